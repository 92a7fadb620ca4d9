"""Records a module can rebuild from the rest of its state, so older state dicts load strictly.

AION's `step_count`/`alpha_cached` and ADyT's `grad_norm_steps` are bookkeeping that surgeon
added after checkpoints were already written (and that peers' state dicts lack). A module
names them in `optional_state` and rebuilds them in `reset_optional_state_`; loading a state
dict without them is then not a missing-key error, and 0-dim scalars are promoted to `(1,)`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from surgeon.nn.scalars import promote_scalars


class RebuildsOptionalState(nn.Module):
    """Base for modules whose `optional_state` entries may be absent from a state dict."""

    optional_state: ClassVar[tuple[str, ...]] = ()

    def reset_optional_state_(self, names: tuple[str, ...]) -> nn.Module:
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        missing_keys: list[str] = args[2]  # (local_metadata, strict, missing, unexpected, errors)
        absent = tuple(n for n in self.optional_state if prefix + n not in state_dict)
        promote_scalars(self, state_dict, prefix)  # peers' and older checkpoints' 0-dim scalars
        super()._load_from_state_dict(state_dict, prefix, *args)
        for name in absent:
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)
        if absent:
            self.reset_optional_state_(absent)
