"""Which parameters write a block's residual branches into the stream, and what makes them zero.

A block inserted with those parameters at their zero value adds nothing to the residual stream,
so the grown model computes what the original did (Net2Net-style function-preserving growth).
They are found from the traced graph, not from names: from each residual add of the block, walk
back along the branch through ops that map zero to zero (views, dropout, casts, scaling) to what
last writes it:

- a projection (a module with a weight matrix: `o_proj`, `down_proj`, GPT-2's `c_proj`): its
  weight and bias are zeroed;
- a gain (a module whose parameters are all vectors: a post-norm such as Gemma's
  `post_feedforward_layernorm`, a layer scale): zeroing the projection before it would not do (a
  norm's bias, or its output of a zero input, need not be zero), so the gain itself is set to the
  value that makes its output zero, found by running a copy of the module (0 for `x * w + b`,
  -1 for Gemma's `x * (1 + w)`);
- a sum (attn(x) + mlp(x) in a parallel block, routed experts + a shared expert in an MoE) is
  zero when each term is, so each is followed; a product when one factor is (the shared expert,
  not its sigmoid gate);
- a module whose forward was traced is followed into its own graph; an untraced one (attention
  is often a leaf, fused experts always) gives its last parameter matrix (the output projection
  by the usual convention: q, k, v, o; gate_up, down), a 3-D fused `experts.down_proj` included.
"""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx, nn

from surgeon.errors import SurgeonError
from surgeon.graph.tracing import ModelTrace

# Ops through which a zero branch stays zero (their first argument is the branch).
_ZERO_TO_ZERO_FUNCTIONS = {
    torch.nn.functional.dropout, torch.reshape, torch.transpose, torch.flatten, torch.squeeze,
    torch.unsqueeze, torch.permute, operator.getitem, operator.truediv, torch.div,
    torch.nn.functional.dropout1d, torch.nn.functional.dropout2d, operator.neg, torch.neg,
}
_ZERO_TO_ZERO_METHODS = {"view", "reshape", "transpose", "permute", "contiguous", "to", "type",
                         "float", "half", "bfloat16", "flatten", "squeeze", "unsqueeze",
                         "div", "__getitem__", "clone", "view_as", "reshape_as", "type_as",
                         "neg", "expand", "expand_as"}
# Products: zero when either factor is.
_PRODUCT_FUNCTIONS = {operator.mul, torch.mul}
_PRODUCT_METHODS = {"mul", "__mul__"}
# Sums: zero when every term is (`mlp_output += attention_output` traces as iadd).
_ADDS = {operator.add, torch.add, operator.iadd}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_ZERO_TO_ZERO_MODULES = (nn.Dropout, nn.Identity)
# Tensors that start at zero, and scatters of a branch into one (an MoE's expert outputs summed
# into `torch.zeros(...)` by `index_add`): zero when the base and the source are.
_ZEROS_FUNCTIONS = {torch.zeros, torch.zeros_like}
_ZEROS_METHODS = {"new_zeros", "zero_"}
_SCATTERS = {"index_add", "index_add_", "scatter_add", "scatter_add_", "index_put", "index_put_"}


class BranchError(SurgeonError):
    """A block's residual branches could not be traced back to the parameters that write them."""


def branch_outputs(trace: ModelTrace, residuals: list, block: str) -> list[str]:
    """Qualified names of what writes the residual branches of `block` (`residuals`: the
    inspection's residual adds): a module (all its parameters are zeroed) or a single
    parameter (a fused `experts.down_proj`)."""
    found: list[str] = []
    sites = []
    for r in residuals:
        if r.module != block and not r.module.startswith(block + "."):
            continue
        graph = trace.traces[r.module].graph
        add = next(n for n in graph.nodes if n.name == r.node)
        # a parallel block's site has several branches (`r.branches`), an ordinary add one;
        # a branch that is itself a sum is followed term by term
        outputs = ([n for n in graph.nodes if n.name in r.branches] if r.branches
                   else [add.args[1 - r.skip]])
        skip = add.args[r.skip] if len(add.args) > r.skip else None
        sites.append((r, add, [o for o in outputs if isinstance(o, fx.Node)],
                      [skip] if isinstance(skip, fx.Node) else []))
    # adds that feed another site's branch but not its skip: they write that branch (the
    # input of its norm and mixer), not the stream a block must pass through unchanged
    inner: set[fx.Node] = set()
    for _, _, outputs, skip in sites:
        inner |= _ancestors(outputs) - _ancestors(skip)
    for r, add, outputs, _ in sites:
        if add in inner:
            continue  # Zamba's `h + transformer_out` before the norm and mixer of its branch
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


def _ancestors(nodes: list[fx.Node]) -> set[fx.Node]:
    """Every node `nodes` are computed from (themselves included), within their graph."""
    seen: set[fx.Node] = set()
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(node.all_input_nodes)
    return seen


def branch_zeros(trace: ModelTrace, residuals: list, block: str) -> dict[str, float]:
    """Qualified parameter name → the value to fill it with so that `block` adds nothing to its
    input (0 for a projection; a gain's value that zeroes its output, see the module docstring).
    Raises `BranchError` where a writer cannot be made zero."""
    fills: dict[str, float] = {}
    model = trace.model
    for name in branch_outputs(trace, residuals, block):
        owner, _, leaf = name.rpartition(".")
        params = dict(model.named_parameters())
        if name in params:  # one parameter of a module (fused experts): it and its bias
            module = model.get_submodule(owner)
            for p, _ in module.named_parameters(recurse=False):
                if p == leaf or p.startswith(leaf + "_") and "bias" in p:
                    fills[f"{owner}.{p}"] = 0.0
            continue
        module = model.get_submodule(name)
        if _is_gain(module):
            values = _gain_zero(module)
            if values is None:
                raise BranchError(f"the residual branch of {block} ends in {name} "
                                  f"({type(module).__name__}), whose output no setting of its "
                                  "parameters makes zero; use another --init")
            fills.update({f"{name}.{p}": v for p, v in values.items()})
        else:
            fills.update({f"{name}.{p}": 0.0 for p, _ in module.named_parameters()})
    return fills


def _is_gain(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.dim() <= 1 for p in params)


def _gain_zero(module: nn.Module) -> dict[str, float] | None:
    """Values for `module`'s parameters that make its output zero for any input: all 0 (a norm
    `x̂ * w + b`, a layer scale), else one of them at -1 (Gemma's `x̂ * (1 + w)`); found by
    running a copy on a random input. None if neither does."""
    names = [n for n, _ in module.named_parameters()]
    width = next(p for p in module.parameters() if p.dim() == 1).shape[0] if any(
        p.dim() == 1 for p in module.parameters()) else 1
    trials = [dict.fromkeys(names, 0.0)]
    trials += [{**dict.fromkeys(names, 0.0), n: -1.0} for n in names]
    probe = copy.deepcopy(module).to_empty(device="cpu").float()
    x = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    for values in trials:
        with torch.no_grad():
            for n, p in probe.named_parameters():
                p.fill_(values[n])
            try:
                out = probe(x)
            except Exception:  # noqa: BLE001 - a module this probe cannot call is not a gain
                return None
        out = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(out, torch.Tensor) and out.shape == x.shape and not out.any():
            return values
    return None


def _is_call(node: fx.Node, functions: set, methods: set) -> bool:
    return (node.op == "call_function" and node.target in functions or
            node.op == "call_method" and node.target in methods)


def _producers(trace: ModelTrace, owner: str, node: object) -> list[str] | None:
    """What writes `node` in `owner`'s graph (qualified module or parameter names), through
    zero-to-zero ops, sums (every term) and products (one factor); None if it cannot be found."""
    while isinstance(node, fx.Node):
        if _is_call(node, _ADDS, _ADD_METHODS):
            found: list[str] = []
            for term in node.args[:2]:
                names = _producers(trace, owner, term)
                if names is None:
                    return None
                found.extend(n for n in names if n not in found)
            return found
        if _is_call(node, _PRODUCT_FUNCTIONS, _PRODUCT_METHODS):
            for factor in node.args[:2]:  # the first factor that can be zeroed
                names = _producers(trace, owner, factor)
                if names is not None:
                    return names
            return None
        if _is_call(node, _ZEROS_FUNCTIONS, _ZEROS_METHODS):
            return []
        if node.op == "call_method" and node.target in _SCATTERS or (
                node.op == "call_function" and getattr(node.target, "__name__", "") in _SCATTERS):
            at = 2 if "index_put" in str(node.target) else 3  # (base, dim, index, source)
            source = node.args[at] if len(node.args) > at else next(
                (node.kwargs[k] for k in ("source", "src", "values") if k in node.kwargs), None)
            terms = [node.args[0], source]
            found = []
            for term in terms:
                names = _producers(trace, owner, term)
                if names is None:
                    return None
                found.extend(n for n in names if n not in found)
            return found
        if node.op == "get_attr":
            name = f"{owner}.{node.target}" if owner else str(node.target)
            return [name] if name in dict(trace.model.named_parameters()) else None
        if node.op == "call_module":
            return _module_producers(trace, owner, node)
        if _is_call(node, _ZERO_TO_ZERO_FUNCTIONS, _ZERO_TO_ZERO_METHODS):
            node = node.args[0] if node.args else None
            continue
        return None
    return None


def _module_producers(trace: ModelTrace, owner: str, node: fx.Node) -> list[str] | None:
    name = f"{owner}.{node.target}" if owner else str(node.target)
    module = trace.model.get_submodule(name)
    if isinstance(module, _ZERO_TO_ZERO_MODULES):
        return _producers(trace, owner, node.args[0] if node.args else None)
    own = dict(module.named_parameters(recurse=False))
    weight = own.get("weight")
    if isinstance(weight, torch.Tensor) and weight.dim() >= 2 or _is_gain(module) and not any(
            True for _ in module.children()):
        return [name]  # a projection, or a gain (a norm applied to the branch)
    inner = trace.traces.get(name)
    if inner is not None:
        output = next(n for n in inner.graph.nodes if n.op == "output")
        first = output.args[0]
        while isinstance(first, (tuple, list)):  # (hidden, attn_weights) -> hidden
            first = first[0]
        return _producers(trace, name, first)  # traced: no guessing from names
    last = _last_weighted(module, name)
    return None if last is None else _writers_by_running(trace, module, name, last)


def _writers_by_running(trace: ModelTrace, module: nn.Module, name: str, last: str) -> list[str]:
    """What writes the output of the untraced `module`: `last` (its last parameter matrix) where
    zeroing it makes the module's output zero on its recorded call, else the fewest of its
    children's last matrices that do (DeepSeek-V3's MoE, untraced for its router's tuple:
    the routed experts' 3-D `down_proj` and the shared experts' `down_proj`, not the router).
    Where the module cannot be run on its recorded call, `last` (the identity check decides)."""
    call = trace.calls.get(name)
    if call is None:
        return [last]
    candidates = [found for sub, child in module.named_children()
                  if (found := _last_weighted(child, f"{name}.{sub}")) is not None]
    candidates += [] if last in candidates else [last]
    if len(candidates) == 1:
        return [last]
    from surgeon.files.lazy import materialized

    with materialized(module):
        probe = copy.deepcopy(module)
    for sub in probe.modules():  # LazyWeights' hooks belong to the original
        sub._forward_pre_hooks.clear()
        sub._forward_hooks.clear()
    saved = {n: p.detach().clone() for n, p in probe.named_parameters()}

    def zero_with(names: list[str]) -> bool | None:
        """Whether `module`'s output is zero with `names` zeroed (None: it does not run)."""
        params = dict(probe.named_parameters())
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])
            for writer in names:
                local = writer[len(name) + 1:]
                for n, p in params.items():
                    if n.startswith(local + ".") or n == local or (
                            n.startswith(local + "_") and "bias" in n):
                        p.zero_()
            try:
                out = probe(*call.args, **call.kwargs)
            except Exception:  # noqa: BLE001 - a module this cannot call keeps the graph's answer
                return None
        while isinstance(out, (tuple, list)) and out:
            out = out[0]
        return bool(isinstance(out, torch.Tensor) and not out.any())

    if zero_with([last]) is not False or not zero_with(candidates):
        return [last]
    chosen = list(candidates)
    for writer in candidates:  # leave out each one the output does not need zeroed
        if zero_with([c for c in chosen if c != writer]):
            chosen.remove(writer)
    return chosen


def _last_weighted(module: nn.Module, name: str) -> str | None:
    """The last parameter matrix of `module` (in registration order), as the module owning it
    when it is that module's `weight`: the output projection of an attention or MLP module by
    the usual convention (q, k, v, o; gate, up, down), a fused experts' `down_proj`."""
    last = None
    for sub, child in module.named_modules():
        if isinstance(child, nn.Embedding):
            continue  # a lookup (T5's relative_attention_bias), never the output projection
        for p, value in child.named_parameters(recurse=False):
            if value.dim() >= 2:
                here = f"{name}.{sub}" if sub else name
                last = here if p == "weight" and sub else f"{here}.{p}"
    return last
