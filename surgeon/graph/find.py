"""Analysis only: residual adds, LayerNorm/RMSNorm layers and residual trunks in a traced model.

Each module owns its own graph (see `surgeon.graph.tracing`), so results name the module whose
code holds the add or the norm. Facts that depend only on a graph (ancestry, the adds in it) are
computed once per shared graph, so a deep model costs what one block costs plus a little per
block.

- A residual add is `add(skip, branch)` where `skip` is an ancestor of `branch` and the path between
  them holds a parameterised op (a submodule with parameters, or an op fed a parameter) — this
  leaves
  out GELU's `x + 0.044715·x³`. When both operands are inputs of the module (BERT's
  `LayerNorm(dense(h) + input_tensor)`), the question is asked again in the caller's graph.
- Kinds: "pre_norm" (the branch starts with a norm of the skip), "post_norm" (the add feeds a norm
  that produces the module's output), else "plain".
- Norms are found by class (nn.LayerNorm, nn.RMSNorm), by call (`F.layer_norm`, `F.rms_norm`) and by
  behaviour (`x·rsqrt(mean(x²)+eps)`, `(x−mean)/sqrt(var+eps)`), including modules whose whole
  forward is such a norm (nanoGPT's LayerNorm class, Llama's and T5's RMSNorm).
"""

from __future__ import annotations

import functools
import inspect
import operator
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from surgeon.graph.report import Inspection, Norm, Residual, Trunk, Untraced
from surgeon.graph.tracing import STAND_IN, ModelTrace, ModuleTrace, flatten

_FUNCTION_OPS: dict[Any, str] = {
    operator.add: "add", operator.iadd: "add", torch.add: "add",
    operator.mul: "mul", operator.imul: "mul", torch.mul: "mul",
    operator.sub: "sub", operator.isub: "sub", torch.sub: "sub",
    operator.truediv: "div", operator.itruediv: "div", torch.div: "div", torch.true_divide: "div",
    operator.pow: "pow", torch.pow: "pow", torch.square: "square",
    torch.rsqrt: "rsqrt", torch.sqrt: "sqrt", torch.mean: "mean", torch.var: "var",
    F.layer_norm: "layer_norm", torch.layer_norm: "layer_norm",
    F.rms_norm: "rms_norm", torch.rms_norm: "rms_norm",
    F.dropout: "dropout", torch.dropout: "dropout",
}
_METHOD_OPS = {"add": "add", "add_": "add", "__add__": "add", "__iadd__": "add",
               "mul": "mul", "mul_": "mul", "sub": "sub", "sub_": "sub", "div": "div",
               "div_": "div", "pow": "pow", "square": "square", "rsqrt": "rsqrt", "sqrt": "sqrt",
               "mean": "mean", "var": "var"}
_CASTS = frozenset(("to", "float", "type", "type_as", "half", "bfloat16", "double",
                    "contiguous"))
_NORM_CLASSES: tuple[tuple[type, str], ...] = ((nn.LayerNorm, "layer_norm"),)
if hasattr(nn, "RMSNorm"):
    _NORM_CLASSES += ((nn.RMSNorm, "rms_norm"),)


def op_name(node: fx.Node) -> str | None:
    """A short name for what a node computes ("add", "mean", ...), or None."""
    if node.op == "call_function":
        return _FUNCTION_OPS.get(node.target)
    if node.op == "call_method":
        return _METHOD_OPS.get(node.target)
    return None


def _is_cast(node: fx.Node) -> bool:
    return node.op == "call_method" and node.target in _CASTS


def strip_casts(value: Any) -> Any:
    """Follow dtype casts back to the value they cast."""
    while isinstance(value, fx.Node) and _is_cast(value) and value.args:
        value = value.args[0]
    return value


def _operands(node: fx.Node) -> tuple[Any, Any]:
    args = list(node.args) + [node.kwargs.get(k) for k in ("other",) if k in node.kwargs]
    return (args[0] if args else None, args[1] if len(args) > 1 else None)


def _source(node: fx.Node) -> str:
    return source_line(node.meta.get("stack_trace") or "")


# The code of surgeon and torch, found where the imported packages lie (not by a directory name:
# a user's model may well live under some ".../surgeon/..." or ".../torch/..." directory).
LIBRARY_DIRS = (str(Path(__file__).resolve().parents[1]),
                str(Path(torch.__file__).resolve().parent))


@functools.lru_cache(maxsize=4096)
def library_file(path: str) -> bool:
    """True for a file of surgeon's or torch's own code, or a forward surgeon generated."""
    if path.startswith(STAND_IN):
        return True
    real = os.path.realpath(path)
    return any(real == d or real.startswith(d + os.sep) for d in LIBRARY_DIRS)


def source_line(stack_trace: str) -> str:
    """`file.py:line` of the innermost frame of a node's stack trace that is the model's own code
    (not surgeon's, torch's or a generated stand-in), or "" when there is none."""
    found = [(p, ln) for p, ln in re.findall(r'File "([^"]+)", line (\d+)', stack_trace)
             if not library_file(p)]
    if not found:
        return ""
    path, line = found[-1]
    return f"{os.path.basename(path)}:{line}"


def _class_source(cls: type) -> str:
    try:
        path = inspect.getsourcefile(cls) or ""
        line = inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return ""
    return f"{os.path.basename(path)}:{line}"


@dataclass(frozen=True)
class _NormNode:
    kind: str
    input: Any  # the normalised value (casts stripped)
    shape: tuple[int, ...] | None
    eps: float | None
    affine: bool


# ---------------------------------------------------------------------------------------------
# Per-graph facts.
# ---------------------------------------------------------------------------------------------

class GraphFacts:
    """Ancestry (as bitsets), parameterised ops and norm nodes of one graph, for the module it was
    traced on (instances sharing the graph have the same structure)."""

    def __init__(self, graph: fx.Graph, module: nn.Module, child_norms: dict[str, _NormNode]):
        self.graph = graph
        self.nodes = list(graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.anc: list[int] = []
        for n in self.nodes:
            mask = 0
            for inp in n.all_input_nodes:
                j = self.index[inp]
                mask |= self.anc[j] | (1 << j)
            self.anc.append(mask)
        params = {name for name, _ in module.named_parameters()}
        self.param_mask = 0
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        for i, n in enumerate(self.nodes):
            if _is_parameterised(n, module, params):
                self.param_mask |= 1 << i
        self.norms: dict[fx.Node, _NormNode] = {}
        for n in self.nodes:
            found = _norm_node(n, module, params, child_norms)
            if found is not None:
                self.norms[n] = found
        self.output = next(n for n in reversed(self.nodes) if n.op == "output")

    def bit(self, node: fx.Node) -> int:
        return 1 << self.index[node]

    def is_ancestor(self, a: fx.Node, b: fx.Node) -> bool:
        return bool(self.anc[self.index[b]] & self.bit(a))

    def path_mask(self, skip: fx.Node, branch: fx.Node) -> int:
        """Nodes on some path from `skip` to `branch`, `branch` included."""
        sbit = self.bit(skip)
        below = self.anc[self.index[branch]] | self.bit(branch)
        mask = 0
        for i, n in enumerate(self.nodes):
            if (below >> i) & 1 and self.anc[i] & sbit:
                mask |= 1 << i
        return mask

    def norm_of(self, skip: fx.Node, mask: int) -> fx.Node | None:
        """The norm of `skip` on the path `mask` (what a pre-norm branch starts with), or None."""
        for n, info in self.norms.items():
            if (mask >> self.index[n]) & 1 and info.input is skip:
                return n
        return None

    def starts_with_norm_of(self, skip: fx.Node, mask: int) -> bool:
        return self.norm_of(skip, mask) is not None

    def feeds_output_norm(self, add: fx.Node) -> bool:
        """The add (through dropout, casts and in-place aliases) feeds a norm whose result
        reaches the graph's output."""
        frontier = [add]
        seen = set()
        while frontier:
            n = frontier.pop()
            if n in seen:
                continue
            seen.add(n)
            for user in n.users:
                info = self.norms.get(user)
                if info is not None and info.input is n:
                    out = self.output
                    if user in out.all_input_nodes or self.is_ancestor(user, out):
                        return True
                if _is_cast(user) or op_name(user) == "dropout" or _is_dropout_module(user):
                    frontier.append(user)
        return False

    def placeholder_indices(self, mask: int) -> list[int]:
        return [k for k, p in enumerate(self.placeholders) if (mask >> self.index[p]) & 1]


def _is_dropout_module(node: fx.Node) -> bool:
    return node.op == "call_module" and "drop" in str(node.target).rsplit(".", 1)[-1].lower()


def _is_parameterised(node: fx.Node, module: nn.Module, params: set[str]) -> bool:
    if node.op == "call_module":
        try:
            sub = module.get_submodule(str(node.target))
        except AttributeError:
            return False
        return any(True for _ in sub.parameters())
    if node.op in ("call_function", "call_method"):
        return any(i.op == "get_attr" and str(i.target) in params
                   for i in node.all_input_nodes)
    return False


def _const(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _param_shape(value: Any, module: nn.Module) -> tuple[int, ...] | None:
    if isinstance(value, fx.Node) and value.op == "get_attr":
        try:
            return tuple(module.get_parameter(str(value.target)).shape)
        except AttributeError:
            return None
    return None


def _norm_node(n: fx.Node, module: nn.Module, params: set[str],
               child_norms: dict[str, _NormNode]) -> _NormNode | None:
    """The norm `n` computes, if it is one: a norm submodule, a functional norm, or the core of a
    hand-written RMSNorm / LayerNorm."""
    if n.op == "call_module":
        info = child_norms.get(str(n.target))
        if info is None or not n.args:
            return None
        return _NormNode(info.kind, strip_casts(n.args[0]), info.shape, info.eps, info.affine)
    name = op_name(n)
    if name in ("layer_norm", "rms_norm"):
        args = list(n.args) + [None] * 5
        weight = n.kwargs.get("weight", args[2])
        eps = n.kwargs.get("eps", args[4] if name == "layer_norm" else args[3])
        shape_arg = n.kwargs.get("normalized_shape", args[1])
        shape = (tuple(shape_arg) if isinstance(shape_arg, (list, tuple))
                 and all(isinstance(s, int) for s in shape_arg)
                 else (shape_arg,) if isinstance(shape_arg, int) else _param_shape(weight, module))
        return _NormNode(name, strip_casts(args[0]), shape, _const(eps), weight is not None)
    if name in ("mul", "div"):
        a, b = _operands(n)
        for x, s in ((a, b), (b, a)) if name == "mul" else ((a, b),):
            core = _scale_core(s, "rsqrt" if name == "mul" else "sqrt")
            if core is None or not isinstance(x, fx.Node):
                continue
            var, eps = core
            src = strip_casts(x)
            kind = _variance_kind(var, src)
            if kind == "rms_norm":
                return _NormNode("rms_norm", src, None, eps, False)
            if kind == "layer_norm":
                centred_from = _centred_source(src)
                return _NormNode("layer_norm", centred_from, None, eps, False)
    return None


def norm_input(n: fx.Node, module: nn.Module) -> Any:
    """The value the functional or hand-written norm at node `n` of `module`'s graph normalises
    (casts stripped), or None if `n` computes no norm."""
    params = {name for name, _ in module.named_parameters()}
    found = _norm_node(n, module, params, {})
    return found.input if found is not None else None


def _scale_core(node: Any, fn: str) -> tuple[fx.Node, float | None] | None:
    """`rsqrt(var + eps)` (or `sqrt`): returns (var, eps)."""
    if not isinstance(node, fx.Node) or op_name(node) != fn or not node.args:
        return None
    inner = node.args[0]
    if isinstance(inner, fx.Node) and op_name(inner) == "add":
        a, b = _operands(inner)
        if isinstance(a, fx.Node) and not isinstance(b, fx.Node):
            return a, _const(b)
        if isinstance(b, fx.Node) and not isinstance(a, fx.Node):
            return b, _const(a)
    return None


def _squared_of(node: Any) -> Any:
    node = strip_casts(node)
    if not isinstance(node, fx.Node):
        return None
    name = op_name(node)
    if name == "pow" and len(node.args) > 1 and node.args[1] == 2:
        return strip_casts(node.args[0])
    if name == "square":
        return strip_casts(node.args[0])
    if name == "mul":
        a, b = _operands(node)
        if a is b:
            return strip_casts(a)
    return None


def _centred_source(node: Any) -> Any:
    """For `x - mean(x)`, x; else None."""
    if isinstance(node, fx.Node) and op_name(node) == "sub":
        a, b = _operands(node)
        b = strip_casts(b)
        if isinstance(b, fx.Node) and op_name(b) == "mean" and strip_casts(b.args[0]) is \
                strip_casts(a):
            return strip_casts(a)
    return None


def _variance_kind(var: fx.Node, x: Any) -> str | None:
    """"rms_norm" if var = mean(x²) over the last dim, "layer_norm" if x = z − mean(z) and var is
    its variance (mean of squares or torch.var)."""
    var = strip_casts(var)
    name = op_name(var)
    if name == "mean":
        sq = _squared_of(var.args[0])
        if sq is None:
            return None
        if sq is x:
            return "layer_norm" if _centred_source(x) is not None else "rms_norm"
        if _centred_source(sq) is not None and _centred_source(sq) is _centred_source(x):
            return "layer_norm"
    if name == "var" and _centred_source(x) is strip_casts(var.args[0]):
        return "layer_norm"
    return None


def _from_params_only(value: Any, facts: GraphFacts) -> bool:
    """A value computed from parameters and constants alone (`w`, `1 + w.float()`)."""
    if not isinstance(value, fx.Node) or value.op == "placeholder":
        return False
    ph = 0
    for p in facts.placeholders:
        ph |= facts.bit(p)
    return not facts.anc[facts.index[value]] & ph and (
        value.op == "get_attr" or any(facts.nodes[i].op == "get_attr"
                                      for i in range(len(facts.nodes))
                                      if (facts.anc[facts.index[value]] >> i) & 1))


def _param_of(value: fx.Node) -> fx.Node:
    """The parameter a params-only value is computed from (Gemma's `1 + w.float()` -> w)."""
    frontier = [value]
    while frontier:
        n = frontier.pop(0)
        if n.op == "get_attr":
            return n
        frontier.extend(n.all_input_nodes)
    return value


def module_norm(mt: ModuleTrace, facts: GraphFacts) -> _NormNode | None:
    """If the module's whole forward is a norm of its first input (plus an optional affine gain
    and bias), what norm it is."""
    out = facts.output.args[0]
    value, gain, bias = strip_casts(out), None, None
    while isinstance(value, fx.Node) and value not in facts.norms:
        name = op_name(value)
        if name not in ("mul", "add"):
            return None
        a, b = _operands(value)
        a, b = strip_casts(a), strip_casts(b)
        if _from_params_only(b, facts):
            param, value = _param_of(b), a
        elif _from_params_only(a, facts):
            param, value = _param_of(a), b
        else:
            return None
        if name == "mul":
            gain = param
        else:
            bias = param
        value = strip_casts(value)
    info = facts.norms.get(value) if isinstance(value, fx.Node) else None
    if info is None or info.input is not (facts.placeholders[0] if facts.placeholders else None):
        return None
    if value.op == "call_module":
        return None  # a wrapper around a norm module: the inner module is the norm
    affine = info.affine or gain is not None or bias is not None
    shape = info.shape or _param_shape(gain, mt.module) or _param_shape(bias, mt.module)
    return _NormNode(info.kind, None, shape, info.eps, affine)


# ---------------------------------------------------------------------------------------------
# The whole model.
# ---------------------------------------------------------------------------------------------

class _Analysis:
    def __init__(self, trace: ModelTrace):
        self.trace = trace
        self.facts: dict[int, GraphFacts] = {}
        self.norm_of: dict[str, _NormNode] = {}  # module name -> its norm, for norm modules
        self.calls_into: dict[str, tuple[str, fx.Node]] = {}  # child -> (caller, call node)
        for name, module in trace.model.named_modules():
            kind = _class_norm_kind(module)
            if kind is not None and _is_atomic_norm(module):
                self.norm_of[name] = _atomic_norm(module, kind)

    def graph_facts(self, mt: ModuleTrace) -> GraphFacts:
        key = id(mt.shared)
        facts = self.facts.get(key)
        if facts is None:
            child_norms = {}
            prefix = mt.name + "." if mt.name else ""
            for n in mt.graph.nodes:
                if n.op == "call_module" and prefix + str(n.target) in self.norm_of:
                    child_norms[str(n.target)] = self.norm_of[prefix + str(n.target)]
            facts = GraphFacts(mt.graph, mt.module, child_norms)
            self.facts[key] = facts
        return facts


def _class_norm_kind(module: nn.Module) -> str | None:
    for cls, kind in _NORM_CLASSES:
        if isinstance(module, cls):
            return kind
    name = type(module).__name__.lower()
    name = name.removesuffix("gated")  # Mamba2RMSNormGated (MambaRMSNormGated before 5.25)
    if name.endswith("rmsnorm"):
        return "rms_norm"
    if name.endswith("layernorm"):
        return "layer_norm"
    return None


def _is_atomic_norm(module: nn.Module) -> bool:
    return isinstance(module, tuple(c for c, _ in _NORM_CLASSES))


def _atomic_norm(module: nn.Module, kind: str) -> _NormNode:
    shape = tuple(getattr(module, "normalized_shape", ()) or ()) or None
    eps = getattr(module, "eps", None)
    affine = bool(getattr(module, "elementwise_affine", False))
    return _NormNode(kind, None, shape, float(eps) if eps is not None else None, affine)


def _by_name_norm(module: nn.Module, kind: str) -> _NormNode:
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    eps = next((getattr(module, a) for a in ("eps", "variance_epsilon", "epsilon")
                if isinstance(getattr(module, a, None), float)), None)
    return _NormNode(kind, None, shape, eps, isinstance(weight, torch.Tensor))


def inspect_trace(trace: ModelTrace, model_name: str = "") -> Inspection:
    """Find residual adds, norms and trunks in a traced model."""
    an = _Analysis(trace)
    calls = trace.calls
    ordered = [(n, trace.traces[n]) for n in sorted(trace.traces,
                                                    key=lambda n: (-n.count("."), calls[n].order))]
    # Bottom-up: a module's norm-ness is known before its callers' graphs are analysed.
    for name, mt in ordered:
        facts = an.graph_facts(mt)
        info = module_norm(mt, facts)
        if info is not None:
            an.norm_of[name] = info
    report = Inspection(model=model_name or type(trace.model).__name__)
    for name, module in trace.model.named_modules():
        if name not in calls:
            continue
        info = an.norm_of.get(name)
        if info is None and name not in trace.traces:
            kind = _class_norm_kind(module)
            if kind is not None:
                info = _by_name_norm(module, kind)
                an.norm_of[name] = info
        if info is not None:
            caller = _caller(an, name)
            where = _source(caller[1]) if caller else ""
            report.norms.append(Norm(name, info.kind, info.shape, info.eps, info.affine, None,
                                     where or _class_source(type(module))))
    for name, mt in sorted(trace.traces.items(), key=lambda kv: calls[kv[0]].order):
        facts = an.graph_facts(mt)
        if name not in an.norm_of:
            for node, info in facts.norms.items():
                if node.op != "call_module":
                    report.norms.append(Norm(name, info.kind, info.shape, info.eps, info.affine,
                                             node.name, _source(node)))
        report.residuals.extend(_residuals(an, name, mt, facts))
    report.traced = [n for n, _ in sorted(trace.traces.items(), key=lambda kv: calls[kv[0]].order)]
    report.untraced = [Untraced(n, r) for n, r in trace.failures.items()]
    owners = {r.module for r in report.residuals} | _aion_owners(trace)
    report.trunks = _trunks(trace, owners)
    return report


def _submodule(module: nn.Module, target: str) -> nn.Module | None:
    try:
        return module.get_submodule(target)
    except AttributeError:
        return None


def _aion_owners(trace: ModelTrace) -> set[str]:
    """Modules whose graph calls an AionResidual: residual owners after the `aion` pass."""
    from surgeon.nn.aion import AionResidual

    owners = set()
    for name, mt in trace.traces.items():
        for n in mt.graph.nodes:
            if n.op == "call_module" and isinstance(
                    _submodule(mt.module, str(n.target)), AionResidual):
                owners.add(name)
                break
    return owners


def _residuals(an: _Analysis, name: str, mt: ModuleTrace, facts: GraphFacts) -> list[Residual]:
    calls = an.trace.calls[name].times if name in an.trace.calls else 1
    found: list[tuple[int, Residual]] = []
    absorbed: set[fx.Node] = set()
    for node in reversed(facts.nodes):  # the last add of a parallel sum first
        if op_name(node) == "add" and node not in absorbed:
            site = _parallel_site(facts, node)
            if site is not None:
                skip, branches, inner = site
                absorbed |= inner | {node}
                found.append((facts.index[node], _site(facts, name, node, skip, branches,
                                                       inner, calls)))
    for node in facts.nodes:
        if op_name(node) != "add" or node in absorbed:
            continue
        a, b = _operands(node)
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        hit = _local_residual(facts, node, a, b)
        if hit is None:
            hit = _lifted_residual(an, name, facts, node, a, b)
        if hit is None:
            hit = _projection_residual(an, name, mt, facts, node, a, b)
        if hit is not None:
            kind, skip, x_norm = hit
            found.append((facts.index[node], Residual(
                name, kind, node.name, _source(node), 0 if skip is a else 1,
                x_norm.name if x_norm is not None else None, skip_node=skip.name,
                calls=calls)))
    return [r for _, r in sorted(found, key=lambda ir: ir[0])]


# A found residual: (kind, the skip operand, the norm node the branch starts with or None).
_Hit = tuple[str, fx.Node, "fx.Node | None"]


def _parallel_site(facts: GraphFacts, root: fx.Node
                   ) -> tuple[fx.Node, list[fx.Node], set[fx.Node]] | None:
    """`skip + b1 + … + bk` (k ≥ 2) summed in any order ending at `root`, where each branch is
    computed from the skip through a parameterised op: (skip, branches in graph order, the inner
    adds). An inner add joins the sum only if it feeds nothing else and is no ancestor of another
    term (`x = x + f(x); x = x + g(x)` is two residuals, not one site)."""
    terms = list(_operands(root))
    inner: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for t in list(terms):
            if not (isinstance(t, fx.Node) and op_name(t) == "add" and len(t.users) == 1):
                continue
            a, b = _operands(t)
            others = [o for o in terms if o is not t]
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)) or any(
                    isinstance(o, fx.Node) and facts.is_ancestor(t, o) for o in others):
                continue
            terms = others + [a, b]
            inner.add(t)
            changed = True
    if not inner or not all(isinstance(t, fx.Node) for t in terms):
        return None
    for skip in terms:
        branches = [t for t in terms if t is not skip]
        if all(facts.is_ancestor(skip, t) and facts.path_mask(skip, t) & facts.param_mask
               for t in branches):
            return skip, sorted(branches, key=facts.index.__getitem__), inner
    return None


def _terms(value: Any, inner: set[fx.Node]) -> list[Any]:
    """The terms an operand of a parallel sum adds up (itself unless it is an inner add)."""
    if value not in inner:
        return [value]
    return [t for o in _operands(value) for t in _terms(o, inner)]


def _site(facts: GraphFacts, name: str, root: fx.Node, skip: fx.Node, branches: list[fx.Node],
          inner: set[fx.Node], calls: int) -> Residual:
    """The Residual of a parallel site: one add site, several branches."""
    norms = [facts.norm_of(skip, facts.path_mask(skip, b)) for b in branches]
    x_norm = next((n for n in norms if n is not None), None)
    kind = ("pre_norm" if x_norm is not None
            else "post_norm" if facts.feeds_output_norm(root) else "plain")
    side = next(k for k, o in enumerate(_operands(root)) if skip in _terms(o, inner))
    return Residual(name, kind, root.name, _source(root), side,
                    x_norm.name if x_norm is not None else None,
                    tuple(b.name for b in branches), skip.name, calls)


def _local_residual(facts: GraphFacts, add: fx.Node, a: fx.Node, b: fx.Node) -> _Hit | None:
    if facts.is_ancestor(a, b):
        skip, branch = a, b
    elif facts.is_ancestor(b, a):
        skip, branch = b, a
    else:
        return None
    mask = facts.path_mask(skip, branch)
    if not mask & facts.param_mask:
        return None
    return _kind(facts, add, skip, mask), skip, facts.norm_of(skip, mask)


def _projection_residual(an: _Analysis, name: str, mt: ModuleTrace, facts: GraphFacts,
                         add: fx.Node, a: fx.Node, b: fx.Node) -> _Hit | None:
    """`f(x) + s(x)` with a shortcut `s` that is parameter-free (`nn.Identity`, a fixed scale,
    a pool) or a chain of ops that changes the stream's shape (ResNet's downsample: a strided or
    widening conv and a norm), lighter than the branch `f`; the two paths meet only at the fork.
    A sum of two parameterised branches that keep the shape (re-parameterisable convs, a MoE's
    routed and shared experts) is no residual: neither operand is the identity."""
    common = facts.anc[facts.index[a]] & facts.anc[facts.index[b]]
    if not common:
        return None
    fork = facts.nodes[common.bit_length() - 1]  # the latest common ancestor
    paths = [facts.path_mask(fork, x) for x in (a, b)]
    if paths[0] & paths[1] or _is_split(fork):  # parts of a split are no skip (Res2Net)
        return None
    weights = [_weight(mt, facts, p) for p in paths]
    short, long_ = (0, 1) if weights[0] < weights[1] else (1, 0)
    if weights[long_] <= weights[short]:
        return None
    if weights[short] and not (_is_chain(facts, fork, paths[short])
                               and _changes_shape(an, name, facts, paths[short])):
        return None
    skip = (a, b)[short]
    if facts.starts_with_norm_of(fork, paths[long_]) and weights[short] == 0:
        return "pre_norm", skip, facts.norm_of(fork, paths[long_])
    return ("post_norm" if facts.feeds_output_norm(add) else "plain"), skip, None


_SPLITS = frozenset(("split", "chunk", "unbind", "tensor_split", "split_with_sizes"))


def _is_split(node: fx.Node) -> bool:
    """A node that cuts a tensor into parts (`x.chunk(2)`, `torch.split`)."""
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and target in _SPLITS


def _weight(mt: ModuleTrace, facts: GraphFacts, mask: int) -> int:
    """How much parameterised work a path holds: one per parameterised op, and for a submodule
    call the number of its parameterised leaf modules (`Sequential(conv, bn)` weighs 2)."""
    total = 0
    for i, n in enumerate(facts.nodes):
        if not (mask & facts.param_mask) >> i & 1:
            continue
        sub = _submodule(mt.module, str(n.target)) if n.op == "call_module" else None
        total += max(1, sum(1 for m in sub.modules()
                            if any(True for _ in m.parameters(recurse=False)))) if sub else 1
    return total


def _is_chain(facts: GraphFacts, fork: fx.Node, mask: int) -> bool:
    """Each node of the path takes exactly one input from the fork or the path: a chain of ops
    (conv → norm), not a small network of its own (a router feeding experts)."""
    inside = mask | facts.bit(fork)
    return all(sum(1 for i in n.all_input_nodes if (inside >> facts.index[i]) & 1) == 1
               for k, n in enumerate(facts.nodes) if (mask >> k) & 1)


def _changes_shape(an: _Analysis, name: str, facts: GraphFacts, mask: int) -> bool:
    """A submodule call on the path whose recorded output has another shape than its input."""
    prefix = name + "." if name else ""
    for i, n in enumerate(facts.nodes):
        if (mask >> i) & 1 and n.op == "call_module":
            call = an.trace.calls.get(prefix + str(n.target))
            if call is not None and call.in_shape is not None and call.out_shape is not None \
                    and call.in_shape != call.out_shape:
                return True
    return False


def _kind(facts: GraphFacts, add: fx.Node, skip: Any, mask: int) -> str:
    if skip is not None and facts.starts_with_norm_of(skip, mask):
        return "pre_norm"
    if facts.feeds_output_norm(add):
        return "post_norm"
    return "plain"


def _caller(an: _Analysis, name: str) -> tuple[ModuleTrace, fx.Node] | None:
    """The traced module whose graph calls `name`, and the call node."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        owner = ".".join(parts[:cut])
        mt = an.trace.traces.get(owner)
        if mt is None:
            continue
        rel = ".".join(parts[cut:])
        for n in mt.graph.nodes:
            if n.op == "call_module" and n.target == rel:
                return mt, n
        return None
    return None


def caller_inputs(child: ModuleTrace, call: fx.Node) -> list[Any] | None:
    """The caller's values for each of the child's graph inputs."""
    spec = child.shared.spec
    try:
        bound = spec.signature.bind(*call.args, **call.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    leaves, tree = flatten(dict(bound.arguments))
    if tree != spec.spec:
        return None
    return [v for v, k in zip(leaves, spec.kinds) if k != "const"]


def _lifted_residual(an: _Analysis, name: str, facts: GraphFacts, add: fx.Node, a: fx.Node,
                     b: fx.Node, depth: int = 0) -> _Hit | None:
    """Both operands come from the module's inputs (one of them is an input): ask the caller."""
    for skip, branch in ((strip_casts(a), b), (strip_casts(b), a)):
        if not (isinstance(skip, fx.Node) and skip.op == "placeholder"):
            continue
        branch_mask = facts.anc[facts.index[branch]] | facts.bit(branch)
        sources = facts.placeholder_indices(branch_mask & ~facts.bit(skip))
        if not sources:
            continue
        local_param = bool(branch_mask & facts.param_mask)
        kind = _ask_caller(an, name, facts.placeholders.index(skip), sources, local_param, depth)
        if kind is not None:
            kind = "post_norm" if facts.feeds_output_norm(add) else kind
            return kind, (a if strip_casts(a) is skip else b), None
    return None


def _ask_caller(an: _Analysis, name: str, skip_idx: int, branch_idxs: list[int],
                has_param: bool, depth: int) -> str | None:
    if depth > 3:
        return None
    child = an.trace.traces.get(name)
    found = _caller(an, name)
    if child is None or found is None:
        return None
    caller, call = found
    values = caller_inputs(child, call)
    if values is None or skip_idx >= len(values):
        return None
    facts = an.graph_facts(caller)
    skip = strip_casts(values[skip_idx])
    if not isinstance(skip, fx.Node):
        return None
    for j in branch_idxs:
        branch = values[j] if j < len(values) else None
        if not isinstance(branch, fx.Node) or branch is skip:
            continue
        if facts.is_ancestor(skip, branch):
            mask = facts.path_mask(skip, branch)
            if has_param or mask & facts.param_mask:
                return "pre_norm" if facts.starts_with_norm_of(skip, mask) else "plain"
        elif skip.op == "placeholder":
            branch_mask = facts.anc[facts.index[branch]] | facts.bit(branch)
            sources = facts.placeholder_indices(branch_mask & ~facts.bit(skip))
            if sources:
                up = _ask_caller(an, caller.name, facts.placeholders.index(skip), sources,
                                 has_param or bool(branch_mask & facts.param_mask), depth + 1)
                if up is not None:
                    return up
    return None


def _folds_batch(trace: ModelTrace, block: str, owners: set[str]) -> bool:
    """Residual adds inside `block` run on a stream whose batch is a multiple k > 1 of the
    block's own (MobileViT unfolds an image's patches into the batch, `(b·area, p, c)`, before
    its transformer): streams folded into the block's batch would be mixed across patches
    there, so the block cannot carry a trunk's streams; the chains nested in it can."""
    calls = trace.calls
    outer = calls[block].in_shape
    if not outer:
        return False
    for o in owners:
        if o.startswith(block + ".") and o in calls and calls[o].in_shape:
            inner = calls[o].in_shape[0]
            if inner > outer[0] and inner % outer[0] == 0:
                return True
    return False


def _trunks(trace: ModelTrace, owners: set[str]) -> list[Trunk]:
    """Chains of sibling modules holding residual adds, each one's output the next one's first
    input. A member may change the stream's shape (a strided block, a stage that downsamples):
    one trunk spans a staged network's stages, so hyper-connections cover its every block.
    A chain of two or more blocks hides chains nested in its blocks (T5's sub-layers); a lone
    block gives way to a chain nested in it."""
    calls = trace.calls
    candidates = set()
    for owner in owners:
        parts = owner.split(".")
        for cut in range(len(parts), 0, -1):
            candidates.add(".".join(parts[:cut]))
    groups: dict[str, list[str]] = {}
    for c in candidates:
        call = calls.get(c)
        if call is not None and call.out_ids and call.out_shape is not None \
                and call.in_shape is not None and len(call.out_shape) == len(call.in_shape) \
                and not _folds_batch(trace, c, owners):
            groups.setdefault(c.rsplit(".", 1)[0] if "." in c else "", []).append(c)
    chains: list[list[str]] = []
    for members in groups.values():
        members.sort(key=lambda n: calls[n].order)
        chain = [members[0]]
        for prev, nxt in zip(members, members[1:]):
            if calls[prev].out_ids[0] == calls[nxt].in_ids[0]:  # the stream goes on
                chain.append(nxt)
            else:
                chains.append(chain)
                chain = [nxt]
        chains.append(chain)

    def inside(inner: list[str], outer: list[str]) -> bool:
        return any(b.startswith(o + ".") for b in inner for o in outer)

    kept = [c for c in chains
            if not any(len(d) > 1 and inside(c, d) for d in chains if d is not c)
            and not (len(c) == 1 and any(inside(d, c) for d in chains if d is not c))]
    kept.sort(key=lambda c: calls[c[0]].order)
    return [Trunk(tuple(c)) for c in kept]
