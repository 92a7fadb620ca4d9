"""AION adaptive residual: `out = x + α·y`, `α = alpha0 / (1 + beta·r_s)`.

`r` is the branch's energy ratio, the mean over tokens of `E[y] / (E[x_norm] + ε)` with
`E[t] = mean(t², -1)` taken in fp32, and `r_s` its EMA (`ratio_ema`, starting at 1.0).

A drop-in replacement for `aion_torch.AionResidual` (same constructor, `forward(x, y, x_norm)`,
buffer `ratio_ema`) without its defects: no `.item()` and no collective in the forward (the EMA
is updated in place on the device, or once per optimizer step for all layers together after
`surgeon.attach`), eval computes α from the current parameters and EMA, and backward works in
eval. Presets `aion`, `deepnorm`, `preln`, `rezero` are the same module with other defaults.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

PRESETS = ("aion", "deepnorm", "preln", "rezero")


def energy(t: torch.Tensor) -> torch.Tensor:
    """`E[t] = mean(t², -1)` accumulated in fp32 whatever t's dtype: shape `t[..., 0]`."""
    return t.float().pow(2).mean(-1)


class AionResidual(nn.Module):
    """`x + α·y` with `α = alpha0 / (1 + beta·r_s)`; see the module docstring.

    `ema_gamma = 1` turns smoothing off (training uses the batch ratio, as aion-torch does;
    `ratio_ema` then holds the latest ratio). The presets other than `aion` freeze `beta` at 0
    and set `adaptive = False`: α is then a plain scale and the forward skips the ratio.
    """

    _surgeon_atomic = True  # tracing treats it as a leaf: passes never rewrite it again

    def __init__(
        self,
        alpha0: float = 0.1,
        beta: float = 0.05,
        ema_gamma: float = 0.99,
        epsilon: float = 1e-8,
    ) -> None:
        super().__init__()
        if alpha0 <= 0:
            raise ValueError(f"alpha0 must be positive, got {alpha0}")
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        if not 0 <= ema_gamma <= 1:
            raise ValueError(f"ema_gamma must be in [0, 1], got {ema_gamma}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        self.alpha0 = nn.Parameter(torch.tensor(float(alpha0)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))
        self.register_buffer("ratio_ema", torch.tensor(1.0))
        self.ema_gamma = float(ema_gamma)
        self.epsilon = float(epsilon)
        self.preset = "aion"
        # Whether training tracks the ratio; the fixed-β presets switch it off (α = alpha0).
        self.adaptive = True
        # Set by `surgeon.attach`: this module's row of a shared (L, 2) tensor (a view, so that
        # compiled blocks don't specialise on the row number); the forward adds (Σ ratio,
        # token count) to it and the EMA moves once per optimizer step.
        self._pending: torch.Tensor | None = None
        self._attachment: Any = None  # weakref to the `surgeon.attach` handle, if any

    @classmethod
    def from_preset(
        cls,
        preset: str = "aion",
        *,
        num_layers: int | None = None,
        ema_gamma: float = 0.99,
        epsilon: float = 1e-8,
    ) -> AionResidual:
        """The general form's named points: `aion` (α0 0.1, β 0.05, both learnable),
        `deepnorm` (α0 = 1/√(2L) fixed, needs `num_layers`), `preln` (α = 1 fixed, the plain
        residual), `rezero` (α0 learnable from 0). β is frozen at 0 except for `aion`."""
        if preset not in PRESETS:
            raise ValueError(f"unknown AION preset {preset!r}; choose one of {', '.join(PRESETS)}")
        if preset == "aion":
            module = cls(ema_gamma=ema_gamma, epsilon=epsilon)
        else:
            module = cls(alpha0=1.0, beta=0.0, ema_gamma=ema_gamma, epsilon=epsilon)
            module.beta.requires_grad_(False)
            module.adaptive = False
            if preset == "deepnorm":
                if not num_layers or num_layers < 1:
                    raise ValueError("the deepnorm preset needs num_layers (the trunk's depth L)")
                module.alpha0.data.fill_(1.0 / math.sqrt(2 * num_layers))
                module.alpha0.requires_grad_(False)
            elif preset == "preln":
                module.alpha0.requires_grad_(False)
            else:  # rezero
                module.alpha0.data.zero_()
        module.preset = preset
        return module

    @property
    def _gamma(self) -> float:
        # γ = 1 means "no smoothing" (aion-torch): the step's ratio replaces the EMA.
        return 0.0 if self.ema_gamma == 1.0 else self.ema_gamma

    def alpha(self) -> torch.Tensor:
        """α from the current parameters and EMA: what eval uses (fp32 scalar)."""
        return self.alpha0 / (1.0 + self.beta * self.ratio_ema)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, x_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        # x, y: (..., d); x_norm: what the branch saw, (..., d), or None.
        return x + self.scale(y, x, x_norm)

    def scale(
        self, y: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`α·y`, the scaled branch (with the ratio and EMA work of a forward). Hyper-connections
        call this and add the result to their streams themselves."""
        if not (self.training and self.adaptive):
            return self.alpha() * y
        # per-token ratio E[y] / (E[x_norm] + ε), fp32: (...,)
        per_token = energy(y) / (energy(x if x_norm is None else x_norm) + self.epsilon)
        ratio = per_token.mean()  # () batch ratio, in the graph: α's gradient reaches y
        gamma = self._gamma
        ratio_s = gamma * self.ratio_ema + (1.0 - gamma) * ratio
        with torch.no_grad():
            if self._pending is None:
                self.ratio_ema.copy_(ratio_s)
            else:
                self._pending[0] += per_token.sum()  # a view of the shared (L, 2) tensor
                self._pending[1] += per_token.numel()
        alpha = self.alpha0 / (1.0 + self.beta * ratio_s)  # ()
        return alpha * y  # a 0-dim fp32 α keeps y's dtype

    @torch.no_grad()
    def preserve_(self, ratio: torch.Tensor | float | None = None) -> AionResidual:
        """Make α exactly 1 now, so the rewritten model computes what the original did.

        `ratio` (the branch's ratio on a calibration batch, see `batch_ratio`) seeds the EMA;
        then `alpha0` is set to `1 + beta·ratio_ema`, the very denominator eval divides by.
        """
        if ratio is not None:
            self.ratio_ema.copy_(torch.as_tensor(ratio, dtype=torch.float32))
        self.alpha0.copy_(1.0 + self.beta * self.ratio_ema)
        return self

    def batch_ratio(
        self, x: torch.Tensor, y: torch.Tensor, x_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ratio `r` this module computes for one batch (fp32 scalar, detached)."""
        with torch.no_grad():
            x_in = x if x_norm is None else x_norm
            return (energy(y) / (energy(x_in) + self.epsilon)).mean()

    def extra_repr(self) -> str:
        return f"preset={self.preset}, ema_gamma={self.ema_gamma}, epsilon={self.epsilon}"
