"""Residual adds → `AionResidual`: `x + f(x)` becomes `aion(x, f(x), x_norm)`.

`x_norm` is the norm output the branch started from (pre-norm residuals), so the ratio is the
one AION defines. Energies are taken over the features: the last axis, or axis 1 where the
graph shows a channels-first stream (a conv net's `(b, c, h, w)`). With `preserve=True` (the
default, `aion` preset) every new module is seeded with its branch's ratio on the example (all
at α = 1, so each sees the original activations) and α set to exactly 1, so the converted model
computes what the original did.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx
from torch import nn

from surgeon.graph.channels import feature_axis
from surgeon.graph.rewrite import Surgery, node_named
from surgeon.nn.aion import AionResidual
from surgeon.recipe import PassConfig, PassError, bounded, register


def _sum(graph: fx.Graph, terms: list[fx.Node]) -> fx.Node:
    """`b1 + b2 + …` as new add nodes (a parallel block's branches, summed in graph order)."""
    total = terms[0]
    for t in terms[1:]:
        total = graph.call_function(operator.add, (total, t))
    return total


def _erase_sum(graph: fx.Graph, add: fx.Node) -> None:
    """Erase `add` and the adds of its sum that nothing else uses any more."""
    operands = [o for o in add.args if isinstance(o, fx.Node)]
    graph.erase_node(add)
    for o in operands:
        if o.target in (operator.add, operator.iadd) and not o.users:
            _erase_sum(graph, o)


@register
@dataclass(frozen=True)
class AION(PassConfig):
    """Adaptive residual scaling on every residual add in scope."""

    name: ClassVar[str] = "aion"
    version: ClassVar[int] = 1
    rewrites: ClassVar[str] = "residual adds"
    runs_before: ClassVar[tuple[str, ...]] = ("hyper",)
    runs_before_reason: ClassVar[str] = (
        "hyper-connections take over the residual adds; AION applied first scales each branch "
        "inside the streams")

    preset: Literal["aion", "deepnorm", "preln", "rezero"] = "aion"
    preserve: bool = True
    ema_gamma: float = bounded(0.99, 0, 1)  # 1: no smoothing (aion-torch)
    epsilon: float = bounded(1e-8, 0, 1, open_low=True)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preserve and self.preset not in ("aion", "preln"):
            raise ValueError(f"preset {self.preset!r} starts from its own α, so it cannot "
                             "preserve the model's function; pass preserve=false")

    def preserves(self) -> float | None:
        """α = 1 exactly with the ratio seeded (`aion` preset) or frozen at 1 (`preln`)."""
        return 1e-5 if self.preserve else None

    def run(self, surgery: Surgery) -> list[str]:
        """Rewrite the adds; returns the qualified names of the new modules."""
        residuals = [r for r in surgery.inspection.residuals if self.selects(r.module)]
        if any(not r.module for r in residuals):
            raise PassError("aion: a residual add is in the top-level module's own forward; "
                            "wrap the model in a parent module, or exclude it with exclude=''")
        new: list[str] = []
        ordinal: dict[str, int] = {}
        for r in residuals:
            graph = surgery.graph(r.module)
            add = node_named(graph, r.node)
            if r.branches:  # a parallel block: one AION on the sum of its branches
                skip = node_named(graph, r.skip_node)
                with graph.inserting_before(add):
                    branch = _sum(graph, [node_named(graph, b) for b in r.branches])
            else:
                skip, branch = add.args[r.skip], add.args[1 - r.skip]
            args = (skip, branch)
            if r.x_norm is not None:
                args += (node_named(graph, r.x_norm),)
            k = ordinal[r.module] = ordinal.get(r.module, -1) + 1
            module = AionResidual.from_preset(
                self.preset, num_layers=max(1, len(residuals) // 2),
                ema_gamma=self.ema_gamma, epsilon=self.epsilon)
            # energies over the stream's features: axis 1 for (b, c, h, w) streams, not the width
            module.channel_first = feature_axis(surgery.trace, r.module, branch) == "first"
            target = surgery.add_module(r.module, f"aion_{k}", module)
            with graph.inserting_before(add):
                call = graph.call_module(target, args)
            add.replace_all_uses_with(call)
            _erase_sum(graph, add)
            new.append(f"{r.module}.{target}")
        return new

    def after_commit(self, surgery: Surgery, new: list[str]) -> None:
        """Seed each new module's EMA with its ratio on the example and set α = 1."""
        if not (self.preserve and self.preset == "aion"):
            return
        modules = {name: surgery.model.get_submodule(name) for name in new}
        ratios: dict[str, torch.Tensor] = {}

        def recorder(name: str):
            def hook(module: nn.Module, args: tuple) -> None:
                ratios.setdefault(name, module.batch_ratio(*args))
            return hook

        for module in modules.values():  # α = 1 first, so that each module records the ratio
            module.preserve_()  # of the original model's activations, not of upstream α0 = 0.1
        handles = [m.register_forward_pre_hook(recorder(n)) for n, m in modules.items()]
        try:
            surgery.run_example()
        finally:
            for h in handles:
                h.remove()
        for name, module in modules.items():
            module.preserve_(ratios.get(name))
