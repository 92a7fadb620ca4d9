"""A learnable scalar on the trunk's input: DyT's scale after the token embedding.

Without a norm to rescale it, the residual stream of a freshly initialised language model keeps
the embedding's scale (rms ≈ 0.02 with Hugging Face's init), where `tanh(α·x)` is nearly linear
and tiny, so the model starts from near-uniform predictions. DyT (Zhu et al. 2025) multiplies
the embedding output by a learnable scalar initialised to √d; `InputScale` is that scalar.
"""

from __future__ import annotations

import torch

from surgeon.nn.scalars import scalar_parameter
from surgeon.nn.state import RebuildsOptionalState


class InputScale(RebuildsOptionalState):
    """`y = s·x` with a learnable scalar `s` (a `(1,)` fp32 parameter, shardable by FSDP; a
    0-dim `scale` in a state dict loads too)."""

    _surgeon_atomic = True  # tracing treats it as a leaf: passes never rewrite it again

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = scalar_parameter(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.reshape(()).to(x.dtype)  # (..., d), x's dtype

    def extra_repr(self) -> str:
        return f"scale={float(self.scale):.4g}"
