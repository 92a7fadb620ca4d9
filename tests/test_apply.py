"""surgeon.apply over the zoo: every (model × pass combination) row rewrites what it should,
preserves the function where promised, trains every new parameter, keeps every original key
and the model's class, and changes nothing when applied again."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from zoo import ZOO, ZooCase

import surgeon
from surgeon import NoEffectWarning
from surgeon.applying import apply, plain_output
from surgeon.graph.tracing import flatten, run_example
from surgeon.nn import ADyT, AionResidual, InputScale
from surgeon.nn.hyper import StreamMixer
from surgeon.recipe import PassError, parse_pass

COMBOS = [("aion",), ("adyt",), ("hyper",), ("hyper:mhc=true",), ("aion", "adyt"),
          ("adyt", "aion"), ("aion", "hyper", "adyt"), ("adyt", "aion", "hyper:streams=2")]
# Models hyper-connections refuse (none today; a row here expects the PassError).
NO_HYPER: set[str] = set()


def output_sum(model: torch.nn.Module, example: tuple | dict) -> torch.Tensor:
    """A fixed random projection of every float output (a norm's output has a constant mean
    square, so that would be a loss without gradient)."""
    out = flatten(plain_output(run_example(model, example)))[0]
    gen = torch.Generator().manual_seed(0)
    return sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in out
               if isinstance(t, torch.Tensor) and t.is_floating_point())


@functools.cache
def residuals_in_trunks(name: str) -> int:
    case = next(c for c in ZOO if c.name == name)
    report = surgeon.inspect(case.build(), case.example())
    blocks = [b for t in report.trunks for b in t.blocks]
    return sum(any(r.module == b or r.module.startswith(b + ".") for b in blocks)
               for r in report.residuals)


def expected_new(case: ZooCase, name: str) -> int:
    if name == "aion":
        return sum(case.residuals.values())
    if name == "hyper":  # the residual adds inside the trunks' blocks
        return residuals_in_trunks(case.name)
    return sum(case.norms.values())


# `adyt:input_scale=rms` on these untrained models: DyT's learnable scale on each trunk's input
# where a token embedding feeds the trunk (encoder-decoders: both stacks; Whisper: its decoder)
INPUT_SCALES = {name: 1 for name in (
    "nanogpt", "hf_gpt2", "hf_llama", "hf_bert", "hf_whisper", "flat_moe", "parallel",
    "hf_mixtral", "hf_mamba", "hf_mamba2", "hf_neox_parallel", "functional_norms",
    "hf_modernbert", "hf_qwen2_moe", "hf_bloom")} | {"hf_t5": 2, "hf_bart": 2, "hf_led": 2}


# The slowest models to trace (encoder-decoders, caches copied per call) take fewer rows.
FEWER = {name: [("hyper:mhc=true",), ("adyt", "aion"), ("aion", "hyper", "adyt")]
         for name in ("hf_t5", "hf_bart", "hf_whisper")}
PARALLEL = {"parallel", "hf_neox_parallel"}  # attention and MLP added to one input together
# Known defect from merging issue 14's branches: adyt run after hyper leaves one norm of a
# hyper-wrapped block unconverted (e.g. Mixtral's model.layers.0.post_attention_layernorm).
# strict: the rows fail loudly once it is fixed, so the mark must then go.
# hyper on ConvNeXt-style channels-first toy streams rounds (≤ 1e-6) where the others are exact;
# on LeViT (its stages' subsample-attention shortcuts reshape the stream) by a few fp32 ulps
HYPER_ROUNDS = {"convnext_ish": 1e-6, "hf_levit": 1e-6}


@pytest.mark.parametrize("case", [c for c in ZOO if c.name in INPUT_SCALES], ids=lambda c: c.name)
def test_trunk_scale_where_a_token_embedding_feeds_the_trunk(case: ZooCase) -> None:
    model = apply(case.build(), ["adyt:input_scale=rms"], case.example())
    assert sum(isinstance(m, InputScale) for m in model.modules()) == INPUT_SCALES[case.name]
    assert model.surgeon_drift[-1].modules == sum(case.norms.values()) + INPUT_SCALES[case.name]


ROWS = [pytest.param(case, combo, id=f"{case.name}-{'+'.join(combo)}")
        for case in ZOO for combo in FEWER.get(case.name, COMBOS)]


@pytest.mark.parametrize("case, combo", ROWS)
def test_apply_row(case: ZooCase, combo: tuple[str, ...]) -> None:
    model, example = case.build(), case.example()
    cls, keys = type(model), set(model.state_dict())
    names = [c.split(":")[0] for c in combo]
    if "hyper" in names and case.name in NO_HYPER:
        with pytest.raises(PassError, match="hyper"):
            apply(model, list(combo), example)
        return
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        apply(model, list(combo), example)
    idle = [str(w.message).split("'")[1] for w in record if w.category is NoEffectWarning]
    assert idle == [n for n in names if expected_new(case, n) == 0]  # no effect: it says so

    assert type(model) is cls
    assert keys <= set(model.state_dict()), keys - set(model.state_dict())
    by_pass = {d.pass_name: d for d in model.surgeon_drift}
    for name in names:
        assert by_pass[name].modules == expected_new(case, name)
    assert sum(isinstance(m, AionResidual) for m in model.modules()) == (
        expected_new(case, "aion") if "aion" in names else 0)
    assert sum(isinstance(m, ADyT) for m in model.modules()) == (
        sum(case.norms.values()) if "adyt" in names else 0)
    assert not any(isinstance(m, InputScale) for m in model.modules())  # opt-in
    assert sum(isinstance(m, StreamMixer) for m in model.modules()) == (
        expected_new(case, "hyper") if "hyper" in names else 0)
    if "adyt" not in names[:names.index("hyper")] if "hyper" in names else False:
        # hyper-connections at init: exact (HC), within 1e-5 relative (mHC)
        # (after AION's `x + α·(a + m)` a parallel block's sum is AION's, in its own order)
        exact = 1e-6 if case.name in PARALLEL and "aion" in names else 0.0
        exact = max(exact, HYPER_ROUNDS.get(case.name, 0.0))
        assert by_pass["hyper"].max_abs <= (1e-5 if "mhc=true" in "".join(combo) else exact)
    if names[0] == "aion":  # the preserving start: exact in fp32
        # (on a parallel block AION scales the sum of its branches, `x + α·(a + m)`, which
        # adds in another order than the block's `(x + a) + m`)
        exact = 1e-6 if case.name in PARALLEL else 0.0
        assert by_pass["aion"].max_abs <= exact and by_pass["aion"].cosine == pytest.approx(1.0)

    # Optimizer steps move every new parameter: one step, or two for hyper-connections, whose
    # dynamic scales and norm gains have no gradient while the dynamic weights are still 0.
    ours = (AionResidual, ADyT, StreamMixer)
    new_owners = [mn for mn, m in model.named_modules() if mn and isinstance(m, ours)]
    new_params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
                  and (n not in keys or any(n.startswith(mn + ".") for mn in new_owners))}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-30)  # ~lr for any gradient
    for _ in range(2 if "hyper" in names else 1):
        opt.zero_grad()
        output_sum(model, example).backward()
        opt.step()
    params = dict(model.named_parameters())
    unmoved = [n for n, v in new_params.items() if torch.equal(params[n].detach(), v)]
    assert not unmoved, {n: params[n].grad for n in unmoved}

    # Idempotent: the same passes again change nothing.
    model.eval()
    with torch.no_grad():
        before = output_sum(model, example)
    modules = [n for n, _ in model.named_modules()]
    apply(model, list(combo), example)
    assert [n for n, _ in model.named_modules()] == modules
    with torch.no_grad():
        assert torch.equal(output_sum(model, example), before)


def test_pass_specs_and_errors() -> None:
    config = parse_pass("aion:preset=rezero,preserve=false,include=transformer.h.0*")
    assert config.preset == "rezero" and config.include == ("transformer.h.0*",)
    assert parse_pass(config.to_json()["_type"]).to_json() != config.to_json()
    with pytest.raises(PassError, match="unknown pass 'hyperr'"):
        parse_pass("hyperr")
    with pytest.raises(PassError, match="unknown option 'gamma'"):
        parse_pass("aion:gamma=1")
    with pytest.raises(PassError, match="expected true or false"):
        parse_pass("aion:preserve=maybe")
    with pytest.raises(PassError, match="cannot preserve"):
        parse_pass("aion:preset=rezero")


def test_order_that_cannot_work_is_refused() -> None:
    case = next(c for c in ZOO if c.name == "nanogpt")
    with pytest.raises(PassError, match="apply aion before hyper"):
        apply(case.build(), ["hyper", "aion"], case.example())
    model = apply(case.build(), ["hyper"], case.example())
    with pytest.raises(PassError, match="apply aion before hyper"):
        apply(model, ["aion"], case.example())


def test_filter_limits_the_rewrite() -> None:
    case = next(c for c in ZOO if c.name == "hf_gpt2")
    model = case.build()
    apply(model, ["aion:include=transformer.h.1"], case.example())
    owners = {n.rsplit(".", 1)[0] for n, m in model.named_modules() if isinstance(m, AionResidual)}
    assert owners == {"transformer.h.1"}


# Calibration fits each norm on its own (slope, gain, bias by least squares on the example), so
# it promises a closer output in cosine (convnext_ish: 0.59 → 0.90, while max |Δ| goes 2.74 →
# 3.00). On these post-norm encoders' random weights and 16-row examples it halves max |Δ| but
# lowers the cosine (hf_bert 0.960 → 0.909, max |Δ| 3.05 → 1.37; hf_bart 0.954 → 0.845, 3.29
# → 1.74; hf_led 0.957 → 0.901, 2.72 → 1.40): for them the promise is max |Δ|.
MAX_ABS_GAIN = {"hf_bert", "hf_bart", "hf_led", "hf_modernbert", "hf_squeezebert", "hf_bloom"}
NO_CALIBRATION_GAIN: set[str] = set()


@pytest.mark.parametrize("case", [c for c in ZOO if c.norms and c.name not in
                                  NO_CALIBRATION_GAIN], ids=lambda c: c.name)
def test_adyt_calibration_shrinks_the_drift(case: ZooCase) -> None:
    drift = []
    for calibrate in (False, True):
        torch.manual_seed(0)  # the same weights and example both times
        model, example = case.build().eval(), case.example()
        # against the plain swap (an untrained model would get the recipe's matched gains)
        drift.append(apply(model, ["adyt:recipe=none"], example,
                           calibrate=calibrate).surgeon_drift[0])
    if case.name in MAX_ABS_GAIN:
        assert 0 < drift[1].max_abs < drift[0].max_abs
    else:
        assert drift[0].cosine < drift[1].cosine <= 1 + 1e-9
    assert drift[1].calibrated is not None and drift[1].calibrated["inputs"] == "example"


def qwen3() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Qwen3Config"):
        pytest.skip("this transformers has no Qwen3")
    config = transformers.Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=128, max_position_embeddings=64)
    return transformers.Qwen3ForCausalLM(config).eval()


@pytest.mark.parametrize("spec, converted", [
    ("adyt", {"input_layernorm", "post_attention_layernorm", "model.norm"}),
    ("adyt:qk_norms=true", {"input_layernorm", "post_attention_layernorm", "model.norm",
                            "q_norm", "k_norm"}),
    ("adyt:final_norms=false", {"input_layernorm", "post_attention_layernorm"}),
])
def test_adyt_selects_qk_and_final_norms(spec: str, converted: set[str]) -> None:
    """Qwen3 normalises q and k per head (width 8 here, against 32 for the stream)."""
    model = apply(qwen3(), [spec])
    names = {n for n, m in model.named_modules() if isinstance(m, ADyT)}
    kinds = {n if n == "model.norm" else n.rsplit(".", 1)[-1] for n in names}
    assert kinds == converted
    assert len(names) == 1 * ("model.norm" in converted) + 2 * (len(converted) - (
        "model.norm" in converted))
