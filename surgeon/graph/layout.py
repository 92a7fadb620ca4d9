"""Layouts in a traced graph: each node's shape on the recorded call, and which axis of a value
holds its features (the hyper pass mixes streams along it, decided at each residual add)."""

from __future__ import annotations

import copy
import math
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.graph.rewrite import Surgery, copy_graph
from surgeon.graph.tracing import as_recorded


def node_shapes(surgery: Surgery, owner: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor-valued node of the owner's traced graph on its recorded call
    (empty where the graph cannot be run again on it)."""
    cache = surgery.__dict__.setdefault("_node_shapes", {})
    if owner in cache:
        return cache[owner]
    mt, call = surgery.trace.traces[owner], surgery.trace.calls[owner]
    try:
        args, kwargs = copy.deepcopy((call.args, call.kwargs))
    except Exception:  # an object that refuses copying: run on the recording itself
        args, kwargs = call.args, call.kwargs
    inputs = mt.shared.spec.match(args, kwargs)
    shapes: dict[str, tuple[int, ...]] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if isinstance(out, torch.Tensor):
                shapes[n.name] = tuple(out.shape)
            return out

    if inputs is not None:
        try:
            with as_recorded(surgery.model), torch.no_grad():
                Recorder(fx.GraphModule(mt.module, copy_graph(mt.graph))).run(*inputs)
        except Exception:  # shapes stay partial; the layout falls back to the stream's rank
            pass
    cache[owner] = shapes
    return shapes


_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention, nn.Bilinear,
         *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
          nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_LAST_FNS = {F.linear, F.layer_norm, torch.layer_norm, F.embedding,
             *((F.rms_norm,) if hasattr(F, "rms_norm") else ())}
_FIRST_FNS = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d,
              F.conv_transpose3d, F.batch_norm, F.group_norm, F.instance_norm, torch.conv2d,
              torch.conv1d, torch.conv3d}
_VIEW_OPS = frozenset(("view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze"))


def feature_axis(module: nn.Module, node: Any, shapes: dict[str, tuple[int, ...]],
                 depth: int = 0) -> int | None:
    """The feature axis (non-negative) of `node`'s value in `module`'s graph, found backwards
    from the last layer whose layout is known (a Linear or LayerNorm reads features last, a
    convolution or BatchNorm on axis 1) through the permutes and views after it; None if
    unknown. `shapes` (from `node_shapes`) lets views be followed."""
    if not isinstance(node, fx.Node) or depth > 64:
        return None
    shape = shapes.get(node.name)
    rank = len(shape) if shape is not None else None

    def of(x: Any) -> int | None:
        return feature_axis(module, x, shapes, depth + 1)

    if node.op == "call_module":
        sub = module.get_submodule(str(node.target))
        if rank is None and node.args and isinstance(node.args[0], fx.Node):
            in_shape = shapes.get(node.args[0].name)
            rank = len(in_shape) if in_shape is not None else None
        if isinstance(sub, _LAST):
            return rank - 1 if rank else None
        if isinstance(sub, _FIRST) or getattr(sub, "data_format", "") == "channels_first":
            return 1
        return of(node.args[0]) if node.args else None
    if node.op not in ("call_function", "call_method"):
        return None
    target, args = node.target, node.args
    if target in _LAST_FNS:
        return rank - 1 if rank else None
    if target in _FIRST_FNS:
        return 1
    if target is operator.getitem:
        src = args[0]
        if isinstance(src, fx.Node) and src.name not in shapes:  # an item of a tuple
            return of(src)
        before = shapes.get(src.name) if isinstance(src, fx.Node) else None
        axis = of(src)
        return axis if before is not None and rank == len(before) else None
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    x = args[0] if args else None
    if name in ("permute", "transpose", "movedim", "swapaxes", "swapdims") and rank:
        axis = of(x)
        if axis is None:
            return None
        dims = [d for a in args[1:] for d in (a if isinstance(a, (tuple, list)) else (a,))]
        if not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % rank for d in dims]
        if name == "permute":
            return dims.index(axis) if axis in dims else None
        if name == "movedim":
            src, dst = dims
            order = [d for d in range(rank) if d != src]
            order.insert(dst, src)
            return order.index(axis)
        i, j = dims
        return j if axis == i else i if axis == j else axis
    if name in _VIEW_OPS and isinstance(x, fx.Node):
        before = shapes.get(x.name)
        axis = of(x)
        if axis is None or before is None or shape is None:
            return None
        prefix = math.prod(before[:axis])
        for k in range(len(shape)):
            if math.prod(shape[:k]) == prefix and shape[k] == before[axis]:
                return k
        return None
    # elementwise: a layer scale (a parameter) tells the axis; otherwise follow the operand
    # that carries the value
    for a in args:
        if isinstance(a, fx.Node) and a.op == "get_attr" and rank:
            p = getattr(module.get_submodule(".".join(str(a.target).split(".")[:-1]))
                        if "." in str(a.target) else module, str(a.target).split(".")[-1],
                        None)
            if isinstance(p, torch.Tensor) and p.dim() >= 1 and (
                    sum(s != 1 for s in p.shape) == 1):
                k = next(i for i, s in enumerate(p.shape) if s != 1)
                return rank - p.dim() + k
    for a in args:
        if isinstance(a, fx.Node) and a.name in shapes and len(shapes[a.name]) == rank:
            return of(a)
    return None
