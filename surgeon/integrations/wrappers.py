"""The wrappers training puts around a model, and how to see through them: `torch.compile`,
DDP / DataParallel (also what accelerate and DeepSpeed hand back), FSDP1 and FSDP2.
`surgeon.save` unwraps a model with these before it writes it."""

from __future__ import annotations

import torch
from torch import nn


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The module inside the wrappers training puts around a model: `torch.compile`'s
    OptimizedModule, DistributedDataParallel and DataParallel (as `accelerate` and DeepSpeed
    also wrap), FSDP1's FullyShardedDataParallel. Returns (the module, the FSDP module whose
    shards must be gathered, None if none). An FSDP2 (`fully_shard`) model is the module itself,
    of a subclass of its own class (see `base_class`), and also gathered."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    sharded = None
    for _ in range(16):
        name = type(model).__name__
        fsdp1 = _fsdp_classes()[0]
        if name == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (DistributedDataParallel, DataParallel)) or (
                name == "DeepSpeedEngine" and isinstance(getattr(model, "module", None),
                                                         nn.Module)):
            model = model.module
        elif fsdp1 is not None and isinstance(model, fsdp1):
            sharded = sharded or model
            model = model.module
        else:
            break
    fsdp2 = _fsdp_classes()[1]
    if sharded is None and fsdp2 is not None and isinstance(model, fsdp2):
        sharded = model
    return model, sharded


def _fsdp_classes() -> tuple[type | None, type | None]:
    """(FSDP1's FullyShardedDataParallel, FSDP2's FSDPModule), None where torch lacks one."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        FullyShardedDataParallel = None  # noqa: N806
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None  # noqa: N806
    return FullyShardedDataParallel, FSDPModule


def base_class(model: nn.Module) -> type:
    """`model`'s class, or for an FSDP2 model (whose class `fully_shard` swapped for a subclass
    named FSDP<name>) the class it had before."""
    fsdp2 = _fsdp_classes()[1]
    if fsdp2 is not None and isinstance(model, fsdp2):
        return next(c for c in type(model).__mro__[1:] if not issubclass(c, fsdp2))
    return type(model)


def full_state_dict(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP model, gathered onto rank 0's CPU (every rank must call
    this; ranks other than 0 get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))
