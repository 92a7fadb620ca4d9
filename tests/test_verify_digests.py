"""What `surgeon verify` proves: the sha256 of every tensor surgeon wrote (weights and example)
and of the whole output, recorded in surgeon.json; and a checkpoint kept in the dtype it was
converted in (a bf16 Llama verifies right after conversion; `--dtype float32` loads it in
float32 and verifies within bf16's tolerance)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run
from safetensors.torch import load_file, save_file

import surgeon
from surgeon.checkpoint import CheckpointError
from surgeon.converting import convert
from surgeon.files.digests import tensor_digests
from surgeon.files.weights import Checkpoint
from surgeon.verifying import MATCH, TOLERANCES, check_digests, verify

transformers = pytest.importorskip("transformers")

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"


def tiny_llama(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(TINY)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def converted(request, tmp_path_factory) -> tuple[Path, torch.dtype]:
    """A tiny Llama saved in `dtype` with save_pretrained, converted with -p aion."""
    src = tmp_path_factory.mktemp("src")
    tiny_llama(request.param).save_pretrained(src)
    dst = tmp_path_factory.mktemp("dst") / "aion"
    convert(str(src), dst, ["aion"])
    return dst, request.param


@pytest.fixture
def copy(converted, tmp_path) -> Path:
    return Path(shutil.copytree(converted[0], tmp_path / "copy"))


def recipe(path: Path) -> dict:
    return json.loads((path / "surgeon.json").read_text())


def rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def swap_rows(tensors: dict[str, torch.Tensor]) -> None:
    w = tensors["lm_head.weight"]
    w[[0, 1]] = w[[1, 0]].clone()


def flip_one_bit(tensors: dict[str, torch.Tensor]) -> None:
    w = tensors["model.layers.0.mlp.up_proj.weight"]  # (128, 64)
    w.view(torch.uint8)[3, 0] ^= 1  # the lowest bit of one element


# -- dtype ------------------------------------------------------------------------------------


def test_load_keeps_the_checkpoints_dtype(converted):
    dst, dtype = converted
    model = surgeon.load(dst)
    stored = Checkpoint.open(dst)
    state = model.state_dict()
    assert {k: state[k].dtype for k in stored} == {k: stored[k].dtype for k in stored}
    assert model.lm_head.weight.dtype == dtype
    assert recipe(dst)["dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", [torch.float32, "float32", "torch.float16"])
def test_load_casts_to_the_asked_dtype(converted, dtype):
    model = surgeon.load(converted[0], dtype=dtype)
    want = dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype.split(".")[-1])
    assert {p.dtype for p in model.parameters()} == {want}


@pytest.mark.parametrize("bad", ["int8", "complex64", "bogus", "finfo"])
def test_a_dtype_that_is_not_a_float_type_is_refused(converted, bad):
    with pytest.raises(CheckpointError, match="not a floating-point torch dtype"):
        surgeon.load(converted[0], dtype=bad)


def test_a_fresh_conversion_verifies_in_its_dtype(converted):
    dst, dtype = converted
    result = verify(dst)
    assert result.ok, result.failures
    assert result.reload_difference == 0.0 and result.identical is True
    assert result.dtype == str(dtype).removeprefix("torch.")
    assert result.tolerance == TOLERANCES[result.dtype]
    assert result.digests == len(Checkpoint.open(dst))


def test_verify_in_float32_uses_the_looser_tolerance(converted):
    dst, dtype = converted
    result = run("verify", str(dst), "--dtype", "float32", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    if dtype == torch.float32:
        assert data["reload_difference"] == 0.0 and data["tolerance"] == MATCH
    else:  # computed in float32, compared with the bf16 run: close, not identical
        assert data["identical"] is False and data["tolerance"] == TOLERANCES["bfloat16"]
        assert 0 < data["reload_difference"] < 1e-2


def test_verify_cli_refuses_a_bad_dtype(converted):
    result = run("verify", str(converted[0]), "--dtype", "int8")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.startswith("error: dtype 'int8' is not a floating-point torch dtype")


# -- digests ----------------------------------------------------------------------------------


def test_surgeon_json_records_every_tensor_and_the_output(converted):
    dst, _ = converted
    digests = recipe(dst)["digests"]
    assert digests["algorithm"] == "sha256"
    stored = Checkpoint.open(dst)
    assert sorted(digests["weights"]) == sorted(stored)
    assert digests["weights"] == tensor_digests(stored)
    row = digests["weights"]["lm_head.weight"]
    assert row["shape"] == [512, 64] and len(row["sha256"]) == 64
    assert len(recipe(dst)["check"]["sha256"]) == 64


# What is done to DST's weights, and the tensor the failure must name.
TAMPER = [
    pytest.param(swap_rows, "lm_head.weight", id="swapped-rows"),
    pytest.param(flip_one_bit, "model.layers.0.mlp.up_proj.weight", id="one-bit"),
]


@pytest.mark.parametrize("edit, key", TAMPER)
def test_a_changed_byte_fails_verify_naming_the_tensor(copy, edit, key):
    rewrite(copy, edit)
    result = run("verify", str(copy))
    assert result.exit_code == 1
    assert "Traceback" not in result.stderr
    assert result.stderr == (f"error: {copy} failed verification: tensor {key} in "
                             "model.safetensors differs from what surgeon wrote (its sha256, "
                             "dtype or shape changed)\n")
    assert verify(copy).failures[0].startswith(f"tensor {key} in model.safetensors differs")


def test_a_changed_example_fails_verify(tmp_path):
    """A factory model's example is a tensor file surgeon wrote: it is digested too."""
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    example = (torch.randn(2, 8),)
    surgeon.apply(model, ["adyt"], example)
    surgeon.save(model, tmp_path / "m", base="torch.nn:Identity")
    digests = recipe(tmp_path / "m")["digests"]
    assert sorted(digests["example"]) == ["0"]
    tensors = load_file(str(tmp_path / "m" / "example.safetensors"))
    tensors["0"][0, 0] += 1
    save_file(tensors, str(tmp_path / "m" / "example.safetensors"))
    failures, checked = check_digests(tmp_path / "m", digests)
    assert checked == len(digests["weights"]) + 1
    assert failures == ["tensor 0 in example.safetensors differs from what surgeon wrote (its "
                        "sha256, dtype or shape changed)"]


def test_a_checkpoint_without_digests_still_verifies(copy):
    """Format-1 checkpoints (no digests, no dtype): verify checks what they hold."""
    data = recipe(copy)
    assert data["format"] == 2
    del data["digests"], data["check"]["sha256"], data["dtype"]
    data["format"] = 1
    (copy / "surgeon.json").write_text(json.dumps(data))
    result = verify(copy)
    assert result.ok and result.digests is None and result.identical is None
    assert result.reload_difference == 0.0 and result.dtype is None


def test_a_format_2_checkpoint_without_digests_fails(copy):
    data = recipe(copy)
    del data["digests"]
    (copy / "surgeon.json").write_text(json.dumps(data))
    result = run("verify", str(copy))
    assert result.exit_code == 1
    assert "tensors: no digests recorded (an older checkpoint), bytes not checked" in (
        result.stdout.splitlines())
    assert result.stderr == (f"error: {copy} failed verification: surgeon.json records no "
                             "digests, which every checkpoint of its format has: it was edited; "
                             "convert the model again\n")
