"""The stream-folded values of a rewritten graph, and the shape code around them.

The hyper pass folds n residual streams into the batch dimension (stream index outermost,
`(n·b, ...)`) between a trunk's expand and its reduce. Code written for the plain network reads
shapes off those tensors and reshapes by them (`b, t, d = x.shape`, `h.view(-1, d)`, then
`.view(b, t, d)` after the reduce or on a branch). Here every shape read of a folded tensor
returns one stream's shape, and every reshape-like op on a folded tensor takes sizes written for
one stream (the first scaled by n), so each value sees the shape the code expects of it. Ops
that would mix the streams' rows along the batch dimension (a `cat` or `split` along it,
indexing it) are reported, for the pass to refuse.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable

import torch
import torch.fx as fx

from surgeon.graph.tracing import Call, CallSpec, flatten
from surgeon.nn.hyper import (
    expand_streams,
    stream_numel,
    stream_permute,
    stream_shape,
    stream_size,
    stream_unflatten,
    stream_view,
)

_VIEWS = frozenset(("view", "reshape", "expand"))
_PERMUTES = frozenset(("permute", "transpose", "movedim", "swapaxes", "swapdims"))
_BATCH_OPS = {torch.cat: 0, torch.concat: 0, torch.stack: 0, torch.split: 0, torch.chunk: 0,
              torch.unbind: 0}
_BATCH_METHODS = frozenset(("split", "chunk", "unbind", "tensor_split"))


def folded_values(graph: fx.Graph, seeds: Iterable[fx.Node], blocked: Iterable[fx.Node]
                  ) -> set[fx.Node]:
    """Nodes whose value carries folded streams: the seeds, and every node fed one that is not
    blocked (a reduce, a branch input) and not a shape read."""
    folded = set(seeds)
    stop = set(blocked)
    for node in graph.nodes:
        if node in folded or node in stop or node.op in ("placeholder", "output"):
            continue
        if _shape_read(node) is not None:
            continue
        if any(i in folded for i in node.all_input_nodes):
            folded.add(node)
    return folded


def _shape_read(node: fx.Node) -> str | None:
    if node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
        return "shape"
    if node.op == "call_method" and node.target in ("size", "numel"):
        return str(node.target)
    return None


def translate(graph: fx.Graph, folded: set[fx.Node], num_streams: int,
              tensors: set[str]) -> list[fx.Node]:
    """Rewrite the shape code on folded values in place; returns the nodes that use the batch
    dimension of a folded value in a way no rewrite keeps per stream. `tensors` names the nodes
    known to hold a tensor (an index into a tuple is no index into the batch)."""
    n = num_streams
    bad = []
    for node in list(graph.nodes):
        x = node.args[0] if node.args else None
        if not (isinstance(x, fx.Node) and x in folded):
            continue
        read = _shape_read(node)
        with graph.inserting_before(node):
            new = None
            if read == "shape" or (read == "size" and len(node.args) == 1
                                   and "dim" not in node.kwargs):
                new = graph.call_function(stream_shape, (x, n))
            elif read == "size":
                dim = node.args[1] if len(node.args) > 1 else node.kwargs["dim"]
                new = graph.call_function(stream_size, (x, n, dim))
            elif read == "numel":
                new = graph.call_function(stream_numel, (x, n))
            elif node.op == "call_method" and node.target in _VIEWS and not node.kwargs:
                new = graph.call_function(stream_view, (x, n, node.target, *node.args[1:]))
            elif node.op == "call_function" and node.target is torch.reshape:
                new = graph.call_function(stream_view, (x, n, "reshape", *node.args[1:]))
            elif _is(node, "unflatten") and len(node.args) == 3:
                new = graph.call_function(stream_unflatten, (x, n, *node.args[1:]))
            elif _is(node, *_PERMUTES) and not node.kwargs and _touches_batch(node):
                new = graph.call_function(stream_permute, (x, n, node.target, *node.args[1:]))
            elif x.name in tensors and _mixes_batch(node):
                bad.append(node)
        if new is not None:
            node.replace_all_uses_with(new)
            graph.erase_node(node)
    return bad


def _is(node: fx.Node, *methods: str) -> bool:
    return node.op == "call_method" and node.target in methods


def _touches_batch(node: fx.Node) -> bool:
    dims = [d for a in node.args[1:] for d in (a if isinstance(a, (tuple, list)) else (a,))]
    if node.target == "permute":
        return bool(dims) and dims[0] != 0
    return 0 in dims


def _mixes_batch(node: fx.Node) -> bool:
    """A split, chunk or unbind along the batch dimension, or an index into it."""
    if node.op == "call_method" and node.target in _BATCH_METHODS:
        at = 1 if node.target == "unbind" else 2
        dim = node.kwargs.get("dim", node.args[at] if len(node.args) > at else 0)
        return dim == 0
    if node.op == "call_function" and node.target is operator.getitem:
        index = node.args[1]
        first = index[0] if isinstance(index, tuple) and index else index
        return not (first is Ellipsis or (isinstance(first, slice) and first == slice(None))
                    or first is None)
    return False


def mixes_batch_in_list(node: fx.Node, folded: set[fx.Node]) -> bool:
    """`torch.cat([...], dim=0)` (or stack, split) over folded values."""
    if node.op != "call_function" or node.target not in _BATCH_OPS:
        return False
    first = node.args[0] if node.args else None
    values = first if isinstance(first, (tuple, list)) else (first,)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 and node.target in
                          (torch.cat, torch.concat, torch.stack) else 0)
    return dim == 0 and any(isinstance(v, fx.Node) and v in folded for v in values)


def same_tensor_inputs(graph: fx.Graph, call: Call, spec: CallSpec) -> dict[fx.Node, fx.Node]:
    """Graph inputs that received the very tensor an earlier input did in the recorded call
    (Funnel's `layer(h, h, h)`: query, key and value are one stream), each mapped to that
    earlier input. The streams must reach all of them alike: a rewrite that widens or mixes
    one of them and not the others would hand the branch a stream and a copy of it at two
    batch sizes."""
    clones = [x for x in flatten((call.args, call.kwargs))[0] if isinstance(x, torch.Tensor)]
    if len(clones) != len(call.in_ids):
        return {}
    original = {id(c): i for c, i in zip(clones, call.in_ids)}
    try:
        bound = spec.signature.bind(*call.args, **call.kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    leaves = [x for x, k in zip(flatten(dict(bound.arguments))[0], spec.kinds) if k != "const"]
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(leaves) != len(inputs):
        return {}
    first: dict[int, fx.Node] = {}
    aliases: dict[fx.Node, fx.Node] = {}
    for node, leaf in zip(inputs, leaves):
        key = original.get(id(leaf)) if isinstance(leaf, torch.Tensor) else None
        if key is None:
            continue
        if key in first:
            aliases[node] = first[key]
        else:
            first[key] = node
    return aliases


def join_per_stream(graph: fx.Graph, folded: set[fx.Node], num_streams: int) -> None:
    """A `cat` or `stack` along another dimension than the batch that joins folded values with
    values at batch b (CvT's class token, `cls.expand(b, -1, -1)`, put before the folded
    tokens): the batch-b values are repeated over the streams, so every stream gets them."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.cat, torch.concat,
                                                             torch.stack):
            continue
        values = node.args[0] if node.args else None
        if not isinstance(values, (tuple, list)):
            continue
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        nodes = [v for v in values if isinstance(v, fx.Node)]
        if dim == 0 or not any(v in folded for v in nodes) or all(v in folded for v in nodes):
            continue
        with graph.inserting_before(node):
            wide = [graph.call_function(expand_streams, (v, num_streams))
                    if isinstance(v, fx.Node) and v not in folded else v for v in values]
        node.args = (type(values)(wide), *node.args[1:])
