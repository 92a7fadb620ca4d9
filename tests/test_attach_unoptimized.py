"""`attach(model, optimizer)` warns when trainable parameters of the model are in no param group
of the optimizer: an optimizer built before `surgeon.apply` never sees the new parameters, which
then stay at their initial values without a word."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn
from zoo import ZOO

import surgeon
from surgeon.applying import plain_output
from surgeon.graph.tracing import flatten, run_example
from surgeon.nn import ParametersNotOptimizedWarning, attach, unoptimized_parameters

CASE = next(c for c in ZOO if c.name == "nanogpt")
PASSES = ["aion", "adyt"]
NEW = 4 * 2 + 5 + 5 + 3  # α0, β of 4 residual adds; α0, weight of 5 norms, 3 of them with bias


def loss(model: nn.Module) -> torch.Tensor:
    """A fixed random projection of the logits (every new parameter gets a gradient)."""
    out = flatten(plain_output(run_example(model, CASE.example())))[0][0]
    gen = torch.Generator().manual_seed(0)
    return (out * torch.randn(out.shape, generator=gen)).sum()


def converted_with_early_optimizer() -> tuple[nn.Module, torch.optim.Optimizer, set[int]]:
    """The order a README reader may take: optimizer first, then `surgeon.apply`. Returns the
    ids of the parameters the optimizer holds."""
    torch.manual_seed(0)
    model = CASE.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    surgeon.apply(model, PASSES, CASE.example())
    return model, optimizer, {id(p) for p in optimizer.param_groups[0]["params"]}


def attach_warnings(model: nn.Module, optimizer: object) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = attach(model, optimizer)
    handle.remove()
    return [str(w.message) for w in caught if w.category is ParametersNotOptimizedWarning]


def test_an_optimizer_built_before_apply_is_named_with_counts_and_the_fix() -> None:
    model, optimizer, held = converted_with_early_optimizer()
    new = [(n, p) for n, p in model.named_parameters() if id(p) not in held]
    assert len(new) == NEW  # the optimizer holds the norms' old weights, not ADyT's copies
    assert unoptimized_parameters(model, optimizer) == new
    (message,) = attach_warnings(model, optimizer)
    elements = sum(p.numel() for _, p in new)
    assert message.startswith(f"{len(new)} trainable parameter tensors of the model "
                              f"({elements:,} elements: {new[0][0]}, {new[1][0]}, {new[2][0]}, "
                              "...) are in no param group of the optimizer, so they will not "
                              "train; build the optimizer after surgeon.apply, or add them with "
                              "optimizer.add_param_group(")
    assert issubclass(ParametersNotOptimizedWarning, UserWarning)

    # as warned: they never move; added as the message says, they all train and it is quiet
    before = [p.detach().clone() for _, p in new]
    loss(model).backward()
    optimizer.step()
    assert sum(not torch.equal(p, b) for (_, p), b in zip(new, before)) == 0
    optimizer.add_param_group({"params": [p for _, p in unoptimized_parameters(model,
                                                                                optimizer)]})
    assert attach_warnings(model, optimizer) == []
    optimizer.zero_grad()
    loss(model).backward()
    optimizer.step()
    assert sum(not torch.equal(p, b) for (_, p), b in zip(new, before)) == len(new)


class Wrapper:
    """An optimizer wrapper that is not a torch optimizer (accelerate, some trainers)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer


def _frozen_new(model: nn.Module, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for _, p in unoptimized_parameters(model, optimizer):
        p.requires_grad_(False)  # frozen on purpose: not the optimizer's business
    return optimizer


@pytest.mark.parametrize("make, warns", [
    pytest.param(lambda m, o: o, NEW, id="built-before-apply"),
    pytest.param(lambda m, o: Wrapper(o), NEW, id="wrapped-built-before-apply"),
    pytest.param(lambda m, o: torch.optim.AdamW(m.parameters()), 0, id="built-after-apply"),
    pytest.param(lambda m, o: Wrapper(torch.optim.SGD(m.parameters())), 0,
                 id="wrapped-built-after-apply"),
    pytest.param(_frozen_new, 0, id="new-parameters-frozen"),
])
def test_which_optimizers_warn(make: Callable[[nn.Module, torch.optim.Optimizer], object],
                               warns: int) -> None:
    model, optimizer, _ = converted_with_early_optimizer()
    messages = attach_warnings(model, make(model, optimizer))
    counts = [int(re.match(r"\d+", m).group()) for m in messages]
    assert counts == ([warns] if warns else [])


def test_no_optimizer_no_check() -> None:
    model, _, _ = converted_with_early_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ParametersNotOptimizedWarning)
        attach(model).remove()
