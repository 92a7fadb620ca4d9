"""A converted transformers model still behaves like one: generate() with a KV cache, padding
masks, gradient checkpointing, torch.compile, copy.deepcopy."""

from __future__ import annotations

import copy

import pytest
import torch
from test_apply import output_sum
from zoo import ZOO

import surgeon

CAUSAL = ["hf_gpt2", "hf_llama"]


def converted(name: str, passes: list[str]) -> tuple[torch.nn.Module, torch.nn.Module, dict]:
    case = next(c for c in ZOO if c.name == name)
    original = case.build().eval()
    model = copy.deepcopy(original)
    return original, surgeon.apply(model, passes, case.example()), case.example()


def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Training-mode comparisons need a deterministic forward."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@pytest.mark.parametrize("name", CAUSAL)
def test_generate_with_cache_gives_the_same_tokens_at_init(name: str) -> None:
    original, model, example = converted(name, ["aion", "hyper"])
    prompt = example["input_ids"][:, :5]
    want = original.generate(prompt, max_new_tokens=8, do_sample=False)
    got = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", CAUSAL + ["hf_t5"])
def test_padding_masks_keep_working(name: str) -> None:
    original, model, example = converted(name, ["aion", "hyper"])
    mask = torch.ones_like(example["input_ids"])
    mask[0, :3] = 0  # left padding on the first row
    padded = {**example, "attention_mask": mask}
    with torch.no_grad():
        want, got = original(**padded), model(**padded)
    key = "logits" if "logits" in want else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", CAUSAL)
def test_gradient_checkpointing_still_checkpoints(name: str) -> None:
    _, model, example = converted(name, ["aion", "hyper", "adyt"])
    plain = copy.deepcopy(no_dropout(model)).train()
    model.gradient_checkpointing_enable()
    model.train()
    calls = []

    def counting(inner):  # noqa: ANN001, ANN202
        return lambda *a, **k: calls.append(1) or inner(*a, **k)

    for layer in layers(model):
        layer._gradient_checkpointing_func = counting(layer._gradient_checkpointing_func)
    for use_cache in (False, True):  # True: the layers turn the cache off themselves
        calls.clear()
        batch = {**example, "use_cache": use_cache}
        output_sum(model, batch).backward()
        assert len(calls) == len(layers(model))
    output_sum(plain, example).backward()
    output_sum(plain, example).backward()
    for (n, p), q in zip(model.named_parameters(), plain.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.parametrize("name", CAUSAL)
def test_torch_compile_forward_and_backward(name: str) -> None:
    _, model, example = converted(name, ["aion", "hyper", "adyt"])
    no_dropout(model).train()
    eager = copy.deepcopy(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss_c, loss_e = output_sum(compiled, example), output_sum(eager, example)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-5)
    loss_c.backward()
    loss_e.backward()
    for (n, p), q in zip(model.named_parameters(), eager.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=n)


def test_deepcopy_of_a_converted_model() -> None:
    _, model, example = converted("hf_llama", ["aion", "hyper", "adyt"])
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(output_sum(twin, example), output_sum(model, example))
    assert type(layers(twin)[0]).__mro__[1:3] == type(layers(model)[0]).__mro__[1:3]
    assert twin.surgeon_drift == model.surgeon_drift
