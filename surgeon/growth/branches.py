"""Which parameters write a block's residual branches into the stream.

A block inserted with those parameters at zero adds nothing to the residual stream, so the grown
model computes what the original did (Net2Net-style function-preserving growth). They are found
from the traced graph, not from names: from each residual add of the block, walk back along the
branch through ops that map zero to zero (views, dropout, casts, scaling by a constant) to the
parameterised module that produced it (`o_proj`, `down_proj`, GPT-2's `c_proj`); a module whose
forward was traced is followed into its own graph; an untraced one (attention is often a leaf)
gives its last weighted submodule, the output projection by convention.
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from surgeon.errors import SurgeonError
from surgeon.graph.tracing import ModelTrace

# Ops through which a zero branch stays zero.
_ZERO_TO_ZERO_FUNCTIONS = {
    torch.nn.functional.dropout, torch.reshape, torch.transpose, torch.flatten, torch.squeeze,
    torch.unsqueeze, torch.permute, operator.getitem, operator.mul,
    torch.mul, operator.truediv, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
}
_ZERO_TO_ZERO_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "to", "type",
                         "float", "half", "bfloat16", "flatten", "squeeze", "unsqueeze", "mul",
                         "div", "__getitem__", "clone"}
_ZERO_TO_ZERO_MODULES = (nn.Dropout, nn.Identity)


class BranchError(SurgeonError):
    """A block's residual branches could not be traced back to the parameters that write them."""


def branch_outputs(trace: ModelTrace, residuals: list, block: str) -> list[str]:
    """Qualified names of the modules whose outputs are the residual branches of `block`
    (`residuals`: the inspection's residual adds). Zeroing their weights and biases makes the
    block add nothing to its input."""
    found: list[str] = []
    for r in residuals:
        if r.module != block and not r.module.startswith(block + "."):
            continue
        graph = trace.traces[r.module].graph
        add = next(n for n in graph.nodes if n.name == r.node)
        # a parallel block's site has several branches (`r.branches`), an ordinary add one;
        # a branch that is itself a sum is followed term by term
        outputs = ([n for n in graph.nodes if n.name in r.branches] if r.branches
                   else [add.args[1 - r.skip]])
        for output in outputs:
            names = _producers(trace, r.module, output)
            if names is None:
                raise BranchError(f"cannot trace the residual branch of {r.module} ({r.source}) "
                                  "back to a parameterised module; use another --init")
            found.extend(n for n in names if n not in found)
    if not found:
        raise BranchError(f"no residual adds found in {block}; --init zero needs a block with "
                          "residual branches")
    return found


_ADDS = {operator.add, torch.add}


def _producers(trace: ModelTrace, owner: str, node: object) -> list[str] | None:
    """The modules producing `node`: a sum of branches (a parallel block's attn(x) + mlp(x),
    GPT-NeoX, GPT-J, Phi) is zero when each term is, so each term is followed on its own."""
    if isinstance(node, fx.Node) and (node.op == "call_function" and node.target in _ADDS or
                                      node.op == "call_method" and node.target == "add"):
        found: list[str] = []
        for term in node.args[:2]:
            names = _producers(trace, owner, term)
            if names is None:
                return None
            found.extend(n for n in names if n not in found)
        return found
    name = _producer(trace, owner, node)
    return None if name is None else [name]


def _producer(trace: ModelTrace, owner: str, node: object) -> str | None:
    """The module (qualified name) producing `node` in `owner`'s graph, through zero-to-zero ops."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in _ADDS or (
                node.op == "call_method" and node.target == "add"):
            names = _producers(trace, owner, node)
            return names[0] if names and len(names) == 1 else None
        if node.op == "call_module":
            name = f"{owner}.{node.target}" if owner else str(node.target)
            module = trace.model.get_submodule(name)
            if isinstance(module, _ZERO_TO_ZERO_MODULES):
                node = node.args[0] if node.args else None
                continue
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                return name
            inner = trace.traces.get(name)
            if inner is not None:
                output = next(n for n in inner.graph.nodes if n.op == "output")
                first = output.args[0]
                while isinstance(first, (tuple, list)):  # (hidden, attn_weights) -> hidden
                    first = first[0]
                found = _producer(trace, name, first)
                if found is not None:
                    return found
            return _last_weighted(module, name)
        if node.op == "call_function" and node.target in _ZERO_TO_ZERO_FUNCTIONS or (
                node.op == "call_method" and node.target in _ZERO_TO_ZERO_METHODS):
            node = node.args[0] if node.args else None
            continue
        return None
    return None


def _last_weighted(module: nn.Module, name: str) -> str | None:
    """The last submodule (in registration order) with a weight matrix: the output projection
    of an attention or MLP module by the usual convention (q, k, v, o; gate, up, down)."""
    last = None
    for sub, child in module.named_modules():
        if isinstance(child, nn.Embedding):
            continue  # a lookup (T5's relative_attention_bias), never the output projection
        weight = getattr(child, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and sub:
            last = f"{name}.{sub}"
    return last
