"""Gated RMSNorms (`norm(x·silu(gate))`, Mamba2's MambaRMSNormGated) are found; adyt converts
them to the DyT of the gated input, or refuses in one line where the parent hands the norm's
weights to a fused kernel itself (Mamba2's mixer in training), which would bypass any ADyT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import surgeon
from surgeon import apply
from surgeon.nn.adyt import ADyT
from surgeon.recipe import PassError

mamba2 = pytest.importorskip("transformers.models.mamba2.modeling_mamba2")


class GatedBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.norm = mamba2.MambaRMSNormGated(d, group_size=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        h, gate = self.inp(x).chunk(2, dim=-1)
        return x + self.out(self.norm(h, gate))


class GatedNet(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(GatedBlock(d) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return F.gelu(x)


def test_gated_norm_becomes_dyt_of_the_gated_input() -> None:
    model = GatedNet().eval()
    with torch.no_grad():
        for b in model.blocks:
            b.norm.weight.uniform_(0.5, 1.5)
    weights = [b.norm.weight.detach().clone() for b in model.blocks]
    x = torch.randn(2, 5, 16)
    assert len(surgeon.inspect(model, (x,)).norms) == 2
    apply(model, ["adyt"], (x,))
    for b, w in zip(model.blocks, weights):
        assert isinstance(b.norm, ADyT) and b.norm.gate == "before"
        assert torch.equal(b.norm.weight, w)
        h, g = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
        want = torch.tanh(b.norm.alpha() * h * F.silu(g)) * w
        assert (b.norm(h, g) - want).abs().max() < 1e-6
    model.train()
    model(x).square().mean().backward()
    assert all(b.norm.alpha0.grad is not None for b in model.blocks)


def tiny_mamba2() -> nn.Module:
    config = mamba2.Mamba2Config(hidden_size=32, num_hidden_layers=2, state_size=8, expand=2,
                                 head_dim=8, num_heads=8, n_groups=1, vocab_size=64,
                                 chunk_size=8)
    return mamba2.Mamba2Model(config).eval()


def test_mamba2_finds_all_five_norms_and_adyt_refuses_the_fused_ones() -> None:
    model = tiny_mamba2()
    example = {"input_ids": torch.randint(0, 64, (2, 8))}
    norms = surgeon.inspect(model, example).norms
    assert sorted(n.module for n in norms) == sorted(
        ["layers.0.norm", "layers.0.mixer.norm", "layers.1.norm", "layers.1.mixer.norm",
         "norm_f"])
    before = model(**example).last_hidden_state
    with pytest.raises(PassError, match=r"^adyt: layers.0.mixer reads layers.0.mixer.norm"
                                        r"\.variance_epsilon .*exclude='layers.0.mixer.norm'$"):
        apply(model, ["adyt"], example)
    assert not any(isinstance(m, ADyT) for m in model.modules())
    assert torch.equal(model(**example).last_hidden_state, before)
    apply(model, ["adyt:exclude=layers.*.mixer.norm"], example)
    assert sum(isinstance(m, ADyT) for m in model.modules()) == 3
    model.train()
    model(**example).last_hidden_state.square().mean().backward()
