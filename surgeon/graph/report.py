"""What `surgeon.inspect` returns: residual adds, norms, residual trunks and untraced modules.

Plain dataclasses, so the CLI, the passes and tests read the same fields; `to_dict()` gives
JSON-able data with the same field names.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Residual:
    """A residual add `skip + branch` found in the graph of `module`.

    `kind` is "pre_norm" (the branch starts with a norm of the skip), "post_norm" (the add feeds a
    norm that produces the module's output) or "plain". `node` is the add's name in the graph,
    `skip` which of its two operands is the skip (0 or 1), and `x_norm` the node of the norm the
    branch applies to the skip (pre-norm residuals in the same graph), else None.

    A parallel block (`x + attn(ln(x)) + mlp(ln(x))`, GPT-J, GPT-NeoX, Phi, Cohere) is ONE site:
    `branches` names each branch's output node (two or more, in graph order), `skip_node` the
    skip, and `node` the last add of the sum; `skip` is then the operand of `node` that holds the
    skip (it is the skip itself only when the skip is added last). `branches` is empty for an
    ordinary `skip + branch` add. `calls` is how many times `module` runs in one forward of the
    model (a shared block called N times holds one add, N call sites).
    """

    module: str
    kind: str
    node: str
    source: str = ""
    skip: int = 0
    x_norm: str | None = None
    branches: tuple[str, ...] = ()
    skip_node: str | None = None
    calls: int = 1


@dataclass(frozen=True)
class Norm:
    """A LayerNorm or RMSNorm: a module (by class or by behaviour) or a functional call in a graph.

    For a functional norm `module` is the module whose graph holds the call and `node` names it;
    for a
    norm module `node` is None.
    """

    module: str
    kind: str  # "layer_norm" | "rms_norm"
    shape: tuple[int, ...] | None
    eps: float | None
    affine: bool
    node: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Trunk:
    """An ordered chain of blocks carrying one residual stream: block i's output is block i+1's
    input."""

    blocks: tuple[str, ...]


@dataclass(frozen=True)
class Untraced:
    """A module that could not be captured as a verified graph, and why (its children were
    tried)."""

    module: str
    reason: str


@dataclass
class Inspection:
    """The result of `surgeon.inspect(model)`."""

    model: str
    residuals: list[Residual] = field(default_factory=list)
    norms: list[Norm] = field(default_factory=list)
    trunks: list[Trunk] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    traced: list[str] = field(default_factory=list)

    def in_trunks(self) -> int:
        """How many residual adds lie in a trunk's blocks: what hyper-connections carry."""
        blocks = [b for t in self.trunks for b in t.blocks]
        return sum(any(r.module == b or r.module.startswith(b + ".") for b in blocks)
                   for r in self.residuals)

    def counts(self) -> dict[str, Any]:
        """Totals by kind, as printed under the CLI's tables."""
        by_kind: dict[str, int] = {}
        for r in self.residuals:
            by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
        norm_kinds: dict[str, int] = {}
        for n in self.norms:
            norm_kinds[n.kind] = norm_kinds.get(n.kind, 0) + 1
        return {
            "residuals": len(self.residuals),
            "residual_calls": sum(r.calls for r in self.residuals),
            "residual_kinds": by_kind,
            "norms": len(self.norms),
            "norm_kinds": norm_kinds,
            "trunks": len(self.trunks),
            "residuals_in_trunks": self.in_trunks(),
            "traced_modules": len(self.traced),
            "untraced_modules": len(self.untraced),
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data with the same field names as the dataclasses."""

        def plain(obj: Any) -> Any:
            d = dataclasses.asdict(obj)
            return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

        return {
            "model": self.model,
            "residuals": [plain(r) for r in self.residuals],
            "norms": [plain(n) for n in self.norms],
            "trunks": [plain(t) for t in self.trunks],
            "untraced": [plain(u) for u in self.untraced],
            "traced": list(self.traced),
            "counts": self.counts(),
        }
