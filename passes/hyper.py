"""Residual trunks → n-stream hyper-connections (or mHC).

Every residual site of a trunk (an add `skip + branch`, or an AION call left by the `aion` pass)
is rewritten in its owner's graph:

    bi, residuals, beta = hyper_k.width_connection(H)   # the branch now reads bi (b, ..., d)
    H = hyper_k.depth_connection(branch, residuals, beta)

The streams are folded into the batch (`H` is `(b·n, ..., d)`), so the code between sites keeps
its shapes; the first site expands its skip into the streams and the last one reduces them, so
the trunk's callers see `(b, ..., d)` as before. Masks, rotary tables and caches reach the branch,
which runs at batch b. At init the rewrite is exact (HC) or within ~1e-6 (mHC).

A trunk whose caller skips blocks at random in train mode (LayerDrop) is folded within each block
instead: a block returns one stream's tensor carrying the streams (`suspend_streams`), which the
next block that runs takes up (`resume_streams`), so a skipped block is an identity on the streams.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.fx as fx

from surgeon.errors import ModuleError
from surgeon.files.budget import require_memory
from surgeon.graph.blame import fold
from surgeon.graph.find import source_line
from surgeon.graph.layout import feature_axis, node_shapes
from surgeon.graph.rewrite import Surgery, node_named
from surgeon.graph.streams import (
    folded_values,
    join_per_stream,
    mixes_batch_in_list,
    same_tensor_inputs,
    translate,
)
from surgeon.graph.tracing import FOLDED_STREAMS, flatten
from surgeon.nn.aion import AionResidual
from surgeon.nn.hyper import (
    expand_streams,
    reduce_streams,
    resume_streams,
    stream_numel,
    stream_shape,
    stream_size,
    suspend_streams,
)
from surgeon.nn.mhc import hyper_connections
from surgeon.recipe import PassConfig, PassError, bounded, option_error, register

_log = logging.getLogger("surgeon")
MANY_STREAMS = 16  # hyper-connection papers use 2-8 streams
MHC_MAX_STREAMS = int(1 + math.exp(3.0)) + 1  # 22: mHC's home bias needs (n - 1)·σ(-3) < 1


@dataclass
class _Site:
    owner: str
    node: str
    skip: int  # operand index of the skip (adds); AION calls have it first
    aion: str | None = None  # the AION submodule target, for AION sites


@dataclass
class _Plan:
    """How one residual site is rewritten (node names of its owner's traced graph)."""

    site: _Site
    fork: str  # the stream value that the branch and the shortcut both start from
    skip: str  # the add's skip operand (the fork itself, or the end of the shortcut)
    branch: str
    shortcut: tuple[str, ...]  # nodes from the fork to the skip (a cast, a projection)
    more: tuple[str, ...]  # further branch outputs of a parallel block, in add order
    chain: tuple[str, ...]  # the site's add and the outer adds of a parallel block
    axis: int  # the feature axis at the add
    dim: int  # the stream's width on that axis

    @property
    def outer(self) -> str:
        return self.chain[-1]


@register
@dataclass(frozen=True)
class HyperConnections(PassConfig):
    """Hyper-connection streams over every residual trunk in scope.

    A trunk spans stage boundaries: a block that changes the stream's shape (a strided block
    with a projection shortcut) is wrapped too, its shortcut applied to every residual stream
    (folded into the batch, so with the block's own weights) and its depth weights averaged
    over the positions of each sample. One expand before the trunk's first residual, one
    reduce after its last. After a run, `model.surgeon_hyper_coverage` says how many of the
    model's residual adds the streams carry."""

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
        plans: list[list[_Plan]] = []
        carried: dict[int, tuple[str, ...]] = {}  # trunk index -> its blocks, where LayerDrop
        refused: list[tuple[str, tuple[str, ...], str]] = []
        for trunk in trunks:
            sites = _sites(surgery, trunk.blocks)
            if not sites:
                continue
            if any(not _is_local(surgery, s) for s in sites):
                refused.append((trunk.blocks[0], trunk.blocks, "its residual adds take their "
                                "skip from the calling module (BERT-style post-norm), which "
                                "hyper-connections cannot wrap yet"))
                continue
            if surgery.skipped_in_training(list(trunk.blocks)):
                carried[len(plans)] = trunk.blocks
            plans.append(_plans(surgery, sites))
        if refused and not plans:
            name, blocks, reason = refused[0]
            raise ModuleError(name, type(surgery.module(name)).__name__, reason, fold(blocks),
                              self.name)
        added: list[tuple[str, str]] = []
        try:
            new = self._rewrite_trunks(surgery, plans, added, carried)
        except PassError:
            for owner, attr in added:  # nothing of this pass stays on the model
                delattr(surgery.module(owner), attr)
            surgery.graphs.clear()
            raise
        coverage = _coverage(surgery, sum(len(p) for p in plans), len(plans))
        surgery.model.surgeon_hyper_coverage = coverage
        _log.info("hyper %s", coverage)
        return new

    def _rewrite_trunks(self, surgery: Surgery, plans: list[list[_Plan]],
                        added: list[tuple[str, str]], carried: dict[int, tuple[str, ...]]
                        ) -> list[str]:
        """Each trunk folded from its first site to its last; a trunk whose blocks may be
        skipped (LayerDrop, `carried`) folded within each block, the streams handed from
        block to block on the reduced tensor (`suspend_streams`, `resume_streams`)."""
        new: list[str] = []
        for t, trunk in enumerate(plans):
            renamed: dict[tuple[str, str], str] = {}  # a site's add -> the node now in its place
            blocks = carried.get(t)
            groups = [trunk] if blocks is None else [
                g for g in ([p for p in trunk if _holds(b, p)] for b in blocks) if g]
            carry = None if blocks is None else blocks[0]
            i = 0
            for group in groups:
                for j, plan in enumerate(group):
                    new.append(self._rewrite(surgery, plan, i, first=j == 0,
                                             last=j == len(group) - 1, added=added,
                                             renamed=renamed, carry=carry))
                    i += 1
                folded = _fold_shapes(surgery, group, self.streams, carried=carry is not None)
                if carry is not None:
                    self._suspend_at_output(surgery, group, folded, carry)
        return new

    def _suspend_at_output(self, surgery: Surgery, group: list[_Plan],
                           folded: dict[str, set[fx.Node]], carry: str) -> None:
        """A carried trunk's block returns one stream (`suspend_streams`) where its graph
        returns the folded streams: after its last site and whatever follows it in the block
        (a post-norm block's final norm runs on every stream)."""
        block = next(b for b in _span_blocks(surgery, group))
        if block not in folded:
            raise PassError(f"hyper: {block} is skipped at random in train mode (LayerDrop) "
                            f"and its own code could not be traced, so the streams cannot be "
                            f"handed past it; set the model's layerdrop to 0 or exclude "
                            f"exclude={block}")
        graph = surgery.graph(block)
        output = next(n for n in graph.nodes if n.op == "output")
        mine = folded[block]

        def suspend(value: Any) -> Any:
            if not (isinstance(value, fx.Node) and value in mine):
                return value
            with graph.inserting_before(output):
                return graph.call_function(suspend_streams,
                                           (value, self.streams, self.reduce, carry))

        output.args = fx.node.map_aggregate(output.args, suspend)

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

    def _rewrite(self, surgery: Surgery, plan: _Plan, index: int, first: bool, last: bool,
                 added: list[tuple[str, str]], renamed: dict[tuple[str, str], str],
                 carry: str | None = None) -> str:
        site = plan.site
        graph = surgery.graph(site.owner)

        def named(name: str) -> fx.Node:
            return node_named(graph, renamed.get((site.owner, name), name))

        node = named(plan.outer)
        fork = named(plan.fork)
        _merge_same_inputs(surgery, site.owner, graph, fork)
        branch = named(plan.branch)
        more = [named(m) for m in plan.more]
        shortcut = {named(m) for m in plan.shortcut}
        module = hyper_connections(self.streams, plan.dim, mhc=self.mhc, layer_index=index)
        module.feature_axis = plan.axis
        target = surgery.add_module(site.owner, f"hyper_{index}", module)
        added.append((site.owner, target))
        upstream = set().union(*(_ancestors(b) | {b} for b in (branch, *more)))
        in_branch = [u for u in fork.users if u in upstream and u not in shortcut]
        to_shortcut = [u for u in fork.users if u in shortcut]
        with graph.inserting_before(_anchor(fork).next):
            stream = fork
            if first:
                stream = graph.call_function(expand_streams, (fork, self.streams)) \
                    if carry is None else graph.call_function(resume_streams,
                                                              (fork, self.streams, carry))
            mixer = graph.get_attr(target)
            width = graph.call_method("width_connection", (mixer, stream))
            branch_input = graph.call_function(_item, (width, 0))
            residuals = graph.call_function(_item, (width, 1))
            beta = graph.call_function(_item, (width, 2))
        for user in in_branch:
            user.replace_input_with(fork, branch_input)
        for user in to_shortcut:  # the block's shortcut (a cast, a projection) on the streams
            user.replace_input_with(fork, residuals)
        site_node = named(site.node)
        skip = residuals if not shortcut else named(plan.skip)
        with graph.inserting_before(node):
            y = branch
            if site.aion is not None:  # AION scales the branch inside the streams
                aion = graph.get_attr(site.aion)
                # its x: what the branch reads, or with a shortcut (another shape) the mean
                # of the streams past the shortcut
                x = branch_input if not shortcut else graph.call_function(
                    reduce_streams, (skip, self.streams, "mean"))
                y = graph.call_method("scale", (aion, branch, x, *site_node.args[2:]))
            out = graph.call_method("depth_connection", (mixer, y, skip, beta, *more))
            if last and carry is None:  # (a carried trunk's blocks reduce at their output)
                out = graph.call_function(reduce_streams, (out, self.streams, self.reduce))
        node.replace_all_uses_with(out)
        renamed[(site.owner, plan.outer)] = out.name
        for done in reversed(plan.chain):  # the site's add and a parallel block's outer adds
            graph.erase_node(node_named(graph, done))
        return f"{site.owner}.{target}"


def _inline_lifted_sites(surgery: Surgery, trunks: list) -> bool:
    """Where a site's skip comes from the caller (BERT's `LayerNorm(dense(h) + input_tensor)`),
    inline the owner into its caller until skip and branch meet in one graph; the model is then
    committed and traced again. Returns whether anything was inlined."""
    changed = False
    for _ in range(3):
        sites = [s for t in trunks for s in _sites(surgery, t.blocks)]
        owners = [s.owner for s in sites if not _is_local(surgery, s)]
        owners += [c for c in (_tuple_fork(surgery, s) for s in sites) if c is not None]
        if not any([surgery.inline(o) for o in dict.fromkeys(owners)]):
            break
        surgery.commit()
        surgery.refresh()
        changed = True
        trunks = [t for t in surgery.inspection.trunks
                  if any(b in {x for tr in trunks for x in tr.blocks} for b in t.blocks)]
    return changed


def _tuple_fork(surgery: Surgery, site: _Site) -> str | None:
    """The child module whose tuple output both skip and branch start from (DBRX's
    `resid, h = self.norm_attn_norm(x)`, whose residual stream is `resid` and whose branch reads
    `h = norm(resid)`): the stream must be taken inside it, so it is inlined."""
    graph = surgery.graphs.get(site.owner, surgery.trace.traces[site.owner].graph)
    skip, branch = _operands(surgery, site, graph)
    found = _fork(skip, branch) if isinstance(skip, fx.Node) and isinstance(
        branch, fx.Node) else None
    fork = found[0] if found else None
    if fork is None or fork.op != "call_module" or not fork.users or any(
            u.op != "call_function" or u.target is not operator.getitem for u in fork.users):
        return None
    return f"{site.owner}.{fork.target}" if site.owner else str(fork.target)


def _same_inputs(surgery: Surgery, owner: str, graph: fx.Graph) -> dict[fx.Node, fx.Node]:
    """The owner's inputs that got the same tensor as an earlier input (see
    `same_tensor_inputs`), on its editable graph."""
    mt = surgery.trace.traces[owner]
    found = same_tensor_inputs(mt.graph, surgery.trace.calls[owner], mt.shared.spec)
    return {node_named(graph, a.name): node_named(graph, n.name) for a, n in found.items()}


def _merge_same_inputs(surgery: Surgery, owner: str, graph: fx.Graph, fork: fx.Node) -> None:
    """Where the stream the fork starts from came in through several inputs (Funnel's
    `attention(h, h, h)`), their uses read the first one, so the branch and the shortcut see
    one stream: the mixed branch input at batch b, or the folded streams."""
    stream = {n for n in _ancestors(fork) | {fork} if n.op == "placeholder"}
    for alias, first in _same_inputs(surgery, owner, graph).items():
        if first in stream:
            alias.replace_all_uses_with(first)


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


def _is_local(surgery: Surgery, site: _Site) -> bool:
    """Skip and branch start from one value of the owner's graph (not a BERT-style lifted add,
    whose skip comes from the caller)."""
    skip, branch = _operands(surgery, site, surgery.trace.traces[site.owner].graph)
    return isinstance(skip, fx.Node) and isinstance(branch, fx.Node) and (
        _fork(skip, branch) is not None)


def _sites(surgery: Surgery, blocks: tuple[str, ...]) -> list[_Site]:
    """The trunk's residual sites in execution order: adds and AION calls."""
    def inside(owner: str) -> bool:
        return any(owner == b or owner.startswith(b + ".") for b in blocks)

    sites = [_site(surgery, r) for r in surgery.inspection.residuals if inside(r.module)]
    for owner, mt in surgery.trace.traces.items():
        if not inside(owner):
            continue
        for n in mt.graph.nodes:
            if n.op == "call_module" and isinstance(mt.module.get_submodule(str(n.target)),
                                                    AionResidual):
                sites.append(_Site(owner, n.name, 0, str(n.target)))
    return sorted(sites, key=lambda s: _when(surgery, s.owner, s.node))


def _site(surgery: Surgery, r: Any) -> _Site:
    """A found residual as a site. A parallel block reported as one residual with `branches`
    (its `node` the last add of the sum): where the skip is added last, the sum of the branches
    is the branch; where it is added first (`x + attn + mlp`), the site is the add that takes
    the skip, and the outer adds join it as further branch outputs (see `_parallel`)."""
    skip_node = getattr(r, "skip_node", None)
    if not getattr(r, "branches", ()) or skip_node is None:
        return _Site(r.module, r.node, r.skip)
    graph = surgery.trace.traces[r.module].graph
    add = node_named(graph, r.node)
    while isinstance(add, fx.Node) and _is_add(add):
        names = [a.name if isinstance(a, fx.Node) else None for a in add.args[:2]]
        if skip_node in names:
            return _Site(r.module, add.name, names.index(skip_node))
        inner = [a for a in add.args[:2] if isinstance(a, fx.Node) and _is_add(a)
                 and any(x.name == skip_node for x in _ancestors(a) | {a})]
        if not inner:
            break
        add = inner[0]
    return _Site(r.module, r.node, r.skip)


def _when(surgery: Surgery, owner: str, node: str) -> tuple:
    """When a node runs: its index in its owner's graph, behind the index of the call into
    the owner in each traced ancestor's graph (a parent's add can come after a child's)."""
    graph = surgery.trace.traces[owner].graph
    key: tuple = (next(i for i, n in enumerate(graph.nodes) if n.name == node),)
    while True:
        found = surgery.caller(owner)
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


def _operands(surgery: Surgery, site: _Site, graph: fx.Graph) -> tuple[fx.Node, fx.Node]:
    node = node_named(graph, site.node)
    if site.aion is not None:
        return node.args[0], node.args[1]
    return node.args[site.skip], node.args[1 - site.skip]


def _fork(skip: fx.Node, branch: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """The value both the branch and the skip start from, and the shortcut nodes between it and
    the skip (none when the skip itself feeds the branch). None: they share no tensor value."""
    up = _ancestors(branch)
    if skip in up:
        return skip, []
    common = (_ancestors(skip) | {skip}) & (up | {branch})
    order = {n: i for i, n in enumerate(skip.graph.nodes)}
    common = {n for n in common if n.op != "get_attr" and
              (n.op == "placeholder" or any(a.op == "placeholder" for a in _ancestors(n)))}
    if not common:
        return None
    fork = max(common, key=order.__getitem__)
    down = _descendants(fork)
    shortcut = [n for n in _ancestors(skip) | {skip} if n in down and n not in up]
    return fork, sorted(shortcut, key=order.__getitem__)


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in (operator.add, torch.add)) or (
        node.op == "call_method" and node.target in ("add", "__add__"))


def _parallel(node: fx.Node, fork: fx.Node, shortcut: set[fx.Node]
              ) -> tuple[list[fx.Node], list[fx.Node]]:
    """A parallel block written `x + attn(ln(x)) + mlp(ln(x))`: the outer adds whose other
    operand reads the stream but not the residual before it. Returns the add chain (the site's
    add first) and those further branch outputs."""
    chain, more = [node], []
    while len(chain[-1].users) == 1:
        outer = next(iter(chain[-1].users))
        if not _is_add(outer) or len(outer.args) != 2 or outer.kwargs:
            break
        other = outer.args[1] if outer.args[0] is chain[-1] else outer.args[0]
        if not isinstance(other, fx.Node) or other is fork or other in shortcut:
            break
        up = _ancestors(other)
        if chain[-1] in up or fork not in up:
            break
        chain.append(outer)
        more.append(other)
    return chain, more


def _plans(surgery: Surgery, sites: list[_Site]) -> list[_Plan]:
    """Plan every site of a trunk; a parallel block's outer adds join the site they extend."""
    plans: list[_Plan] = []
    for site in sites:
        mt = surgery.trace.traces[site.owner]
        skip, branch = _operands(surgery, site, mt.graph)
        fork, shortcut = _fork(skip, branch)  # type: ignore[misc]  # _is_local checked it
        chain, more = _parallel(node_named(mt.graph, site.node), fork, set(shortcut))
        shapes = node_shapes(surgery, site.owner)
        axis, dim = _layout(surgery, site, mt, fork, chain[0], branch, shapes)
        plans.append(_Plan(site, fork.name, skip.name, branch.name,
                           tuple(n.name for n in shortcut), tuple(n.name for n in more),
                           tuple(n.name for n in chain), axis, dim))
    consumed = {(p.site.owner, c) for p in plans for c in p.chain[1:]}
    plans = [p for p in plans if (p.site.owner, p.site.node) not in consumed]
    return [p for p in plans if not any(_nested(surgery, p, q) for q in plans if q is not p)]


def _nested(surgery: Surgery, inner: _Plan, outer: _Plan) -> bool:
    """`inner`'s add runs inside `outer`'s branch (ConvNeXt-V2's GRN `γ·(x·n) + β + x` in a
    block's MLP): a residual of the branch, not of the stream, which `outer` carries."""
    graph = surgery.trace.traces[outer.site.owner].graph
    owner = outer.site.owner
    if inner.site.owner == owner:
        node = node_named(graph, inner.site.node)
    elif inner.site.owner.startswith(owner + "." if owner else ""):
        rel = inner.site.owner[len(owner) + 1:] if owner else inner.site.owner
        calls = [n for n in graph.nodes if n.op == "call_module"
                 and (rel == n.target or rel.startswith(f"{n.target}."))]
        if not calls:
            return False
        node = calls[0]
    else:
        return False
    branches = [node_named(graph, b) for b in (outer.branch, *outer.more)]
    up = set().union(*(_ancestors(b) | {b} for b in branches))
    return node in up and node_named(graph, outer.fork) in _ancestors(node)


def _layout(surgery: Surgery, site: _Site, mt: Any, fork: fx.Node, add: fx.Node,
            branch: fx.Node, shapes: dict[str, tuple[int, ...]]) -> tuple[int, int]:
    """The feature axis at the add (-1 for last) and the stream's width on it at the fork.

    Decided at each add from the branch's last layer whose layout is known (a Linear or
    LayerNorm reads features last, a convolution or BatchNorm reads them on axis 1), followed
    through the permutes and views between it and the add; where none is found, rank > 3
    means channels first."""
    out = shapes.get(add.name) or shapes.get(branch.name)
    fork_shape = shapes.get(fork.name)
    if out is None or fork_shape is None:  # no shapes: the block's first input decides
        stream = _stream(surgery, site.owner)
        axis = 1 if stream.dim() > 3 else stream.dim() - 1
        return (-1 if axis == stream.dim() - 1 else axis), int(stream.shape[axis])
    rank = len(out)
    axis = feature_axis(mt.module, branch, shapes)
    if axis is None or not 0 <= axis < rank:
        axis = 1 if rank > 3 else rank - 1
    if len(fork_shape) != rank:
        raise PassError(f"hyper: the residual add {site.node} of {site.owner} adds a rank-"
                        f"{rank} branch to a rank-{len(fork_shape)} stream, which the streams "
                        f"cannot carry; exclude it with exclude={site.owner}")
    return (-1 if axis == rank - 1 else axis), int(fork_shape[axis])


def _fold_shapes(surgery: Surgery, trunk: list[_Plan], streams: int, carried: bool = False
                 ) -> dict[str, set[fx.Node]]:
    """In each graph the trunk edited, make shape code on folded streams see one stream's shape
    (see `surgeon.graph.streams`); refuse ops that mix the streams along the batch. Returns the
    folded values of each graph the streams pass through."""
    found: dict[str, set[fx.Node]] = {}
    owners = list(dict.fromkeys(p.site.owner for p in trunk))
    for owner in owners:
        graph = surgery.graph(owner)
        mine = [p for p in trunk if p.site.owner == owner]
        seeds, blocked = set(), set()
        if mine[0] is not trunk[0]:  # the stream arrives folded
            fork = node_named(graph, mine[0].fork)  # a placeholder's descendant, never renamed
            inputs = {n for n in _ancestors(fork) | {fork} if n.op == "placeholder"}
            inputs |= {a for a, n in _same_inputs(surgery, owner, graph).items() if n in inputs}
            for n in inputs:  # a call traced again cuts them to one stream (see tracing)
                n.meta[FOLDED_STREAMS] = streams
            seeds |= inputs
        for n in graph.nodes:
            if n.op == "call_function" and n.target in (expand_streams, resume_streams):
                seeds.add(n)
            elif n.op == "call_function" and n.target in (reduce_streams, suspend_streams):
                blocked.add(n)
            elif n.op == "call_method" and n.target == "width_connection":
                blocked.add(n)
                for u in n.users:
                    (seeds if u.args[1] == 1 else blocked).add(u)
            elif n.op == "call_method" and n.target == "depth_connection":
                seeds.add(n)
        found[owner] = _translate(surgery, owner, graph, seeds, blocked, streams)
    for owner in _containers(surgery, trunk, owners):
        found[owner] = _fold_container(surgery, trunk, owner, streams, carried)
    return found


def _translate(surgery: Surgery, owner: str, graph: fx.Graph, seeds: set[fx.Node],
               blocked: set[fx.Node], streams: int) -> set[fx.Node]:
    """Translate the shape code on the values folded from `seeds`; refuse batch mixing.
    Returns the folded values of the graph as translated."""
    folded = folded_values(graph, seeds, blocked)
    tensors = set(node_shapes(surgery, owner))
    bad = translate(graph, folded, streams, tensors)
    bad += [n for n in graph.nodes if mixes_batch_in_list(n, folded)]
    if bad:
        where = source_line(bad[0].meta.get("stack_trace") or "") or bad[0].name
        raise PassError(f"hyper: {owner} splits, joins or indexes the batch dimension of "
                        f"the residual stream between its residual adds ({where}), which "
                        f"would mix the streams; exclude it with exclude={owner}")
    join_per_stream(graph, folded, streams)
    shapes = (stream_shape, stream_size, stream_numel)
    return {n for n in folded_values(graph, seeds, blocked)
            if not (n.op == "call_function" and n.target in shapes)}


def _containers(surgery: Surgery, trunk: list[_Plan], owners: list[str]) -> list[str]:
    """The traced modules whose code the streams pass through between sites without holding
    a site themselves: a trunk's blocks around their layers (CvT's stage reshapes its tokens
    to an image after its layers), and the modules between a block and its sites."""
    span = _trunk_span(surgery, trunk)
    return [name for name in surgery.trace.traces if name in span and name not in owners]


def _trunk_span(surgery: Surgery, trunk: list[_Plan]) -> set[str]:
    """The blocks holding the trunk's sites (`trunk` may be one block's sites) and every
    module between one of them and a site owner."""
    blocks = _span_blocks(surgery, trunk)
    span = set(blocks)
    for p in trunk:
        parts = p.site.owner.split(".")
        for cut in range(1, len(parts)):
            name = ".".join(parts[:cut])
            if any(name == b or name.startswith(b + ".") for b in blocks):
                span.add(name)
    return span


def _span_blocks(surgery: Surgery, trunk: list[_Plan]) -> list[str]:
    """The trunk blocks that hold the plans' sites."""
    return [b for t in surgery.inspection.trunks for b in t.blocks
            if any(_holds(b, p) for p in trunk)]


def _holds(name: str, plan: _Plan) -> bool:
    """Module `name` is the plan's site owner or holds it."""
    return plan.site.owner == name or plan.site.owner.startswith(name + ".") or not name


def _fold_container(surgery: Surgery, trunk: list[_Plan], owner: str, streams: int,
                    carried: bool = False) -> set[fx.Node]:
    """A module the streams pass through: its stream input arrives folded unless the trunk's
    first site is inside it, a call into a child holding sites returns folded streams unless
    the trunk's last site is inside that child (and the trunk is not `carried`: then the
    block reduces at its output)."""
    holds = _holds
    fresh = owner not in surgery.graphs
    graph = surgery.graph(owner)
    seeds, blocked = set(), set()
    if not holds(owner, trunk[0]):
        stream = next((n for n in graph.nodes if n.op == "placeholder"), None)
        if stream is not None:
            same = _same_inputs(surgery, owner, graph)
            for n in {stream} | {a for a, f in same.items() if f is stream}:
                n.meta[FOLDED_STREAMS] = streams
                seeds.add(n)
    for n in graph.nodes:
        if n.op != "call_module":
            continue
        child = f"{owner}.{n.target}" if owner else str(n.target)
        if not any(holds(child, p) for p in trunk):
            continue
        (blocked if holds(child, trunk[-1]) and not carried else seeds).add(n)
    before = str(graph)
    folded = _translate(surgery, owner, graph, seeds, blocked, streams) if seeds else set()
    if fresh and not carried and str(graph) == before:
        # no shape code to translate: the module stays as it is, its children (traced again
        # for another call) cutting their inputs to one stream themselves
        del surgery.graphs[owner]
        return set()
    return folded


def _coverage(surgery: Surgery, covered: int, trunks: int) -> str:
    """'covers 8 of 8 residual adds in 1 trunk' for the model as inspected; adds an earlier
    `aion` pass rewrote count as the AION calls they became."""
    total = len(surgery.inspection.residuals) + sum(
        n.op == "call_module" and isinstance(mt.module.get_submodule(str(n.target)), AionResidual)
        for mt in surgery.trace.traces.values() for n in mt.graph.nodes)
    return (f"covers {covered} of {total} residual add{'s' * (total != 1)} in {trunks} "
            f"trunk{'s' * (trunks != 1)}")
