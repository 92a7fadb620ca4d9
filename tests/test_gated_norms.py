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
# transformers 5.25 renamed MambaRMSNormGated to Mamba2RMSNormGated
GATED_NORM = getattr(mamba2, "Mamba2RMSNormGated", None) or mamba2.MambaRMSNormGated


class GatedBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.norm = GATED_NORM(d, group_size=d)

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


def test_mamba2_finds_all_five_norms_and_adyt_converts_the_mixers_guarded() -> None:
    """No kernel installed: the mixer calls its norm as a module in eval and train, so the norm
    converts (its `variance_epsilon` kept for the fused branch's argument list)."""
    model = tiny_mamba2()
    example = {"input_ids": torch.randint(0, 64, (2, 8))}
    norms = surgeon.inspect(model, example).norms
    assert sorted(n.module for n in norms) == sorted(
        ["layers.0.norm", "layers.0.mixer.norm", "layers.1.norm", "layers.1.mixer.norm",
         "norm_f"])
    apply(model, ["adyt"], example)
    assert sum(isinstance(m, ADyT) for m in model.modules()) == 5
    assert model.layers[0].mixer.norm.variance_epsilon == 1e-5
    model.train()
    model(**example).last_hidden_state.square().mean().backward()
    assert model.layers[0].mixer.norm.alpha0.grad is not None


class FusedRMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


KERNEL = {"installed": False}


class FusedMixer(nn.Module):
    """Like Mamba2's mixer: in training it hands its norm's weight and eps to a "kernel" (when
    one is installed) that computes the norm itself."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.inp, self.out = nn.Linear(d, d), nn.Linear(d, d)
        self.norm = FusedRMSNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.training and KERNEL["installed"]:
            w, eps = self.norm.weight, self.norm.variance_epsilon
            return self.out(w * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
        return self.out(self.norm(h))


class FusedNet(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.ln = nn.ModuleList(nn.LayerNorm(d) for _ in range(2))
        self.mix = nn.ModuleList(FusedMixer(d) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for ln, mix in zip(self.ln, self.mix):
            x = x + mix(ln(x))
        return x


def test_fused_path_reachable_is_refused_up_front() -> None:
    model, x = FusedNet().eval(), torch.randn(2, 5, 16)
    KERNEL["installed"] = True
    try:
        with pytest.raises(PassError, match=r"^adyt: mix.0 reads mix.0.norm.variance_epsilon "
                                            r"itself .*exclude='mix.0.norm'$"):
            apply(model, ["adyt"], (x,))
        assert not any(isinstance(m, ADyT) for m in model.modules())
        apply(model, ["adyt:exclude=mix.*.norm"], (x,))
        assert sum(isinstance(m, ADyT) for m in model.modules()) == 2
    finally:
        KERNEL["installed"] = False


def test_fused_path_taken_after_conversion_fails_loudly() -> None:
    import copy

    from passes.adyt import FusedPathError

    model, x = FusedNet().eval(), torch.randn(2, 5, 16)
    apply(model, ["adyt"], (x,))
    assert sum(isinstance(m, ADyT) for m in model.modules()) == 4
    model.train()
    model(x).square().mean().backward()  # the module path: fine
    twin = copy.deepcopy(model)
    KERNEL["installed"] = True  # a kernel installed later would compute the old norm
    try:
        for m in (model, twin):
            with pytest.raises(FusedPathError, match="FusedMixer.norm: .*bypassed its ADyT"):
                m(x)
        model.eval()
        model(x)  # eval takes the module path
    finally:
        KERNEL["installed"] = False


def test_falcon_mamba_parameter_free_narrow_norms_convert_with_their_own_width() -> None:
    """FalconMamba's dt/B/C RMSNorms hold no parameter (a dummy `weight` buffer of the inner
    width, not the time-step rank they normalise): each ADyT takes the width it is called on.
    B and C feed the scan's products like keys and queries: q/k norms, kept by default."""
    fm = pytest.importorskip("transformers.models.falcon_mamba.modeling_falcon_mamba")
    config = fm.FalconMambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2,
                                  vocab_size=64, expand=2, conv_kernel=4, time_step_rank=4,
                                  use_cache=False)
    example = {"input_ids": torch.randint(0, 64, (2, 8))}
    model = fm.FalconMambaModel(config).eval()
    report = surgeon.inspect(model, example)
    assert len(report.norms) == 9
    apply(model, ["adyt"], example)
    mixer = model.layers[0].mixer
    assert isinstance(mixer.dt_layernorm, ADyT) and mixer.dt_layernorm.normalized_shape == (4,)
    assert not isinstance(mixer.b_layernorm, ADyT)
    model = fm.FalconMambaModel(config).eval()
    apply(model, ["adyt:qk_norms=true"], example)
    assert sum(isinstance(m, ADyT) for m in model.modules()) == 9
    assert model.layers[1].mixer.c_layernorm.normalized_shape == (8,)
    model.train()
    model(**example).last_hidden_state.square().mean().backward()
    assert model.layers[0].mixer.dt_layernorm.alpha0.grad is not None
