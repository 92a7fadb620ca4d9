"""Scalar parameters as `(1,)` vectors: FSDP (`fully_shard`, FSDP1) shards no 0-dim parameter, so
every learnable scalar surgeon creates has shape `(1,)`, as has AION's record `alpha_cached`
(alpha0's shape); the forwards read them as `p.reshape(())` and compute exactly what 0-dim
parameters did. Checkpoints written before, and peers' state dicts (aion-torch, lucidrains'
hyper-connections), store such scalars 0-dim: `promote_scalars` reshapes them on load so they
still load strictly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def scalar_parameter(value: float) -> nn.Parameter:
    """A learnable scalar as a `(1,)` fp32 parameter (shardable by FSDP)."""
    return nn.Parameter(torch.full((1,), float(value)))


def promote_scalars(module: nn.Module, state_dict: dict[str, Any], prefix: str) -> None:
    """Reshape each 0-dim entry of `state_dict` (as handed to `_load_from_state_dict`) whose
    parameter or buffer in `module` (not its children) has shape `(1,)` to `(1,)`, in place."""
    for name, param in [*module.named_parameters(recurse=False),
                        *module.named_buffers(recurse=False)]:
        value = state_dict.get(prefix + name)
        if isinstance(value, torch.Tensor) and value.dim() == 0 and tuple(param.shape) == (1,):
            state_dict[prefix + name] = value.reshape(1)
