"""ADyT on norms written into a block's forward (`F.layer_norm`, an inline RMSNorm): the norm's
sub-graph becomes an ADyT call holding the norm's own gain and bias."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from zoo import FunctionalNormNet, tokens

import surgeon
from surgeon import apply
from surgeon.nn.adyt import ADyT
from surgeon.recipe import PassError


def _randomise_gains(model: nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("ln_w", "ln_b", "rms_w"):
                p.uniform_(0.5, 1.5)


def test_functional_norms_become_adyt_with_their_own_parameters() -> None:
    model = FunctionalNormNet().eval()
    _randomise_gains(model)
    example = (tokens(64),)
    reference = copy.deepcopy(model)
    keys = set(model.state_dict())
    apply(model, ["adyt"], example)
    assert keys <= set(model.state_dict())
    adyts = {n: m for n, m in model.named_modules() if isinstance(m, ADyT)}
    assert len(adyts) == 5
    for i in (0, 1):
        block, orig = model.blocks[i], reference.blocks[i]
        ln = next(m for m in adyts.values() if m.weight is block.ln_w)
        rms = next(m for m in adyts.values() if m.weight is block.rms_w)
        assert ln.bias is block.ln_b and rms.bias is None
        assert torch.equal(block.ln_w, orig.ln_w) and torch.equal(block.rms_w, orig.rms_w)
        # no norm is left in the block's forward: what ran before is now tanh
        code = block.code
        assert "layer_norm" not in code and "rsqrt" not in code
    # the block computes x + fc1(DyT(x)) with the norm's gain and bias, exactly
    block, orig = model.blocks[0], reference.blocks[0]
    ln = next(m for m in adyts.values() if m.weight is block.ln_w)
    rms = next(m for m in adyts.values() if m.weight is block.rms_w)
    x = torch.randn(2, 8, 32)
    a = ln.alpha()
    h = x + orig.fc1(torch.tanh(a * x) * orig.ln_w + orig.ln_b)
    want = h + orig.fc2(torch.tanh(rms.alpha() * h) * orig.rms_w)
    assert (block(x) - want).abs().max() < 1e-6
    # trains: the shared gain gets a gradient through the ADyT
    model.train()
    model(*example).square().mean().backward()
    assert block.ln_w.grad is not None and ln.alpha0.grad is not None
    assert block.rms_w.grad is not None and rms.alpha0.grad is not None
    # applying again changes nothing
    assert apply(model, ["adyt"], example) is model
    assert sum(isinstance(m, ADyT) for m in model.modules()) == 5


def test_functional_norms_with_aion_first() -> None:
    """AION's x_norm reads the norm; after adyt it reads the ADyT (no norm left behind)."""
    model = FunctionalNormNet().eval()
    apply(model, ["aion", "adyt"], (tokens(64),))
    assert sum(isinstance(m, ADyT) for m in model.modules()) == 5
    assert all("rsqrt" not in b.code and "layer_norm" not in b.code for b in model.blocks)


def test_save_and_load_keep_the_shared_parameters(tmp_path) -> None:
    model = FunctionalNormNet().eval()
    _randomise_gains(model)
    example = (tokens(64),)
    apply(model, ["adyt"], example)
    out = surgeon.save(model, tmp_path / "m", base="zoo:FunctionalNormNet")
    back = surgeon.load(out, trust_remote_code=True)
    assert back.blocks[0].adyt.weight is back.blocks[0].ln_w
    assert torch.equal(back(*example), model(*example))


class NoGain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc(x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class Wrap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([NoGain(), NoGain()])
        self.norm = nn.LayerNorm(8)  # convertible, and left as it is by the refusal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return F.gelu(self.norm(x))


def test_gainless_inline_norm_is_refused() -> None:
    model = Wrap().eval()
    x = torch.randn(2, 3, 8)
    before = model(x)
    try:
        apply(model, ["adyt"], (x,))
    except PassError as e:
        assert "exclude='blocks.0'" in str(e) and "\n" not in str(e)
    else:
        raise AssertionError("a gainless inline norm of unknown width converted")
    assert torch.equal(model(x), before)
    assert not any(isinstance(m, ADyT) for m in model.modules())
