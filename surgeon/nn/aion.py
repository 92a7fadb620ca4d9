"""AION adaptive residual: `out = x + α·y`, `α = alpha0 / (1 + beta·r_s)`.

`r` is the branch's energy ratio, the mean over tokens of `E[y] / (E[x_norm] + ε)` with
`E[t] = mean(t², -1)` taken in fp32 (over axis 1, the channels, where the pass set
`channel_first`), and `r_s` its EMA (`ratio_ema`, starting at 1.0).

A drop-in replacement for `aion_torch.AionResidual`: the same constructor, `forward(x, y,
x_norm, return_stats=False)`, the same `ValueError`s for empty or mismatched inputs, and the same
state dict (`alpha0`, `beta`, `ratio_ema`, `step_count`, `alpha_cached`), so either module loads
the other's strictly. Deliberately different: no `.item()` and no collective in the forward (the
EMA is updated in place on the device, or once per optimizer step for all layers together after
`surgeon.attach`); eval computes α from the current parameters and EMA (`alpha_cached` is only a
record, never read); with `ema_gamma = 1` the EMA holds the latest ratio, which that eval needs;
and backward works in eval. Presets `aion`, `deepnorm`, `preln`, `rezero` are the same module with
other defaults.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from surgeon.nn.scalars import scalar_parameter
from surgeon.nn.state import RebuildsOptionalState

PRESETS = ("aion", "deepnorm", "preln", "rezero")


def energy(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """`E[t] = mean(t², dim)` accumulated in fp32 whatever t's dtype: `dim` is the feature
    axis (-1, or 1 for channels-first `(b, c, h, w)` streams); the rest are tokens."""
    return t.float().pow(2).mean(dim)


class AionResidual(RebuildsOptionalState):
    """`x + α·y` with `α = alpha0 / (1 + beta·r_s)`; see the module docstring.

    `ema_gamma = 1` turns smoothing off (training uses the batch ratio, as aion-torch does;
    `ratio_ema` then holds the latest ratio). The presets other than `aion` freeze `beta` at 0
    and set `adaptive = False`: α is then a plain scale and the forward skips the ratio.

    aion-torch's bookkeeping buffers are kept, as records: `step_count` (int32) counts the
    updates of the statistics (training forwards; optimizer steps after `surgeon.attach`) and
    `alpha_cached` holds the α of the latest one. A state dict without them (an older surgeon
    checkpoint) loads strictly too: `alpha_cached` becomes `alpha()` and `step_count` 0.
    """

    _surgeon_atomic = True  # tracing treats it as a leaf: passes never rewrite it again
    # State-dict entries a checkpoint may lack: records rebuilt from the rest by
    # `reset_optional_state_` (`load_state_dict` and `surgeon.load` accept their absence).
    optional_state: ClassVar[tuple[str, ...]] = ("step_count", "alpha_cached")

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
        # (1,), not 0-dim, so that FSDP can shard them; the forward reads them as scalars
        self.alpha0 = scalar_parameter(alpha0)
        self.beta = scalar_parameter(beta)
        self.register_buffer("ratio_ema", torch.tensor(1.0))
        # aion-torch's records, in its order: updates of the statistics, and the latest α.
        self.register_buffer("step_count", torch.tensor(0, dtype=torch.int32))
        self.register_buffer("alpha_cached", torch.full((1,), float(alpha0)))  # alpha0's shape
        self.ema_gamma = float(ema_gamma)
        self.epsilon = float(epsilon)
        self.preset = "aion"
        # Whether training tracks the ratio; the fixed-β presets switch it off (α = alpha0).
        self.adaptive = True
        # Channels-first streams `(b, c, ...)` (conv nets): energies over axis 1, the channels,
        # not over the image width (set by the aion pass, which reads the layout from the graph).
        self.channel_first = False
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
            module.alpha_cached.copy_(module.alpha0.detach())
        module.preset = preset
        return module

    @property
    def _gamma(self) -> float:
        # γ = 1 means "no smoothing" (aion-torch): the step's ratio replaces the EMA.
        return 0.0 if self.ema_gamma == 1.0 else self.ema_gamma

    def alpha(self) -> torch.Tensor:
        """α from the current parameters and EMA: what eval uses (fp32 scalar)."""
        return self.alpha0.reshape(()) / (1.0 + self.beta.reshape(()) * self.ratio_ema)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_norm: torch.Tensor | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        """`x + α·y`; x, y: (..., d) of one shape; x_norm: what the branch saw, (..., d), or None.

        `return_stats=True` also returns `{"alpha": α, "ratio": r}` as Python floats (the batch
        ratio in training, `ratio_ema` in eval), as aion-torch does: that reads two numbers back
        to the host, so leave it off in a training loop that should not wait on the device."""
        # Checks on shapes only (no tensor values): no sync, and compiled code guards on them.
        if x.numel() == 0:
            raise ValueError(f"Input tensor x cannot be empty (x.shape={tuple(x.shape)})")
        if y.numel() == 0:
            raise ValueError(f"Input tensor y cannot be empty (y.shape={tuple(y.shape)})")
        if x.shape != y.shape:
            raise ValueError(f"Input shapes must match: x.shape={tuple(x.shape)}, "
                             f"y.shape={tuple(y.shape)} (AionResidual adds y to x without "
                             "broadcasting)")
        branch, alpha, ratio = self._scaled(y, x, x_norm)
        out = x + branch
        if not return_stats:
            return out
        if ratio is None:
            ratio = self.batch_ratio(x, y, x_norm) if self.training else self.ratio_ema
        return out, {"alpha": float(alpha.detach()), "ratio": float(ratio.detach())}

    def scale(
        self, y: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`α·y`, the scaled branch (with the ratio and EMA work of a forward). Hyper-connections
        call this and add the result to their streams themselves."""
        return self._scaled(y, x, x_norm)[0]

    def _scaled(
        self, y: torch.Tensor, x: torch.Tensor, x_norm: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(`α·y`, α, the batch ratio or None where the forward needs none)."""
        if not (self.training and self.adaptive):
            alpha = self.alpha()
            if self.training:  # a fixed-α preset: aion-torch's records all the same
                with torch.no_grad():
                    self.alpha_cached.copy_(alpha)
                    self.step_count.add_(1)
            return alpha * y, alpha, None
        # per-token ratio E[y] / (E[x_norm] + ε), fp32: (...,)
        dim = 1 if self.channel_first else -1
        x_in = x if x_norm is None else x_norm
        per_token = energy(y, dim) / (energy(x_in, dim) + self.epsilon)  # (b, ...) tokens
        ratio = per_token.mean()  # () batch ratio, in the graph: α's gradient reaches y
        gamma = self._gamma
        ratio_s = gamma * self.ratio_ema + (1.0 - gamma) * ratio
        alpha = self.alpha0.reshape(()) / (1.0 + self.beta.reshape(()) * ratio_s)  # ()
        with torch.no_grad():
            if self._pending is None:
                self.ratio_ema.copy_(ratio_s)
                self.alpha_cached.copy_(alpha)
                self.step_count.add_(1)
            else:  # attached: the optimizer step moves the EMA and the records
                self._pending[0] += per_token.sum()  # a view of the shared (L, 2) tensor
                self._pending[1] += per_token.numel()
        return alpha * y, alpha, ratio  # a 0-dim fp32 α keeps y's dtype

    @torch.no_grad()
    def preserve_(self, ratio: torch.Tensor | float | None = None) -> AionResidual:
        """Make α exactly 1 now, so the rewritten model computes what the original did.

        `ratio` (the branch's ratio on a calibration batch, see `batch_ratio`) seeds the EMA;
        then `alpha0` is set to `1 + beta·ratio_ema`, the very denominator eval divides by.
        """
        if ratio is not None:
            self.ratio_ema.copy_(torch.as_tensor(ratio, dtype=torch.float32))
        self.alpha0.copy_(1.0 + self.beta * self.ratio_ema)  # (1,)
        self.alpha_cached.copy_(self.alpha())
        return self

    def batch_ratio(
        self, x: torch.Tensor, y: torch.Tensor, x_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ratio `r` this module computes for one batch (fp32 scalar, detached)."""
        with torch.no_grad():
            x_in = x if x_norm is None else x_norm
            dim = 1 if self.channel_first else -1
            return (energy(y, dim) / (energy(x_in, dim) + self.epsilon)).mean()

    @torch.no_grad()
    def reset_optional_state_(self, names: tuple[str, ...] = optional_state) -> AionResidual:
        """Rebuild the records `names` from the rest of the state: `alpha_cached = alpha()`,
        `step_count` 0 (what a state dict without them loads as)."""
        values = {"step_count": lambda: torch.zeros((), dtype=torch.int32),
                  "alpha_cached": lambda: self.alpha().detach().reshape(1)}
        for name in names:
            value = values[name]()
            if getattr(self, name).is_meta:  # loaded with assign=True into a meta module
                setattr(self, name, value.to(self.ratio_ema.device))
            else:
                getattr(self, name).copy_(value)
        return self

    def extra_repr(self) -> str:
        # aion-torch's "alpha0=0.1000, beta=0.0500, ema_gamma=0.99", then surgeon's own fields.
        def show(t: torch.Tensor) -> str:
            return "?" if t.is_meta else f"{float(t.detach()):.4f}"

        return (f"alpha0={show(self.alpha0)}, beta={show(self.beta)}, "
                f"ema_gamma={self.ema_gamma}, epsilon={self.epsilon}, preset={self.preset}")
