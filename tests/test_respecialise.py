"""Guards that re-specialise: a rewritten module called in a way its graph was not traced for
(a keyword handed on, a flag) is traced again for that call, the passes' edits re-applied, and
gives what the unconverted model gives for the same weights."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

import surgeon
from surgeon.errors import SpecializationError
from surgeon.graph import tracing
from tests.zoo import hf_bert, hf_gpt2, hf_llama

IDS = torch.arange(16).reshape(2, 8) % 128


def converted(passes: list[str], attn: str = "sdpa") -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = hf_llama()
    model.config._attn_implementation = attn
    original = copy.deepcopy(model)
    surgeon.apply(model, passes, {"input_ids": IDS})
    return original, model


def traced_layers(model: torch.nn.Module) -> list[tracing.TracedModule]:
    return [m for m in model.modules() if isinstance(m, tracing.TracedModule)]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5)


CALLS = [
    ("num_items_in_batch", dict(labels=IDS, num_items_in_batch=torch.tensor(16))),
    ("output_hidden_states", dict(output_hidden_states=True)),
    ("output_attentions", dict(output_attentions=True)),
    ("padding_mask", dict(attention_mask=torch.tensor([[1] * 8, [0] * 3 + [1] * 5]))),
    ("no_cache", dict(use_cache=False, labels=IDS)),
    ("both", dict(output_hidden_states=True, output_attentions=True, labels=IDS)),
]


@pytest.mark.parametrize("label,kwargs", CALLS, ids=[c[0] for c in CALLS])
def test_new_call_gives_the_original_numbers(label: str, kwargs: dict) -> None:
    original, model = converted(["aion"], attn="eager")
    assert traced_layers(model)
    want, got = original(input_ids=IDS, **kwargs), model(input_ids=IDS, **kwargs)
    assert close(got.logits, want.logits)
    if "labels" in kwargs:
        assert close(got.loss, want.loss)
    for key in ("hidden_states", "attentions"):
        if kwargs.get(f"output_{key}"):
            assert len(got[key]) == len(want[key]) > 0
            assert all(close(g, w) for g, w in zip(got[key], want[key]))
    # each layer now holds one more graph, and the first call spec still works
    # a new keyword the layers get makes them hold one more graph; a mask or flag they already
    # took as a graph input needs none
    expected = int(any(k.startswith(("output_", "num_items")) for k in kwargs))
    assert all(len(m.__dict__.get("_surgeon_specs", ())) == expected
               for m in traced_layers(model) if m._surgeon_name.startswith("model.layers."))
    assert close(model(input_ids=IDS).logits, original(input_ids=IDS).logits)


@pytest.mark.parametrize("build", [hf_gpt2, hf_bert], ids=["gpt2", "bert"])
def test_other_families_give_the_original_numbers(build) -> None:
    torch.manual_seed(0)
    model = build().eval()
    model.config._attn_implementation = "eager"
    original = copy.deepcopy(model)
    surgeon.apply(model, ["aion"], {"input_ids": IDS})
    assert traced_layers(model)
    kwargs = dict(output_hidden_states=True, output_attentions=True)
    want, got = original(input_ids=IDS, **kwargs), model(input_ids=IDS, **kwargs)
    for key in ("hidden_states", "attentions"):
        assert len(got[key]) == len(want[key]) > 0
        assert all(close(g, w) for g, w in zip(got[key], want[key]))


def test_cached_graph_is_reused_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    original, model = converted(["aion"])
    with caplog.at_level(logging.INFO, logger="surgeon"):
        for _ in range(3):
            model(input_ids=IDS, labels=IDS, num_items_in_batch=torch.tensor(16))
    layers = [m for m in traced_layers(model) if m._surgeon_name.startswith("model.layers.")]
    logged = [r for r in caplog.records if "traced again" in r.getMessage()]
    assert len(logged) == len(layers) == 2


def test_training_step_then_generate() -> None:
    """A training step with Trainer's loss kwargs, then `generate` (cache, use_cache, growing
    lengths): the converted model follows the original step for step."""
    original, model = converted(["aion"])
    outs = []
    for m in (original, model):
        m.train()
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        loss = m(input_ids=IDS, labels=IDS, num_items_in_batch=torch.tensor(14)).loss
        loss.backward()
        opt.step()
        m.eval()
        outs.append((loss.detach(), m.generate(IDS[:, :4], max_new_tokens=5, do_sample=False)))
    (loss_a, gen_a), (loss_b, gen_b) = outs
    assert close(loss_a, loss_b)
    assert torch.equal(gen_a, gen_b)


@pytest.mark.parametrize("passes", [["aion", "adyt"], ["aion", "hyper", "adyt"]])
def test_every_pass_trains_and_generates_with_new_calls(passes: list[str]) -> None:
    _, model = converted(passes)
    model.train()
    loss = model(input_ids=IDS, labels=IDS, num_items_in_batch=torch.tensor(14)).loss
    loss.backward()
    assert torch.isfinite(loss)
    out = model(input_ids=IDS, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    model.eval()
    assert model.generate(IDS[:, :4], max_new_tokens=3, do_sample=False).shape == (2, 7)


def test_a_count_handed_on_serves_every_value() -> None:
    """An int only handed on (a loss normaliser) becomes a graph input: one graph for all."""
    original, model = converted(["aion"])
    for n in (14, 15, 16):
        want = original(input_ids=IDS, labels=IDS, num_items_in_batch=n).loss
        assert close(model(input_ids=IDS, labels=IDS, num_items_in_batch=n).loss, want)
    assert all(len(m.__dict__.get("_surgeon_specs", ())) == 1 for m in traced_layers(model)
               if m._surgeon_name.startswith("model.layers."))


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = converted(["aion"])
    monkeypatch.setattr(tracing, "RESPECIALISE_LIMIT", 1)
    model(input_ids=IDS, output_hidden_states=True)
    with pytest.raises(SpecializationError, match="already holds 1 graphs"):
        model(input_ids=IDS, output_attentions=True)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.lin = torch.nn.LayerNorm(8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        h = self.lin(self.norm(x))
        if scale is not None:  # the residual's branch itself changes with the call
            h = h * scale
        return x + h


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor, scale: float | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=scale)
        return x


def test_an_edit_whose_inputs_change_is_refused_not_misapplied() -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(2, 3, 8)
    surgeon.apply(model, ["aion"], (x,))
    assert isinstance(model.blocks[0], tracing.TracedModule)
    with pytest.raises(SpecializationError, match="blocks.0.*cannot be carried over") as e:
        model(x, scale=2.0)
    assert "\n" not in str(e.value)


def test_a_call_that_cannot_be_traced_fails_in_one_line() -> None:
    _, model = converted(["aion"])
    layer = model.model.layers[0]
    with pytest.raises(SpecializationError) as e:
        layer(torch.zeros(2, 8, 32), not_an_argument=object(), strange=[object()])
    assert "\n" not in str(e.value)


def test_a_miss_under_torch_compile_re_specialises() -> None:
    """The first call with Trainer's kwargs under torch.compile: one graph break, right loss."""
    original, model = converted(["aion"])
    compiled = torch.compile(model, backend="aot_eager")
    for _ in range(2):
        got = compiled(input_ids=IDS, labels=IDS, num_items_in_batch=torch.tensor(16)).loss
        want = original(input_ids=IDS, labels=IDS, num_items_in_batch=torch.tensor(16)).loss
        assert close(got, want)
