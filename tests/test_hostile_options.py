"""Hostile numbers get one line, before anything is read or allocated: pass options that are
NaN, infinite, out of range or absurdly large; a drift that is not finite; spoiled or huge
transformers configs (`config.json`); an oversized example in a recipe; `grow --count` beyond
what one grow inserts."""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from cli_runner import run
from safetensors.torch import save_file
from zoo import ZOO

import surgeon
from surgeon import converting
from surgeon.applying import drift
from surgeon.errors import SurgeonError
from surgeon.files import budget
from surgeon.recipe import PassConfig, PassError, config_from_json, parse_pass

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-llama"

# pass spec → a fragment of the one-line PassError
BAD_OPTIONS = [
    ("aion:epsilon=nan", "option 'epsilon' = nan is out of range (allowed: finite, (0, 1])"),
    ("aion:epsilon=inf", "option 'epsilon' = inf is out of range"),
    ("aion:epsilon=-inf", "option 'epsilon' = -inf is out of range"),
    ("aion:epsilon=0", "option 'epsilon' = 0.0 is out of range"),
    ("aion:epsilon=1e400", "option 'epsilon' = inf is out of range"),
    ("aion:ema_gamma=nan", "option 'ema_gamma' = nan is out of range (allowed: finite, [0, 1])"),
    ("aion:ema_gamma=1.5", "option 'ema_gamma' = 1.5 is out of range"),
    ("aion:ema_gamma=-0.1", "option 'ema_gamma' = -0.1 is out of range"),
    ("aion:preset=huge", "expected one of aion, deepnorm, preln, rezero"),
    ("adyt:alpha0=nan", "option 'alpha0' = nan is out of range (allowed: finite, (0, 100])"),
    ("adyt:alpha0=-1", "option 'alpha0' = -1.0 is out of range"),
    ("adyt:alpha0=0", "option 'alpha0' = 0.0 is out of range"),
    ("adyt:alpha0=1e9", "option 'alpha0' = 1000000000.0 is out of range"),
    ("adyt:alpha0=inf", "option 'alpha0' = inf is out of range"),
    ("hyper:streams=10000", "option 'streams' = 10000 is out of range (allowed: [1, 16]; "
                            "pass allow_many_streams=true"),
    ("hyper:streams=17", "option 'streams' = 17 is out of range (allowed: [1, 16]"),
    ("hyper:streams=0", "option 'streams' = 0 is out of range (allowed: [1, 1024])"),
    ("hyper:streams=-4", "option 'streams' = -4 is out of range"),
    ("hyper:streams=nan", "option 'streams': expected an int, got 'nan'"),
    ("hyper:streams=1e5", "option 'streams': expected an int, got '1e5'"),
    ("hyper:streams=2000,allow_many_streams=true", "option 'streams' = 2000 is out of range "
                                                   "(allowed: [1, 1024])"),
    ("hyper:streams=23,mhc=true,allow_many_streams=true",
     "option 'streams' = 23 is out of range (allowed: [2, 22] with mhc=true"),
]


@pytest.mark.parametrize("spec, fragment", BAD_OPTIONS)
def test_bad_option_is_one_pass_error(spec: str, fragment: str) -> None:
    with pytest.raises(PassError) as info:
        parse_pass(spec)
    message = str(info.value)
    assert fragment in message and "\n" not in message
    assert message.startswith(f"pass {spec.partition(':')[0]!r}")


@pytest.mark.parametrize("spec, fragment", BAD_OPTIONS[:4] + BAD_OPTIONS[9:11] + BAD_OPTIONS[14:15])
def test_cli_refuses_bad_options_before_reading_the_source(
        spec: str, fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the source was opened")

    monkeypatch.setattr(converting, "open_source", never)
    dst = tmp_path / "dst"
    result = run("convert", str(TINY), str(dst), "-p", "aion", "-p", spec)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: pass ") and fragment in lines[0]
    assert not dst.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("build, fragment", [
    (lambda c: c(epsilon=float("nan")), "option 'epsilon' = nan"),
    (lambda c: c(ema_gamma=float("inf")), "option 'ema_gamma' = inf"),
    (lambda c: c(epsilon="small"), "option 'epsilon' must be a number, got 'small'"),
    (lambda c: c(preserve="yes"), "option 'preserve' must be true or false"),
    (lambda c: c(preset="huge"), "option 'preset' = 'huge' is out of range"),
])
def test_configs_built_in_python_are_checked(build, fragment: str) -> None:  # noqa: ANN001
    with pytest.raises(PassError, match="pass 'aion': ") as info:
        build(type(parse_pass("aion")))
    assert fragment in str(info.value)


def test_recipe_json_with_nan_is_refused() -> None:
    data = parse_pass("adyt").to_json()
    data["_data"]["alpha0"] = float("nan")
    with pytest.raises(PassError, match="option 'alpha0' = nan is out of range"):
        config_from_json(json.loads(json.dumps(data)))
    data["_data"]["alpha0"] = True  # a bool is not a number
    with pytest.raises(PassError, match="expected a float, got True"):
        config_from_json(data)


def test_many_streams_when_asked_for_explicitly() -> None:
    config = parse_pass("hyper:streams=32,allow_many_streams=true")
    assert config.streams == 32 and config.allow_many_streams
    assert config_from_json(json.loads(json.dumps(config.to_json()))) == config
    assert parse_pass("hyper:streams=16").streams == 16  # the bound itself is allowed


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_drift_that_is_not_finite_fails_naming_the_pass(value: float) -> None:
    before = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    after = before.clone()
    after[1] = value
    with pytest.raises(PassError, match=r"^aion: the output on the example holds NaN or Inf "
                                        r"after this pass \(1 of 3 values\)"):
        drift(before, after, "aion", 2, promise=1e-5)
    if math.isnan(value):
        with pytest.raises(PassError, match="^hyper: the model's output on the example already"):
            drift(after, before, "hyper", 2)
    else:  # an infinity the model itself outputs (masked scores) may stay where it is
        assert drift(after, after * 1.5, "hyper", 2).step == pytest.approx(0.5)
        with pytest.raises(PassError, match=r"holds NaN or Inf after this pass \(1 of 3"):
            drift(after, before, "hyper", 2)
    assert drift(before, before * 1.5, "aion", 2).step == pytest.approx(0.5)


@dataclass(frozen=True)
class Poison(PassConfig):
    """A pass that breaks the model: its first parameter becomes NaN."""

    name: ClassVar[str] = "poison"

    def run(self, surgery) -> list[str]:  # noqa: ANN001
        with torch.no_grad():
            next(surgery.model.parameters()).fill_(float("nan"))
        return ["poisoned"]


def test_apply_fails_a_pass_whose_output_is_nan() -> None:
    case = next(c for c in ZOO if c.name == "hf_llama")
    model = case.build().eval()
    with pytest.raises(PassError, match="^poison: the output on the example holds NaN or Inf"):
        surgeon.apply(model, [Poison()], case.example())


def test_a_pass_refuses_what_would_not_fit_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    case = next(c for c in ZOO if c.name == "hf_llama")
    model = case.build().eval()
    monkeypatch.setattr(budget, "available_memory", lambda: 10_000)
    with pytest.raises(budget.BudgetError, match=r"hyper:streams=4 on \d+ residual sites of "
                                                 r"width \d+ needs about .* more than this "
                                                 r"machine has available \(10.0 kB\)"):
        surgeon.apply(model, "hyper", case.example())


# (field, value, fragment of the one line): tiny-llama's config.json with one field spoiled
SPOILED = [
    ("num_attention_heads", 0, "field 'num_attention_heads' is 0; it must be a whole number"),
    ("num_key_value_heads", 0, "field 'num_key_value_heads' is 0"),
    ("num_attention_heads", [4, 0], "field 'num_attention_heads' is [4, 0]; it must be a whole"),
    ("num_attention_heads", [], "field 'num_attention_heads' is []"),
    ("num_attention_heads", [[4]], "field 'num_attention_heads' is [[4]]"),
    ("num_attention_heads", [4] * 65, "field 'num_attention_heads' is [4, 4,"),
    ("num_attention_heads", [4, 4], "field 'num_attention_heads': a model cannot be built"),
    ("vocab_size", -5, "field 'vocab_size' is -5"),
    ("hidden_size", "sixty-four", "field 'hidden_size' is 'sixty-four'"),
    ("hidden_size", 64.5, "field 'hidden_size' is 64.5"),
    ("num_hidden_layers", True, "field 'num_hidden_layers' is true"),
    ("head_dim", 2**40, "field 'head_dim' is 1099511627776"),
    ("rms_norm_eps", "tiny", "field 'rms_norm_eps'"),
    ("rms_norm_eps", float("nan"), "field 'rms_norm_eps' is NaN; it must be a finite number"),
    ("rope_parameters", "junk", "field 'rope_parameters'"),
    ("rope_parameters", {"rope_type": "linear"}, "field 'rope_parameters'"),
    ("rope_scaling", {"rope_type": "nonsense", "factor": "x"}, "field 'rope_scaling"),
    ("dtype", "int64", "field 'dtype' is 'int64'; a model's weights need a floating-point"),
    ("dtype", "bogus", "field 'dtype' is 'bogus'"),
    ("hidden_act", "nope", "field 'hidden_act' is 'nope'"),
]


def spoiled_copy(src: Path, dst: Path, field: str, value: object) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config[field] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.mark.parametrize("field, value, fragment", SPOILED)
def test_spoiled_config_is_one_line(field: str, value: object, fragment: str,
                                    tmp_path: Path) -> None:
    src = spoiled_copy(TINY, tmp_path / "src", field, value)
    dst = tmp_path / "dst"
    result = run("convert", str(src), str(dst), "-p", "aion")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {src / 'config.json'}: ") and fragment in lines[0]
    assert not dst.exists()


@pytest.mark.parametrize("model_type, fields", [
    ("swin", {"num_heads": [1, 2], "depths": [1, 1], "embed_dim": 16}),
    ("segformer", {"num_attention_heads": [1, 2], "hidden_sizes": [16, 32], "depths": [1, 1]}),
    ("cvt", {"num_heads": [1, 2], "embed_dim": [16, 32], "depth": [1, 1]}),
])
def test_per_stage_list_fields_are_accepted(model_type: str, fields: dict,
                                            tmp_path: Path) -> None:
    from transformers import AutoConfig

    from surgeon.files.hf_config import check_config_file

    AutoConfig.for_model(model_type, **fields).save_pretrained(tmp_path)
    check_config_file(tmp_path / "config.json")  # no SourceError


@pytest.mark.parametrize("text, fragment", [
    ("[1, 2]", "it holds a JSON list, not an object"),
    ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
    ('{"model_type": "llama", "vocab_size": 1' + "0" * 5000 + "}", "not valid JSON"),
    ('{"model_type": "llama", "vocab_size": 1' + "0" * 30 + "}", "field 'vocab_size' is 1000"),
])
def test_malformed_config_json_is_one_line(text: str, fragment: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    (src / "config.json").write_text(text)
    result = run("convert", str(src), str(tmp_path / "dst"), "-p", "aion")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert str(src / "config.json") in lines[0] and fragment in lines[0]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "tiny-aion"
    converting.convert(str(TINY), out, ["aion"])
    return out


@pytest.mark.parametrize("field, value, fragment", SPOILED[:1] + SPOILED[9:10] + SPOILED[12:13])
def test_load_and_verify_of_a_spoiled_config(field: str, value: object, fragment: str,
                                             converted: Path, tmp_path: Path) -> None:
    path = spoiled_copy(converted, tmp_path / "ckpt", field, value)
    with pytest.raises(surgeon.checkpoint.CheckpointError) as info:
        surgeon.load(path)
    assert str(info.value).startswith(f"{path / 'config.json'}: ") and fragment in str(info.value)
    result = run("verify", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], result.stderr


def test_a_config_far_larger_than_its_weights_is_refused_before_building(tmp_path: Path) -> None:
    src = spoiled_copy(TINY, tmp_path / "src", "num_hidden_layers", 100_000)
    start = time.perf_counter()
    result = run("convert", str(src), str(tmp_path / "dst"), "-p", "aion")
    assert time.perf_counter() - start < 20  # building 10⁵ blocks, even on meta, takes minutes
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert (f"{src / 'config.json'} describes a LlamaForCausalLM of about 3,699,265,600 "
            "parameters, but its weights hold 139,584 values") in lines[0]


def test_a_huge_model_is_refused_with_the_estimate(converted: Path, tmp_path: Path) -> None:
    path = spoiled_copy(converted, tmp_path / "ckpt", "num_hidden_layers", 100_000)
    config = json.loads((path / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "head_dim", "vocab_size"):
        del config[key]  # LlamaConfig's 7B-sized defaults
    (path / "config.json").write_text(json.dumps(config))
    start = time.perf_counter()
    with pytest.raises(budget.BudgetError) as info:
        surgeon.load(path)
    assert time.perf_counter() - start < 10
    # 4 heads of 4096 / 4, 2 kv heads, mlp 11008: q and o 4096², k and v 4096·2048 a block
    block = 2 * 4096 * 4096 + 2 * 4096 * 2048 + 3 * 4096 * 11008 + 2 * 4096
    estimate = 2 * 32_000 * 4096 + 100_000 * block + 4096  # embedding, head, blocks, norm
    message = str(info.value)
    assert f"describes a LlamaForCausalLM of about {estimate:,} parameters" in message
    assert "more than this machine has available" in message and "\n" not in message


def test_7b_defaults_refused_where_memory_is_short(converted: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(converted, path)
    (path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "architectures": ["LlamaForCausalLM"]}))
    monkeypatch.setattr(budget, "available_memory", lambda: 8 * 10**9)
    with pytest.raises(budget.BudgetError, match=r"about 6,738,415,616 parameters, which needs "
                                                 r"about 27.0 GB of memory, more than this "
                                                 r"machine has available \(8.0 GB\)"):
        surgeon.load(path)


def test_parameter_estimate_is_exact_for_the_zoo() -> None:
    for name in ("hf_llama", "hf_gpt2", "hf_t5"):
        model = next(c for c in ZOO if c.name == name).build()
        real = sum(p.numel() for p in model.parameters())
        assert budget.estimate_parameters(type(model), model.config) == real, name


def test_an_oversized_example_in_a_recipe_is_refused(converted: Path, tmp_path: Path) -> None:
    path = tmp_path / "ckpt"
    shutil.copytree(converted, path)
    save_file({"input_ids": torch.zeros(1, 65_536, dtype=torch.long)}, str(path / "example."
                                                                                "safetensors"))
    recipe = json.loads((path / "surgeon.json").read_text())
    recipe["example"] = {"kind": "dict", "keys": ["input_ids"], "values": {}}
    (path / "surgeon.json").write_text(json.dumps(recipe))
    fragment = (f"{path / 'example.safetensors'}: example tensor 'input_ids' holds 65,536 values "
                "(shape [1, 65536]); an example of ids or masks holds at most 16,384")
    with pytest.raises(budget.BudgetError) as info:
        surgeon.load(path)
    assert fragment in str(info.value)
    result = run("verify", str(path))
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], result.stderr


@pytest.mark.parametrize("shapes, fragment", [
    ({"input_ids": ((4, 4097), torch.long)}, "holds 16,388 values"),
    ({"pixels": ((64, 3, 224, 224), torch.float32)}, "the example holds 9,633,792 values"),
])
def test_example_bounds(shapes: dict, fragment: str) -> None:
    with pytest.raises(budget.BudgetError, match=fragment):
        budget.check_example_tensors(shapes, "example.safetensors")
    budget.check_example_tensors({"input_ids": ((8, 2048), torch.long),
                                  "pixels": ((16, 3, 224, 224), torch.float32)}, "ok")


@pytest.mark.parametrize("count, fragment", [
    ("100000", "--count 100000 is more than one grow inserts (at most 1024"),
    ("3", "--count 3 is more than one grow inserts (at most the checkpoint's 2 blocks under "
          "'model.layers.'"),
])
def test_grow_count_is_bounded(count: str, fragment: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    result = run("grow", str(src), str(tmp_path / "grown"), "--init", "copy", "--count", count)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and fragment in lines[0], result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_grow_count_check_reads_nothing() -> None:
    with pytest.raises(budget.BudgetError, match="--count must be at least 1"):
        budget.check_grow_count(0)
    with pytest.raises(budget.BudgetError, match="at most 1024"):
        budget.check_grow_count(100_000)
    budget.check_grow_count(2, 2, "model.layers.")
    assert issubclass(budget.BudgetError, SurgeonError) and math.isfinite(budget.MAX_GROW_COUNT)


def _int_weight(directory: Path, key: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "model.safetensors"))
    tensors[key] = tensors[key].to(torch.int32)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


def test_a_weight_stored_as_integers_is_one_line(converted: Path, tmp_path: Path) -> None:
    key = "model.layers.0.mlp.up_proj.weight"
    src = tmp_path / "src"
    shutil.copytree(TINY, src)
    _int_weight(src, key)
    result = run("convert", str(src), str(tmp_path / "dst"), "-p", "aion")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.stderr
    assert f"{key!r} is stored as torch.int32 but is a floating-point parameter" in lines[0]
    path = tmp_path / "ckpt"
    shutil.copytree(converted, path)
    _int_weight(path, key)
    with pytest.raises(surgeon.checkpoint.CheckpointError,
                       match=f"{key} is stored as torch.int32, not a floating-point dtype"):
        surgeon.load(path)
