"""`if` on shapes (class 17): a forward that branches on its input's shape (Swin-style padding
to a multiple of the window, `if x.shape[1] > k`) traces with the recorded call's branch and a
guard on it; a call whose branch goes the other way gets its own graph, the passes' edits
re-applied; one whose other path lacks a rewritten residual is refused in one line."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import WindowNet

import surgeon
from surgeon.applying import apply
from surgeon.errors import SpecializationError
from surgeon.graph.tracing import ShapeGuardMiss, shape_guard


def built() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = WindowNet()
    return model, copy.deepcopy(model)


def test_shape_branches_trace_and_find_every_add() -> None:
    model, _ = built()
    report = surgeon.inspect(model, (torch.randn(2, 10, 8),))
    assert not report.untraced
    assert sorted(r.module for r in report.residuals) == ["blocks.0", "blocks.0", "blocks.1",
                                                        "blocks.1"]
    graph = surgeon.trace(model, (torch.randn(2, 10, 8),)).traces["blocks.0"].graph
    guards = [n for n in graph.nodes if n.target is shape_guard]
    assert [g.args[1] for g in guards] == [True, True]  # 10 % 4 != 0 and 10 > 4


@pytest.mark.parametrize("passes", [["aion"], ["aion", "hyper"], ["adyt", "aion"]])
def test_other_shapes_take_their_branch(passes: list[str]) -> None:
    model, original = built()
    apply(model, passes, (torch.randn(2, 10, 8),))
    model.eval()
    exact = passes[0] == "aion"
    for t in (10, 12, 9, 16, 10):  # padded, not padded, padded by 3, ...
        x = torch.randn(2, t, 8)
        with torch.no_grad():
            got, want = model(x), original.eval()(x)
        assert got.shape == want.shape
        if exact:
            assert float((got - want).abs().max()) <= 1e-6, t
    specs = model.blocks[0].__dict__.get("_surgeon_specs", [])
    assert len(specs) == 1  # one more graph: the branch without padding
    # train mode and backward on a new shape
    model.train()
    model(torch.randn(2, 12, 8)).square().mean().backward()


def test_path_without_the_rewritten_add_is_refused() -> None:
    model, _ = built()
    apply(model, ["aion"], (torch.randn(2, 10, 8),))
    with pytest.raises(SpecializationError, match="blocks.0") as info:
        model(torch.randn(2, 3, 8))  # 3 ≤ window: the MLP residual is not on this path
    assert "\n" not in str(info.value)


def test_guard() -> None:
    shape_guard(True, True, "here")
    with pytest.raises(ShapeGuardMiss, match="at here"):
        shape_guard(False, True, "here")


def test_branch_on_values_stays_untraced() -> None:
    class ValueBranch(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data, not shapes: never specialised
                return x + self.fc(x)
            return x

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = ValueBranch()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    report = surgeon.inspect(Net(), (torch.ones(2, 4),))
    assert [u.module for u in report.untraced] == ["block", ""] or "block" in [
        u.module for u in report.untraced]
