"""AION's aion-torch records (`step_count`, `alpha_cached`) in surgeon checkpoints: written and
read back like any buffer, and a checkpoint written before AionResidual carried them (no such
tensors, a manifest without them) still loads strictly and verifies, the records rebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_apply import output_sum
from test_save_load import converted
from zoo import ZOO

import surgeon
from surgeon.checkpoint import CheckpointError
from surgeon.nn import AionResidual

CASE = next(c for c in ZOO if c.name == "hf_gpt2")
RECORDS = ("step_count", "alpha_cached")


def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model, _ = converted(CASE, ("aion",))
    model.train()
    output_sum(model, CASE.example())  # one training forward: the records move
    model.eval()
    return model, surgeon.save(model, tmp_path / "converted")


def as_older_surgeon_wrote_it(out: Path, drop: tuple[str, ...] = RECORDS) -> None:
    tensors = load_file(str(out / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.endswith(drop)},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    recipe = json.loads((out / "surgeon.json").read_text())
    params = recipe["manifest"]["parameters"]
    recipe["manifest"]["parameters"] = [k for k in params if not k.endswith(drop)]
    recipe["format"] = 1  # as surgeon wrote it then: no digests, no transformers marks
    recipe.pop("digests", None)
    (out / "surgeon.json").write_text(json.dumps(recipe))


def test_records_are_saved_and_loaded(tmp_path: Path) -> None:
    model, out = saved(tmp_path)
    tensors = load_file(str(out / "model.safetensors"))
    aions = {n: m for n, m in model.named_modules() if isinstance(m, AionResidual)}
    assert len(aions) == 4
    for name, module in aions.items():
        assert tensors[f"{name}.step_count"].dtype == torch.int32
        assert tensors[f"{name}.step_count"].item() == 1
        assert torch.equal(tensors[f"{name}.alpha_cached"], module.alpha_cached)
    loaded = surgeon.load(out)
    for name, module in aions.items():
        assert loaded.get_submodule(name).step_count.item() == 1


def test_a_checkpoint_without_the_records_loads_strictly(tmp_path: Path) -> None:
    model, out = saved(tmp_path)
    as_older_surgeon_wrote_it(out)
    loaded = surgeon.load(out)
    with torch.no_grad():
        assert torch.equal(output_sum(loaded, CASE.example()), output_sum(model, CASE.example()))
    for name, module in loaded.named_modules():
        if isinstance(module, AionResidual):
            assert module.step_count.item() == 0, name
            assert torch.equal(module.alpha_cached, module.alpha().detach().reshape(1)), name


def test_verify_passes_on_a_checkpoint_without_the_records(tmp_path: Path) -> None:
    model = surgeon.apply(CASE.build().eval(), ["aion"], CASE.example())
    out = surgeon.save(model, tmp_path / "converted")
    as_older_surgeon_wrote_it(out)
    result = surgeon.verify(out)
    assert result.ok, result.failures


def test_one_record_missing_keeps_the_other(tmp_path: Path) -> None:
    _, out = saved(tmp_path)
    as_older_surgeon_wrote_it(out, drop=("alpha_cached",))
    loaded = surgeon.load(out)
    assert all(m.step_count.item() == 1 for m in loaded.modules() if isinstance(m, AionResidual))


def test_a_missing_parameter_is_still_refused(tmp_path: Path) -> None:
    _, out = saved(tmp_path)
    as_older_surgeon_wrote_it(out, drop=RECORDS + ("aion_0.beta",))
    with pytest.raises(CheckpointError, match="transformer.h.0.aion_0.beta"):
        surgeon.load(out)
