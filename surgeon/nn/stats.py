"""Step-time statistics: `attach(model, optimizer)` moves AION's ratio EMAs and ADyT's
gradient-norm EMAs to the optimizer step, with no other change to the training loop.

After `attach`, each AION forward adds `(Σ per-token ratio, token count)` to one shared
`(L, 2)` tensor instead of moving its EMA. A step pre-hook on the optimizer then

- sums that tensor over ranks with **one** `all_reduce` for all layers (under
  `torch.distributed`), so every rank moves its EMAs by the ratio of the union batch of all
  micro-batches and all ranks, bit-identically;
- updates every ADyT `G` (a bias-corrected EMA) from the L2 norm of its parameters' gradients,
  which DDP has already averaged and GradScaler has already unscaled by then (no collective). Under
  FSDP2 (`fully_shard`, a 1-D mesh) the gradients are sharded DTensors: each rank's squared local
  norms, and the local parts of AION's sharded `alpha0` / `beta`, ride in that same `all_reduce`,
  so G is the full norm and the records agree on every rank. FSDP1's flat parameters are refused (a
  `TypeError`).

A step pre-hook runs only on real steps: under gradient accumulation once per accumulated step,
under GradScaler not on steps it skips (their ratios count towards the next real step; fused
optimizers, which GradScaler hands the scale and overflow flag instead, are handled too). A
batch whose ratio overflowed is dropped. Nothing here reads a value back to the host. The hook
sees the gradients the optimizer will apply: after `clip_grad_norm_`, if the loop clips.

`attach` also checks that the optimizer holds every trainable parameter of the model: one built
before `surgeon.apply` never sees the new ones (they stay at their initial values, silently), so
it warns with a `ParametersNotOptimizedWarning` that counts them and says what to do.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch built without distributed
    DTensor = type("DTensor", (), {})  # noqa: N806 - matches nothing

from surgeon.nn.adyt import ADyT
from surgeon.nn.aion import AionResidual


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _is_sharded(t: torch.Tensor | None) -> bool:
    """Whether `t` is a DTensor sharded over its mesh (FSDP2's parameters and gradients)."""
    return (isinstance(t, DTensor) and any(p.is_shard() for p in t.placements))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _part(t: torch.Tensor, first: bool) -> torch.Tensor:
    """This rank's addend of `t`'s one value in a sum over ranks: the local shard's sum (0 where
    the shard is empty) if `t` is sharded, else the value on the group's first rank only."""
    local = _local(t.detach()).float()
    if _is_sharded(t) or first:
        return local.sum()
    return local.new_zeros(())


def _squared_norm(module: nn.Module, first: bool) -> torch.Tensor:
    """This rank's addend of the squared L2 norm of `module`'s gradients: sharded gradients
    count their local shard, replicated ones count on the group's first rank only."""
    parts = [_local(p.grad) for p in module.parameters()
             if p.grad is not None and (first or _is_sharded(p.grad))]
    if not parts:
        return module.grad_norm_ema.new_zeros(())
    norms = torch._foreach_norm(parts)
    return torch.stack([n.float() for n in norms]).square().sum()


def _refuse_flat_parameters(model: nn.Module) -> None:
    """FSDP1 flattens parameters into FlatParameters: the modules no longer see their own."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return
    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise TypeError("surgeon.attach does not support FSDP1 (FullyShardedDataParallel): its "
                        "flat parameters hide ADyT's gradients; shard with FSDP2's "
                        "torch.distributed.fsdp.fully_shard instead")


def _check_meshes(modules: list[nn.Module], group: dist.ProcessGroup | None) -> None:
    """Sharded parameters are summed over `group`: they must be sharded over all of it (FSDP2
    on a 1-D mesh of the group's ranks), else the sums would count replicas or miss shards."""
    for module in modules:
        for name, p in module.named_parameters(recurse=False):
            if not isinstance(p, DTensor):
                continue
            mesh = p.device_mesh
            if mesh.ndim != 1 or mesh.size() != dist.get_world_size(group):
                raise TypeError(
                    f"surgeon.attach supports FSDP2 on a 1-D mesh over the process group's "
                    f"{dist.get_world_size(group)} ranks; {type(module).__name__}.{name} is on a "
                    f"mesh of shape {tuple(mesh.shape)}: pass process_group= for its ranks")


def _innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer behind wrappers such as accelerate's `AcceleratedOptimizer` (itself
    an `Optimizer` subclass that never ran `Optimizer.__init__`, so it cannot take hooks)."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError("attach needs a torch.optim.Optimizer (or a wrapper with .optimizer)")
    return optimizer


class ParametersNotOptimizedWarning(UserWarning):
    """Trainable parameters of the model are in none of the optimizer's param groups (an
    optimizer built before `surgeon.apply`): they would never train."""


def unoptimized_parameters(model: nn.Module, optimizer: Any) -> list[tuple[str, nn.Parameter]]:
    """`(name, parameter)` for each trainable parameter of `model` that `optimizer` (or the
    torch optimizer inside a wrapper) does not hold, in `named_parameters` order. Hand them to
    `optimizer.add_param_group({"params": [p for _, p in ...]})` to train them."""
    held = {id(p) for group in _innermost(optimizer).param_groups for p in group["params"]}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) not in held]


def _warn_unoptimized(model: nn.Module, optimizer: Any) -> None:
    outside = unoptimized_parameters(model, optimizer)
    if not outside:
        return
    names = ", ".join(n for n, _ in outside[:3]) + (", ..." if len(outside) > 3 else "")
    elements = sum(p.numel() for _, p in outside)
    warnings.warn(ParametersNotOptimizedWarning(
        f"{len(outside)} trainable parameter tensors of the model ({elements:,} elements: "
        f"{names}) are in no param group of the optimizer, so they will not train; build the "
        "optimizer after surgeon.apply, or add them with optimizer.add_param_group({'params': "
        "[p for _, p in surgeon.nn.unoptimized_parameters(model, optimizer)]})"), stacklevel=4)


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
        _refuse_flat_parameters(model)
        self.aion = [m for m in model.modules() if isinstance(m, AionResidual) and m.adaptive]
        self.adyt = [m for m in model.modules() if isinstance(m, ADyT) and m.adaptive]
        _check_meshes(self.aion + self.adyt, process_group)
        self.process_group = process_group
        self.pending: torch.Tensor | None = None
        for module in self.aion + self.adyt:  # attaching again replaces the old attachment
            old = module._attachment() if module._attachment is not None else None
            if old is not None and old is not self:
                old.remove()
            module._attachment = weakref.ref(self)
        if self.aion:
            device = self.aion[0].ratio_ema.device
            self.pending = torch.zeros(len(self.aion), 2, device=device)  # (L, [Σ r, count])
            self._gamma = torch.tensor([m._gamma for m in self.aion], device=device)  # (L,)
            for row, module in enumerate(self.aion):
                module._pending = self.pending[row]  # (2,) view
        self._handle = None
        if optimizer is not None:
            self._handle = _innermost(optimizer).register_step_pre_hook(self._hook)
            _warn_unoptimized(model, optimizer)

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Fused / scaling-aware optimizers get GradScaler's scale and overflow flag as
        # attributes during `step` instead of unscaled gradients and a skipped call.
        self.step(getattr(optimizer, "grad_scale", None), getattr(optimizer, "found_inf", None))

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor | None = None,
             found_inf: torch.Tensor | None = None) -> None:
        """Fold this step's statistics into the EMAs (what the optimizer hook calls).

        `grad_scale` divides the gradients first; a non-zero `found_inf` keeps every EMA as it
        is (the step is skipped) and leaves the AION ratios pending for the next step.

        Parameters sharded by FSDP2 (DTensors) hold only a part on each rank: their values and
        ADyT's squared gradient norms are summed over ranks in the same single `all_reduce` as
        AION's ratios (a part held by no rank adds 0, so the sums are exact)."""
        skip = None if found_inf is None else found_inf.to(torch.float32).reshape(()) > 0
        first = not _distributed() or dist.get_rank(self.process_group) == 0
        sharded_adyt = [m for m in self.adyt if any(_is_sharded(p.grad) for p in m.parameters())]
        sharded_aion = any(_is_sharded(m.alpha0) or _is_sharded(m.beta) for m in self.aion)
        extra: list[torch.Tensor] = []  # summed over ranks with the AION ratios
        if sharded_aion:
            extra.append(torch.stack([_part(t, first) for m in self.aion
                                      for t in (m.alpha0, m.beta)]))  # (2L,)
        if sharded_adyt:
            extra.append(torch.stack([_squared_norm(m, first) for m in sharded_adyt]))  # (A,)
        pending = self.pending
        if extra:
            packed = torch.cat([t.to(self._device()) for t in extra])
            if pending is not None:
                packed = torch.cat([pending.reshape(-1), packed])
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)
            if pending is not None:
                pending.copy_(packed[: pending.numel()].view_as(pending))
                packed = packed[pending.numel():]
        elif pending is not None and _distributed():
            dist.all_reduce(pending, op=dist.ReduceOp.SUM, group=self.process_group)
        if pending is not None:
            scalars = packed[: 2 * len(self.aion)].view(-1, 2) if sharded_aion else None
            self._step_aion(pending, skip, scalars)
        norms = dict(zip(map(id, sharded_adyt), packed[-len(sharded_adyt):].sqrt().unbind(0))
                     ) if sharded_adyt else {}
        if self.adyt:
            self._step_adyt(grad_scale, skip, norms)

    def _device(self) -> torch.device:
        return (self.pending if self.pending is not None else self.adyt[0].grad_norm_ema).device

    def _step_aion(self, pending: torch.Tensor, skip: torch.Tensor | None,
                   scalars: torch.Tensor | None = None) -> None:
        total, count = pending.unbind(1)  # (L,), (L,)
        ratio = total / count.clamp_min(1.0)
        emas = [m.ratio_ema for m in self.aion]
        old = torch.stack(emas)  # (L,)
        new = self._gamma * old + (1.0 - self._gamma) * ratio
        keep = (count == 0) | ~torch.isfinite(ratio)  # nothing seen, or an overflowed batch
        if skip is not None:
            keep = keep | skip
        ema = torch.where(keep, old, new)  # (L,)
        torch._foreach_copy_(emas, list(ema.unbind(0)))
        # aion-torch's records: the α at the new EMA, and one more update, where the EMA moved
        # (the same on every rank: parameters and EMAs agree, nothing rank-local goes in).
        if scalars is None:
            alpha0 = torch.stack([m.alpha0.detach().reshape(()) for m in self.aion])  # (L,)
            beta = torch.stack([m.beta.detach().reshape(()) for m in self.aion])  # (L,)
        else:  # FSDP2: the full values, summed over ranks with the ratios
            alpha0, beta = scalars.unbind(1)
        alpha0, beta = alpha0.to(ema.dtype), beta.to(ema.dtype)
        cached = [m.alpha_cached for m in self.aion]
        old_alpha = torch.stack([c.reshape(()) for c in cached]).to(ema.dtype)  # (L,)
        alpha = torch.where(keep, old_alpha, alpha0 / (1.0 + beta * ema))
        torch._foreach_copy_(cached, [a.reshape(c.shape) for a, c in zip(alpha.unbind(0), cached)])
        counts = [m.step_count for m in self.aion]
        torch._foreach_add_(counts, list((~keep).to(counts[0].dtype).unbind(0)))
        if skip is None:
            pending.zero_()
        else:
            pending.mul_(skip.to(pending.dtype))

    def _step_adyt(self, grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
                   full_norms: dict[int, torch.Tensor] | None = None) -> None:
        for module in self.adyt:
            g = (full_norms or {}).get(id(module))
            if g is None:
                grads = [p.grad for p in module.parameters() if p.grad is not None]
                if not grads:
                    continue
                norms = torch._foreach_norm(grads)  # one 0-dim norm per parameter
                g = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
            if grad_scale is not None:
                g = g / grad_scale.float().reshape(())
            module.update_grad_norm_(g, skip)

    def remove(self) -> None:
        """Detach: remove the optimizer hook and give the AION modules their own EMA back."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        for module in self.aion:
            module._pending = None
        for module in self.aion + self.adyt:
            if module._attachment is not None and module._attachment() is self:
                module._attachment = None

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
    Warns (`ParametersNotOptimizedWarning`) if trainable parameters of `model` are not in
    `optimizer`, as when it was built before `surgeon.apply`.
    """
    return Attachment(model, optimizer, process_group=process_group)
