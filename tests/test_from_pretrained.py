"""transformers' own loading of a converted checkpoint: `AutoModelForCausalLM.from_pretrained(DST,
trust_remote_code=True)` returns exactly `surgeon.load(DST)` (through the auto_map and the
surgeon_model.py surgeon writes); without trust_remote_code transformers refuses DST instead of
building the unconverted model; surgeon itself reads DST's config without importing anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.checkpoint import CheckpointError
from surgeon.converting import convert
from surgeon.files.remote_code import MODULE, read_base_config

transformers = pytest.importorskip("transformers")

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])


@pytest.fixture(autouse=True)
def offline_modules(remote_code_cache, monkeypatch):
    """Nothing downloads; transformers copies remote code into a cache of the test's own."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(TINY)
    transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dst(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "llama"
    convert(str(src), out, ["aion", "adyt"])  # adyt moves the output: unconverted ≠ converted
    return out


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_the_config_names_surgeons_classes(dst):
    data = json.loads((dst / "config.json").read_text())
    assert data["model_type"] == "surgeon_llama"
    assert data["architectures"] == ["SurgeonLlamaForCausalLM"]
    assert data["auto_map"] == {"AutoConfig": "surgeon_model.SurgeonLlamaConfig",
                                "AutoModelForCausalLM": "surgeon_model.SurgeonLlamaForCausalLM"}
    assert data["surgeon"] == {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert (dst / MODULE).is_file()


@pytest.mark.parametrize("dtype", [None, torch.float32, "auto"])
def test_trust_remote_code_loads_exactly_what_surgeon_loads(src, dst, dtype):
    extra = {} if dtype is None else {"dtype": dtype}
    model = transformers.AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True,
                                                              **extra)
    reference = surgeon.load(dst)
    assert type(model) is type(reference) is transformers.LlamaForCausalLM
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 reference.state_dict().values()))
    assert torch.equal(logits(model), logits(reference))
    base = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    assert not torch.allclose(logits(model), logits(base), atol=1e-3)  # it is the converted one


@pytest.mark.parametrize("auto", ["AutoModelForCausalLM", "AutoConfig", "AutoModel"])
def test_without_trust_remote_code_transformers_refuses(dst, auto):
    with pytest.raises(ValueError, match="trust_remote_code=True|Unrecognized configuration"):
        getattr(transformers, auto).from_pretrained(dst, trust_remote_code=False)


def test_the_auto_class_it_does_not_map_refuses_too(dst):
    with pytest.raises(ValueError, match="Unrecognized configuration class"):
        transformers.AutoModel.from_pretrained(dst, trust_remote_code=True)


@pytest.mark.parametrize("kwargs, match", [
    ({"device_map": "auto"}, "loads it on one device"),
    ({"device_map": {"": "cpu"}}, "loads it on one device"),
    ({"low_cpu_mem_usage": True, "output_loading_info": True}, "without low_cpu_mem_usage, "
                                                               "output_loading_info"),
])
def test_options_surgeon_cannot_honour_are_refused(dst, kwargs, match):
    with pytest.raises(CheckpointError, match=match):
        transformers.AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True, **kwargs)


def test_surgeon_reads_the_base_config_without_importing_the_directory(dst, tmp_path):
    """surgeon.load and verify never import DST's module: it may be anyone's code."""
    import shutil

    copy = Path(shutil.copytree(dst, tmp_path / "copy"))
    (copy / MODULE).write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\n"
                               "raise SystemExit('imported')\n")
    config = read_base_config(copy)
    assert type(config) is transformers.LlamaConfig and config.model_type == "llama"
    assert not hasattr(config, "auto_map") and not hasattr(config, "surgeon")
    assert config.architectures == ["LlamaForCausalLM"]
    assert torch.equal(logits(surgeon.load(copy)), logits(surgeon.load(dst)))
    assert not (tmp_path / "ran").exists()


def test_surgeon_save_marks_the_config_too(tmp_path):
    config = transformers.AutoConfig.from_pretrained(TINY)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    surgeon.apply(model, ["adyt"])
    surgeon.save(model, tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == (
        "surgeon_llama")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved",
                                                               trust_remote_code=True)
    assert torch.equal(logits(loaded), logits(model))
    resaved = surgeon.save(surgeon.load(tmp_path / "saved"), tmp_path / "again")
    assert json.loads((resaved / "config.json").read_text())["surgeon"]["model_type"] == "llama"


def test_a_factory_checkpoint_gets_no_remote_code(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    surgeon.apply(model, ["adyt"], (torch.randn(2, 8),))
    surgeon.save(model, tmp_path / "m", base="torch.nn:Identity")
    assert sorted(os.listdir(tmp_path / "m")) == ["example.safetensors", "model.safetensors",
                                                  "surgeon.json"]


def test_surgeon_commands_on_dst_never_ask_to_run_its_code(dst, monkeypatch):
    """DST's auto_map is for transformers' users: surgeon's own readers ignore it (no prompt)."""
    from cli_runner import run

    def asked(*_):
        raise AssertionError("transformers asked on stdin whether to run DST's code")

    monkeypatch.setattr("builtins.input", asked)
    result = run("inspect", str(dst), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == "LlamaForCausalLM"


def test_a_hub_id_in_the_cache_loads_converted(dst, tmp_path):
    """A converted checkpoint pushed to the hub: transformers fetches config and module, surgeon
    the snapshot (here from a cache laid out as huggingface_hub writes it, offline)."""
    import shutil

    commit = "0" * 40
    repo = tmp_path / "cache" / "models--someone--tiny-surgeon"
    shutil.copytree(dst, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        "someone/tiny-surgeon", trust_remote_code=True, cache_dir=str(tmp_path / "cache"))
    assert torch.equal(logits(model), logits(surgeon.load(dst)))
