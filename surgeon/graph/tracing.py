"""Example-guided, per-module torch.fx capture.

`torch.fx.symbolic_trace` fails on today's models (wrapped forwards, `**kwargs` passed on, Python
control flow on shapes, mask code that refuses tracing on purpose). We trace differently:

1. Record one real call of every module on an example input (forward pre-hooks with kwargs).
2. Trace each module on its own, top-down, through a generated stand-in forward that takes only the
   call's tensors (and opaque objects such as caches) as graph inputs. Non-tensor leaves of the call
   (None, flags, ints, strings) are specialised; the traced module keeps the original call signature
   and checks them at run time, raising `SpecializationError` when a call differs.
3. Every child module is a leaf (`call_module`) of its parent's graph and is traced in its own
right,
   so each module owns the adds and norms written in its own code. A leaf's output is given the
   structure its recorded call had (a tuple of tensors becomes a tuple of proxies, `None` stays
   None).
4. A graph is trusted only if it reproduces the recorded call's outputs (structure and values);
   otherwise the module is reported untraced, with the reason, and stays eager.
5. Modules of the same class, called with the same signature, with the same children and the same
   values of the attributes their forward reads, share one graph: tracing cost does not grow
   with depth.

Nothing here edits the model; `ModuleTrace.to_module()` builds a `TracedModule` (a GraphModule with
the original parameter names and call signature) when a pass needs one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import inspect
import logging
import math
import operator
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.proxy import ParameterProxy

from surgeon.errors import ExampleError, SpecializationError, TracingError
from surgeon.files.lazy import materialized
from surgeon.graph.undo import snapshot

# ---------------------------------------------------------------------------------------------
# Structures: our own tiny pytree. Only exact tuple/list/dict are containers; everything else is a
# leaf, so namedtuples, ModelOutputs and cache objects pass through whole.
# ---------------------------------------------------------------------------------------------

_LEAF = "*"
_CONSTANT_TYPES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device,
                   enum.Enum, type(Ellipsis), slice)

STAND_IN = "<surgeon stand-in"  # the file name of the generated forwards' code


def flatten(obj: Any) -> tuple[list[Any], Any]:
    """Split `obj` into leaves and a hashable spec that `unflatten` inverts."""
    leaves: list[Any] = []

    def go(o: Any) -> Any:
        t = type(o)
        if t is tuple or t is list:
            return (t.__name__, tuple(go(v) for v in o))
        if t is dict:
            return ("dict", tuple(o.keys()), tuple(go(v) for v in o.values()))
        leaves.append(o)
        return _LEAF

    return leaves, go(obj)


def unflatten(spec: Any, leaves: list[Any]) -> Any:
    """Rebuild the object `flatten` described, taking leaves in order."""
    it = iter(leaves)

    def go(s: Any) -> Any:
        if s == _LEAF:
            return next(it)
        if s[0] == "dict":
            return {k: go(v) for k, v in zip(s[1], s[2])}
        items = [go(v) for v in s[1]]
        return tuple(items) if s[0] == "tuple" else items

    return go(spec)


def _is_constant(x: Any) -> bool:
    return isinstance(x, _CONSTANT_TYPES)


def _first_line(text: Any, limit: int = 160) -> str:
    line = " ".join(str(text).strip().splitlines()[:1]) or type(text).__name__
    if len(line) > limit and ". " in line:
        line = line[: line.index(". ") + 1]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _where(exc: BaseException) -> str:
    """` (at file.py:line)` for the innermost frame of `exc` in model code (not torch, not us)."""
    tb, where = exc.__traceback__, ""
    while tb is not None:
        path = tb.tb_frame.f_code.co_filename
        if not any(part in path for part in (os.sep + "torch" + os.sep, os.sep + "surgeon" + os.sep,
                                              "<surgeon")):
            where = f" (at {os.path.basename(path)}:{tb.tb_lineno})"
        tb = tb.tb_next
    return where


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a Tensor of shape {tuple(x.shape)}"
    if _is_constant(x):
        return repr(x)
    return f"a {type(x).__name__}"


# ---------------------------------------------------------------------------------------------
# Which modules are atomic: never traced, always leaves.
# ---------------------------------------------------------------------------------------------

def is_atomic(module: nn.Module) -> bool:
    """True for modules whose forward is a primitive op: torch.nn layers without children
    (Linear, LayerNorm, Conv, Dropout, activations, ...), nn.MultiheadAttention, and surgeon's own
    runtime modules (marked `_surgeon_atomic = True`)."""
    if getattr(type(module), "_surgeon_atomic", False):
        return True
    if isinstance(module, nn.MultiheadAttention):
        return True
    mod = type(module).__module__
    return mod.startswith(("torch.nn.", "torch.ao.nn.")) and not module._modules


# ---------------------------------------------------------------------------------------------
# Recording one real call of every module.
# ---------------------------------------------------------------------------------------------

@dataclass
class Call:
    """One recorded call of a module: cloned arguments and output, and the ids of the original
    tensors it took and returned (to link blocks whose output feeds the next one's input)."""

    args: tuple
    kwargs: dict
    output: Any = None
    order: int = 0
    in_ids: tuple[int, ...] = ()
    out_ids: tuple[int, ...] = ()
    in_shape: tuple[int, ...] | None = None
    out_shape: tuple[int, ...] | None = None
    times: int = 1  # calls of the module in the recorded forward (a shared block: N)
    # output leaves (by index in `flatten(output)`) that are one of the call's own input objects
    # (by index in `flatten((args, kwargs))`): a decoder layer hands back the cache it was given
    returns_inputs: tuple[tuple[int, int], ...] = ()


def _clone(obj: Any) -> Any:
    """Tensors cloned; opaque objects (caches) deep-copied, as the forward will mutate them."""
    leaves, spec = flatten(obj)
    return unflatten(spec, [x.detach().clone() if isinstance(x, torch.Tensor)
                            else x if _is_constant(x) else _snapshot(x) for x in leaves])


def _snapshot(x: Any) -> Any:
    try:
        return copy.deepcopy(x)
    except Exception:
        pass
    try:  # a cache holding tensors of an autograd graph: copy them detached
        with _detaching_deepcopy():
            return copy.deepcopy(x)
    except Exception:  # not copyable (a function, a module): share it
        return x


@contextlib.contextmanager
def _detaching_deepcopy() -> Iterator[None]:
    """Inside, `copy.deepcopy` copies non-leaf tensors (which refuse it) detached."""
    original = torch.Tensor.__deepcopy__

    def deepcopy(self: torch.Tensor, memo: dict) -> torch.Tensor:
        if self.is_leaf:
            return original(self, memo)
        out = memo[id(self)] = self.detach().clone()
        return out

    torch.Tensor.__deepcopy__ = deepcopy
    try:
        yield
    finally:
        torch.Tensor.__deepcopy__ = original


def _tensor_ids(obj: Any) -> tuple[int, ...]:
    return tuple(id(x) for x in flatten(obj)[0] if isinstance(x, torch.Tensor))


def _is_object(x: Any) -> bool:
    """An opaque leaf (a cache, a config): neither a tensor nor a constant."""
    return not isinstance(x, torch.Tensor) and not _is_constant(x)


def _returned_inputs(output: Any, inputs: Any) -> tuple[tuple[int, int], ...]:
    """(output leaf, input leaf) index pairs where the output hands back an object the call
    was given. Cloning the call separates the two, so verification needs to know."""
    where = {id(x): i for i, x in enumerate(flatten(inputs)[0]) if _is_object(x)}
    return tuple((j, where[id(x)]) for j, x in enumerate(flatten(output)[0])
                 if _is_object(x) and id(x) in where)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    return next((x for x in flatten(obj)[0] if isinstance(x, torch.Tensor)), None)


def run_example(model: nn.Module, example: tuple | dict) -> Any:
    """Call `model` on an example given as a tuple of positional args or a dict of keyword args."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, (tuple, list)):
        return model(*example)
    raise ExampleError(
        f"example must be a tuple of positional args or a dict of keyword args, "
        f"not {type(example).__name__}")


def record_calls(model: nn.Module, example: tuple | dict,
                 kwargs: dict | None = None) -> dict[str, Call]:
    """Run `model` once in eval mode without gradients and record the first call of every module.

    Train/eval flags are restored afterwards. Inputs and outputs are cloned, so in-place ops later
    in the forward (`out += identity`) do not change what was recorded. With `kwargs`, the call is
    `model(*example, **kwargs)`.
    """
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[str, Call] = {}
    keep: list[Any] = []  # originals stay alive so that tensor ids stay unique during the run
    counter = iter(range(1 << 62))

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        name = names.get(id(mod))
        if name is None or name in calls:
            if name is not None:
                calls[name].times += 1
            return
        keep.append((args, kwargs))
        first = _first_tensor((args, kwargs))
        calls[name] = Call(_clone(args), _clone(kwargs), order=next(counter),
                           in_ids=_tensor_ids((args, kwargs)),
                           in_shape=tuple(first.shape) if first is not None else None)

    def post_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        name = names.get(id(mod))
        call = calls.get(name) if name is not None else None
        if call is None or call.out_ids:
            return
        keep.append(output)
        call.output = _clone(output)
        call.returns_inputs = _returned_inputs(output, (args, kwargs))
        call.out_ids = _tensor_ids(output) or (-1,)
        first = _first_tensor(output)
        call.out_shape = tuple(first.shape) if first is not None else None

    try:
        with watch_calls(list(model.modules()), pre_hook, post_hook), as_recorded(model), \
                torch.no_grad():
            if kwargs is None:
                run_example(model, example)
            else:
                model(*example, **kwargs)
    except ExampleError:
        raise
    except Exception as e:
        raise ExampleError(
            f"the example input fails on {type(model).__name__}: {type(e).__name__}: "
            f"{_first_line(e)}; pass an example the model accepts") from e
    return calls


@contextlib.contextmanager
def watch_calls(modules: list[nn.Module], pre: Callable[[nn.Module, tuple, dict], None],
                post: Callable[[nn.Module, tuple, dict, Any], None] | None = None
                ) -> Iterator[None]:
    """Inside, `pre(module, args, kwargs)` runs before and `post(module, args, kwargs, output)`
    after each call of one of `modules`, whether the caller wrote `module(...)` (forward hooks)
    or `module.forward(...)`, which runs no hooks (SqueezeBERT's encoder calls its layers so):
    an instance `forward` that reports a call the hooks did not see. Put back on exit."""
    hooked: set[int] = set()  # modules whose __call__ ran the pre-hook, forward not yet entered

    def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        hooked.add(id(mod))
        pre(mod, args, kwargs)

    def post_hook(mod: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if post is not None:
            post(mod, args, kwargs, output)

    def direct(mod: nn.Module, forward: Any) -> Any:
        def watched_forward(*args: Any, **kwargs: Any) -> Any:
            if id(mod) in hooked:  # called through mod(...): the hooks report it
                hooked.discard(id(mod))
                return forward(*args, **kwargs)
            pre(mod, args, kwargs)
            output = forward(*args, **kwargs)
            post_hook(mod, args, kwargs, output)
            return output
        return watched_forward

    modules = list({id(m): m for m in modules}.values())  # a shared module is watched once
    handles = []
    own_forward: dict[int, Any] = {}  # a forward set on the instance, put back after
    try:
        for m in modules:
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook, with_kwargs=True))
            if "forward" in m.__dict__:
                own_forward[id(m)] = m.__dict__["forward"]
            m.forward = direct(m, m.forward)
        yield
    finally:
        for h in handles:
            h.remove()
        for m in modules:
            if id(m) in own_forward:
                m.forward = own_forward[id(m)]
            else:
                m.__dict__.pop("forward", None)


@contextlib.contextmanager
def as_recorded(model: nn.Module) -> Iterator[None]:
    """Inside, `model` runs as tracing records it: eval mode, and torch's fused
    TransformerEncoderLayer/MultiheadAttention path off, so a recorded call runs the same ops the
    trace sees. Every module's train/eval mode and the fast-path switch are restored on exit,
    and so is what the runs wrote into the modules' plain attributes (`plain_state_kept`)."""
    modes = {m: m.training for m in model.modules()}
    backend = getattr(torch.backends, "mha", None)
    fastpath = backend.get_fastpath_enabled() if backend is not None else False
    if backend is not None:
        backend.set_fastpath_enabled(False)
    try:
        with plain_state_kept(model):
            model.eval()
            yield
    finally:
        if backend is not None:
            backend.set_fastpath_enabled(fastpath)
        for m, mode in modes.items():
            m.training = mode


# nn.Module's own slots (parameters, buffers, children, hooks, mode) and the forward that
# `watch_calls` and `_replaying` set: those have owners of their own
_MODULE_SLOTS = frozenset(nn.Module().__dict__) | {"forward"}


def _plain(key: str) -> bool:
    """A module attribute that a forward may write as a cache: not a torch slot, and not
    surgeon's own (a rewritten module's graphs for other calls are kept)."""
    return key not in _MODULE_SLOTS and not key.startswith("_surgeon")


@contextlib.contextmanager
def plain_state_kept(model: nn.Module) -> Iterator[None]:
    """Inside, forwards may fill caches kept in the modules' plain dicts, lists and sets; on
    exit each of those holds what it held before. Runs made while tracing must leave no such
    trace: LeViT's eval-mode `attention_bias_cache` would keep biases gathered from the weights
    of that moment (`surgeon.load` traces before it loads the checkpoint's weights), and a key
    that tracing made from a Proxy. Attributes a forward sets or rebinds stay (transformers
    marks a model whose output-capturing hooks it installed, and the hooks stay too)."""
    saved = [(v, copy.copy(v)) for m in model.modules() for k, v in m.__dict__.items()
             if _plain(k) and type(v) in (dict, list, set)]
    try:
        yield
    finally:
        for held, content in saved:
            if isinstance(held, list):
                held[:] = content
            else:
                held.clear()
                held.update(content)


# ---------------------------------------------------------------------------------------------
# Call specs: how a call maps to graph inputs, and the run-time guard.
# ---------------------------------------------------------------------------------------------

def _forward_signature(cls: type) -> inspect.Signature:
    sig = inspect.signature(inspect.unwrap(cls.forward))
    params = list(sig.parameters.values())[1:]  # drop self
    return sig.replace(parameters=params)


@dataclass(frozen=True)
class CallSpec:
    """How a module's calls map to its graph's flat inputs.

    `spec` is the structure of the bound arguments (defaults applied); `kinds` says for each leaf
    whether it is a graph input ("tensor", "object", or "passed": a flag or None the module only
    hands on to its children, such as HF's `use_cache` or a mask that was None) or a constant the
    graph was specialised to.
    """

    signature: inspect.Signature
    spec: Any
    kinds: tuple[str, ...]
    constants: tuple[Any, ...]
    arg_names: tuple[str, ...]  # a readable name for each leaf, for messages and placeholders

    def with_leaf(self, i: int, kind: str, constant: Any) -> CallSpec:
        """This spec with leaf `i` of another kind or constant."""
        kinds, consts = list(self.kinds), list(self.constants)
        kinds[i], consts[i] = kind, constant
        return dataclasses.replace(self, kinds=tuple(kinds), constants=tuple(consts))

    @property
    def key(self) -> Any:
        return (self.spec, self.kinds, tuple((type(c), c) for c in self.constants))

    def inputs(self, owner: str, args: tuple, kwargs: dict) -> list[Any]:
        """Check a call against what was traced and return the graph's flat inputs."""
        out = self.match(args, kwargs)
        if out is None:
            raise SpecializationError(self.mismatch(owner, args, kwargs))
        return out

    def match(self, args: tuple, kwargs: dict) -> list[Any] | None:
        """The graph's flat inputs for a call, or None where the call differs from the traced
        one (no exception: this is the guard every call runs, also under torch.compile)."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        leaves, spec = flatten(dict(bound.arguments))
        if spec != self.spec:
            return None
        out = []
        for value, kind, const in zip(leaves, self.kinds, self.constants):
            if kind == "const":
                if type(value) is not type(const) or value != const:
                    return None
                continue
            if kind == "tensor" and not isinstance(value, torch.Tensor):
                return None
            out.append(value)
        return out

    def mismatch(self, owner: str, args: tuple, kwargs: dict) -> str:
        """Why a call that `match` refuses differs from the traced one, in one line."""
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as e:
            return f"{owner}: {e}"
        bound.apply_defaults()
        leaves, spec = flatten(dict(bound.arguments))
        if spec != self.spec:
            return (f"{owner} was traced for a call with arguments {_spec_text(self.spec)} but "
                    f"got {_spec_text(spec)}; trace it again with an example that calls it "
                    "this way")
        for value, kind, const, name in zip(leaves, self.kinds, self.constants, self.arg_names):
            if kind == "const" and (type(value) is not type(const) or value != const):
                return (f"{owner} was traced with {name}={const!r}, but this call passes "
                        f"{_describe(value)}; trace it again with an example that passes {name} "
                        f"the way your model will")
            if kind == "tensor" and not isinstance(value, torch.Tensor):
                return (f"{owner} was traced with a Tensor for {name}, but this call passes "
                        f"{_describe(value)}; trace it again with an example that passes {name} "
                        f"the way your model will")
        return f"{owner}: the call differs from the traced one"


def _spec_text(spec: Any) -> str:
    """`(x, mask=None-or-tensor, kwargs=(position_ids))`-like text of a call structure."""
    if spec == _LEAF:
        return "·"
    if spec[0] == "dict":
        parts = [k if s == _LEAF else f"{k}={_spec_text(s)}" for k, s in zip(spec[1], spec[2])]
        return "(" + ", ".join(parts) + ")"
    inner = ", ".join(_spec_text(s) for s in spec[1])
    return f"({inner})" if spec[0] == "tuple" else f"[{inner}]"


def _leaf_names(spec: Any, prefix: str = "") -> list[str]:
    if spec == _LEAF:
        return [prefix]
    if spec[0] == "dict":
        out = []
        for k, s in zip(spec[1], spec[2]):
            out += _leaf_names(s, f"{prefix}[{k!r}]" if prefix else str(k))
        return out
    out = []
    for i, s in enumerate(spec[1]):
        out += _leaf_names(s, f"{prefix}[{i}]")
    return out


def make_call_spec(cls: type, call: Call) -> CallSpec:
    """Bind a recorded call to the module's forward signature and classify its leaves."""
    sig = _forward_signature(cls)
    bound = sig.bind(*call.args, **call.kwargs)
    bound.apply_defaults()
    leaves, spec = flatten(dict(bound.arguments))
    kinds, consts = [], []
    for x in leaves:
        if isinstance(x, torch.Tensor):
            kinds.append("tensor")
            consts.append(None)
        elif _is_constant(x):
            kinds.append("const")
            consts.append(x)
        else:
            kinds.append("object")
            consts.append(None)
    return CallSpec(sig, spec, tuple(kinds), tuple(consts), tuple(_leaf_names(spec)))


# ---------------------------------------------------------------------------------------------
# The tracer.
# ---------------------------------------------------------------------------------------------

class _ReadLog:
    """Attribute names read on the root module while its forward runs under tracing."""

    def __init__(self) -> None:
        self.active = False
        self.names: set[str] = set()


class _ParameterProxy(ParameterProxy):
    """A parameter's shape, dtype and device are read from the parameter itself, so code such as
    T5's `if self.weight.dtype in (torch.float16, torch.bfloat16)` traces (for the dtypes the
    model has when traced)."""

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        return self.param.device


class _Tracer(fx.Tracer):
    """Traces one module; every submodule it calls becomes a `call_module` leaf whose output has
    the structure of that submodule's recorded output."""

    def __init__(self, root_name: str, calls: dict[str, Call],
                 inputs: Callable[[], list[Any]] | None = None) -> None:
        super().__init__(autowrap_modules=(math,), param_shapes_constant=True)
        self.record_stack_traces = True
        self.root_name = root_name
        self.calls = calls
        self.inputs = inputs  # gives the recorded call's flat graph inputs, for `to_bool`

    def to_bool(self, obj: fx.Proxy) -> bool:
        """An `if` on a value computed from shapes (`if x.shape[1] % window != 0: pad`) takes
        the branch the recorded call took, and the graph guards on it: a later call for which
        the condition comes out otherwise raises `ShapeGuardMiss` there, and a rewritten
        module traces itself again for it. A condition on tensor values stays untraceable."""
        if self.inputs is None:
            return super().to_bool(obj)
        try:
            value = _Concrete(self).value(obj.node)
        except _NotShapes:
            return super().to_bool(obj)
        if isinstance(value, torch.Tensor) or not isinstance(value, (bool, int)):
            return super().to_bool(obj)
        taken = bool(value)
        where = obj.node.stack_trace.strip().splitlines()[-1].strip() if obj.node.stack_trace \
            else obj.node.name
        self.create_proxy("call_function", shape_guard, (obj, taken, where), {})
        return taken

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        out = super().getattr(attr, attr_val, parameter_proxy_cache)
        if isinstance(out, ParameterProxy):
            out.__class__ = _ParameterProxy
        return out

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            qual = self.path_of_module(m)
        except NameError:
            # A module made during the call (transformers' `ACT2FN["silu"]` builds a fresh
            # activation each time): not a child, so no leaf; one without state of its own is
            # traced through, its ops joining this graph.
            if any(True for _ in m.parameters()) or any(True for _ in m.buffers()):
                raise
            return forward(*args, **kwargs)
        proxy = self.create_proxy("call_module", qual, args, kwargs)
        full = f"{self.root_name}.{qual}" if self.root_name else qual
        call = self.calls.get(full)
        if call is None or not call.out_ids:
            return proxy
        return _structure_like(proxy, call.output)


class ShapeGuardMiss(SpecializationError):
    """A call for which a branch on shapes goes the other way than in the traced call."""


def shape_guard(condition: Any, taken: bool, where: str) -> None:
    """The guard `to_bool` puts in a graph where the forward branched on shapes."""
    if bool(condition) != taken:
        raise ShapeGuardMiss(f"the branch on shapes at {where} goes the other way for this call")


class _NotShapes(Exception):
    """A value that is not computed from the recorded call's shapes alone."""


_SHAPE_ATTRS = frozenset(("shape", "ndim", "dtype", "device", "is_cuda", "requires_grad"))
_SHAPE_METHODS = frozenset(("size", "dim", "numel", "ndimension", "get_device"))


class _Concrete:
    """The value a node of a graph being traced had in the recorded call, where it is
    computed from shapes: graph inputs, children's recorded outputs and parameters, through
    ops whose only way from a tensor to a number is a shape accessor."""

    def __init__(self, tracer: _Tracer) -> None:
        self.tracer = tracer
        placeholders = [n for n in tracer.graph.nodes if n.op == "placeholder"]
        self.values: dict[fx.Node, Any] = dict(zip(placeholders, tracer.inputs()
                                                   if tracer.inputs is not None else []))

    def value(self, node: fx.Node) -> Any:
        if node in self.values:
            return self.values[node]
        args = fx.node.map_arg(node.args, self.value)
        kwargs = fx.node.map_arg(node.kwargs, self.value)
        if node.op == "call_module":
            full = (f"{self.tracer.root_name}.{node.target}" if self.tracer.root_name
                    else node.target)
            call = self.tracer.calls.get(full)
            if call is None or not call.out_ids:
                raise _NotShapes(node.name)
            out = call.output
        elif node.op == "get_attr":
            out = _getattr_path(self.tracer.root, node.target)
        elif node.op in ("call_function", "call_method"):
            tensors_in = any(isinstance(a, torch.Tensor) for a in flatten((args, kwargs))[0])
            try:
                with torch.no_grad():
                    out = (getattr(args[0], node.target)(*args[1:], **kwargs)
                           if node.op == "call_method" else node.target(*args, **kwargs))
            except Exception as e:
                raise _NotShapes(node.name) from e
            accessor = (node.op == "call_method" and node.target in _SHAPE_METHODS) or (
                node.target is getattr and len(args) > 1 and args[1] in _SHAPE_ATTRS) or (
                node.target is len)
            if tensors_in and not isinstance(out, torch.Tensor) and not accessor:
                raise _NotShapes(node.name)  # a number read from tensor data (`.item()`)
        else:
            raise _NotShapes(node.name)
        self.values[node] = out
        return out


def _structure_like(proxy: fx.Proxy, value: Any) -> Any:
    t = type(value)
    if value is None:
        return None
    if t is tuple or t is list:
        return t(_structure_like(proxy[i], v) for i, v in enumerate(value))
    if t is dict:
        return {k: _structure_like(proxy[k], v) for k, v in value.items()}
    return proxy


def _identifier(name: str, taken: set[str]) -> str:
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in name).strip("_") or "arg"
    if base[0].isdigit() or base in ("self",):
        base = "arg_" + base
    out, i = base, 1
    while out in taken:
        out, i = f"{base}_{i}", i + 1
    taken.add(out)
    return out


def _trace_once(module: nn.Module, name: str, spec: CallSpec, calls: dict[str, Call],
                reads: _ReadLog) -> fx.Graph:
    """Trace `module` through a stand-in forward that takes the call's graph inputs flat."""
    cls = type(module)
    orig_forward = cls.forward
    n_positional = len(calls[name].args)
    taken: set[str] = set()
    input_names = [_identifier(n, taken) for n, k in zip(spec.arg_names, spec.kinds)
                   if k != "const"]

    def call_original(self: nn.Module, flat_inputs: tuple) -> Any:
        it = iter(flat_inputs)
        leaves = [next(it) if k != "const" else c for k, c in zip(spec.kinds, spec.constants)]
        args, kwargs = _call_shape(spec, unflatten(spec.spec, leaves), n_positional)
        reads.active = True
        try:
            return orig_forward(self, *args, **kwargs)
        finally:
            reads.active = False

    params = ", ".join(["self", *input_names])
    packed = ", ".join(input_names) + ("," if len(input_names) == 1 else "")
    src = f"def forward({params}):\n    return __call_original(self, ({packed}))\n"
    scope: dict[str, Any] = {"__call_original": call_original}
    exec(compile(src, f"{STAND_IN} for {cls.__qualname__}>", "exec"), scope)

    def __getattribute__(self: nn.Module, attr: str) -> Any:  # noqa: N807
        if reads.active and self is module:
            reads.names.add(attr)
        return cls.__getattribute__(self, attr)

    stand_in = type(cls.__name__, (cls,), {"forward": scope["forward"],
                                          "__getattribute__": __getattribute__,
                                          "__module__": cls.__module__})
    module.__class__ = stand_in
    tracer = _Tracer(name, calls, lambda: _flat_inputs(spec, calls[name]))
    try:
        with _direct_calls_as_leaves(module, tracer):
            graph = tracer.trace(module)
    finally:
        module.__class__ = cls
    _tidy(graph)
    return graph


@contextlib.contextmanager
def _direct_calls_as_leaves(root: nn.Module, tracer: _Tracer) -> Iterator[None]:
    """Inside, a submodule of `root` that its forward calls as `block.forward(x)` (which runs
    no `__call__`, so fx would trace through it) is a `call_module` leaf like `block(x)`: the
    adds in the block's code are the block's, found once, in its own graph."""
    patched: list[tuple[nn.Module, Any]] = []
    for m in root.modules():
        if m is root:
            continue
        own = m.__dict__.get("forward")
        forward = m.forward

        def direct(*args: Any, _m: nn.Module = m, _forward: Any = forward, **kwargs: Any) -> Any:
            return tracer.call_module(_m, _forward, args, kwargs)

        m.forward = direct
        patched.append((m, own))
    try:
        yield
    finally:
        for m, own in patched:
            if own is not None:
                m.forward = own
            else:
                m.__dict__.pop("forward", None)


def _call_shape(spec: CallSpec, arguments: dict[str, Any], n_positional: int
                ) -> tuple[list[Any], dict[str, Any]]:
    """Arguments as the recorded call passed them: its positional ones by position, the rest by
    keyword, so decorators around `forward` see the same kind of call."""
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    for i, (pname, param) in enumerate(spec.signature.parameters.items()):
        value = arguments[pname]
        if param.kind is param.VAR_POSITIONAL:
            args.extend(value)
        elif param.kind is param.VAR_KEYWORD:
            kwargs.update(value)
        elif param.kind is param.POSITIONAL_ONLY or (
                param.kind is param.POSITIONAL_OR_KEYWORD and i < n_positional):
            args.append(value)
        else:
            kwargs[pname] = value
    return args, kwargs


def _tidy(graph: fx.Graph) -> None:
    """Drop getitems nobody uses (made for structured leaf outputs) and rename nodes that would
    shadow `self` in generated code (BERT has a child module called `self`)."""
    for node in reversed(list(graph.nodes)):
        if node.op == "call_function" and node.target is operator.getitem and not node.users:
            graph.erase_node(node)
    for node in graph.nodes:
        if node.name == "self":
            node._rename("self_module")


def compile_graph(graph: fx.Graph) -> Callable[..., Any]:
    """Python function `forward(self, *flat_inputs)` for a graph, runnable with any module that
    has the graph's submodule and parameter paths as `self`."""
    code = graph.python_code(root_module="self")
    scope = dict(code.globals)
    exec(compile(code.src, "<surgeon graph>", "exec"), scope)
    return scope["forward"]


# ---------------------------------------------------------------------------------------------
# Verification: a graph is trusted only if it reproduces the recorded call.
# ---------------------------------------------------------------------------------------------

def _mismatch(got: Any, want: Any, path: str = "output",
              given: dict[int, Any] | None = None) -> str | None:
    """Where `got` differs from `want`, in words; None where it matches. `given` maps the id of
    an object `want` holds because its call was given it to the object the run of `got` was
    given in its place (each run gets its own copy of a cache, and hands it back)."""
    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{path} is {_describe(got)}, expected a Tensor"
        if got.shape != want.shape or got.dtype != want.dtype:
            return (f"{path} has shape {tuple(got.shape)} {got.dtype}, expected "
                    f"{tuple(want.shape)} {want.dtype}")
        if want.is_floating_point() or want.is_complex():
            scale = float(want.detach().abs().max()) if want.numel() else 0.0
            ok = torch.allclose(got, want, rtol=1e-4, atol=1e-5 * max(1.0, scale), equal_nan=True)
        else:
            ok = torch.equal(got, want)
        return None if ok else f"{path} values differ from the recorded call"
    if type(got) is not type(want):
        return f"{path} is a {type(got).__name__}, expected a {type(want).__name__}"
    if isinstance(want, (tuple, list)):
        if len(got) != len(want):
            return f"{path} has {len(got)} items, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            bad = _mismatch(g, w, f"{path}[{i}]", given)
            if bad:
                return bad
        return None
    if isinstance(want, dict):
        if list(got.keys()) != list(want.keys()):
            return f"{path} has keys {list(got.keys())}, expected {list(want.keys())}"
        for k in want:
            bad = _mismatch(got[k], want[k], f"{path}[{k!r}]", given)
            if bad:
                return bad
        return None
    if _is_constant(want):
        return None if got == want else f"{path} is {got!r}, expected {want!r}"
    if got is want or (given is not None and got is given.get(id(want))):
        return None
    return f"{path} is a different {type(want).__name__} object"


def _bound_inputs(spec: CallSpec, args: tuple, kwargs: dict) -> list[Any]:
    """The leaves of a call that are graph inputs, in the graph's order (not copied)."""
    bound = spec.signature.bind(*args, **kwargs)
    bound.apply_defaults()
    leaves, _ = flatten(dict(bound.arguments))
    return [x for x, k in zip(leaves, spec.kinds) if k != "const"]


def _flat_inputs(spec: CallSpec, call: Call) -> list[Any]:
    """The recorded call's graph inputs: its tensors, and copies of its objects (a forward
    mutates a cache)."""
    return [x if isinstance(x, torch.Tensor) else _snapshot(x)
            for x in _bound_inputs(spec, call.args, call.kwargs)]


def _given(inputs: list[Any], copies: list[Any]) -> dict[int, Any]:
    """id of each object among a call's graph `inputs` -> the copy a run got in its place."""
    return {id(x): c for x, c in zip(inputs, copies) if _is_object(x)}


def _recorded_given(spec: CallSpec, call: Call, flat: list[Any]) -> dict[int, Any]:
    """For `_mismatch` on the recorded output: each object it hands back from the call's own
    inputs (`Call.returns_inputs`) -> the copy of that input in `flat`."""
    by_input = _given(_bound_inputs(spec, call.args, call.kwargs), flat)
    ins, outs = flatten((call.args, call.kwargs))[0], flatten(call.output)[0]
    return {id(outs[j]): by_input[id(ins[i])] for j, i in call.returns_inputs
            if id(ins[i]) in by_input}


def _verify(shared: SharedGraph, module: nn.Module, spec: CallSpec, call: Call,
            children: dict[str, Call] | None = None) -> str | None:
    """Run the traced graph on the recorded call and compare with the recorded output.
    `children` (recorded calls of the module's children, by attribute name) are replayed. The
    graph runs on `module` directly, not through its call, so weights that `surgeon convert`
    keeps on disk until a module is called are read around it (`materialized`)."""
    try:
        flat = _flat_inputs(spec, call)
        with torch.no_grad(), _replaying(module, children or {}), \
                materialized(module, shared.graph):
            out = shared.forward(module, *flat)
    except Exception as e:  # the graph does not even run: report why
        return f"the traced graph fails on the recorded call: {type(e).__name__}: {_first_line(e)}"
    bad = _mismatch(out, call.output, given=_recorded_given(spec, call, flat))
    return f"the traced graph does not reproduce the recorded call: {bad}" if bad else None


def verify_train(graph: fx.Graph, module: nn.Module, spec: CallSpec, call: Call,
                 seeds: tuple[int, ...] = (0, 1)) -> str | None:
    """Run `module`'s train-mode `graph` and its eager forward in train mode on the recorded
    call, each from the same random state (dropout draws the same masks when the same ops run
    in the same order), and compare. Buffers a train-mode forward writes (BatchNorm's running
    statistics) and every module's mode are put back afterwards."""
    forward = compile_graph(graph)
    saved = snapshot(module)
    state = random.getstate()
    try:
        module.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _hooks_off(module):
            for seed in seeds:
                torch.manual_seed(seed)
                random.seed(seed)
                args, kwargs = _clone(call.args), _clone(call.kwargs)
                want = module(*args, **kwargs)
                torch.manual_seed(seed)
                random.seed(seed)
                flat = _flat_inputs(spec, call)
                with materialized(module, graph):
                    got = forward(module, *flat)
                bad = _mismatch(got, want, given=_given(_bound_inputs(spec, args, kwargs), flat))
                if bad is not None:
                    return f"in train mode the traced graph does not reproduce the forward: {bad}"
    except Exception as e:
        return (f"in train mode the traced graph or the forward fails: {type(e).__name__}: "
                f"{_first_line(e)}")
    finally:
        random.setstate(state)
        saved.restore()
    return None


@contextlib.contextmanager
def _replaying(module: nn.Module, children: dict[str, Call]) -> Iterator[None]:
    """While verifying `module`'s graph, a child called with exactly the arguments recorded for
    it returns its recorded output instead of running again: the child's own graph is verified
    on its own, and this keeps verification from re-running the whole model below every level.
    Any other call of the child runs it."""
    patched = []
    for attr, recorded in children.items():
        child = module._modules.get(attr)
        if child is None or not recorded.out_ids or "forward" in child.__dict__:
            continue
        run = child.forward

        def replay(*args: Any, _run: Callable = run, _rec: Call = recorded, **kwargs: Any) -> Any:
            if _same_call((args, kwargs), (_rec.args, _rec.kwargs)):
                return _clone(_rec.output)
            return _run(*args, **kwargs)

        child.forward = replay
        patched.append(child)
    try:
        yield
    finally:
        for child in patched:
            del child.__dict__["forward"]


def _same_call(got: Any, want: Any) -> bool:
    """Exactly the same arguments: equal structure, bit-equal tensors, equal constants."""
    (a, spec_a), (b, spec_b) = flatten(got), flatten(want)
    if spec_a != spec_b:
        return False
    for x, y in zip(a, b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
                    and x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)):
                return False
        elif not (_is_constant(x) and _is_constant(y) and type(x) is type(y) and x == y):
            return False
    return True


def _recorded_children(module: nn.Module, name: str, calls: dict[str, Call]) -> dict[str, Call]:
    prefix = f"{name}." if name else ""
    return {attr: calls[prefix + attr] for attr in module._modules if prefix + attr in calls}


# ---------------------------------------------------------------------------------------------
# Results.
# ---------------------------------------------------------------------------------------------

@dataclass
class SharedGraph:
    """One traced graph and everything instances of it share."""

    graph: fx.Graph
    spec: CallSpec
    forward: Callable[..., Any]  # forward(self, *flat_inputs)
    reads: dict[str, Any]  # instance attributes the forward read, with their values
    mode_dependent: bool  # the forward reads `self.training` and its graph differs by mode
    first: str  # qualified name of the module it was traced on
    train_graph: fx.Graph | None = None  # the train-mode graph, where mode_dependent


@dataclass
class ModuleTrace:
    """A module of the model and the verified graph it shares."""

    name: str
    module: nn.Module
    shared: SharedGraph

    @property
    def graph(self) -> fx.Graph:
        return self.shared.graph

    def to_module(self) -> TracedModule:
        """A GraphModule over this module's own parameters, with its original call signature."""
        return TracedModule(self.module, self.shared.graph, self.shared.spec, self.name)


@dataclass
class ModelTrace:
    """Everything tracing learnt about a model: recorded calls, graphs, and untraced modules."""

    model: nn.Module
    calls: dict[str, Call]
    traces: dict[str, ModuleTrace] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    graphs_traced: int = 0



RESPECIALISE_LIMIT = 8  # graphs a rewritten module keeps for other call specs than its first
_log = logging.getLogger("surgeon")


@dataclass
class ModuleSource:
    """What a rewritten module needs to trace itself again for another call: the original class,
    the original's plain attributes (its config, flags; not its parameters or children, which
    the rewritten module holds), and the graph the passes started from."""

    cls: type
    attrs: dict[str, Any]
    base: fx.Graph


_NOT_PLAIN = ("_parameters", "_buffers", "_modules")


def module_source(original: nn.Module, base: fx.Graph) -> ModuleSource:
    """The `ModuleSource` of `original`, about to be replaced by a graph edited from `base`.
    A module rewritten before keeps the source it had."""
    kept = original.__dict__.get("_surgeon_source")
    if isinstance(kept, ModuleSource):
        return kept
    attrs = {k: v for k, v in original.__dict__.items() if k not in _NOT_PLAIN
             and not k.startswith(("_forward", "_backward", "_state_dict", "_load_state_dict"))
             and not isinstance(v, (nn.Module, torch.Tensor))}
    graph = fx.Graph()
    graph.output(graph.graph_copy(base, {}))
    return ModuleSource(type(original), attrs, graph)


# Instance entries a rewritten module must not take from the module it replaces: its own
# forward, and graphs cached for the original's graph (which a new graph makes stale).
_NOT_ADOPTED = frozenset(("forward", "_surgeon_specs", "_train_graph", "_train_forward"))


def keep_original(module: nn.Module, root: nn.Module) -> None:
    """Give `module` (a GraphModule built over `root`) everything of `root` that its graph does
    not call: GraphModule copies only the submodules and parameters its nodes name. Children,
    parameters and buffers come back as the same objects in `root`'s order (so state_dict keys
    stay), and every plain instance attribute that other code may read stays readable
    (ModernBERT's encoder reads `layer.attention_type`)."""
    for slot in ("_modules", "_parameters", "_buffers"):
        mine, theirs = module.__dict__[slot], root.__dict__.get(slot, {})
        merged = {**theirs, **{k: v for k, v in mine.items() if k not in theirs}}
        mine.clear()
        mine.update(merged)
    module._non_persistent_buffers_set |= set(root.__dict__.get("_non_persistent_buffers_set",
                                                               ()))
    for k, v in root.__dict__.items():
        if k not in module.__dict__ and k not in _NOT_ADOPTED \
                and not k.startswith(("_forward", "_backward")):
            module.__dict__[k] = v


class TracedModule(fx.GraphModule):
    """A GraphModule that keeps the traced module's call signature and checks specialised
    arguments at every call. Parameter and submodule names are the original module's.

    A call the graph was not specialised for (a new keyword handed on, another flag) does not
    fail: like a failed guard in torch.compile, the module is traced again for that call from its
    original forward, the passes' edits are re-applied to the new graph (`reapply_edits`) and the
    result is cached, up to `RESPECIALISE_LIMIT` graphs per module."""

    def __init__(self, root: nn.Module, graph: fx.Graph, spec: CallSpec, name: str = "") -> None:
        super().__init__(root, graph, class_name=type(root).__name__)
        keep_original(self, root)
        self._call_spec = spec
        self._surgeon_name = name or type(root).__name__

    # What `copy.deepcopy` must carry over: GraphModule's deepcopy rebuilds through
    # `GraphModule.__init__`, which knows nothing of them.
    _KEPT = ("_call_spec", "_surgeon_name", "_surgeon_source", "training",
             "gradient_checkpointing", "_gradient_checkpointing_func", "_train_graph",
             "_train_forward")

    def set_train_graph(self, graph: fx.Graph) -> None:
        """The graph to run in train mode, where the forward takes another path there
        (`F.dropout(training=self.training)`); `graph` is then the eval-mode one."""
        self._train_graph = graph
        self._train_forward = compile_graph(graph)

    def _deepcopy_init(self) -> Callable[..., None]:
        def init(res: fx.GraphModule, fake_mod: nn.Module, graph: fx.Graph) -> None:
            fx.GraphModule.__init__(res, fake_mod, graph, class_name=type(self).__name__)
            keep_original(res, fake_mod)
            for attr in self._KEPT:
                if attr in fake_mod.__dict__:
                    setattr(res, attr, fake_mod.__dict__[attr])
        return init

    def recompile(self) -> Any:
        code = super().recompile()
        cls = type(self)
        cls._flat_forward = cls.forward
        cls.forward = TracedModule._guarded_forward
        self.__dict__.pop("_surgeon_specs", None)  # graphs re-applied from an older graph
        return code

    def _guarded_forward(self, *args: Any, **kwargs: Any) -> Any:
        # Hugging Face gradient checkpointing (`model.gradient_checkpointing_enable()`) sets
        # these two attributes on every layer that has the first; honour them like the layer did.
        if self.training and getattr(self, "gradient_checkpointing", False):
            checkpoint = getattr(self, "_gradient_checkpointing_func", None)
            if checkpoint is not None:
                return checkpoint(functools.partial(self._checked_forward, **kwargs), *args)
        return self._checked_forward(*args, **kwargs)

    def _checked_forward(self, *args: Any, **kwargs: Any) -> Any:
        flat = self._call_spec.match(args, kwargs)
        train = self.__dict__.get("_train_forward")
        try:
            if flat is not None:
                if train is not None and self.training:
                    return train(self, *flat)
                return self._flat_forward(*flat)
        except ShapeGuardMiss:  # a branch on shapes goes the other way: another graph
            pass
        mode = self.training if train is not None else None
        for spec, forward, traced_mode in self.__dict__.get("_surgeon_specs", ()):
            if traced_mode is mode or traced_mode == mode:
                flat = spec.match(args, kwargs)
                if flat is not None:
                    try:
                        return forward(self, *flat)
                    except ShapeGuardMiss:
                        continue
        return self._respecialised(args, kwargs)

    @torch._dynamo.disable
    def _respecialised(self, args: tuple, kwargs: dict) -> Any:
        """Trace a new graph for a call no cached graph accepts, cache it and run it (eagerly:
        under torch.compile this is a graph break, once per new call spec)."""
        miss = self._call_spec.mismatch(self._surgeon_name, args, kwargs)
        specs: list[tuple[CallSpec, Callable[..., Any], bool | None]] = \
            self.__dict__.setdefault("_surgeon_specs", [])
        mode = self.training if "_train_forward" in self.__dict__ else None
        source = self.__dict__.get("_surgeon_source")
        if not isinstance(source, ModuleSource):
            raise SpecializationError(miss)
        if len(specs) >= RESPECIALISE_LIMIT:
            raise SpecializationError(
                f"{miss}; {self._surgeon_name} already holds {RESPECIALISE_LIMIT} graphs for "
                "other calls (surgeon.graph.tracing.RESPECIALISE_LIMIT)")
        try:
            spec, graph = respecialise(self, source, args, kwargs, bool(mode))
        except Exception as e:
            reason = (str(e) if isinstance(e, SpecializationError)
                      else f"{type(e).__name__}: {_first_line(e)}")
            raise SpecializationError(
                f"{miss}; tracing it again for this call failed: {reason}") from None
        forward = compile_graph(graph)
        specs.append((spec, forward, mode))
        _log.info("surgeon: %s traced again for a call with arguments %s (%d graph(s) cached)",
                  self._surgeon_name, _spec_text(spec.spec), len(specs) + 1)
        return forward(self, *spec.inputs(self._surgeon_name, args, kwargs))


@contextlib.contextmanager
def _hooks_off(module: nn.Module) -> Iterator[None]:
    """Forward hooks of `module` and its submodules silenced (transformers' output recorders
    must not see the extra runs tracing makes)."""
    names = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
             "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
    saved = []
    for m in module.modules():
        for n in names:
            if n in m.__dict__:
                saved.append((m, n, m.__dict__[n]))
                m.__dict__[n] = type(m.__dict__[n])()
    try:
        yield
    finally:
        for m, n, v in saved:
            m.__dict__[n] = v


def respecialise(module: TracedModule, source: ModuleSource, args: tuple, kwargs: dict,
                 training: bool = False) -> tuple[CallSpec, fx.Graph]:
    """Trace the original forward of rewritten `module` for the call `(args, kwargs)`, verify it
    reproduces an eager run of that forward, and re-apply the passes' edits to it. The original
    runs on a view that has the original's attributes and `module`'s own children and
    parameters, so the modules the passes created and replaced are the ones called."""
    args, kwargs = _one_stream(module, args, kwargs)
    view = source.cls.__new__(source.cls)
    nn.Module.__init__(view)
    view.__dict__.update(source.attrs)
    for attr in _NOT_PLAIN:
        view.__dict__[attr] = module.__dict__[attr]
    view.training = module.training
    with _hooks_off(view):
        calls = record_calls(view, tuple(_clone(args)), _clone(kwargs))
        with as_recorded(view):
            spec = _generalise_flags("", view, make_call_spec(source.cls, calls[""]), calls,
                                     numbers=True)
            shared = _new_graph("", view, spec, calls[""], calls, training)
            bad = _verify(shared, view, spec, calls[""], _recorded_children(view, "", calls))
        if bad is None and training and shared.train_graph is not None:
            bad = verify_train(shared.train_graph, view, spec, calls[""])
    if bad is not None:
        raise SpecializationError(bad)
    new = shared.train_graph if training and shared.train_graph is not None else shared.graph
    graph = reapply_edits(source.base, module.graph, new)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            try:
                module.get_submodule(node.target) if node.op == "call_module" else \
                    _getattr_path(module, node.target)
            except AttributeError:
                raise SpecializationError(
                    f"its new graph calls {node.target}, which the rewritten module does not "
                    "hold") from None
    return spec, graph


# The `node.meta` key a pass sets on a graph input that carries n streams folded into its batch
# (hyper-connections: `(n·b, ...)`); its value is n.
FOLDED_STREAMS = "surgeon_folded_streams"


def _one_stream(module: TracedModule, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The call with each input that arrives stream-folded (`FOLDED_STREAMS`) cut to its first
    stream: the original forward, which tracing again runs, was written for batch b, and its
    other inputs (an encoder's states for cross-attention, masks) have batch b. The graph
    traced on it takes the folded input again once the edits are re-applied."""
    spec = module._call_spec
    names = [nm for nm, k in zip(spec.arg_names, spec.kinds) if k != "const"]
    inputs = [n for n in module.graph.nodes if n.op == "placeholder"]
    folded = {nm: n.meta[FOLDED_STREAMS] for nm, n in zip(names, inputs)
              if n.meta.get(FOLDED_STREAMS)}
    if not folded:
        return args, kwargs
    try:
        bound = spec.signature.bind(*args, **kwargs)
    except TypeError:
        return args, kwargs
    leaves, tree = flatten(dict(bound.arguments))
    for i, name in enumerate(_leaf_names(tree)):
        t, n = leaves[i], folded.get(name)
        if n and isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] % n == 0:
            leaves[i] = t.unflatten(0, (n, -1))[0]  # (n·b, ...) -> (b, ...)
    bound.arguments.update(unflatten(tree, leaves))
    return bound.args, bound.kwargs


def _getattr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _arg_text(value: Any) -> Any:
    return fx.node.map_aggregate(value, lambda x: ("node", x.name) if isinstance(x, fx.Node)
                                 else ("value", repr(x)))


def reapply_edits(base: fx.Graph, edited: fx.Graph, new: fx.Graph) -> fx.Graph:
    """A three-way merge of graphs: the edits that turned `base` into `edited` (inserted nodes,
    erased nodes, changed arguments) applied to `new`, another trace of the same forward.

    Nodes are matched by name (tracing the same code names them the same). Where a pass
    changed a node's argument, the edited one wins; elsewhere the new trace's does, so a keyword
    the new call hands on reaches its children. Raises `SpecializationError` when an edit refers
    to a value the new trace does not have."""
    b_nodes = {n.name: n for n in base.nodes}
    e_nodes = {n.name: n for n in edited.nodes}
    n_nodes = {n.name: n for n in new.nodes}
    common = {k for k in b_nodes if k in e_nodes and k in n_nodes}
    out = fx.Graph()
    env_e: dict[str, fx.Node] = {}
    env_n: dict[str, fx.Node] = {}

    def look(env: dict[str, fx.Node], x: fx.Node) -> fx.Node:
        if x.name not in env:
            raise SpecializationError(
                f"a rewritten graph uses {x.name}, which tracing the new call does not produce")
        return env[x.name]

    def conflict(name: str) -> None:
        raise SpecializationError(
            f"a pass rewrote {name}, whose inputs differ in the new call; the edit cannot be "
            "carried over")

    # a node a pass erased (an add it replaced) must take the same inputs in the new trace,
    # else what replaced it would compute from the old ones
    for name, n in n_nodes.items():
        b = b_nodes.get(name)
        if b is not None and name not in e_nodes and (
                _arg_text(b.args) != _arg_text(n.args)
                or _arg_text(b.kwargs) != _arg_text(n.kwargs)):
            conflict(name)

    def from_e(v: Any) -> Any:
        return fx.node.map_arg(v, lambda x: look(env_e, x))

    def from_n(v: Any) -> Any:
        return fx.node.map_arg(v, lambda x: look(env_n, x))

    def merged(name: str) -> tuple[Any, tuple, dict]:
        b, e, n = b_nodes[name], e_nodes[name], n_nodes[name]
        args = []
        for i, nv in enumerate(n.args):
            if i < len(b.args) and i < len(e.args) and _arg_text(b.args[i]) != _arg_text(
                    e.args[i]):
                if _arg_text(b.args[i]) != _arg_text(nv):
                    conflict(name)
                args.append(from_e(e.args[i]))
            else:
                args.append(from_n(nv))
        args += [from_e(v) for v in e.args[len(n.args):]] if len(e.args) > len(b.args) else []
        kw = {}
        for k, nv in n.kwargs.items():
            if k in b.kwargs and k not in e.kwargs:
                continue
            if k in b.kwargs and _arg_text(b.kwargs[k]) != _arg_text(e.kwargs[k]):
                if _arg_text(b.kwargs[k]) != _arg_text(nv):
                    conflict(name)
                kw[k] = from_e(e.kwargs[k])
            else:
                kw[k] = from_n(nv)
        kw.update({k: from_e(v) for k, v in e.kwargs.items() if k not in b.kwargs})
        target = e.target if e.target != b.target else n.target
        return target, tuple(args), kw

    def emit(node: fx.Node, target: Any, args: tuple, kwargs: dict) -> fx.Node:
        made = out.create_node(node.op, target, args, kwargs, name=node.name, type_expr=node.type)
        made.meta = dict(node.meta)
        return made

    # placeholders: exactly the new trace's, in its order (they are the new spec's flat inputs)
    for n in new.nodes:
        if n.op == "placeholder":
            env_n[n.name] = emit(n, n.target, n.args, n.kwargs)
            if n.name in common:
                env_e[n.name] = env_n[n.name]
    e_placeholders = [n for n in edited.nodes if n.op == "placeholder"]
    for n in e_placeholders:
        if n.name not in b_nodes:
            raise SpecializationError(f"a pass added the graph input {n.name}")
    pending = [n for n in new.nodes if n.op not in ("placeholder", "output")]
    pos = 0

    def flush(upto: str | None) -> None:
        nonlocal pos
        while pos < len(pending):
            n = pending[pos]
            if upto is not None and n.name == upto:
                return
            pos += 1
            if n.name in common or (n.name in b_nodes and n.name not in e_nodes):
                continue  # common: emitted in the edited order; the rest: erased by a pass
            env_n[n.name] = emit(n, n.target, from_n(n.args), from_n(n.kwargs))

    for e in edited.nodes:
        if e.op in ("placeholder", "output"):
            continue
        if e.name in common:
            flush(e.name)
            if pos < len(pending):
                pos += 1
            target, args, kwargs = merged(e.name)
            env_e[e.name] = env_n[e.name] = emit(e, target, args, kwargs)
        elif e.name in b_nodes:
            # the new call takes another path (a branch on shapes not taken): a node the
            # passes left as it was is simply not there; what they added that reads it
            # fails in `look`
            if _arg_text(b_nodes[e.name].args) != _arg_text(e.args) or \
                    _arg_text(b_nodes[e.name].kwargs) != _arg_text(e.kwargs):
                raise SpecializationError(
                    f"tracing the new call does not produce {e.name}, which a pass rewrote "
                    "(the forward takes another path for this call)")
            continue
        else:
            env_e[e.name] = emit(e, e.target, from_e(e.args), from_e(e.kwargs))
    flush(None)
    _, args, _ = merged("output")
    out.output(args[0])
    out.lint()
    return out


# ---------------------------------------------------------------------------------------------
# Driving it over a model.
# ---------------------------------------------------------------------------------------------

def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _structure_key(module: nn.Module, name: str, calls: dict[str, Call]) -> Any:
    children = []
    for cname, child in module._modules.items():
        if child is None:
            children.append((cname, None, None))
            continue
        full = f"{name}.{cname}" if name else cname
        call = calls.get(full)
        out_spec = flatten(call.output)[1] if call is not None and call.out_ids else None
        children.append((cname, type(child), out_spec))
    return (tuple(children), tuple(module._parameters), tuple(module._buffers))


_IGNORED_READS = frozenset(("training", "_parameters", "_buffers", "_modules", "__dict__",
                            "__class__", "forward"))


def _instance_reads(module: nn.Module, names: set[str]) -> dict[str, Any]:
    d = module.__dict__
    return {n: d[n] for n in sorted(names) if n in d and n not in _IGNORED_READS
            and not n.startswith("_forward") and not n.startswith("_backward")}


# Shared graphs keyed by class, call spec and child structure; a hit also needs equal attribute
# reads and a passing verification.
_Cache = dict[Any, list[SharedGraph]]


def _trace_module(name: str, module: nn.Module, call: Call, calls: dict[str, Call],
                  cache: _Cache, result: ModelTrace) -> None:
    cls = type(module)
    try:
        spec = make_call_spec(cls, call)
    except (TypeError, ValueError) as e:
        result.failures[name] = f"its forward signature does not accept the recorded call: {e}"
        return
    key = (cls, spec.key, _structure_key(module, name, calls))
    children = _recorded_children(module, name, calls)
    last_failure = None
    for shared in cache.get(key, ()):
        if all(_same_value(module.__dict__.get(a), v) for a, v in shared.reads.items()):
            bad = _verify(shared, module, spec, call, children)
            if bad is None:
                result.traces[name] = ModuleTrace(name, module, shared)
                return
            last_failure = bad
    general = _generalise_flags(name, module, spec, calls)
    for attempt in ([general, spec] if general is not spec else [spec]):
        try:
            shared = _new_graph(name, module, attempt, call, calls)
        except Exception as e:
            if attempt is not spec:
                continue
            result.failures[name] = f"{type(e).__name__}: {_first_line(e)}{_where(e)}"
            return
        result.graphs_traced += 1
        bad = _verify(shared, module, attempt, call, children)
        if bad is None and shared.train_graph is not None:
            bad = verify_train(shared.train_graph, module, attempt, call)
        if bad is None:
            break
        if attempt is spec:
            result.failures[name] = bad if last_failure is None else last_failure
            return
    cache.setdefault(key, []).append(shared)
    result.traces[name] = ModuleTrace(name, module, shared)


def _skeleton(graph: fx.Graph) -> list[tuple[str, str]]:
    return [(n.op, str(n.target)) for n in graph.nodes if n.op != "placeholder"]


def _generalise_flags(name: str, module: nn.Module, spec: CallSpec,
                      calls: dict[str, Call], numbers: bool = False) -> CallSpec:
    """Turn bool and None arguments that the module only hands on to its children (HF's
    `use_cache`, an attention mask that was None) into graph inputs, so one graph serves other
    values too. An argument qualifies when tracing it as an input gives the same ops as the
    specialised trace; one the forward branches on fails that test and stays specialised.
    `numbers` also tries ints and floats (a count handed on to a loss, re-specialising)."""
    kinds = (bool, int, float) if numbers else (bool,)
    candidates = [i for i, (k, c) in enumerate(zip(spec.kinds, spec.constants))
                  if k == "const" and (c is None or isinstance(c, kinds))]
    if not candidates:
        return spec
    was_training = module.training

    def same_ops(trial: CallSpec) -> bool:
        try:
            return _skeleton(_trace_once(module, name, trial, calls, _ReadLog())) == base
        except Exception:
            return False

    def accepted(general: CallSpec, group: list[int]) -> CallSpec:
        # Try the whole group at once and split it only where it fails: a module that hands
        # on all its flags costs one trace, not one per flag.
        trial = general
        for i in group:
            trial = trial.with_leaf(i, "passed", None)
        if same_ops(trial):
            return trial
        if len(group) == 1:
            return general
        half = len(group) // 2
        return accepted(accepted(general, group[:half]), group[half:])

    try:
        module.training = False
        graph = _trace_once(module, name, spec, calls, _ReadLog())
        base = _skeleton(graph)
        # Only a value some child call receives can be one that is handed on.
        handed_on = {repr(v) for n in graph.nodes if n.op == "call_module"
                     for v in (*n.args, *n.kwargs.values()) if v is None or isinstance(v, kinds)}
        candidates = [i for i in candidates if repr(spec.constants[i]) in handed_on]
        return accepted(spec, candidates) if candidates else spec
    except Exception:
        return spec
    finally:
        module.training = was_training


def _new_graph(name: str, module: nn.Module, spec: CallSpec, call: Call,
               calls: dict[str, Call], training: bool = False) -> SharedGraph:
    """Trace `module` for `spec` in eval mode (in train mode with `training`, for a module
    rewritten already), and, when its forward reads `self.training`, in the other mode too:
    a graph that differs by mode (`F.dropout(training=self.training)`, `if self.training:`) is
    kept as `train_graph`, so a rewritten module runs the right one in each mode. A forward
    that cannot be traced in train mode (a branch on `torch.rand`, LayerDrop in the module
    itself) is not traced at all."""
    reads = _ReadLog()
    was_training = module.training
    train_graph = None
    try:
        module.training = training
        graph = _trace_once(module, name, spec, calls, reads)
        if "training" in reads.names:
            module.training = not training
            try:
                other = _trace_once(module, name, spec, calls, _ReadLog())
            except Exception as e:
                mode = "eval" if training else "train"
                raise TracingError(f"in {mode} mode its forward cannot be traced: "
                                   f"{type(e).__name__}: {_first_line(e)}{_where(e)}") from e
            if other.python_code("self").src != graph.python_code("self").src:
                train_graph = graph if training else other
                graph = other if training else graph
    finally:
        module.training = was_training
    return SharedGraph(graph, spec, compile_graph(graph), _instance_reads(module, reads.names),
                       train_graph is not None, name, train_graph)


def trace_model(model: nn.Module, example: tuple | dict, *, share_graphs: bool = True
                ) -> ModelTrace:
    """Record `example` on `model` and trace every module it calls, top-down.

    Modules that cannot be traced (or whose graph does not reproduce the recorded call) are listed
    in `ModelTrace.failures` with the reason; their children are traced on their own calls.
    `share_graphs=False` traces every module afresh (for debugging and benchmarks).
    """
    calls = record_calls(model, example)
    result = ModelTrace(model, calls)
    cache: _Cache = {}
    with as_recorded(model):
        for name, module in model.named_modules():
            if is_atomic(module) or name not in calls or name in result.traces:
                continue
            if isinstance(module, TracedModule):  # rewritten earlier: its graph is the truth
                graph = module.graph
                train = module.__dict__.get("_train_graph")
                shared = SharedGraph(graph, module._call_spec, compile_graph(graph), {},
                                     train is not None, name, train)
                result.traces[name] = ModuleTrace(name, module, shared)
                continue
            if isinstance(module, fx.GraphModule):
                continue
            _trace_module(name, module, calls[name], calls, cache if share_graphs else {},
                          result)
    if not result.traces and result.failures:
        raise TracingError(f"no module of {type(model).__name__} could be traced: "
                           + "; ".join(f"{n or '<root>'}: {r}" for n, r in
                                       list(result.failures.items())[:3]))
    return result
