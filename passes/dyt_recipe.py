"""DyT's recipe for training from scratch (Zhu et al. 2025), as the `adyt` pass applies it.

Beyond swapping the norms: α0 by the norm's role and the model's width where a token embedding
feeds the trunk (`dyt_llama_alpha0`: attention-input norms more than FFN-input and final norms),
and each new ADyT's gain matched on the example so that it starts with the output scale the
untrained norm had (`match_output_scales`). Without that match a freshly initialised
transformer's stream (rms ≈ 0.02 under Hugging Face's init) comes out of `tanh(α·x)` at ≈ α·0.02
instead of 1, and the model trains far behind (examples/benchmarks/adyt_training.py measures it).

DyT's learnable scalar after the embedding (`InputScale`, √d at init for embeddings at std
1/√d) is available (`input_scale=rms` starts it at 1/rms of the trunk input on the example,
`input_scale=sqrt_d` at √d) but off by default: with matched gains it puts the trunk at rms 1,
where α(t) growing saturates the tanh, and it trained worse in the benchmark.

The recipe is for models that have not been trained: a trained model's norms already match its
stream's scale, and converting one is calibration's job. `untrained` tells them apart by the
norms' affine parameters: every one still exactly at its init (gains 1 or Gemma's 0, biases 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.files.lazy import keep_in_memory
from surgeon.graph.rewrite import Surgery
from surgeon.nn.adyt import ADyT
from surgeon.nn.hyper import expand_streams
from surgeon.nn.input_scale import InputScale


def untrained(norms: list[nn.Module]) -> bool:
    """Whether every norm's own parameters are still constant 0 or 1 (their init)."""
    for norm in norms:
        for p in norm.parameters(recurse=False):
            if p.is_meta or not p.is_floating_point():
                continue
            flat = p.detach().flatten()
            if not (bool((flat == 1).all()) or bool((flat == 0).all())):
                return False
    return True


def token_fed_trunks(surgery: Surgery) -> dict[str, tuple[float, int]]:
    """The first block of every trunk a token embedding feeds (the embedding runs before the
    block, at the block's width), each with its input's (rms, width) on the example. Blocks
    called more than once per forward (shared weights) are left out. One forward."""
    embeddings = _token_embeddings(surgery.model)
    if not embeddings:
        return {}
    firsts = [t.blocks[0] for t in surgery.inspection.trunks] + [
        name for name, mt in surgery.trace.traces.items()  # trunks hyper-connections hold
        if any(n.op == "call_function" and n.target is expand_streams for n in mt.graph.nodes)]
    firsts = [b for b in dict.fromkeys(firsts)
              if b in surgery.trace.traces and _called_once(surgery, b)]
    return _fed_inputs(surgery, embeddings, firsts) if firsts else {}


def scale_trunk_inputs(surgery: Surgery, fed: dict[str, tuple[float, int]], how: str
                       ) -> list[str]:
    """Put an `InputScale` on the input of each trunk's first block in `fed` (from
    `token_fed_trunks`) that has none yet; return the qualified names of the new modules. The
    scale goes into the block's own graph, ahead of everything that reads the input (ahead of
    hyper-connections' expand where there is one), so it works where the model's top-level
    forward is not traced. `how`: "rms" (start at 1/rms of the trunk input on the example) or
    "sqrt_d" (start at √d)."""
    new = []
    for block, (rms, width) in fed.items():
        if any(isinstance(m, InputScale) for m in surgery.module(block).children()):
            continue  # scaled by an earlier run of the pass
        graph = surgery.graph(block)
        expand = next((n for n in graph.nodes
                       if n.op == "call_function" and n.target is expand_streams), None)
        x = expand.args[0] if expand is not None else next(
            (n for n in graph.nodes if n.op == "placeholder"), None)
        if x is None or not x.users:
            continue
        readers = [expand] if expand is not None else list(x.users)
        value = 1.0 / max(rms, 1e-6) if how == "rms" else math.sqrt(width)
        target = surgery.add_module(block, "input_scale", InputScale(value).to(_device(surgery)))
        first = next(n for n in graph.nodes if n in readers)
        with graph.inserting_before(first):
            scaled = graph.call_module(target, (x,))
        for reader in readers:
            reader.replace_input_with(x, scaled)
        new.append(f"{block}.{target}")
    return new


def match_output_scales(surgery: Surgery, adyts: list[ADyT]) -> None:
    """Rescale each new ADyT's gain so that, on the example, `tanh(α·s·x)` times the gain's
    rescaling has rms 1, as the normalised `x̂` of the norm it replaced has: the converted model
    starts with the activations the untrained norm gave it, and its α(t) later moves from there.
    One forward, in call order, so each norm sees the input its rescaled predecessors make;
    a norm called more than once is matched at its first call. An adaptive ADyT also keeps the
    scale when its first gradient-norm update moves α(t) (`keep_scale_at_first_update`)."""
    pending = {id(m): m for m in adyts}

    def match(module: ADyT, args: tuple, kwargs: dict) -> None:
        if pending.pop(id(module), None) is None:
            return
        x = args[0] if args else kwargs.get("x")
        gate = args[1] if len(args) > 1 else kwargs.get("gate")
        if not isinstance(x, torch.Tensor) or x.is_meta:
            return
        if gate is not None and module.gate == "before":
            x = x * F.silu(gate)
        slope = module.alpha().float() * module.input_scale.float().reshape(())
        rms = float(torch.tanh(slope * x.float()).pow(2).mean().sqrt())
        if math.isfinite(rms) and rms > 1e-12:
            keep_in_memory(module.weight)  # a functional norm's own gain may be read from disk
            module.weight.mul_(1.0 / rms)

    handles = [m.register_forward_pre_hook(match, with_kwargs=True) for m in adyts]
    try:
        surgery.run_example()
    finally:
        for h in handles:
            h.remove()
    for m in adyts:
        m.keep_scale_at_first_update = True


def _called_once(surgery: Surgery, name: str) -> bool:
    """A block called more than once per forward (shared weights) would scale at each call."""
    calls = surgery.trace.calls.get(name)
    return calls is None or calls.times == 1


def _fed_inputs(surgery: Surgery, embeddings: list[nn.Module], blocks: list[str]
                ) -> dict[str, tuple[float, int]]:
    """The blocks whose first input, on the example, comes after a call of a token embedding
    whose output has the input's width: each with that input's (rms, width)."""
    seen: dict[str, tuple[float, int]] = {}
    widths: list[int] = []

    def embedded(module: nn.Module, args: tuple, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            widths.append(output.shape[-1])

    def recorder(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            if (name not in seen and isinstance(x, torch.Tensor) and x.is_floating_point()
                    and x.shape[-1] in widths):
                seen[name] = (float(x.float().pow(2).mean().sqrt()), x.shape[-1])
        return hook

    handles = [e.register_forward_hook(embedded) for e in embeddings]
    handles += [surgery.module(b).register_forward_pre_hook(recorder(b), with_kwargs=True)
                for b in blocks]
    try:
        surgery.run_example()
    finally:
        for h in handles:
            h.remove()
    return {b: seen[b] for b in blocks if b in seen}


def _token_embeddings(model: nn.Module) -> list[nn.Module]:
    """The model's token embedding modules: `get_input_embeddings()` (or else its nn.Embedding
    with the largest vocabulary) and every nn.Embedding sharing its weight (T5's per-stack
    copies of `shared`)."""
    token = None
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            token = get()
        except (NotImplementedError, AttributeError):
            token = None
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if not isinstance(token, nn.Embedding):
        token = max(embeddings, key=lambda m: m.num_embeddings, default=None)
    if token is None:
        return []
    return [m for m in embeddings if m is token or m.weight is token.weight]

def _device(surgery: Surgery) -> torch.device:
    p = next(iter(surgery.model.parameters()), None)
    return p.device if p is not None and not p.is_meta else torch.device("cpu")
