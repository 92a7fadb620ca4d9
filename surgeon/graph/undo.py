"""Undo for `surgeon.apply`: a model's structure as it was, restored after any failure.

A pass changes a model by adding and replacing submodules (in their parents' `_modules`),
setting attributes and running the example (buffers a forward updates). `snapshot` records,
for every module, its class, its instance dictionary and the contents of the containers in it
(children, parameters, buffers, hooks), plus a copy of every buffer; `Snapshot.restore` puts
all of it back in place, so the same module and parameter objects are where they were.
Parameters are not copied (passes never write to the original ones); a parameter whose data
changed anyway is reported by `Snapshot.changed_parameters`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class _ModuleState:
    module: nn.Module
    cls: type
    entries: dict[str, Any]  # the instance dictionary: name -> the same object
    contents: dict[str, Any]  # for containers in it (dict, set, list): a shallow copy


@dataclass
class Snapshot:
    """What `snapshot` saw; `restore()` puts the model back as it was."""

    modules: list[_ModuleState] = field(default_factory=list)
    buffers: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    parameters: list[tuple[nn.Parameter, int, bool]] = field(default_factory=list)

    def restore(self) -> None:
        """Every module's class, attributes, children, parameters, buffers and hooks as they
        were; buffers a forward wrote to get their saved values back."""
        for state in self.modules:
            m = state.module
            if type(m) is not state.cls:
                m.__class__ = state.cls
            d = m.__dict__
            d.clear()
            d.update(state.entries)
            for key, content in state.contents.items():
                held = d[key]
                if isinstance(held, dict):
                    held.clear()
                    held.update(content)
                elif isinstance(held, set):
                    held.clear()
                    held.update(content)
                else:
                    held[:] = content
        with torch.no_grad():
            for buf, saved, _ in self.buffers:
                # always: kernels such as batch_norm's write running stats without a version
                if buf.shape == saved.shape and buf.dtype == saved.dtype:
                    buf.copy_(saved)
                else:
                    buf.data = saved
        for p, _, requires_grad in self.parameters:
            p.requires_grad_(requires_grad)

    def changed_parameters(self) -> int:
        """How many original parameters were written to since the snapshot."""
        return sum(p._version != v for p, v, _ in self.parameters)


def snapshot(model: nn.Module) -> Snapshot:
    """Record `model` so that `restore()` can undo whatever happens to it next."""
    out = Snapshot()
    seen: set[int] = set()
    for m in model.modules():
        entries = dict(m.__dict__)
        contents = {k: (dict(v) if isinstance(v, dict) else set(v) if isinstance(v, set)
                        else list(v))
                    for k, v in entries.items() if type(v) in (dict, set, list)
                    or isinstance(v, dict)}
        out.modules.append(_ModuleState(m, type(m), entries, contents))
        for b in m._buffers.values():
            if b is not None and id(b) not in seen and b.device.type != "meta":
                seen.add(id(b))
                out.buffers.append((b, b.detach().clone(), b._version))
        for p in m._parameters.values():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out.parameters.append((p, p._version, p.requires_grad))
    return out
