"""Which axis of a traced value holds its features (channels): the last one, or axis 1.

Passes that reduce over the feature axis (AION's energies) must not guess it from the rank: a
4-D stream is `(b, c, h, w)` in a conv net and `(b, h, w, c)` in a Swin-style model. The answer
is read from the graph: walk back from the value through shape-keeping ops to the op that made
its features (a conv or channel norm: axis 1; a linear layer or a last-axis norm: the last
axis), carrying the axis through the permutes and transposes met on the way (ConvNeXt's
`Linear` then `permute(0, 3, 1, 2)` gives axis 1).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.graph.find import op_name, strip_casts
from surgeon.graph.tracing import ModelTrace

_CHANNEL_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                    nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)
_LAST_MODULES = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)
_CHANNEL_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm,
                      F.instance_norm, torch.conv1d, torch.conv2d, torch.conv3d}
_LAST_FUNCTIONS = {F.linear, torch.matmul, operator.matmul, F.layer_norm, F.rms_norm}
# ops that keep every axis where it was (elementwise, activations, dropout, pooling in place)
_KEEP_METHODS = {"relu", "gelu", "sigmoid", "tanh", "mul", "add", "sub", "div", "neg", "clone",
                 "contiguous", "float", "to", "type_as", "half", "bfloat16", "abs", "clamp"}
_MAX_STEPS = 64


def feature_axis(trace: ModelTrace, owner: str, node: fx.Node) -> str | None:
    """"first" (axis 1) or "last" for the features of `node` in `owner`'s graph; None when the
    graph does not tell (a placeholder, a reshape, an op this walk does not know)."""
    module = trace.model.get_submodule(owner) if owner else trace.model
    found = _walk(trace, owner, module, node, 0)
    if found is None:
        return None
    axis, perms = found
    ndim = None
    for dims in reversed(perms):  # forward order: the op nearest the source first
        if dims[0] == "transpose":
            _, a, b = dims
            if axis == "last" or any(isinstance(d, int) and d < 0 for d in (a, b)):
                return None  # the rank is unknown: cannot place "last" after a transpose
            axis = b if axis == a else a if axis == b else axis
            continue
        ndim = len(dims)
        pos = ndim - 1 if axis == "last" else axis
        norm = [d % ndim for d in dims]
        axis = norm.index(pos) if pos in norm else None
        if axis is None:
            return None
        if axis == ndim - 1:
            axis = "last"
    if axis == "last":
        return "last"
    if axis == 1:
        return "first"
    return None


def _walk(trace: ModelTrace, owner: str, module: nn.Module, node: Any,
          depth: int) -> tuple[Any, list] | None:
    """(the source's feature axis: 1 or "last", the permutes met walking back), or None."""
    perms: list = []
    for _ in range(_MAX_STEPS):
        node = strip_casts(node)
        if not isinstance(node, fx.Node) or node.op in ("placeholder", "get_attr", "output"):
            return None
        if node.op == "call_module":
            target = str(node.target)
            sub = module.get_submodule(target)
            axis = _module_axis(sub)
            if axis is not None:
                return axis, perms
            if not any(True for _ in sub.parameters()):  # ReLU, Dropout, Identity, pooling
                node = _first_node(node.args)
                continue
            name = f"{owner}.{target}" if owner else target
            inner = _inner(trace, name, sub, depth)
            if inner is None:
                return None
            return inner[0], inner[1] + perms  # inner permutes happen before ours
        if node.op == "call_function" and node.target in _CHANNEL_FUNCTIONS:
            return 1, perms
        if node.op == "call_function" and node.target in _LAST_FUNCTIONS:
            return "last", perms
        method = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
        if method == "permute":
            dims = node.args[1:] if node.op == "call_method" else node.args[1]
            if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
                dims = dims[0]
            if not all(isinstance(d, int) for d in dims):
                return None
            perms.append(tuple(dims))
        elif method in ("transpose", "swapaxes"):
            a, b = node.args[1:3]
            if not (isinstance(a, int) and isinstance(b, int)):
                return None
            perms.append(("transpose", a, b))
        elif not (op_name(node) in ("add", "mul", "sub", "div", "dropout")
                  or method in _KEEP_METHODS or node.target in (F.relu, F.gelu, F.silu,
                                                                torch.relu, torch.tanh)):
            return None
        node = _first_node(node.args)
    return None


def _inner(trace: ModelTrace, name: str, sub: nn.Module, depth: int) -> tuple[Any, list] | None:
    """The feature axis of a child's output: from its traced graph, or its last child with
    parameters for a Sequential."""
    if depth > 8:
        return None
    mt = trace.traces.get(name)
    if mt is not None:
        out = next(n for n in reversed(list(mt.graph.nodes)) if n.op == "output")
        value = out.args[0]
        while isinstance(value, (tuple, list)) and value:
            value = value[0]
        return _walk(trace, name, sub, value, depth + 1)
    if isinstance(sub, nn.Sequential):
        for child in reversed(list(sub)):
            axis = _module_axis(child)
            if axis is not None:
                return axis, []
            if any(True for _ in child.parameters()):
                return None
    return None


def _module_axis(module: nn.Module) -> Any:
    if isinstance(module, _CHANNEL_MODULES):
        return 1
    if isinstance(module, _LAST_MODULES):
        return "last"
    return None


def _first_node(args: Any) -> Any:
    """The first tensor operand that is not a parameter (`gamma * x` -> x)."""
    nodes = [a for a in args if isinstance(a, fx.Node)]
    return next((a for a in nodes if a.op != "get_attr"), nodes[0] if nodes else None)
