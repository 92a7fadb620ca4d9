"""Encoder-decoders (T5 pre-norm, BART post-norm, Whisper on speech frames): every residual of
each stack is found (self-attention, cross-attention, FFN), each stack is its own trunk (hyper
expands and reduces the streams once per stack; the encoder's states reach cross-attention at
batch b, never as the decoder's stream), and a converted model generates the original's tokens
where the pass is exact, with a KV cache, beams, and a new call (labels, no cache; or a cache
where the model was converted without one)."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from zoo import ZOO

import surgeon
from surgeon.graph.report import Inspection
from surgeon.graph.tracing import TracedModule
from surgeon.nn.hyper import expand_streams, reduce_streams

CASES = {c.name: c for c in ZOO}
MODELS = ["hf_t5", "hf_bart", "hf_led", "hf_whisper"]
STACKS = ("encoder", "decoder")


def stack_of(name: str) -> str:
    return next(s for s in STACKS if f"{s}." in f".{name}")


@functools.cache
def report(name: str) -> Inspection:
    case = CASES[name]
    return surgeon.inspect(case.build(), case.example())


@functools.cache
def converted(name: str, passes: tuple[str, ...]) -> tuple[torch.nn.Module, torch.nn.Module]:
    case = CASES[name]
    torch.manual_seed(0)
    original = case.build().eval()
    model = copy.deepcopy(original)
    surgeon.apply(model, list(passes), case.example())
    return original, model.eval()


def prompt(name: str) -> torch.Tensor:
    ex = CASES[name].example()
    return ex["input_features" if "input_features" in ex else "input_ids"]


@pytest.mark.parametrize("name", MODELS)
def test_every_stack_has_its_residuals(name: str) -> None:
    """2 per encoder layer (self-attention, FFN), 3 per decoder layer (+ cross-attention)."""
    per_stack = {s: 0 for s in STACKS}
    for r in report(name).residuals:
        per_stack[stack_of(r.module)] += 1
    assert per_stack == {"encoder": 4, "decoder": 6}


@pytest.mark.parametrize("name", MODELS)
def test_each_stack_is_its_own_trunk(name: str) -> None:
    trunks = report(name).trunks
    assert [{stack_of(b) for b in t.blocks} for t in trunks] == [{"encoder"}, {"decoder"}]
    assert [len(t.blocks) for t in trunks] == [2, 2]


@pytest.mark.parametrize("name", MODELS)
def test_hyper_expands_and_reduces_once_per_stack(name: str) -> None:
    _, model = converted(name, ("hyper",))
    calls: dict[str, list] = {s: [] for s in STACKS}
    for mod_name, m in model.named_modules():
        if isinstance(m, TracedModule):
            for n in m.graph.nodes:
                if n.op == "call_function" and n.target in (expand_streams, reduce_streams):
                    calls[stack_of(mod_name)].append(n.target)
    assert calls == {s: [expand_streams, reduce_streams] for s in STACKS}
    with torch.no_grad():
        out = model(**CASES[name].example())
    assert out.encoder_last_hidden_state.shape[0] == 2  # the encoder hands on batch b


@pytest.mark.parametrize("passes", [("aion",), ("hyper",)],
                         ids=lambda p: "+".join(p))
@pytest.mark.parametrize("name", MODELS)
def test_generate_after_conversion_gives_the_original_tokens(name: str, passes: tuple) -> None:
    original, model = converted(name, passes)
    ids = prompt(name)
    for kwargs in (dict(max_new_tokens=5), dict(max_new_tokens=4, num_beams=2)):
        want = original.generate(ids, do_sample=False, **kwargs)
        got = model.generate(ids, do_sample=False, **kwargs)
        assert torch.equal(got, want), kwargs


@pytest.mark.parametrize("name", MODELS)
def test_converted_without_a_cache_generates_with_one(name: str) -> None:
    """Converted on an example run with `use_cache=False` (as the support matrix does), the
    decoder layers meet a cache (and, one token at a time, no causal mask) only in generate:
    they trace themselves again for that call, and LED's, which hand the cache back, must
    verify although the run gets its own copy of it."""
    torch.manual_seed(0)
    original = CASES[name].build().eval()
    original.config.use_cache = False
    model = copy.deepcopy(original)
    surgeon.apply(model, ["aion", "hyper"], CASES[name].example())
    model.eval()
    ids = prompt(name)
    want = original.generate(ids, do_sample=False, max_new_tokens=4, use_cache=True)
    got = model.generate(ids, do_sample=False, max_new_tokens=4, use_cache=True)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", MODELS)
def test_a_new_call_on_folded_streams_gives_the_original_loss(name: str) -> None:
    """With labels the decoder layers are called with use_cache=False, which they were not
    traced for: the layers whose stream arrives folded trace themselves again on one stream
    (the encoder's states for cross-attention have batch b)."""
    original, model = converted(name, ("aion", "hyper"))
    ex = CASES[name].example()
    labels = ex["decoder_input_ids"]
    with torch.no_grad():
        want = original(**ex, labels=labels, use_cache=False).loss
        got = model(**ex, labels=labels, use_cache=False).loss
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_training_step_on_a_converted_encoder_decoder() -> None:
    _, model = converted("hf_bart", ("aion", "hyper", "adyt"))
    model = copy.deepcopy(model).train()
    ex = CASES["hf_bart"].example()
    loss = model(**ex, labels=ex["decoder_input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
    new = [p for n, p in model.named_parameters() if "hyper_" in n]
    assert new and all(p.grad is not None for p in new)
