"""Modules whose forward takes another path in train mode (class 9): a rewritten module runs the
graph of the mode it is in, layers a parent skips at random in train mode keep being skipped,
and hyper-connections carry their streams through a skipped layer."""

from __future__ import annotations

import copy

import pytest
import torch
from zoo import DropBlock, LayerDropNet, PostNormDropBlock

from surgeon.applying import apply
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


def skipping(pattern: list[bool]):
    """`torch.rand` as LayerDropNet (layerdrop 0.5) sees it: 0.9 (run) or 0.1 (skip) per layer."""
    values = iter([0.1 if skip else 0.9 for skip in pattern])
    return lambda *a, **k: torch.full(a[0] if a else [], next(values))


@pytest.mark.parametrize("block", [DropBlock, PostNormDropBlock])
def test_hyper_carries_the_streams_through_a_layer_skipped_by_layerdrop(
        monkeypatch: pytest.MonkeyPatch, block: type[DropBlock]) -> None:
    """LayerDrop: a skipped block is an identity on the n streams. Exact at init in both modes;
    with trained (random) mixing, skipping the middle block equals running the other two one
    after the other on the streams, not on one reduced stream; a skipped first or last block
    still gives (b, t, d). A post-norm block hands on its output after its norm."""
    torch.manual_seed(0)
    model = LayerDropNet(layerdrop=0.5, layers=3, block=block)
    original = copy.deepcopy(model)
    apply(model, ["hyper"], (X,))
    assert model.surgeon_drift[-1].max_abs == 0.0
    assert model.surgeon_hyper_coverage == "covers 3 of 3 residual adds in 1 trunk"
    want, got = outputs(original, range(6)), outputs(model, range(6))
    assert max(float((a - b).abs().max()) for a, b in zip(want, got)) == 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "hyper_" in name:
                p.add_(torch.randn_like(p) * 0.3)
    model.train()
    for layer in model.layers:  # no dropout in the blocks: only the skipping is random
        layer.eval()
    l0, l1, l2 = model.layers
    with torch.no_grad():
        monkeypatch.setattr(torch, "rand", skipping([False, True, False]))
        skipped = model(X)
        h = model.embed(X)
        chained = model.norm(l2(l0(h)))
        collapsed = model.norm(l2(l0(h).clone()))  # a copy drops the streams: one stream on
        for pattern in ([True, False, False], [False, False, True], [True, True, True]):
            monkeypatch.setattr(torch, "rand", skipping(pattern))
            assert model(X).shape == (2, 8, 32)
    torch.testing.assert_close(skipped, chained, rtol=0, atol=0)
    assert float((skipped - collapsed).abs().max()) > 1e-3


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
