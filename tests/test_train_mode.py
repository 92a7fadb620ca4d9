"""Modules whose forward takes another path in train mode (class 9): a rewritten module runs the
graph of the mode it is in, layers a parent skips at random in train mode keep being skipped,
and hyper-connections, which need every block of a trunk to run, refuse such a trunk."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import LayerDropNet

from surgeon.applying import apply
from surgeon.errors import ModuleError
from surgeon.graph.tracing import TracedModule

X = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))


def outputs(model: torch.nn.Module, seeds: range) -> list[torch.Tensor]:
    model.train()
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(model(X).detach())
    return out


@pytest.mark.parametrize("layerdrop", [0.0, 0.5])
def test_train_mode_matches_the_original(layerdrop: float) -> None:
    """With a pass exact in both modes (AION's Pre-LN preset, α = 1), the converted model in
    train mode computes what the original does under the same random state: the same dropout
    masks, the same layers skipped."""
    torch.manual_seed(0)
    model = LayerDropNet(layerdrop=layerdrop)
    original = copy.deepcopy(model)
    apply(model, ["aion:preset=preln"], (X,))
    blocks = [model.layers[0], model.layers[1]]
    assert all(isinstance(b, TracedModule) and "_train_forward" in b.__dict__ for b in blocks)
    want, got = outputs(original, range(6)), outputs(model, range(6))
    assert max(float((a - b).abs().max()) for a, b in zip(want, got)) == 0.0
    # dropout is on in train mode (the eval graph would drop nothing) ...
    model.eval()
    with torch.no_grad():
        ev = model(X)
    assert all(float((g - ev).abs().max()) > 1e-3 for g in got)
    # ... and with layerdrop some seeds skip a layer: the outputs fall into more groups
    distinct = {round(float(g.detach()[..., 0].sum()), 4) for g in got}
    assert len(distinct) == 6
    if layerdrop:
        skipped = 0
        for seed in range(6):
            torch.manual_seed(seed)
            skipped += sum(bool(torch.rand([]) < layerdrop) for _ in range(2))
        assert skipped > 0


def test_train_step_and_backward() -> None:
    torch.manual_seed(0)
    model = LayerDropNet(layerdrop=0.5)
    apply(model, ["aion", "adyt"], (X,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(4):
        torch.manual_seed(seed)
        loss = model(X).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


def test_hyper_refuses_a_trunk_with_layerdrop() -> None:
    torch.manual_seed(0)
    model = LayerDropNet(layerdrop=0.5)
    keys = list(model.state_dict())
    with pytest.raises(ModuleError) as info:
        apply(model, ["hyper"], (X,))
    msg = str(info.value)
    assert "layers.0 (DropBlock)" in msg and "LayerDrop" in msg
    assert "exclude=['layers.*']" in msg and "\n" not in msg
    assert list(model.state_dict()) == keys and not any(
        isinstance(m, TracedModule) for m in model.modules())
    # without layerdrop the same model converts, exactly
    model = LayerDropNet(layerdrop=0.0)
    apply(model, ["hyper"], (X,))
    assert model.surgeon_drift[-1].max_abs == 0.0


def test_copy_keeps_the_train_graph() -> None:
    torch.manual_seed(0)
    model = LayerDropNet()
    apply(model, ["aion:preset=preln"], (X,))
    twin = copy.deepcopy(model)
    assert "_train_forward" in twin.layers[0].__dict__
    torch.manual_seed(3)
    a = model.train()(X)
    torch.manual_seed(3)
    assert torch.equal(twin.train()(X), a)


def test_second_pass_keeps_train_graph() -> None:
    """A rewritten module rewritten again: the new edits reach its train-mode graph too."""
    torch.manual_seed(0)
    model = LayerDropNet()
    original = copy.deepcopy(model)
    apply(model, ["aion:preset=preln"], (X,))
    apply(model, ["adyt"], (X,))
    assert "_train_forward" in model.layers[0].__dict__
    torch.manual_seed(5)
    out = model.train()(X)
    torch.manual_seed(5)
    assert not torch.equal(out, original.train()(X))  # ADyT is in the train graph too
    assert torch.isfinite(out).all()
