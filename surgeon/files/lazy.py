"""Run a model whose parameters stay on disk: each is read while a module that uses it runs.

`convert` builds the base model with its parameters on the `meta` device (`parameters_on_meta`:
buffers such as rotary tables are computed as usual) and wraps the passes in `LazyWeights`. A
module call then reads the parameters it needs from the memory-mapped safetensors checkpoint
and drops them when it returns, so a forward on the example holds about one block's weights,
never the model. The Parameter objects never change identity (their contents are swapped with
`torch.utils.swap_tensors`), so traced graphs that share them keep working. Pass code that reads
an original parameter outside a module call wraps the read in `materialized(module)`.

A parameter's values are a zero-copy view of the file's private memory map: the passes run the
model many times (tracing, checks, calibration), and mapping pages that are already in the page
cache costs far less than copying them. When the parameter is dropped, its pages are unmapped
(`madvise(MADV_DONTNEED)`), so they stop counting in the process's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import fx, nn
from torch.utils import swap_tensors

from surgeon.errors import SurgeonError
from surgeon.files.weights import Checkpoint, Stored

_log = logging.getLogger(__name__)
DEFAULT_UNIT_BYTES = 64 * 2**20  # a module whose weights fit in this is read in one go
TRIM_BYTES = 256 * 2**20  # trim the C heap after a forward that went through this much
_ACTIVE: list[LazyWeights] = []


class MismatchError(SurgeonError):
    """The checkpoint's tensors are not the ones the model built from its config has."""


class MissingTensorError(MismatchError):
    """The checkpoint has no tensor under a name the model's parameter has (it may store it
    under an older name, which transformers renames on load)."""


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules constructed inside get their parameters on the `meta` device (no memory, no
    random init); buffers stay where they are made, so computed tables stay right."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class LazyWeights:
    """Binds every meta parameter of `model` to a tensor of `checkpoint` (a tied parameter to the
    one key the checkpoint holds) and loads the checkpoint's persistent buffers. Use as a
    context manager; `key_of(param)` says where a parameter came from."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint, *, label: str,
                 unit_bytes: int = DEFAULT_UNIT_BYTES):
        self.checkpoint = checkpoint
        self.unit_bytes = max(unit_bytes, max((s.nbytes for s in checkpoint.values()), default=0))
        self.keys: dict[int, str] = {}  # id(param) → checkpoint key
        self.params: dict[int, nn.Parameter] = {}
        self.count: dict[int, int] = {}
        self.live = 0  # parameters holding values now
        self.released = 0  # bytes of weights released since the C heap was last trimmed
        self.held: set[int] = set()  # parameters still referenced elsewhere when released
        self._maps: dict[Any, mmap.mmap] = {}
        self._bind(model, label)
        self._handles: list[Any] = []

    def _bind(self, model: nn.Module, label: str) -> None:
        stored = self.checkpoint
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
            self.params[id(p)] = p
        for pid, group in names.items():
            p = self.params[pid]
            key = next((n for n in group if n in stored), None)
            if key is None:
                raise MissingTensorError(f"{label} has no tensor {group[0]!r}, which "
                                    f"{type(model).__name__} built from its config needs; the "
                                    "config does not match the weights")
            s = stored[key]
            if tuple(p.shape) != s.shape:
                raise MismatchError(f"{s.file}: {key!r} has shape {list(s.shape)} but the model "
                                    f"built from the config wants {list(p.shape)}; the config "
                                    "does not match the weights")
            if p.is_floating_point() and not s.dtype.is_floating_point:
                raise MismatchError(f"{s.file}: {key!r} is stored as {s.dtype} but is a "
                                    f"floating-point parameter of {type(model).__name__}; the "
                                    "checkpoint is damaged")
            if p.device.type != "meta":
                raise MismatchError(f"parameter {key!r} is not on the meta device; build the "
                                    "model inside parameters_on_meta()")
            swap_tensors(p, _placeholder(p, s.dtype))
            self.keys[pid] = key
        buffers = dict(model.named_buffers(remove_duplicate=False))
        ignored = [re.compile(p) for p in
                   getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]
        known = {k for group in names.values() for k in group} | set(buffers)
        for key in stored:
            if key in buffers:
                owner, _, attr = key.rpartition(".")
                module = model.get_submodule(owner)
                value = self.checkpoint.read(key)
                if tuple(value.shape) != tuple(buffers[key].shape):
                    raise MismatchError(f"{stored[key].file}: buffer {key!r} has shape "
                                        f"{list(value.shape)}, the model wants "
                                        f"{list(buffers[key].shape)}")
                module._buffers[attr] = value
            elif key not in known and not any(p.search(key) for p in ignored):
                raise MismatchError(f"{stored[key].file} holds {key!r}, which "
                                    f"{type(model).__name__} built from the config has no place "
                                    "for; the config does not match the weights")

    def key_of(self, tensor: torch.Tensor) -> str | None:
        """The checkpoint key a bound parameter is read from (None for any other tensor)."""
        return self.keys.get(id(tensor)) if self.params.get(id(tensor)) is tensor else None

    def keep_in_memory(self, param: nn.Parameter) -> None:
        """Stop reading `param` from disk: it keeps its values in memory from now on (a pass is
        about to change them in place), and is written from memory, not copied."""
        pid = id(param)
        if self.params.get(pid) is not param:
            return
        if self.count.get(pid, 0) == 0 and pid not in self.held:
            self._acquire([pid])
        values = param.detach().clone()  # off the file's map
        try:
            swap_tensors(param, nn.Parameter(values, requires_grad=param.requires_grad))
        except RuntimeError:  # a view of it is alive: swap what it holds instead
            param.data = values
        self.live -= 1
        stored = self.checkpoint[self.keys.pop(pid)]
        del self.params[pid]
        self.count.pop(pid, None)
        self.held.discard(pid)
        self._unmap(stored)

    def __enter__(self) -> LazyWeights:
        from torch.nn.modules.module import (
            register_module_forward_hook,
            register_module_forward_pre_hook,
        )

        self._handles = [register_module_forward_pre_hook(self._before),
                         register_module_forward_hook(self._after, always_call=True)]
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        _ACTIVE.remove(self)
        for pid in [p for p, n in self.count.items() if n > 0] + sorted(self.held):
            self.count[pid] = 1
            self._release([pid])
        if self.held:  # still referenced: left loaded, with the values the file holds
            _log.debug("%d parameters stayed loaded (views of them outlived the run)",
                       len(self.held))

    # -- module hooks ------------------------------------------------------------------------

    def _needed(self, module: nn.Module) -> list[int]:
        """The bound parameters a call of `module` reads: its whole subtree when that is small
        (one read for a small block), else its own parameters and those its graph reads."""
        subtree = {id(p) for p in module.parameters() if id(p) in self.keys}
        size = sum(self.checkpoint[self.keys[i]].nbytes for i in subtree)
        if size <= self.unit_bytes:
            return sorted(subtree)
        graph = module.graph if isinstance(module, fx.GraphModule) else None
        return self._graph_reads(module, graph)

    def _graph_reads(self, module: nn.Module, graph: fx.Graph | None) -> list[int]:
        """`module`'s own bound parameters and those `graph` (run on `module`) reads."""
        own = {id(p) for p in module.parameters(recurse=False) if id(p) in self.keys}
        for node in graph.nodes if graph is not None else ():
            if node.op == "get_attr":
                value = _resolve(module, node.target)
                if isinstance(value, nn.Parameter) and id(value) in self.keys:
                    own.add(id(value))
        return sorted(own)

    def _before(self, module: nn.Module, args: Any) -> None:
        needed = self._needed(module)
        module.__dict__.setdefault("_surgeon_lazy_stack", []).append(needed)
        self._acquire(needed)

    def _after(self, module: nn.Module, args: Any, output: Any) -> None:
        stack = module.__dict__.get("_surgeon_lazy_stack")
        if stack:
            self._release(stack.pop())
            if self.live == 0 and self.released > TRIM_BYTES:  # a forward is over
                _trim_heap()  # hand the memory it freed back
                self.released = 0

    def _acquire(self, pids: list[int]) -> None:
        for pid in pids:
            n = self.count.get(pid, 0)
            if n == 0 and pid in self.held:  # never released: still holds its values
                self.held.discard(pid)
            elif n == 0:
                p = self.params[pid]
                value = self._view(self.checkpoint[self.keys[pid]])
                swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))
                self.live += 1
            self.count[pid] = n + 1

    def _release(self, pids: list[int]) -> None:
        for pid in pids:
            if pid not in self.count:  # kept in memory meanwhile (`keep_in_memory`)
                continue
            n = self.count[pid] - 1
            self.count[pid] = n
            if n == 0:
                p = self.params[pid]
                try:
                    swap_tensors(p, _placeholder(p, p.dtype))
                except RuntimeError:  # a view of it is still alive (a recorded call's argument,
                    self.held.add(pid)  # MoE experts' `w1[i]`): it stays loaded until exit
                    continue
                self.held.discard(pid)
                self.live -= 1
                self.released += self.checkpoint[self.keys[pid]].nbytes
                self._unmap(self.checkpoint[self.keys[pid]])

    def _view(self, stored: Stored) -> torch.Tensor:
        """`stored` as a tensor over the file's private map (a copy where it is misaligned)."""
        if stored.start % stored.dtype.itemsize or stored.nbytes == 0:
            return self.checkpoint.read(stored.key)
        pages = self._maps.get(stored.file)
        if pages is None:
            with open(stored.file, "rb") as f:
                pages = self._maps[stored.file] = mmap.mmap(f.fileno(), 0,
                                                            access=mmap.ACCESS_COPY)
        flat = torch.frombuffer(pages, dtype=stored.dtype, offset=stored.start,
                                count=stored.nbytes // stored.dtype.itemsize)
        return flat.view(stored.shape)

    def _unmap(self, stored: Stored) -> None:
        """Drop `stored`'s pages from this process (the page cache keeps them)."""
        pages = self._maps.get(stored.file)
        if pages is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        begin = stored.start - stored.start % mmap.PAGESIZE
        end = min(len(pages), -(-(stored.start + stored.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        pages.madvise(mmap.MADV_DONTNEED, begin, end - begin)


def _trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc keeps it in its arenas, and the
    many forwards of tracing leave a few hundred MB there); a no-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        _LIBC = ctypes.CDLL(name) if name else False
    trim = getattr(_LIBC, "malloc_trim", None) if _LIBC else None
    if trim is not None:
        trim(0)


_LIBC: Any = None


def _placeholder(p: nn.Parameter, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(p.shape, dtype=dtype, device="meta"),
                        requires_grad=p.requires_grad)


def _resolve(module: nn.Module, target: str) -> Any:
    value: Any = module
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def keep_in_memory(param: nn.Parameter) -> None:
    """Where an active `LazyWeights` reads `param` from disk, load it for good (see
    `LazyWeights.keep_in_memory`); elsewhere nothing. Call it before changing `param` in place."""
    if _ACTIVE:
        _ACTIVE[-1].keep_in_memory(param)


@contextmanager
def materialized(module: nn.Module, graph: fx.Graph | None = None) -> Iterator[nn.Module]:
    """Inside, every parameter of `module` holds its real values, also where the parameters are
    being read from disk by an active `LazyWeights` (elsewhere this does nothing). With `graph`,
    a graph traced from `module` that is about to run on it directly (not through
    `module(...)`, whose call would read them), only what that graph reads: the module's own
    parameters and its `get_attr` targets; its children read theirs when called."""
    if not _ACTIVE:
        yield module
        return
    lazy = _ACTIVE[-1]
    if graph is None:
        pids = sorted({id(p) for p in module.parameters() if id(p) in lazy.keys})
    else:
        pids = lazy._graph_reads(module, graph)
    lazy._acquire(pids)
    try:
        yield module
    finally:
        lazy._release(pids)
