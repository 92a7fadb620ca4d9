"""ADyT calibration: the local fit (slope, gain, bias) recovers known values over four decades of
input rms; on a tiny Llama with large norm inputs it brings the output much closer while α(t)
stays in its clamp; `input_scale` saves and loads (and is optional in older state dicts); the
CLI's `--calibration` reads ids and text, refuses bad files in one line, and `verify --against`
replays the stored calibration batches."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from cli_runner import run
from torch import nn

import surgeon
from passes.adyt_calibration import fit_adyt_, fit_slope
from surgeon.checkpoint import read_calibration_batches
from surgeon.nn.adyt import ADyT
from surgeon.recipe import PassError

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "examples" / "tiny-llama"
D = 16


@pytest.mark.parametrize("rms", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("bias", [True, False], ids=["layernorm", "rmsnorm"])
def test_the_local_fit_recovers_slope_gain_and_bias(rms: float, bias: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    x = rms * torch.randn(4096, D, generator=gen, dtype=torch.float64)
    slope = 0.7 / rms
    gain = 0.5 + torch.rand(D, generator=gen, dtype=torch.float64)
    shift = torch.randn(D, generator=gen, dtype=torch.float64) * bias  # RMSNorm: no bias
    found, g, b, error = fit_slope(x, gain * torch.tanh(slope * x) + shift, bias)
    assert found == pytest.approx(slope, rel=0.05)
    assert torch.allclose(g, gain, rtol=0.05) and torch.allclose(b, shift, atol=0.05)
    assert error < 1e-2 * len(x)


@pytest.mark.parametrize("adaptive", [True, False])
def test_fit_puts_the_slope_into_input_scale_and_keeps_alpha(adaptive: bool) -> None:
    m = ADyT(D, adaptive=adaptive, channels_first=True, bias=False)
    alpha = float(m.alpha().detach())
    x = 50 * torch.randn(32, D, 4, 4)  # channels first: (b, c, h, w)
    y = 2 * torch.tanh(0.02 * x)
    fit = fit_adyt_(m, [(x, y)])
    assert float(m.alpha().detach()) == alpha and m.input_scale.dtype == torch.float32
    assert float(m.input_scale) * alpha == pytest.approx(0.02, rel=0.05) == fit.slope
    assert torch.allclose(m.weight, torch.full((D,), 2.0), rtol=0.05)
    assert fit.cosine > 0.999
    with torch.no_grad():
        assert torch.allclose(m(x), y, atol=0.05)  # the slope is found to within ~2 %


def tiny_llama(scale: float) -> nn.Module:
    """A 2-layer Llama whose embeddings are `scale` times larger: norm inputs of rms ~0.02·scale."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(scale)
    return model


def test_calibration_follows_large_norm_inputs_within_the_clamp() -> None:
    base = tiny_llama(5000.0)  # norm inputs of rms ~100
    gen = torch.Generator().manual_seed(1)
    example = {"input_ids": torch.randint(0, 64, (2, 16), generator=gen)}
    batches = [torch.randint(0, 64, (4, 16), generator=gen) for _ in range(3)]
    held_out = torch.randint(0, 64, (4, 16), generator=gen)
    with torch.no_grad():
        want = base(held_out).logits.flatten()
    cosine = {}
    # recipe=none: its norms are at their init, so plain `adyt` would pick DyT's training recipe
    for spec, calibration in (("adyt:recipe=none", None), ("adyt:calibrate=true", batches)):
        model = surgeon.apply(copy.deepcopy(base), [spec], example, calibration=calibration)
        with torch.no_grad():
            got = model(held_out).logits.flatten()
        cosine[spec] = float(torch.nn.functional.cosine_similarity(got, want, dim=0))
    assert cosine["adyt:recipe=none"] < 0.9 < 0.99 < cosine["adyt:calibrate=true"]
    adyts = [m for m in model.modules() if isinstance(m, ADyT)]
    assert len(adyts) == 5
    for m in adyts:
        assert m.alpha_min <= float(m.alpha().detach()) <= m.alpha_max
        assert float(m.input_scale) < 0.5  # the slope ~1/100 comes from s, not α
    calibrated = model.surgeon_drift[0].calibrated
    assert calibrated["inputs"] == "calibration" and calibrated["batches"] == 3
    assert calibrated["cosine"] > 0.99


def test_calibration_needs_a_calibrating_pass() -> None:
    with pytest.raises(PassError, match="calibrate=true"):
        surgeon.apply(tiny_llama(1.0), ["adyt"], calibration=[torch.zeros(1, 4, dtype=torch.long)])


def test_input_scale_saves_loads_and_is_optional(tmp_path: Path) -> None:
    model = surgeon.apply(tiny_llama(100.0), ["adyt:calibrate=true"])
    scales = {n: m.input_scale.clone() for n, m in model.named_modules() if isinstance(m, ADyT)}
    assert all(float(s) != 1.0 for s in scales.values())
    surgeon.save(model, tmp_path / "out")
    loaded = surgeon.load(tmp_path / "out")
    for name, m in loaded.named_modules():
        if isinstance(m, ADyT):
            assert torch.equal(m.input_scale, scales[name])
    old = {k: v for k, v in ADyT(D).state_dict().items() if k != "input_scale"}
    m = ADyT(D)
    m.input_scale.fill_(3.0)
    m.load_state_dict(old)  # strict: a state dict written before input_scale existed
    assert float(m.input_scale) == 1.0


def tokenizer_dir(tmp_path: Path) -> Path:
    """A copy of the tiny Llama with a word-level tokenizer of its own (it ships none)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = tmp_path / "tiny-llama"
    shutil.copytree(TINY_LLAMA, src)
    words = "the a cat dog sat on mat and ran far".split()
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]"
                                         ).save_pretrained(str(src))
    return src


def test_cli_calibration_ids_and_text_then_verify(tmp_path: Path) -> None:
    src = tokenizer_dir(tmp_path)
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[(7 * i + j) % 512 for j in range(16)] for i in range(4)]))
    text = tmp_path / "corpus.txt"
    text.write_text("the cat sat on the mat and the dog ran far " * 20)
    for name, file in (("ids", ids), ("text", text)):
        out = tmp_path / name
        result = run("convert", str(src), str(out), "-p", "adyt:calibrate=true",
                     "--calibration", str(file), "--calibration-length", "32", "--json")
        assert result.exit_code == 0, result.output
        calibrated = json.loads(result.stdout)["passes"][0]["calibrated"]
        assert calibrated["inputs"] == "calibration" and calibrated["cosine"] > 0.5
        assert (out / "calibration.safetensors").is_file()
    batches = read_calibration_batches(
        json.loads((tmp_path / "text" / "surgeon.json").read_text())["calibration"],
        tmp_path / "text")
    assert [tuple(b[0].shape) for b in batches] == [(6, 32)]  # 220 words: 6 windows of 32
    result = run("verify", str(tmp_path / "ids"), "--against", str(src))
    assert result.exit_code == 0, result.output
    assert "adyt calibrated on 1 calibration batch: output cosine" in result.stdout


@pytest.mark.parametrize("content, suffix, message", [
    ('[[1, 2], "x"]', ".json", "must be a list of lists of token ids"),
    ("[[1, 2, 9999]]", ".json", "token ids must lie in [0, 512)"),
    ("not json", ".json", "not readable JSON"),
    ("1,2,3", ".csv", "cannot read a .csv file"),
    ("the cat", ".txt", "the source has no tokenizer"),
    (b"\x00\x01", ".safetensors", "not a readable safetensors file"),
])
def test_cli_bad_calibration_file(tmp_path: Path, content: str | bytes, suffix: str,
                                  message: str) -> None:
    file = tmp_path / f"bad{suffix}"
    (file.write_bytes if isinstance(content, bytes) else file.write_text)(content)
    out = tmp_path / "out"
    result = run("convert", str(TINY_LLAMA), str(out), "-p", "adyt:calibrate=true",
                 "--calibration", str(file))
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: --calibration ")
    assert message in result.stderr and str(file) in result.stderr
    assert not out.exists()


def test_cli_calibration_without_a_calibrating_pass(tmp_path: Path) -> None:
    ids = tmp_path / "ids.json"
    ids.write_text("[[1, 2, 3]]")
    result = run("convert", str(TINY_LLAMA), str(tmp_path / "out"), "-p", "adyt",
                 "--calibration", str(ids))
    assert result.exit_code == 1 and "no pass calibrates" in result.stderr
    assert not (tmp_path / "out").exists()
