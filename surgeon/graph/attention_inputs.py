"""Which norm modules feed attention's queries or keys (q/k norms), found by running the model.

A q/k norm is told by where its output goes, not by its width: it reaches the query or key
operand of an attention product through parameter-free ops only (a view into heads, a transpose,
rotary embeddings, `repeat_kv`). A block's input norm reaches attention only through a
projection (a parameterised op), so it is not one, however narrow (the early stages of a
hierarchical vision transformer are narrower than its last). Qwen3's `q_norm` over the head dim
and OLMo2's over the whole projection are both found.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

_ATTENTION = {F.scaled_dot_product_attention}
_PRODUCTS = {torch.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.__matmul__,
             torch.Tensor.bmm, torch.einsum}


class _Follow(TorchFunctionMode):
    """Tags each tensor computed from a norm's output by parameter-free ops with that norm."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: dict[int, set[str]] = {}
        self.alive: list[torch.Tensor] = []  # tagged tensors kept alive: ids stay unique
        self.found: set[str] = set()
        # tensors computed from parameters only, held weakly: a view of a parameter holds its
        # base, and a lazily loaded model must be able to release its parameters mid-forward
        self.weights: dict[int, weakref.ref] = {}

    def is_weight(self, x: Any) -> bool:
        ref = self.weights.get(id(x))
        return isinstance(x, nn.Parameter) or ref is not None and ref() is x

    def tag(self, t: Any, names: set[str]) -> None:
        for x in tree_flatten(t)[0]:
            if isinstance(x, torch.Tensor) and names:
                self.tags.setdefault(id(x), set()).update(names)
                self.alive.append(x)

    def names(self, values: Iterable[Any]) -> set[str]:
        out: set[str] = set()
        for x in values:
            if isinstance(x, torch.Tensor):
                out |= self.tags.get(id(x), set())
        return out

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat = tree_flatten((args, kwargs))[0]
        tensors = [x for x in flat if isinstance(x, torch.Tensor)]
        if not any(id(x) in self.tags for x in tensors):
            if tensors and all(self.is_weight(x) for x in tensors):
                # a view, slice or cast of a weight (an expert's `w[i]`, a transposed
                # mixing matrix) is still a weight
                for x in tree_flatten(out)[0]:
                    if isinstance(x, torch.Tensor) and not isinstance(x, nn.Parameter):
                        self.weights[id(x)] = weakref.ref(x)
            return out
        if func in _ATTENTION:
            q = args[0] if args else kwargs.get("query")
            k = args[1] if len(args) > 1 else kwargs.get("key")
            self.found |= self.names((q, k))
            return out
        if func in _PRODUCTS:
            # eager attention's `q @ kᵀ`: both operands come from norms (a product of one
            # norm's output with a computed weight, as hyper-connections' mixing, is not one)
            operands = [x for x in flat if isinstance(x, torch.Tensor)]
            if len(operands) == 2 and all(id(x) in self.tags for x in operands):
                self.found |= self.names(operands)
            return out
        if any(self.is_weight(x) for x in tensors):
            return out  # a projection (or a gain): what comes out is no longer the norm's
        self.tag(out, self.names(flat))
        return out


def qk_norm_modules(model: nn.Module, names: Iterable[str], run: Callable[[], Any]) -> set[str]:
    """The norm modules among `names` whose output reaches an attention's query or key; `run`
    runs the model once on its example."""
    follow = _Follow()

    def tagger(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            follow.tag(output, {name})
        return hook

    handles = [model.get_submodule(n).register_forward_hook(tagger(n)) for n in names]
    try:
        with follow:
            run()
    finally:
        for h in handles:
            h.remove()
    return follow.found
