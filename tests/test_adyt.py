"""ADyT and DyT: closed form, weights from the replaced norm, the clamp's gradient, α inits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from surgeon.nn import ADyT, dyt_llama_alpha0
from surgeon.nn.adyt import InwardClamp

D = 16


def test_forward_closed_form_with_defaults() -> None:
    m = ADyT(D)
    with torch.no_grad():
        m.weight.normal_(), m.bias.normal_()
    x = torch.randn(3, 5, D)
    alpha = 0.5 * (1 + 0.1 / (1e-6 + 1.0))  # G_0 = 1: α = 0.55
    assert m.alpha().item() == pytest.approx(alpha)
    torch.testing.assert_close(m(x), m.weight * torch.tanh(alpha * x) + m.bias)
    m.eval()  # eval uses the same adapted α
    torch.testing.assert_close(m(x), m.weight * torch.tanh(alpha * x) + m.bias)


@pytest.mark.parametrize("g, expected", [(0.5, 0.5 * 1.2), (1e-3, 2.0), (1e9, 0.5)])
def test_alpha_follows_the_gradient_norm_ema(g: float, expected: float) -> None:
    m = ADyT(D)
    m.grad_norm_ema.fill_(g)
    assert m.alpha().item() == pytest.approx(min(expected, 2.0), rel=1e-5)
    m.alpha0.data.fill_(1e-6)
    assert m.alpha().item() == pytest.approx(0.1)  # clamped at alpha_min


def test_dyt_is_adyt_without_adaptation() -> None:
    m = ADyT(D, alpha0=5.0, adaptive=False, bias=False)
    m.grad_norm_ema.fill_(1e-3)
    x = torch.randn(4, D)
    assert m.alpha().item() == 5.0  # no adaptation, no clamp
    torch.testing.assert_close(m(x), torch.tanh(5.0 * x))
    assert set(m.state_dict()) == {"weight", "alpha0", "grad_norm_ema", "grad_norm_steps",
                                   "input_scale"}


@pytest.mark.parametrize(
    "norm, has_bias",
    [(nn.LayerNorm(D), True), (nn.LayerNorm(D, bias=False), False), (nn.RMSNorm(D), False),
     (LlamaRMSNorm(D), False), (nn.LayerNorm(D, elementwise_affine=False), True)],
)
def test_from_norm_carries_weight_and_bias(norm: nn.Module, has_bias: bool) -> None:
    with torch.no_grad():
        for p in norm.parameters():
            p.normal_()
    m = ADyT.from_norm(norm, alpha0=0.8)
    assert m.normalized_shape == (D,) and (m.bias is not None) == has_bias
    weight = getattr(norm, "weight", None)
    assert torch.equal(m.weight, weight if weight is not None else torch.ones(D))
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        assert torch.equal(m.bias, norm.bias)
    assert m.alpha0.item() == pytest.approx(0.8)


def test_from_norm_keeps_dtype_with_fp32_statistics() -> None:
    m = ADyT.from_norm(nn.LayerNorm(D).bfloat16())
    assert m.weight.dtype == torch.bfloat16 and m.alpha0.dtype == torch.float32
    assert m.grad_norm_ema.dtype == torch.float32
    assert m(torch.randn(2, D, dtype=torch.bfloat16)).dtype == torch.bfloat16


def alpha0_grad(m: ADyT, sign: float) -> float:
    """∂L/∂alpha0 for L = sign·Σ y on positive inputs (∂L/∂α has the sign of `sign`)."""
    m.alpha0.grad = None
    (sign * m(torch.rand(4, D) + 0.1).sum()).backward()
    return m.alpha0.grad.item()


@pytest.mark.parametrize("g, sign, passes", [
    (1e-3, +1.0, True),   # above alpha_max, descent lowers α: inward, let through
    (1e-3, -1.0, False),  # above alpha_max, descent raises α: outward, blocked
    (1.0, +1.0, True),    # in range: the plain gradient
    (1.0, -1.0, True),
])
def test_clamp_gradient_passes_inward_only(g: float, sign: float, passes: bool) -> None:
    m = ADyT(D)
    m.grad_norm_ema.fill_(g)
    grad = alpha0_grad(m, sign)
    assert (grad != 0.0) == passes
    if passes:
        assert grad * sign > 0


def test_clamp_below_alpha_min() -> None:
    a = torch.tensor(0.05, requires_grad=True)
    out = InwardClamp.apply(a, 0.1, 2.0)
    assert out.item() == pytest.approx(0.1)
    (g_in,) = torch.autograd.grad(out, a, torch.tensor(-1.0))  # descent raises a: inward
    (g_out,) = torch.autograd.grad(InwardClamp.apply(a, 0.1, 2.0), a, torch.tensor(1.0))
    assert g_in.item() == -1.0 and g_out.item() == 0.0


def test_alpha0_does_not_freeze_once_clamped() -> None:
    """Small gradient norms saturate α; a loss that wants a smaller α still moves alpha0 back."""
    m = ADyT(D)
    m.grad_norm_ema.fill_(1e-3)
    assert m.alpha().item() == 2.0
    opt = torch.optim.SGD([m.alpha0], lr=1e-4)
    for _ in range(50):
        opt.zero_grad()
        m(torch.rand(4, D) + 0.1).sum().backward()
        opt.step()
    assert m.alpha().item() < 2.0


@pytest.mark.parametrize("role, width, expected", [
    ("attention", 64, 0.8), ("ffn", 4096, 0.2), ("final", 4096, 0.2),
    ("attention", 5120, 0.6), ("ffn", 5120, 0.15),
    ("attention", 8192, 0.2), ("final", 8192, 0.05),
])
def test_llama_alpha0_rule(role: str, width: int, expected: float) -> None:
    assert dyt_llama_alpha0(role, width) == expected


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="norm role"):
        dyt_llama_alpha0("mlp", 64)
    with pytest.raises(ValueError, match="alpha_min"):
        ADyT(D, alpha_min=3.0)
    with pytest.raises(ValueError, match="smoothing"):
        ADyT(D, smoothing=1.0)


def test_the_gradient_norm_ema_is_bias_corrected() -> None:
    m = ADyT(D, smoothing=0.9)
    gs = [0.3, 2.0, 0.05, 1.0]
    for t, g in enumerate(gs, start=1):
        m.update_grad_norm_(torch.tensor(g))
        weights = [(1 - 0.9) * 0.9 ** (t - i) for i in range(1, t + 1)]
        want = sum(w * x for w, x in zip(weights, gs)) / (1 - 0.9**t)  # Adam's m̂_t
        assert m.grad_norm_ema.item() == pytest.approx(want, rel=1e-6)
        assert m.grad_norm_steps.item() == t
    # the first update sets G_1 = g_1, so α starts at α0·(1 + λ/(ε + g_1))
    first = ADyT(D, smoothing=0.99)
    first.update_grad_norm_(torch.tensor(0.25))
    assert first.alpha().item() == pytest.approx(0.5 * (1 + 0.1 / (1e-6 + 0.25)), rel=1e-6)


def test_skipped_and_overflowed_updates_move_nothing() -> None:
    m = ADyT(D)
    m.update_grad_norm_(torch.tensor(0.5), keep=torch.tensor(True))  # GradScaler skipped it
    m.update_grad_norm_(torch.tensor(float("inf")))
    assert (m.grad_norm_ema.item(), m.grad_norm_steps.item()) == (1.0, 0)


@pytest.mark.parametrize("g, steps", [(1.0, 0), (0.3, 1656)])
def test_a_state_dict_without_the_step_count_loads(g: float, steps: int) -> None:
    """Checkpoints written before the correction: G still at its start value counts no
    updates; a G that moved continues as a plain EMA (the correction has settled)."""
    old = {"weight": torch.ones(D), "bias": torch.zeros(D), "alpha0": torch.tensor(0.5),
           "grad_norm_ema": torch.tensor(g)}
    m = ADyT(D)
    m.load_state_dict(old)  # strict
    assert m.grad_norm_steps.item() == steps
    m.update_grad_norm_(torch.tensor(2.0))
    assert m.grad_norm_ema.item() == pytest.approx(2.0 if steps == 0 else 0.99 * g + 0.01 * 2.0)
