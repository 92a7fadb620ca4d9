"""surgeon.save / surgeon.load: every zoo model converted with AION + ADyT reloads strictly with
bit-identical outputs, also after a training step; tied weights are stored once; a tampered
manifest fails clearly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_apply import output_sum
from zoo import ZOO, ZooCase

import surgeon
from surgeon.checkpoint import CheckpointError


def converted(case: ZooCase, passes: tuple[str, ...] = ("aion", "adyt")
              ) -> tuple[torch.nn.Module, tuple | dict]:
    model, example = case.build().eval(), case.example()
    with warnings.catch_warnings():  # a pass with nothing to rewrite (adyt on a ResNet) warns
        warnings.simplefilter("ignore", surgeon.NoEffectWarning)
        surgeon.apply(model, list(passes), example)
    with torch.no_grad():  # move the new parameters off their initial values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    return model, example


def base_of(case: ZooCase, model: torch.nn.Module) -> str | None:
    return None if hasattr(model, "save_pretrained") else f"zoo:{case.build.__name__}"


COMBOS = [("aion", "adyt"), ("aion", "hyper", "adyt"), ("hyper:mhc=true",)]
SLOW = {"hf_t5", "hf_led", "hf_whisper"}  # the slowest models (encoder-decoders): one row each
ROWS = [pytest.param(case, combo, id=f"{case.name}-{'+'.join(combo)}")
        for case in ZOO for combo in COMBOS
        if combo == COMBOS[0] or case.name not in SLOW]


@pytest.mark.parametrize("case, combo", ROWS)
def test_save_load_round_trip(case: ZooCase, combo: tuple[str, ...], tmp_path: Path) -> None:
    model, example = converted(case, combo)
    out = surgeon.save(model, tmp_path / "converted", base=base_of(case, model))
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "surgeon.json"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    recipe = json.loads((out / "surgeon.json").read_text())
    assert [p["_type"] for p in recipe["passes"]] == [c.split(":")[0] for c in combo]
    assert recipe["manifest"]["modules"] == model._surgeon_manifest

    loaded = surgeon.load(out, trust_remote_code=True)  # a zoo factory base
    assert type(loaded) is type(model) and not loaded.training
    with torch.no_grad():
        assert torch.equal(output_sum(loaded, example), output_sum(model, example))
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name", ["hf_levit", "hf_bert"])
def test_reload_after_a_training_step_gives_the_same_outputs(name: str, tmp_path: Path) -> None:
    """The support matrix's save_load cell: train (here: weights moved well off their initial
    values, in train mode), then save and load. `surgeon.load` replays the passes (running the
    example) before it loads the weights, so a cache that an eval-mode forward fills from the
    weights (LeViT's attention biases) must not outlive the runs made while tracing."""
    case = next(c for c in ZOO if c.name == name)
    model, example = converted(case)
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    loaded = surgeon.load(surgeon.save(model, tmp_path / "converted"))
    with torch.no_grad():
        assert torch.equal(output_sum(loaded, example), output_sum(model, example))


def test_a_conversion_leaves_no_cache_behind() -> None:
    """Runs made while tracing write nothing into the modules' plain attributes: LeViT's
    attention bias caches are as empty after the conversion as before it (no entry keyed by
    a Proxy's name either)."""
    model, _ = converted(next(c for c in ZOO if c.name == "hf_levit"))
    caches = [m.attention_bias_cache for m in model.modules() if hasattr(m, "attention_bias_cache")]
    assert caches and all(c == {} for c in caches)


def test_tied_weights_are_stored_once(tmp_path: Path) -> None:
    case = next(c for c in ZOO if c.name == "hf_gpt2")
    model, _ = converted(case)
    surgeon.save(model, tmp_path / "gpt2")
    with safe_open(str(tmp_path / "gpt2" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != ("transformer.wte.weight" in keys)
    loaded = surgeon.load(tmp_path / "gpt2")
    assert loaded.lm_head.weight is loaded.transformer.wte.weight


def test_tampered_manifest_fails_clearly(tmp_path: Path) -> None:
    case = next(c for c in ZOO if c.name == "hf_llama")
    model, _ = converted(case)
    out = surgeon.save(model, tmp_path / "llama")
    recipe = json.loads((out / "surgeon.json").read_text())
    recipe["manifest"]["modules"] = recipe["manifest"]["modules"][1:]
    (out / "surgeon.json").write_text(json.dumps(recipe))
    with pytest.raises(CheckpointError, match="manifest"):
        surgeon.load(out)


def test_save_and_load_errors(tmp_path: Path) -> None:
    case = next(c for c in ZOO if c.name == "nanogpt")
    with pytest.raises(CheckpointError, match="not converted with surgeon.apply"):
        surgeon.save(case.build(), tmp_path / "plain")
    model, _ = converted(case)
    with pytest.raises(CheckpointError, match="base='package.module:factory'"):
        surgeon.save(model, tmp_path / "nobase")
    assert not (tmp_path / "nobase").exists()
    with pytest.raises(CheckpointError, match="has no surgeon.json"):
        surgeon.load(tmp_path)
