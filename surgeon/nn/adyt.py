"""ADyT: `w ⊙ tanh(α(t)·x) + b`, a normalisation-free stand-in for LayerNorm / RMSNorm.

`α(t) = clamp(alpha0·(1 + lam/(eps + G_t)), alpha_min, alpha_max)` where `G_t` (buffer
`grad_norm_ema`) is the bias-corrected EMA of the L2 norm `g_t` of this layer's parameter
gradients (Adam's correction: `G_t = m_t/(1 − s^t)`, `m_t = s·m_{t−1} + (1−s)·g_t`, `m_0 = 0`), so
the first step sets `G_1 = g_1` instead of dragging a made-up start value along for ~1/(1−s)
steps; `grad_norm_steps` counts the updates `t`. Before the first update `G_0 = 1`. It is updated
at each optimizer step by `surgeon.attach` — after GradScaler has unscaled the gradients and after
DDP has averaged them, so no collective and no host sync is needed. With `adaptive=False` this
is plain DyT (Zhu et al. 2025): `α = alpha0`.

`input_scale` (buffer `s`, fp32 `(1,)`, default 1) multiplies the input: the forward computes
`w ⊙ tanh(α(t)·s·x) + b`. Calibration (`passes/adyt_calibration.py`) sets it so that a trained
model's norm, whose input rms may be anywhere from 0.01 to 100, gets the slope `α·s` it needs
while α(t) itself stays inside `[alpha_min, alpha_max]`; it is not trained.

The clamp passes a gradient that would move α back into range and blocks only one that would
push it further out, so `alpha0` never freezes once α saturates (the public ADyT zeroes it).
Eval uses the same adapted α as training.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.nn.scalars import scalar_parameter
from surgeon.nn.state import RebuildsOptionalState

# DyT's LLaMA α0 by width (official code): (width ≤, attention, ffn, final).
_LLAMA_ALPHA0 = ((4096, 0.8, 0.2, 0.2), (5120, 0.6, 0.15, 0.15), (None, 0.2, 0.05, 0.05))
ROLES = ("attention", "ffn", "final")


def dyt_llama_alpha0(role: str, width: int) -> float:
    """DyT's α0 for a LLaMA-style model: attention-input norms get more than FFN-input and final
    norms, and all shrink with width (7B 0.8/0.2/0.2, 13B 0.6/0.15/0.15, 34B+ 0.2/0.05/0.05;
    narrower models take the 7B row)."""
    if role not in ROLES:
        raise ValueError(f"unknown norm role {role!r}; choose one of {', '.join(ROLES)}")
    for limit, *values in _LLAMA_ALPHA0:
        if limit is None or width <= limit:
            return values[ROLES.index(role)]
    raise AssertionError("unreachable")


class InwardClamp(torch.autograd.Function):
    """`clamp(a, lo, hi)` whose backward lets through the gradient that would move `a` back
    into `[lo, hi]` (under gradient descent) and blocks only the one that pushes it out."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.lo, ctx.hi = lo, hi
        return a.clamp(lo, hi)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (a,) = ctx.saved_tensors
        outward = ((a > ctx.hi) & (grad < 0)) | ((a < ctx.lo) & (grad > 0))
        return grad.masked_fill(outward, 0.0), None, None


class ADyT(RebuildsOptionalState):
    """Adaptive dynamic tanh over the last `len(normalized_shape)` dimensions, or over axis 1
    with `channels_first=True` (the stand-in for a `LayerNorm2d` on `(b, c, h, w)`)."""

    _surgeon_atomic = True  # tracing treats it as a leaf: passes never rewrite it again
    # Records a checkpoint may lack (written before the EMA was bias-corrected): rebuilt by
    # `reset_optional_state_`; `load_state_dict` and `surgeon.load` accept their absence.
    optional_state: ClassVar[tuple[str, ...]] = ("grad_norm_steps", "input_scale")

    def __init__(
        self,
        normalized_shape: int | tuple[int, ...],
        *,
        alpha0: float = 0.5,
        bias: bool = True,
        adaptive: bool = True,
        lam: float = 0.1,
        smoothing: float = 0.99,
        eps: float = 1e-6,
        alpha_min: float = 0.1,
        alpha_max: float = 2.0,
        channels_first: bool = False,
        gate: str | None = None,
    ) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        if not 0 < alpha_min <= alpha_max:
            raise ValueError(f"need 0 < alpha_min <= alpha_max, got {alpha_min}, {alpha_max}")
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.normalized_shape = tuple(shape)
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape)) if bias else None
        self.alpha0 = scalar_parameter(alpha0)  # (1,): FSDP shards no 0-dim parameter
        self.register_buffer("grad_norm_ema", torch.tensor(1.0))  # G_t, bias-corrected
        self.register_buffer("grad_norm_steps", torch.tensor(0, dtype=torch.int64))  # t
        self.register_buffer("input_scale", torch.ones(1))  # s: tanh(α(t)·s·x), calibrated
        self.adaptive = adaptive
        self.lam, self.smoothing, self.eps = lam, smoothing, eps
        self.alpha_min, self.alpha_max = alpha_min, alpha_max
        if channels_first and len(self.normalized_shape) != 1:
            raise ValueError("channels_first needs a 1-D normalized_shape (the channels)")
        self.channels_first = channels_first
        if gate not in (None, "before", "after"):
            raise ValueError(f"gate must be None, 'before' or 'after', got {gate!r}")
        # a gated norm's stand-in (Mamba2's norm(x·silu(gate))): where the gate multiplies
        self.gate = gate
        # Set by the `adyt` pass's training recipe, which matched the gain to α at conversion:
        # the first update of `G` moves α(t) from α0·(1 + λ/(ε + 1)) to α0·(1 + λ/(ε + g_1)),
        # so it rescales the gain by their ratio and the layer's output keeps its scale.
        self.keep_scale_at_first_update = False
        self._attachment: Any = None  # weakref to the `surgeon.attach` handle, if any

    @classmethod
    def from_norm(cls, norm: nn.Module, **kwargs: Any) -> ADyT:
        """An ADyT that takes the place of `norm`: its shape, weight, and bias (if it has one:
        RMSNorm has none). A LayerNorm without affine parameters gives `w = 1`, `b = 0`."""
        shape = getattr(norm, "normalized_shape", None)
        weight = getattr(norm, "weight", None)
        if shape is None and isinstance(weight, torch.Tensor):
            shape = tuple(weight.shape)
        if shape is None:
            raise ValueError(f"cannot tell the shape of {type(norm).__name__}: pass an ADyT")
        norm_bias = getattr(norm, "bias", None)
        no_affine = isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine
        has_bias = isinstance(norm_bias, torch.Tensor) or no_affine
        kwargs.setdefault("bias", has_bias)
        module = cls(shape, **kwargs)
        ref = weight if isinstance(weight, torch.Tensor) else module.weight
        module.to(device=ref.device, dtype=ref.dtype)
        module.alpha0.data = module.alpha0.data.float()
        module.grad_norm_ema.data = module.grad_norm_ema.data.float()
        module.input_scale.data = module.input_scale.data.float()
        with torch.no_grad():
            if isinstance(weight, torch.Tensor):
                module.weight.copy_(weight)
            if module.bias is not None and isinstance(norm_bias, torch.Tensor):
                module.bias.copy_(norm_bias)
        return module

    def alpha(self) -> torch.Tensor:
        """α(t) as the forward uses it (fp32 scalar)."""
        alpha0 = self.alpha0.reshape(())
        if not self.adaptive:
            return alpha0
        return InwardClamp.apply(alpha0 * self._adaptation(self.grad_norm_ema), self.alpha_min,
                                 self.alpha_max)

    def _adaptation(self, G: torch.Tensor) -> torch.Tensor:
        """α(t)/α0 before the clamp: `1 + λ/(ε + G)`, 0-dim."""
        return 1.0 + self.lam / (self.eps + G)

    def forward(self, x: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
        if gate is not None and self.gate is None:
            raise TypeError("this ADyT takes no gate (it stands in for an ungated norm)")
        if gate is not None and self.gate == "before":
            x = x * F.silu(gate)  # DyT of the gated input, as the norm normalised it
        y = self._dyt(x)
        return y * F.silu(gate) if gate is not None and self.gate == "after" else y

    def _dyt(self, x: torch.Tensor) -> torch.Tensor:
        slope = self.alpha() * self.input_scale.reshape(())  # α(t)·s, fp32 scalar
        y = torch.tanh(slope * x)  # (..., *normalized_shape) or (b, c, ...), x's dtype
        if self.channels_first:
            trail = (1,) * (x.dim() - 2)
            y = y * self.weight.view(-1, *trail)  # (c, 1, ..., 1)
            return y if self.bias is None else y + self.bias.view(-1, *trail)
        y = y * self.weight
        return y if self.bias is None else y + self.bias

    @torch.no_grad()
    def update_grad_norm_(self, g: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Move `G` by one step's gradient norm `g` (0-dim fp32), bias-corrected; where `keep`
        (0-dim bool) is true, or the result is not finite, `G` and the count stay as they were.
        Tensor ops only, so it runs inside a step hook at full speed: no host sync, except one
        per step while `keep_scale_at_first_update` waits for the first update."""
        G, t = self.grad_norm_ema, self.grad_norm_steps
        rescale = self.keep_scale_at_first_update and self.adaptive
        before, first = (self._alpha_of(G), t == 0) if rescale else (None, None)
        # m_t/(1 − s^t) written as a step towards g: G + w·(g − G), w = (1 − s)/(1 − s^(t+1)),
        # so w is exactly 1 on the first update (G_1 = g_1) and → 1 − s as t grows
        base = torch.full_like(G, self.smoothing)  # s in G's dtype: w is exactly 1 when t = 0
        w = (1.0 - base) / (1.0 - base.pow(t + 1))
        new = G + w * (g.to(G.dtype) - G)
        stay = ~torch.isfinite(new) if keep is None else keep | ~torch.isfinite(new)
        G.copy_(torch.where(stay, G, new))
        t.copy_(torch.where(stay, t, t + 1))
        if before is not None:  # until the first update happened: one host sync per step
            first, updated = bool(first), not bool(stay)
            if first and updated:
                weight = self.weight.to_local() if hasattr(self.weight, "to_local") else self.weight
                weight.mul_((before / self._alpha_of(G)).to(weight.dtype))  # FSDP2: own shard
            if updated or not first:  # done, or a checkpoint's count already past it
                self.keep_scale_at_first_update = False

    def _alpha_of(self, G: torch.Tensor) -> torch.Tensor:
        """α(t) for a given `G`, outside the forward (FSDP2 shards α0 there: gathered)."""
        alpha0 = self.alpha0.full_tensor() if hasattr(self.alpha0, "full_tensor") else self.alpha0
        return (alpha0.float().reshape(()) * self._adaptation(G.float())).clamp(
            self.alpha_min, self.alpha_max)

    @torch.no_grad()
    def reset_optional_state_(self, names: tuple[str, ...] = optional_state) -> ADyT:
        """Rebuild `grad_norm_steps` for a state dict without it: 0 if `G` is still at its start
        value 1, else the count after which the correction no longer changes fp32 values (an EMA
        that had run long enough: `G` continues as a plain EMA). `input_scale` (absent from
        state dicts written before calibration set it) becomes 1: the forward they computed."""
        if "input_scale" in names:
            one = torch.ones(1)
            if self.input_scale.is_meta:
                self.input_scale = one.to(self.grad_norm_ema.device)
            else:
                self.input_scale.copy_(one)
        if "grad_norm_steps" in names:
            s = self.smoothing
            settled = 0 if s == 0 else math.ceil(math.log(2.0 ** -24) / math.log(s))
            fresh = self.grad_norm_ema.is_meta or float(self.grad_norm_ema) == 1.0
            value = torch.tensor(0 if fresh else settled, dtype=torch.int64)
            if self.grad_norm_steps.is_meta:  # loaded with assign=True into a meta module
                self.grad_norm_steps = value.to(self.grad_norm_ema.device)
            else:
                self.grad_norm_steps.copy_(value)
        return self

    def extra_repr(self) -> str:
        kind = "adaptive" if self.adaptive else "DyT"
        layout = ", channels_first" if self.channels_first else ""
        layout += f", gate={self.gate}" if self.gate else ""
        return f"{self.normalized_shape}, {kind}, bias={self.bias is not None}{layout}"
