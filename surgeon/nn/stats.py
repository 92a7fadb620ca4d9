"""Step-time statistics: `attach(model, optimizer)` moves AION's ratio EMAs and ADyT's
gradient-norm EMAs to the optimizer step, with no other change to the training loop.

After `attach`, each AION forward adds `(Σ per-token ratio, token count)` to one shared
`(L, 2)` tensor instead of moving its EMA. A step pre-hook on the optimizer then

- sums that tensor over ranks with **one** `all_reduce` for all layers (under
  `torch.distributed`), so every rank moves its EMAs by the ratio of the union batch of all
  micro-batches and all ranks, bit-identically;
- updates every ADyT `G` from the L2 norm of its parameters' gradients, which DDP has already
  averaged and GradScaler has already unscaled by then (no collective).

A step pre-hook runs only on real steps: under gradient accumulation once per accumulated step,
under GradScaler not on steps it skips (their ratios count towards the next real step). Nothing
here reads a value back to the host.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from surgeon.nn.adyt import ADyT
from surgeon.nn.aion import AionResidual


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind wrappers such as accelerate's `AcceleratedOptimizer`."""
    seen = 0
    while not isinstance(optimizer, torch.optim.Optimizer) and seen < 8:
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("attach needs a torch.optim.Optimizer (or a wrapper with .optimizer)")
    return optimizer


class Attachment:
    """What `attach` returns: `step()` does the update by hand, `remove()` undoes the attach
    (AION modules go back to moving their EMA in the forward). Also a context manager."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        *,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.aion = [m for m in model.modules() if isinstance(m, AionResidual) and m.adaptive]
        self.adyt = [m for m in model.modules() if isinstance(m, ADyT) and m.adaptive]
        self.process_group = process_group
        self.pending: torch.Tensor | None = None
        if self.aion:
            device = self.aion[0].ratio_ema.device
            self.pending = torch.zeros(len(self.aion), 2, device=device)  # (L, [Σ r, count])
            self._gamma = torch.tensor([m._gamma for m in self.aion], device=device)  # (L,)
            for row, module in enumerate(self.aion):
                module._pending = (self.pending, row)
        self._handle = None
        if optimizer is not None:
            hook = lambda *_: self.step()  # noqa: E731 (the hook's (optimizer, args, kwargs))
            self._handle = _innermost(optimizer).register_step_pre_hook(hook)

    @torch.no_grad()
    def step(self) -> None:
        """Fold this step's statistics into the EMAs (what the optimizer hook calls)."""
        if self.pending is not None:
            self._step_aion(self.pending)
        if self.adyt:
            self._step_adyt()

    def _step_aion(self, pending: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(pending, op=dist.ReduceOp.SUM, group=self.process_group)
        total, count = pending.unbind(1)  # (L,), (L,)
        ratio = total / count.clamp_min(1.0)
        emas = [m.ratio_ema for m in self.aion]
        old = torch.stack(emas)  # (L,)
        new = self._gamma * old + (1.0 - self._gamma) * ratio
        torch._foreach_copy_(emas, list(torch.where(count > 0, new, old).unbind(0)))
        pending.zero_()

    def _step_adyt(self) -> None:
        by_smoothing: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = defaultdict(
            lambda: ([], [])
        )
        for module in self.adyt:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            if not grads:
                continue
            norms = torch._foreach_norm(grads)  # one 0-dim norm per parameter
            g = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
            emas, values = by_smoothing[module.smoothing]
            emas.append(module.grad_norm_ema)
            values.append(g)
        for s, (emas, values) in by_smoothing.items():
            torch._foreach_mul_(emas, s)
            torch._foreach_add_(emas, values, alpha=1.0 - s)

    def remove(self) -> None:
        """Detach: remove the optimizer hook and give the AION modules their own EMA back."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for module in self.aion:
            module._pending = None

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach(
    model: nn.Module,
    optimizer: Any = None,
    *,
    process_group: dist.ProcessGroup | None = None,
) -> Attachment:
    """Update the statistics of `model`'s AION and ADyT modules at each step of `optimizer`.

    Call once at set-up, after the model is on its device (DDP-wrapped or not). Without an
    optimizer, call `.step()` on the result between backward and the optimizer step yourself.
    """
    return Attachment(model, optimizer, process_group=process_group)
