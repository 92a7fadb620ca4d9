"""Residual trunks → n-stream hyper-connections (or mHC).

Every residual site of a trunk (an add `skip + branch`, or an AION call left by the `aion` pass)
is rewritten in its owner's graph:

    bi, residuals, beta = hyper_k.width_connection(H)   # the branch now reads bi (b, ..., d)
    H = hyper_k.depth_connection(branch, residuals, beta)

The streams are folded into the batch (`H` is `(b·n, ..., d)`), so the code between sites keeps
its shapes; the first site expands its skip into the streams and the last one reduces them, so
the trunk's callers see `(b, ..., d)` as before. Masks, rotary tables and caches reach the branch,
which runs at batch b. At init the rewrite is exact (HC) or within ~1e-6 (mHC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx

from surgeon.errors import ModuleError
from surgeon.files.budget import require_memory
from surgeon.graph.blame import fold
from surgeon.graph.rewrite import Surgery, node_named
from surgeon.graph.tracing import flatten
from surgeon.nn.aion import AionResidual
from surgeon.nn.hyper import expand_streams, reduce_streams
from surgeon.nn.mhc import hyper_connections
from surgeon.recipe import PassConfig, PassError, bounded, option_error, register

MANY_STREAMS = 16  # hyper-connection papers use 2-8 streams
MHC_MAX_STREAMS = int(1 + math.exp(3.0)) + 1  # 22: mHC's home bias needs (n - 1)·σ(-3) < 1


@dataclass
class _Site:
    owner: str
    node: str
    skip: int  # operand index of the skip (adds); AION calls have it first
    aion: str | None = None  # the AION submodule target, for AION sites


@register
@dataclass(frozen=True)
class HyperConnections(PassConfig):
    """Hyper-connection streams over every residual trunk in scope."""

    name: ClassVar[str] = "hyper"
    version: ClassVar[int] = 1
    rewrites: ClassVar[str] = "residual trunks"

    streams: int = bounded(4, 1, 1024)
    mhc: bool = False
    reduce: Literal["mean", "sum"] = "mean"
    # More than MANY_STREAMS streams only when asked for: the mixing weights grow with
    # streams² (mHC: streams³ × width) per site and the activations with streams.
    allow_many_streams: bool = False

    def __post_init__(self) -> None:
        many = isinstance(self.streams, int) and self.streams > MANY_STREAMS
        if many and not self.allow_many_streams:
            raise option_error(self, "streams", self.streams, f"[1, {MANY_STREAMS}]; pass "
                               "allow_many_streams=true for more (up to 1024)")
        super().__post_init__()
        if self.mhc and self.streams > MHC_MAX_STREAMS:
            raise option_error(self, "streams", self.streams, f"[2, {MHC_MAX_STREAMS}] with "
                               "mhc=true: its home-stream init needs (streams - 1)·σ(-3) < 1")
        if self.streams < 1 or (self.mhc and self.streams < 2):
            raise ValueError(f"streams must be at least {2 if self.mhc else 1}, "
                             f"got {self.streams}")

    def preserves(self) -> float | None:
        """HC starts exact; mHC's Sinkhorn mixing is doubly stochastic only to ~1e-6."""
        return 1e-3 if self.mhc else 1e-5

    def run(self, surgery: Surgery) -> list[str]:
        trunks = self._trunks(surgery)
        if _inline_lifted_sites(surgery, trunks):
            trunks = self._trunks(surgery)
        self._check_memory(surgery, trunks)
        new: list[str] = []
        refused: list[tuple[str, tuple[str, ...], str]] = []
        for trunk in trunks:
            sites = _sites(surgery, trunk.blocks)
            if not sites:
                continue
            skipped = surgery.skipped_in_training(list(trunk.blocks))
            if skipped:
                refused.append((skipped[0], trunk.blocks, "is skipped at random in train mode "
                                "(LayerDrop), and hyper-connections need every block of its "
                                "trunk to run (set the model's layerdrop to 0)"))
                continue
            if any(not _is_local(surgery, s) for s in sites):
                refused.append((trunk.blocks[0], trunk.blocks, "its residual adds take their "
                                "skip from the calling module (BERT-style post-norm), which "
                                "hyper-connections cannot wrap yet"))
                continue
            for i, site in enumerate(sites):
                new.append(self._rewrite(surgery, site, i, first=i == 0,
                                         last=i == len(sites) - 1))
        if refused and not new:
            name, blocks, reason = refused[0]
            raise ModuleError(name, type(surgery.module(name)).__name__, reason, fold(blocks),
                              self.name)
        return new

    def _check_memory(self, surgery: Surgery, trunks: list) -> None:
        """Refuse, before anything is built, streams whose mixing weights (counted on a module
        built on the meta device) and widened activations would not fit in memory."""
        sites = [s for t in trunks for s in _sites(surgery, t.blocks)]
        if not sites:
            return
        stream = _stream(surgery, sites[0].owner)
        dim = int(stream.shape[1] if stream.dim() > 3 else stream.shape[-1])
        with torch.device("meta"):
            per_site = sum(p.numel() for p in
                           hyper_connections(self.streams, dim, mhc=self.mhc).parameters())
        # each site holds its weights and a few (b·n, ..., d) activations of the example
        activations = 2 * len(sites) * self.streams * stream.numel()
        need = (per_site * len(sites) + activations) * 4
        require_memory(need, f"hyper:streams={self.streams} on {len(sites)} residual sites of "
                             f"width {dim}", "use fewer streams")

    def _trunks(self, surgery: Surgery) -> list:
        return [t for t in surgery.inspection.trunks if any(self.selects(b) for b in t.blocks)]

    def _rewrite(self, surgery: Surgery, site: _Site, index: int, first: bool,
                 last: bool) -> str:
        graph = surgery.graph(site.owner)
        node = node_named(graph, site.node)
        skip = node.args[site.skip] if site.aion is None else node.args[0]
        branch = node.args[1 - site.skip] if site.aion is None else node.args[1]
        stream = _stream(surgery, site.owner)
        channel_first = stream.dim() > 3  # (b, c, h, w): conv nets carry channels first
        dim = int(stream.shape[1] if channel_first else stream.shape[-1])
        module = hyper_connections(self.streams, dim, mhc=self.mhc, layer_index=index)
        module.channel_first = channel_first
        target = surgery.add_module(site.owner, f"hyper_{index}", module)
        in_branch = _branch_users(skip, branch)
        with graph.inserting_before(_anchor(skip).next):
            stream = skip
            if first:
                stream = graph.call_function(expand_streams, (skip, self.streams))
            mixer = graph.get_attr(target)
            width = graph.call_method("width_connection", (mixer, stream))
            branch_input = graph.call_function(_item, (width, 0))
            residuals = graph.call_function(_item, (width, 1))
            beta = graph.call_function(_item, (width, 2))
        for user in in_branch:
            user.replace_input_with(skip, branch_input)
        with graph.inserting_before(node):
            y = branch
            if site.aion is not None:  # AION scales the branch inside the streams
                aion = graph.get_attr(site.aion)
                y = graph.call_method("scale", (aion, branch, branch_input, *node.args[2:]))
            out = graph.call_method("depth_connection", (mixer, y, residuals, beta))
            if last:
                out = graph.call_function(reduce_streams, (out, self.streams, self.reduce))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        return f"{site.owner}.{target}"


def _inline_lifted_sites(surgery: Surgery, trunks: list) -> bool:
    """Where a site's skip comes from the caller (BERT's `LayerNorm(dense(h) + input_tensor)`),
    inline the owner into its caller until skip and branch meet in one graph; the model is then
    committed and traced again. Returns whether anything was inlined."""
    changed = False
    for _ in range(3):
        owners = [s.owner for t in trunks for s in _sites(surgery, t.blocks)
                  if not _is_local(surgery, s)]
        if not any([surgery.inline(o) for o in dict.fromkeys(owners)]):
            break
        surgery.commit()
        surgery.refresh()
        changed = True
        trunks = [t for t in surgery.inspection.trunks
                  if any(b in {x for tr in trunks for x in tr.blocks} for b in t.blocks)]
    return changed


def _item(t: tuple, i: int):  # noqa: ANN202 (fx-visible getitem with a readable name)
    return t[i]


def _anchor(node: fx.Node) -> fx.Node:
    """Where to insert after `node`: after the last placeholder if it is one."""
    if node.op != "placeholder":
        return node
    last = node
    for n in node.graph.nodes:
        if n.op == "placeholder":
            last = n
    return last


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        n = stack.pop()
        for inp in n.all_input_nodes:
            if inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def _branch_users(skip: fx.Node, branch: fx.Node) -> list[fx.Node]:
    """Users of `skip` on the branch's side (the branch or its ancestors)."""
    upstream = _ancestors(branch) | {branch}
    return [u for u in skip.users if u in upstream]


def _is_local(surgery: Surgery, site: _Site) -> bool:
    """The skip reaches the branch inside the owner's graph (not a BERT-style lifted add)."""
    graph = surgery.trace.traces[site.owner].graph
    node = node_named(graph, site.node)
    skip = node.args[site.skip] if site.aion is None else node.args[0]
    branch = node.args[1 - site.skip] if site.aion is None else node.args[1]
    return isinstance(skip, fx.Node) and isinstance(branch, fx.Node) and (
        skip in _ancestors(branch))


def _sites(surgery: Surgery, blocks: tuple[str, ...]) -> list[_Site]:
    """The trunk's residual sites in execution order: adds and AION calls."""
    def inside(owner: str) -> bool:
        return any(owner == b or owner.startswith(b + ".") for b in blocks)

    sites = [_Site(r.module, r.node, r.skip) for r in surgery.inspection.residuals
             if inside(r.module)]
    for owner, mt in surgery.trace.traces.items():
        if not inside(owner):
            continue
        for n in mt.graph.nodes:
            if n.op == "call_module" and isinstance(mt.module.get_submodule(str(n.target)),
                                                    AionResidual):
                sites.append(_Site(owner, n.name, 0, str(n.target)))
    return sorted(sites, key=lambda s: _when(surgery, s.owner, s.node))


def _when(surgery: Surgery, owner: str, node: str) -> tuple:
    """When a node runs: its index in its owner's graph, behind the index of the call into
    the owner in each traced ancestor's graph (a parent's add can come after a child's)."""
    graph = surgery.trace.traces[owner].graph
    key: tuple = (next(i for i, n in enumerate(graph.nodes) if n.name == node),)
    while True:
        found = surgery._caller(owner)
        if found is None:
            return (surgery.trace.calls[owner].order, *key)
        owner, rel = found
        nodes = list(surgery.trace.traces[owner].graph.nodes)
        key = (next(i for i, n in enumerate(nodes)
                    if n.op == "call_module" and n.target == rel), *key)


def _stream(surgery: Surgery, owner: str) -> torch.Tensor:
    """The first floating-point tensor of the owner's recorded call: the residual stream."""
    call = surgery.trace.calls[owner]
    tensors = [t for t in flatten((call.args, call.kwargs))[0] if isinstance(t, torch.Tensor)
               and t.is_floating_point()]
    if not tensors:
        raise PassError(f"hyper: cannot tell the residual stream of {owner}")
    return tensors[0]
