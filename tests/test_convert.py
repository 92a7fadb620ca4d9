"""surgeon.convert and `surgeon convert`: HF directories (single and sharded, GPT-2 with a tied
lm_head, Llama, BERT) and factory models converted with the weights streamed from disk reload
with outputs identical to `surgeon.apply` on the model in memory; unchanged tensors are copied
byte for byte; repeated conversions give identical files; every bad input is one `error:` line
that leaves nothing behind; a killed convert leaves no half-written destination; hub ids resolve
from an offline cache; --push-to-hub, --json and --quiet."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from cli_runner import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from zoo import hf_bert, hf_gpt2, hf_llama, hf_mamba, tokens

import surgeon
from surgeon.converting import Conversion, convert
from surgeon.errors import SurgeonError
from surgeon.nn import ADyT
from surgeon.verifying import verify

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"
PASSES = ("aion", "hyper:streams=4", "adyt")
PRESERVING = {"aion": 1e-5, "hyper": 1e-5}  # passes that promise the output, and their bound
COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


@dataclass(frozen=True)
class Model:
    """A tiny transformers model: how to build it, its output's shape on `INPUTS`, and the
    parameters it ties (each pair must be stored once and tied again after a reload)."""

    build: Callable[[], nn.Module]
    shape: tuple[int, ...]
    tied: tuple[tuple[str, str], ...] = ()


MODELS = {
    "gpt2": Model(hf_gpt2, (2, 8, 128), (("transformer.wte.weight", "lm_head.weight"),)),
    "llama": Model(hf_llama, (2, 8, 128)),
    "bert": Model(hf_bert, (2, 8, 32)),
    # tied embeddings, and a mixer that uses views and casts of its parameters (`A_log.float()`):
    # nothing may hold a streamed parameter after its module ran
    "mamba": Model(hf_mamba, (2, 8, 128), (("backbone.embeddings.weight", "lm_head.weight"),)),
}
INPUTS = {"input_ids": tokens(128, batch=2, seq=8)}


def pass_args(passes: tuple[str, ...]) -> list[str]:
    return [arg for p in passes for arg in ("-p", p)]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`source(name, sharded=False)`: the model saved with save_pretrained, once per module;
    sharded sources get several files and an index."""
    made: dict[tuple[str, bool], Path] = {}

    def get(name: str, sharded: bool = False) -> Path:
        if (name, sharded) not in made:
            path = tmp_path_factory.mktemp(f"{name}-{'sharded' if sharded else 'single'}")
            torch.manual_seed(0)
            model = MODELS[name].build().eval()
            model.save_pretrained(path, **({"max_shard_size": "20KB"} if sharded else {}))
            assert (path / INDEX).is_file() == sharded
            assert (path / "model.safetensors").is_file() != sharded
            made[name, sharded] = path
        return made[name, sharded]

    return get


def tensors_in(directory: Path) -> dict[str, torch.Tensor]:
    """Every weight tensor of a checkpoint directory, read with safetensors (no key twice)."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} stored twice"
                out[key] = f.get_tensor(key)
    return out


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def matched_gains(dst: Path) -> set[str]:
    """The keys of the norm gains adyt's training recipe rescaled (recipe=dyt): those of the
    source the conversion changes on purpose."""
    model = surgeon.load(dst, trust_remote_code=True)  # the tests' own factory files
    adyt = [c for c in surgeon.applying.applied_passes(model)
            if c["_type"] == "adyt" and c["_data"]["recipe"] == "dyt"]
    gains = [m.weight for m in model.modules() if isinstance(m, ADyT)] if adyt else []
    return {name for name, p in model.named_parameters(remove_duplicate=False)
            if any(p is g for g in gains)}


def check_copied(stored: dict[str, torch.Tensor], original: dict[str, torch.Tensor],
                 dst: Path) -> None:
    """Every source tensor is in DST: byte for byte, or rescaled where the recipe matched it."""
    changed = matched_gains(dst)
    for key, value in original.items():
        assert same_bytes(stored[key], value) is (key not in changed), key


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def copied_bytes(source: dict[str, torch.Tensor], recipe: dict) -> int:
    """The bytes convert copies from the source files: every source tensor except those of the
    modules the passes replaced (ADyT holds the norm weights anew, written from memory)."""
    replaced = tuple(f"{m}." for m in recipe["manifest"]["modules"])
    return sum(v.nbytes for k, v in source.items() if not k.startswith(replaced))


def output(model: nn.Module, inputs: dict | tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if isinstance(out, torch.Tensor) else out[0]


def in_memory(src: Path, passes: tuple[str, ...]) -> nn.Module:
    """What convert must match: the model loaded by transformers, converted by surgeon.apply."""
    architecture = json.loads((src / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, architecture).from_pretrained(src).eval()
    torch.manual_seed(0)
    return surgeon.apply(model, list(passes))


def same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert [key for key in sa if not torch.equal(sa[key], sb[key])] == []


def check_passes(result: Conversion, passes: tuple[str, ...]) -> None:
    assert [p["name"] for p in result.passes] == [p.split(":")[0] for p in passes]
    for row in result.passes:
        assert row["modules"] > 0
        if row["name"] in PRESERVING:
            assert row["promise"] == PRESERVING[row["name"]]
            assert row["step"] == 0.0 and row["max_abs"] == 0.0
        else:
            assert row["promise"] is None and row["step"] > 0


def check_layout(dst: Path, result: Conversion, sharded: bool) -> None:
    names = sorted(os.listdir(dst))
    assert result.files == names
    assert {"README.md", "surgeon.json", "config.json"} <= set(names)
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    assert os.listdir(dst.parent) == [dst.name]  # no temporary sibling left
    shards = [n for n in names if n.startswith("model") and n.endswith(".safetensors")]
    if not sharded:
        assert shards == ["model.safetensors"] and INDEX not in names
        return
    assert INDEX in names and len(shards) >= 2
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                      for i in range(1, len(shards) + 1)]
    weight_map = json.loads((dst / INDEX).read_text())["weight_map"]
    for shard in shards:
        with safe_open(str(dst / shard), "pt") as f:
            assert sorted(k for k, v in weight_map.items() if v == shard) == sorted(f.keys())


# -- round trips ------------------------------------------------------------------------------

# model, source sharded, DST max_shard_size (None: one file), passes
ROUND_TRIPS = [
    pytest.param("gpt2", False, None, PASSES, id="gpt2"),
    pytest.param("llama", True, None, PASSES, id="llama-sharded-src"),
    pytest.param("bert", False, "40KB", PASSES, id="bert-sharded-dst"),
    pytest.param("gpt2", True, "30KB", ("aion", "adyt"), id="gpt2-sharded-src-and-dst"),
    pytest.param("bert", True, None, ("hyper:streams=2", "adyt"), id="bert-sharded-src"),
    pytest.param("mamba", False, None, PASSES, id="mamba"),
]


@pytest.mark.parametrize("name, sharded_src, dst_shard, passes", ROUND_TRIPS)
def test_convert_verify_load_round_trip(source, tmp_path, name, sharded_src, dst_shard, passes):
    case, src = MODELS[name], source(name, sharded_src)
    dst = tmp_path / "converted"
    result = convert(str(src), dst, list(passes),
                     **({"max_shard_size": dst_shard} if dst_shard else {}))
    assert result.streamed is True
    assert result.source == str(src) and result.destination == str(dst)
    check_passes(result, passes)
    check_layout(dst, result, sharded=dst_shard is not None)

    # Unchanged tensors are the source's bytes; tied weights are stored once.
    before, after = tensors_in(src), tensors_in(dst)
    assert set(before) <= set(after)
    check_copied(after, before, dst)
    for a, b in case.tied:
        assert (a in after) != (b in after)
    recipe = json.loads((dst / "surgeon.json").read_text())
    assert result.tensors == len(after)
    assert result.copied_bytes == copied_bytes(before, recipe)
    assert result.written_bytes == sum(v.nbytes for v in after.values()) - result.copied_bytes
    assert recipe["source"] == {"name": src.name, "revision": None}  # no local path
    assert [p["_type"] for p in recipe["passes"]] == [p["name"] for p in result.passes]
    card = (dst / "README.md").read_text()
    assert f"Converted from `{src.name}`" in card
    assert f"{result.new_parameters:,} parameters" in card

    checked = verify(dst)
    assert checked.ok and checked.failures == [] and checked.reload_difference == 0.0

    loaded = surgeon.load(dst)
    reference = in_memory(src, passes)
    assert type(loaded) is type(reference) and not loaded.training
    assert result.new_parameters == sum(p.numel() for n, p in loaded.named_parameters()
                                        if n not in before) > 0
    for a, b in case.tied:
        assert loaded.get_parameter(a) is loaded.get_parameter(b)
    got = output(loaded, INPUTS)
    assert got.shape == case.shape
    assert torch.equal(got, output(reference, INPUTS))
    same_state(loaded, reference)


def test_cli_convert_prints_the_summary_and_repeats_byte_for_byte(source, tmp_path):
    """The CLI and the Python API give the same bytes in every file (a repeat conversion)."""
    src = source("llama", True)
    dst = tmp_path / "cli"
    result = run("convert", str(src), str(dst), *pass_args(PASSES), "--max-shard-size", "40KB")
    assert result.exit_code == 0, result.output
    again = convert(str(src), tmp_path / "api", list(PASSES), max_shard_size="40KB")
    assert files_of(dst) == files_of(tmp_path / "api")
    assert sorted(os.listdir(tmp_path)) == ["api", "cli"]
    assert INDEX in again.files

    lines = result.stdout.splitlines()
    assert lines[0] == f"converted LlamaForCausalLM from {src} (weights streamed from disk)"
    table = lines[lines.index("Passes (3)") + 1:lines.index("Passes (3)") + 5]
    assert table[0].split() == ["pass", "modules", "drift", "promise", "max", "|Δ|"]
    assert table[1].split() == ["aion", "4", "0", "1e-05", "0"]
    assert table[2].split() == ["hyper", "4", "0", "1e-05", "0"]
    # adyt: 5 norms (the recipe's trunk scale is opt-in)
    assert table[3].split()[:2] == ["adyt", "5"] and table[3].split()[3] == "-"
    assert f"new parameters: {again.new_parameters:,}" in lines
    assert any(line.startswith(f"tensors: {again.tensors} (") for line in lines)
    wrote = next(line for line in lines if line.startswith(f"wrote {dst} in "))
    assert wrote.endswith(": " + ", ".join(again.files))

    reference = in_memory(src, PASSES)
    assert torch.equal(output(surgeon.load(dst), INPUTS), output(reference, INPUTS))


def test_json_summary(source, tmp_path):
    src = source("gpt2")
    result = run("convert", str(src), str(tmp_path / "out"), "-p", "aion", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [p["name"] for p in data["passes"]] == ["aion"]
    assert data["passes"][0]["modules"] == 4 and data["passes"][0]["step"] == 0.0
    assert data["new_parameters"] == 4 * 2  # alpha0 and beta of each of the 4 residual adds
    assert data["copied_bytes"] == sum(v.nbytes for v in tensors_in(src).values())
    assert data["streamed"] is True and data["pushed_to"] is None
    assert data["files"] == sorted(os.listdir(tmp_path / "out"))
    assert data["model"] == "GPT2LMHeadModel" and data["source"] == str(src)


# -- factory models ---------------------------------------------------------------------------

FACTORY = "surgeon_test_convert_factory"
FACTORY_CODE = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.mix = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyPreNorm(nn.Module):
    def __init__(self, d=32, depth=2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, 4)

    def forward(self, x):
        return self.head(self.norm(self.blocks(self.embed(x))))


def make():
    torch.manual_seed(0)
    return TinyPreNorm()


def example():
    return (torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)),)
'''
FACTORY_PASSES = ("aion", "hyper:streams=2", "adyt")


@pytest.fixture(scope="module")
def factory(tmp_path_factory: pytest.TempPathFactory):
    """The factory module, importable; yields the imported module."""
    path = tmp_path_factory.mktemp("factory")
    (path / f"{FACTORY}.py").write_text(textwrap.dedent(FACTORY_CODE))
    sys.path.insert(0, str(path))
    importlib.invalidate_caches()
    yield importlib.import_module(FACTORY)
    sys.path.remove(str(path))
    sys.modules.pop(FACTORY, None)


@pytest.mark.parametrize("with_weights", [True, False], ids=["weights-file", "in-memory"])
def test_factory_model(factory, tmp_path, with_weights):
    reference = factory.make().eval()
    weights = None
    if with_weights:  # other values than make() draws, so they must come from the file
        torch.manual_seed(1)
        donor = factory.TinyPreNorm()
        weights = tmp_path / "weights.safetensors"
        save_file(donor.state_dict(), str(weights))
        reference.load_state_dict(donor.state_dict())
    dst = tmp_path / "out"
    result = convert(f"{FACTORY}:make", dst, list(FACTORY_PASSES),
                     weights=None if weights is None else str(weights),
                     example=f"{FACTORY}:example")
    assert result.streamed is with_weights
    assert result.model == "TinyPreNorm"
    check_passes(result, FACTORY_PASSES)
    assert result.files == sorted(os.listdir(dst)) == [
        "README.md", "example.safetensors", "model.safetensors", "surgeon.json"]
    recipe = json.loads((dst / "surgeon.json").read_text())
    assert recipe["base"] == {"kind": "factory", "factory": f"{FACTORY}:make"}
    stored = tensors_in(dst)
    original = load_file(str(weights)) if weights else reference.state_dict()
    assert set(original) < set(stored)
    check_copied(stored, original, dst)
    assert result.copied_bytes == (copied_bytes(original, recipe) if weights else 0)
    assert 0 < copied_bytes(original, recipe) < sum(v.nbytes for v in original.values())

    torch.manual_seed(0)
    surgeon.apply(reference, list(FACTORY_PASSES), factory.example())
    loaded = surgeon.load(dst, trust_remote_code=True)  # its base is the factory
    same_state(loaded, reference)
    got = output(loaded, factory.example())
    assert got.shape == (2, 5, 4)
    assert torch.equal(got, output(reference, factory.example()))


# -- bad inputs -------------------------------------------------------------------------------


def _copy(src: Path, to: Path) -> Path:
    shutil.copytree(src, to)
    return to


def _edit_config(src: Path, to: Path, **changes: object) -> Path:
    path = _copy(src, to)
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))
    return path


def bad_truncated(source, factory, tmp):
    f = _copy(source("llama"), tmp / "m") / "model.safetensors"
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[:-100])
    return [str(f.parent)], [f"{f} is truncated ({size - 100} bytes, the header needs {size})"]


def bad_header(source, factory, tmp):
    f = _copy(source("llama"), tmp / "m") / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"{{{{!!!!"
    f.write_bytes(bytes(data))
    return [str(f.parent)], [f"{f} has a corrupt safetensors header"]


def bad_missing_shard(source, factory, tmp):
    path = _copy(source("llama", sharded=True), tmp / "m")
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    return [str(path)], [f"{shard} is listed in {INDEX} but missing"]


def bad_hidden_size(source, factory, tmp):
    path = _edit_config(source("llama"), tmp / "m", hidden_size=48)
    return [str(path)], [str(path / "model.safetensors"), "has shape [128, 32]",
                         "wants [128, 48]", "the config does not match the weights"]


def bad_fewer_layers(source, factory, tmp):
    path = _edit_config(source("llama"), tmp / "m", num_hidden_layers=1)
    return [str(path)], [str(path / "model.safetensors"), "'model.layers.1.",
                         "the config does not match the weights"]


def bad_more_layers(source, factory, tmp):
    path = _edit_config(source("llama", sharded=True), tmp / "m", num_hidden_layers=3)
    return [str(path)], [str(path), "do not match config.json", "missing keys",
                         "'model.layers.2."]


def bad_unknown_pass(source, factory, tmp):
    return [str(source("gpt2")), "-p", "nosuch"], [
        "unknown pass 'nosuch'; known passes: adyt, aion, hyper"]


def bad_option_value(source, factory, tmp):
    return [str(source("gpt2")), "-p", "aion", "-p", "hyper:streams=zero"], [
        "pass 'hyper': option 'streams': expected an int, got 'zero'"]


def bad_unknown_option(source, factory, tmp):
    return [str(source("gpt2")), "-p", "hyper:lanes=2"], [
        "pass 'hyper': unknown option 'lanes'"]


def bad_shard_size(source, factory, tmp):
    return [str(source("gpt2")), "-p", "aion", "--max-shard-size", "lots"], [
        "max shard size 'lots' is not a size such as 5GB or 500MB"]


def bad_pickle_only(source, factory, tmp):
    path = pickle_only(source("llama"), tmp / "m")
    return [str(path)], [f"{path / 'pytorch_model.bin'} is a pickle checkpoint",
                         "--allow-pickle"]


def bad_weights_for_a_dir(source, factory, tmp):
    src = source("gpt2")
    return [str(src), "--weights", str(src / "model.safetensors")], [
        f"--weights applies to a 'package.module:factory' source, not {src}"]


def bad_factory_without_example(source, factory, tmp):
    return [f"{FACTORY}:make"], ["no example input for TinyPreNorm: pass --example"]


def bad_factory_weights_missing(source, factory, tmp):
    return [f"{FACTORY}:make", "--weights", str(tmp / "nope.safetensors"),
            "--example", f"{FACTORY}:example"], [f"no such weights file: {tmp}/nope"]


def bad_factory_weights_for_another_model(source, factory, tmp):
    f = tmp / "other.safetensors"
    save_file({"weight": torch.zeros(3, 3)}, str(f))
    return [f"{FACTORY}:make", "--weights", str(f), "--example", f"{FACTORY}:example"], [
        str(f), "the config does not match the weights"]


def pickle_only(src: Path, to: Path) -> Path:
    """A copy of `src` with its weights as pytorch_model.bin only."""
    path = _copy(src, to)
    torch.save(load_file(str(path / "model.safetensors")), path / "pytorch_model.bin")
    (path / "model.safetensors").unlink()
    return path


BAD_INPUTS = {f.__name__[4:]: f for f in [
    bad_truncated, bad_header, bad_missing_shard, bad_hidden_size, bad_fewer_layers,
    bad_more_layers, bad_unknown_pass, bad_option_value, bad_unknown_option, bad_shard_size,
    bad_pickle_only, bad_weights_for_a_dir, bad_factory_without_example,
    bad_factory_weights_missing, bad_factory_weights_for_another_model,
]}


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_leaves_nothing(source, factory, tmp_path, case):
    args, expected = BAD_INPUTS[case](source, factory, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    if not any(a.startswith("-p") for a in args):
        args += ["-p", "aion"]
    before = sorted(os.listdir(tmp_path))
    line = one_error_line(run("convert", args[0], str(out / "dst"), *args[1:]))
    for fragment in expected:
        assert fragment in line
    assert os.listdir(out) == []
    assert sorted(os.listdir(tmp_path)) == before


def test_destination_inside_the_source_is_refused(source, tmp_path):
    src = _copy(source("gpt2"), tmp_path / "m")
    before = files_of(src)
    line = one_error_line(run("convert", str(src), str(src / "converted"), "-p", "aion"))
    assert line == (f"error: {src / 'converted'} is inside the source {src.resolve()}; write the "
                    "converted checkpoint elsewhere")
    assert files_of(src) == before


def test_python_api_errors_are_surgeon_errors_before_writing(source, tmp_path):
    with pytest.raises(SurgeonError, match="give at least one pass"):
        convert(str(source("gpt2")), tmp_path / "out", [])
    with pytest.raises(SurgeonError, match="unknown pass 'nosuch'"):
        convert(str(source("gpt2")), tmp_path / "out", ["nosuch"])
    assert os.listdir(tmp_path) == []


def test_existing_destination(source, tmp_path):
    src = source("gpt2")
    dst = tmp_path / "dst"
    first = convert(str(src), dst, ["aion", "adyt"], max_shard_size="30KB")
    assert INDEX in first.files
    before = files_of(dst)

    line = one_error_line(run("convert", str(src), str(dst), "-p", "aion"))
    assert line == f"error: {dst} already exists; pass --overwrite (overwrite=True) to replace it"
    assert files_of(dst) == before

    result = run("convert", str(src), str(dst), "-p", "aion", "--overwrite", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert os.listdir(tmp_path) == ["dst"]
    assert sorted(os.listdir(dst)) == ["README.md", "config.json", "generation_config.json",
                                       "model.safetensors", "surgeon.json", "surgeon_model.py"]
    recipe = json.loads((dst / "surgeon.json").read_text())
    assert [p["_type"] for p in recipe["passes"]] == ["aion"]
    assert [d.pass_name for d in surgeon.load(dst).surgeon_drift] == ["aion"]

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    line = one_error_line(run("convert", str(src), str(foreign), "-p", "aion", "--overwrite"))
    assert line.startswith(f"error: {foreign} exists and was not written by surgeon")
    assert files_of(foreign) == {"notes.txt": b"mine"}


def test_pickle_source_with_allow_pickle(source, tmp_path):
    src = source("llama")
    path = pickle_only(src, tmp_path / "m")
    dst = tmp_path / "out"
    result = convert(str(path), dst, ["aion", "adyt"], allow_pickle=True)
    assert result.streamed is False and result.copied_bytes == 0
    assert result.files == sorted(os.listdir(dst)) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "surgeon.json", "surgeon_model.py"]
    stored, original = tensors_in(dst), tensors_in(src)
    check_copied(stored, original, dst)
    reference = in_memory(src, ("aion", "adyt"))
    assert torch.equal(output(surgeon.load(dst), INPUTS), output(reference, INPUTS))


# -- a convert killed while writing -----------------------------------------------------------


@pytest.fixture(scope="module")
def big_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Llama with a 32000-token vocabulary: two 8 MB matrices take a moment to write."""
    path = tmp_path_factory.mktemp("big-llama")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=32000,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _temporaries(parent: Path, name: str) -> list[str]:
    return [n for n in os.listdir(parent) if n.startswith(f".{name}.surgeon-tmp-")]


# When to kill: the temporary directory appeared; it holds a weights file being written; the
# weights are done (the index is written) and the other files are being added.
KILL_WHEN = {
    "tmp-created": lambda inside: True,
    "writing-weights": lambda inside: any(n.endswith(".safetensors") for n in inside),
    "weights-done": lambda inside: INDEX in inside,
}


def test_killed_convert_leaves_no_destination(big_source, tmp_path):
    """Run `python -m surgeon convert` side by side, SIGKILL each at its moment; DST is absent
    (or complete, where the convert won the race), and the next convert sweeps the leftovers."""
    procs = {}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    for when in KILL_WHEN:
        parent = tmp_path / when
        parent.mkdir()
        procs[when] = subprocess.Popen(
            [sys.executable, "-m", "surgeon", "convert", str(big_source), str(parent / "dst"),
             "-p", "aion", "--max-shard-size", "1MB", "--quiet"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed: dict[str, list[str]] = {}
    deadline = time.monotonic() + 240
    try:
        while any(p.poll() is None for w, p in procs.items() if w not in killed):
            assert time.monotonic() < deadline, "convert did not finish"
            for when, proc in procs.items():
                if when in killed or proc.poll() is not None:
                    continue
                parent = tmp_path / when
                for tmp in _temporaries(parent, "dst"):
                    try:
                        inside = os.listdir(parent / tmp)
                    except FileNotFoundError:  # renamed into place meanwhile
                        continue
                    if KILL_WHEN[when](inside):
                        proc.send_signal(signal.SIGKILL)
                        killed[when] = inside
                        break
            time.sleep(0.0005)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()  # reaped: the pid in the temporary directory's name is gone

    interrupted = []
    for when, proc in procs.items():
        parent, dst = tmp_path / when, tmp_path / when / "dst"
        if proc.returncode == -signal.SIGKILL:
            interrupted.append(when)
            assert not dst.exists()
            assert len(_temporaries(parent, "dst")) == 1
        else:  # finished before the kill landed
            assert proc.returncode == 0, proc.stderr.read().decode()
            assert sorted(os.listdir(parent)) == ["dst"]
            assert surgeon.load(dst).model.embed_tokens.num_embeddings == 32000
    assert "writing-weights" in interrupted, "no convert was caught writing its weights"
    assert any(n.startswith("model-") for n in killed["writing-weights"])

    # The next convert to the same destination succeeds and removes the dead writer's leftovers.
    parent = tmp_path / "writing-weights"
    result = convert(str(big_source), parent / "dst", ["aion"], max_shard_size="1MB")
    assert os.listdir(parent) == ["dst"]
    assert result.files == sorted(os.listdir(parent / "dst"))
    assert output(surgeon.load(parent / "dst"), INPUTS).shape == (2, 8, 32000)


# -- hub ids ----------------------------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline hub cache in tmp_path; `add(repo_id, directory)` puts a snapshot in it."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the environment once, at import: patch the constants it consults.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str, files_from: Path) -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / COMMIT
        shutil.copytree(files_from, snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        return snapshot

    add.cache = cache  # type: ignore[attr-defined]
    return add


def test_hub_id_from_offline_cache(offline_hub, source, tmp_path):
    src = source("gpt2", sharded=True)
    snapshot = offline_hub("tiny-org/tiny-gpt2", src)
    dst = tmp_path / "out"
    result = convert("tiny-org/tiny-gpt2", dst, ["aion"])
    assert result.streamed is True and result.source == "tiny-org/tiny-gpt2"
    assert result.copied_bytes == sum(v.nbytes for v in tensors_in(snapshot).values())
    assert {"config.json", "generation_config.json"} <= set(result.files)
    recipe = json.loads((dst / "surgeon.json").read_text())
    assert recipe["source"] == {"name": "tiny-org/tiny-gpt2", "revision": None}
    assert "Converted from `tiny-org/tiny-gpt2`" in (dst / "README.md").read_text()
    reference = in_memory(src, ("aion",))
    assert torch.equal(output(surgeon.load(dst), INPUTS), output(reference, INPUTS))

    line = one_error_line(run("convert", "tiny-org/not-cached", str(tmp_path / "out2"),
                              "-p", "aion"))
    assert line.startswith("error: tiny-org/not-cached is not in the hub cache")
    assert "HF_HUB_OFFLINE" in line and str(offline_hub.cache) in line
    assert not (tmp_path / "out2").exists()


# -- --push-to-hub ----------------------------------------------------------------------------


@pytest.fixture
def fake_hub(monkeypatch):
    """HfApi.create_repo and upload_folder, recorded instead of sent."""
    import huggingface_hub

    calls: list[tuple[str, tuple, dict]] = []
    state = SimpleNamespace(calls=calls, fail=None,
                            url="https://huggingface.co/me/tiny/commit/0123abcd")

    def create_repo(self, *args, **kwargs):
        calls.append(("create_repo", args, kwargs))
        return f"https://huggingface.co/{args[0] if args else kwargs['repo_id']}"

    def upload_folder(self, *args, **kwargs):
        calls.append(("upload_folder", args, kwargs))
        if state.fail is not None:
            raise state.fail
        return SimpleNamespace(commit_url=state.url)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return state


def _hub_error(message: str) -> Exception:
    from huggingface_hub.utils import HfHubHTTPError

    response = SimpleNamespace(headers={}, request=None, status_code=403)
    return HfHubHTTPError(message, response=response)


def test_push_to_hub(fake_hub, source, tmp_path):
    src = source("gpt2")
    dst = tmp_path / "out"
    result = run("convert", str(src), str(dst), "-p", "aion", "--push-to-hub", "me/tiny",
                 "--private")
    assert result.exit_code == 0, result.output
    assert fake_hub.calls == [
        ("create_repo", ("me/tiny",), {"private": True, "exist_ok": True}),
        ("upload_folder", (), {"folder_path": str(dst), "repo_id": "me/tiny",
                               "commit_message": f"surgeon convert {src.name} with aion"}),
    ]
    assert result.stdout.splitlines()[-1] == f"pushed to {fake_hub.url}"


def test_push_to_hub_failure_keeps_the_checkpoint(fake_hub, source, tmp_path):
    src = source("gpt2")
    dst = tmp_path / "out"
    fake_hub.fail = _hub_error("403 Forbidden: you have no write access\nto me/tiny")
    line = one_error_line(run("convert", str(src), str(dst), "-p", "aion", "--push-to-hub",
                              "me/tiny"))
    assert line == ("error: cannot push to hub repo me/tiny: 403 Forbidden: you have no write "
                    f"access to me/tiny; the converted checkpoint is complete in {dst}")
    assert [c[0] for c in fake_hub.calls] == ["create_repo", "upload_folder"]
    assert os.listdir(tmp_path) == ["out"]
    assert verify(dst).ok
