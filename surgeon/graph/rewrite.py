"""The workbench passes edit a model on: per-module graph copies, new submodules, installation.

A pass asks for `graph(name)`, a private copy of the graph traced for module `name` (graphs are
shared between modules while tracing), edits it with torch.fx's API, and adds the modules it
calls with `add_module`. `commit()` turns every edited graph into a `TracedModule` over the
original module (same parameter objects and names, same call signature) and puts it in the
original's place in its parent. A module replaced whole (a norm) goes in with `replace`.
"""

from __future__ import annotations

import operator
import random
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from surgeon.errors import ModuleError, SpecializationError
from surgeon.graph.find import caller_inputs, inspect_trace
from surgeon.graph.report import Inspection
from surgeon.graph.tracing import (
    ModelTrace,
    TracedModule,
    as_recorded,
    module_source,
    reapply_edits,
    run_example,
    trace_model,
    watch_calls,
)
from surgeon.graph.undo import snapshot


def copy_graph(graph: fx.Graph) -> fx.Graph:
    """A deep copy of `graph` (nodes, names and output) that can be edited on its own."""
    new = fx.Graph()
    values: dict[fx.Node, fx.Node] = {}
    out = new.graph_copy(graph, values)
    new.output(out)
    return new


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding `name` and the attribute name under which it holds it."""
    owner, _, attr = name.rpartition(".")
    return (model.get_submodule(owner) if owner else model), attr


_CLASSES: dict[type, type] = {}


def checkpointing_class(original: nn.Module) -> type[TracedModule]:
    """The class a rewritten module gets: a subclass of `TracedModule` and of the original
    class, so `isinstance` checks (HF's gradient checkpointing switch, its output recorders),
    class attributes, properties and methods that callers read keep working (TracedModule's
    forward comes first, and does HF's checkpointing itself). Plain `TracedModule` where the
    original class cannot be a base (a metaclass or layout conflict)."""
    cls = type(original)
    if isinstance(original, TracedModule):
        return type(original).__mro__[1]  # the class under GraphModule's per-instance one
    if cls not in _CLASSES:
        # The shim keeps the original's __init__ out of GraphModule's.
        try:
            shim = type(cls.__name__, (cls,), {"__init__": _module_init,
                                               "__module__": cls.__module__})
            _CLASSES[cls] = type(f"Traced{cls.__name__}", (TracedModule, shim), {})
        except TypeError:
            _CLASSES[cls] = TracedModule
    return _CLASSES[cls]


def _module_init(self: nn.Module, *args: object, **kwargs: object) -> None:
    nn.Module.__init__(self)


@dataclass
class Surgery:
    """One run of passes over a model: the model, its example, and what has been edited."""

    model: nn.Module
    example: tuple | dict
    trace: ModelTrace = field(init=False)
    inspection: Inspection = field(init=False)
    graphs: dict[str, fx.Graph] = field(default_factory=dict)
    # the modules committed or replaced so far, and the one a pass last worked on (for errors)
    changed: list[str] = field(default_factory=list)
    touching: str | None = None
    # inputs passes calibrate on, each like `example` (None: the example alone)
    calibration: list[tuple | dict] | None = None

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Trace and inspect the model as it is now (after earlier passes committed)."""
        self.trace = trace_model(self.model, self.example)
        self.inspection = inspect_trace(self.trace)

    def run_example(self) -> Any:
        """The model's output on the example, in eval mode without gradients (mode restored),
        computed as tracing records it (torch's fused attention fast path off)."""
        with as_recorded(self.model), torch.no_grad():
            return run_example(self.model, self.example)

    def run_calibration(self) -> list[Any]:
        """The model's outputs on each calibration batch (the example where none were given),
        run as `run_example` runs the example; hooks a pass installed see every batch."""
        with as_recorded(self.model), torch.no_grad():
            return [run_example(self.model, batch) for batch in self.calibration or
                    [self.example]]

    def skipped_in_training(self, names: list[str]) -> list[str]:
        """Those of modules `names` that the model's train-mode forward may not call although
        eval calls them: LayerDrop-style random layer skipping (`if self.training and
        torch.rand([]) < p: continue`). One train-mode run on the example with `torch.rand`
        and `random.random` giving 0 (so every such branch skips), no gradients, buffers and
        modes put back afterwards."""
        wanted = {id(self.module(n)): n for n in names}
        seen: set[str] = set()
        saved = snapshot(self.model)
        rand, rnd = torch.rand, random.random
        try:
            torch.rand = lambda *a, **k: torch.zeros(*a, **k)  # type: ignore[assignment]
            random.random = lambda: 0.0  # type: ignore[assignment]
            self.model.train()
            with watch_calls([self.module(n) for n in names],
                             lambda m, a, k: seen.add(wanted[id(m)])), \
                    torch.no_grad(), torch.random.fork_rng(devices=[]):
                run_example(self.model, self.example)
        except Exception:
            return []  # the forward does not run this way: nothing learnt
        finally:
            torch.rand, random.random = rand, rnd  # type: ignore[assignment]
            saved.restore()
        return [n for n in wanted.values() if n not in seen]

    def module(self, name: str) -> nn.Module:
        self.touching = name  # what an error in the pass is about
        return self.model.get_submodule(name) if name else self.model

    def graph(self, name: str) -> fx.Graph:
        """The editable graph of module `name` (a private copy, made on first use)."""
        self.touching = name
        if name not in self.graphs:
            self.graphs[name] = copy_graph(self.trace.traces[name].graph)
        return self.graphs[name]

    def add_module(self, owner: str, base: str, module: nn.Module) -> str:
        """Attach `module` to module `owner` under a free attribute name starting with `base`;
        returns the attribute name (the `call_module` target in owner's graph)."""
        self.touching = owner
        holder = self.module(owner)
        attr, k = base, 1
        while hasattr(holder, attr):
            attr, k = f"{base}_{k}", k + 1
        holder.add_module(attr, module)
        return attr

    def inline(self, child: str) -> bool:
        """Copy the graph of module `child` into its caller's graph in place of the call, so
        that values of both meet in one graph (BERT's residual adds take their skip from the
        caller). The child's submodules stay where they are, called by their dotted paths.
        Returns False, changing nothing, where that cannot be done."""
        found = self.caller(child)
        child_trace = self.trace.traces.get(child)
        if found is None or child_trace is None:
            return False
        caller, rel = found
        sub = self.graphs.get(child, child_trace.graph)
        output = next(n for n in sub.nodes if n.op == "output").args[0]
        graph = self.graph(caller)
        call = next((n for n in graph.nodes if n.op == "call_module" and n.target == rel), None)
        values = caller_inputs(child_trace, call) if call is not None else None
        placeholders = [n for n in sub.nodes if n.op == "placeholder"]
        if values is None or len(values) != len(placeholders):
            return False
        if not isinstance(output, fx.Node) and not _indexed_only(call, output):
            return False  # a structured output read other than by constant index
        env: dict[fx.Node, Any] = dict(zip(placeholders, values))
        with graph.inserting_before(call):
            for n in sub.nodes:
                if n.op in ("placeholder", "output"):
                    continue
                env[n] = graph.node_copy(n, lambda x: env[x])
                if n.op in ("call_module", "get_attr"):
                    env[n].target = f"{rel}.{n.target}"
        if isinstance(output, fx.Node):
            call.replace_all_uses_with(env[output])
        else:  # `out, weights = self.attn(...)`: each getitem reads the child's own value
            for item in list(call.users):
                value = fx.node.map_arg(output[item.args[1]], lambda x: env[x])
                for user in list(item.users):
                    user.args = fx.node.map_arg(user.args, lambda x: value if x is item else x)
                    user.kwargs = fx.node.map_arg(user.kwargs,
                                                  lambda x: value if x is item else x)
                graph.erase_node(item)
        graph.erase_node(call)
        self.graphs.pop(child, None)
        return True

    def caller(self, name: str) -> tuple[str, str] | None:
        """The nearest traced ancestor whose graph calls module `name`, and the call's target."""
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            owner, rel = ".".join(parts[:cut]), ".".join(parts[cut:])
            if owner in self.trace.traces:
                graph = self.graphs.get(owner, self.trace.traces[owner].graph)
                if any(n.op == "call_module" and n.target == rel for n in graph.nodes):
                    return owner, rel
                return None
        return None

    def replace(self, name: str, new: nn.Module) -> None:
        """Put `new` where module `name` is."""
        self.touching = name
        self.changed.append(name)
        parent, attr = parent_of(self.model, name)
        setattr(parent, attr, new)

    def commit(self) -> list[str]:
        """Install every edited graph as a TracedModule in its module's place."""
        done = []
        for name, graph in self.graphs.items():
            self.touching = name
            graph.lint()
            original = self.module(name)
            spec = self.trace.traces[name].shared.spec
            cls = checkpointing_class(original)
            try:
                replacement = cls(original, graph, spec, name)
            except (AttributeError, TypeError):
                if cls is TracedModule:  # the original class's own descriptors got in the way
                    raise
                replacement = TracedModule(original, graph, spec, name)
            train = self.trace.traces[name].shared.train_graph
            if train is not None:  # the forward takes another path in train mode
                try:
                    replacement.set_train_graph(
                        reapply_edits(self.trace.traces[name].graph, graph, train))
                except SpecializationError as e:
                    raise ModuleError(
                        name, type(original).__name__,
                        f"its forward takes another path in train mode, where the edits "
                        f"cannot be carried over ({e})") from None
            # what the module needs to trace itself again for another call (see TracedModule)
            replacement._surgeon_source = module_source(original, self.trace.traces[name].graph)
            replacement.train(original.training)
            for attr in ("gradient_checkpointing", "_gradient_checkpointing_func"):
                if attr in original.__dict__:
                    setattr(replacement, attr, original.__dict__[attr])
            if name:
                self.replace(name, replacement)
            done.append(name)
        self.graphs.clear()
        return done


def node_named(graph: fx.Graph, name: str) -> fx.Node:
    for node in graph.nodes:
        if node.name == name:
            return node
    raise KeyError(name)


def _indexed_only(call: fx.Node, output: Any) -> bool:
    """Whether every use of `call` is `call[i]` for a constant i within the tuple `output`."""
    return isinstance(output, (tuple, list)) and all(
        u.op == "call_function" and u.target is operator.getitem and len(u.args) == 2
        and isinstance(u.args[1], int) and 0 <= u.args[1] < len(output) for u in call.users)
