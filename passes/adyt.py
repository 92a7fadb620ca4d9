"""LayerNorm / RMSNorm modules → `ADyT` (or plain DyT), weights carried over.

The norm's effective gain and bias are read by probing it with a zero-mean, unit-variance input
and its negation, so any parametrisation (Gemma's `x·(1 + w)`, a missing bias) comes out right;
where the probe agrees with the stored `weight`, the stored tensor is copied exactly.
Norms outside the residual trunk's blocks are "final" norms; norms whose output feeds attention's
queries or keys through parameter-free ops (found by following the example's tensors, not by
width: a hierarchical model's early stages are narrow too) are "qk" norms; both are selectable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from passes.adyt_calibration import fit_adyt_
from passes.dyt_recipe import match_output_scales, scale_trunk_inputs, token_fed_trunks, untrained
from surgeon.files.lazy import materialized
from surgeon.graph.attention_inputs import qk_norm_modules
from surgeon.graph.find import norm_input, strip_casts
from surgeon.graph.report import Norm
from surgeon.graph.rewrite import Surgery, node_named
from surgeon.nn.adyt import ADyT as ADyTModule
from surgeon.nn.adyt import dyt_llama_alpha0
from surgeon.nn.aion import AionResidual
from surgeon.nn.hyper import StreamMixer
from surgeon.nn.input_scale import InputScale
from surgeon.recipe import PassConfig, PassError, bounded, register


def effective_affine(norm: nn.Module, d: int, eps: float | None,
                     layout: tuple[int, ...] | None = None) -> tuple[torch.Tensor, ...]:
    """(gain, bias) of a norm over d features: `norm(x) = gain·x̂ + bias` for normalised x̂.
    `layout` is the probe's shape for a channels-first norm (`(1, d, 1, 1)`); else `(1, d)`."""
    ref = next(iter(norm.parameters()), torch.empty(0))
    probe = torch.tensor([(-1.0) ** i for i in range(d)], dtype=torch.float64)
    probe = (probe - probe.mean()) / probe.std(unbiased=False)  # mean 0, variance 1
    dtype = ref.dtype if ref.is_floating_point() else torch.float32
    x = probe.to(dtype=dtype, device=ref.device).view(layout or (1, d))  # (1, d) or (1, d, 1, 1)
    with torch.no_grad():
        up, down = (norm(v).reshape(d).double().cpu() for v in (x, -x))
    gain = (up - down) / (2 * probe) * math.sqrt(1.0 + (eps or 0.0))
    return gain, (up + down) / 2


@register
@dataclass(frozen=True)
class ADyT(PassConfig):
    """Norm modules in scope → ADyT (`adaptive=True`) or DyT (`adaptive=False`)."""

    name: ClassVar[str] = "adyt"
    version: ClassVar[int] = 1
    rewrites: ClassVar[str] = "LayerNorm/RMSNorm modules and functional norms"

    adaptive: bool = True
    alpha0: float = bounded(0.5, 0, 100, open_low=True)
    llama_init: bool = False  # DyT's per-role α0 (attention / ffn / final), shrinking with width
    final_norms: bool = True
    qk_norms: bool = False
    calibrate: bool = False  # fit each ADyT to its norm on the calibration inputs (or example)
    # DyT's recipe for training from scratch (passes/dyt_recipe.py): per-role α0 in a token
    # model, gains matched to the untrained norms' output scale. "auto": on for an untrained
    # model. `input_scale`: DyT's learnable scale on the trunk input (off, or its start: 1/rms
    # of the trunk input on the example, or √d).
    recipe: Literal["auto", "dyt", "none"] = "auto"
    input_scale: Literal["none", "rms", "sqrt_d"] = "none"

    def resolved(self, surgery: Surgery) -> ADyT:
        """`recipe=auto` decided: "dyt" when every norm in scope is still at its init (and
        the pass is not calibrating)."""
        if self.recipe != "auto":
            return self
        if self.calibrate:  # calibration keeps the function; the recipe's trunk scale would not
            return dataclasses.replace(self, recipe="none")
        if any(isinstance(m, InputScale) or getattr(m, "keep_scale_at_first_update", False)
               for m in surgery.model.modules()):
            return dataclasses.replace(self, recipe="dyt")  # applied before: the same again
        # a functional norm's gain and bias are parameters of the module computing it
        norms = [surgery.module(n.module) for n in surgery.inspection.norms
                 if self.selects(n.module)]
        with contextlib.ExitStack() as stack:  # weights streamed from disk: read them
            for norm in norms:
                stack.enter_context(materialized(norm))
            fresh = bool(norms) and untrained(norms)
        return dataclasses.replace(self, recipe="dyt" if fresh else "none")

    def run(self, surgery: Surgery) -> list[str]:
        if self.recipe == "auto":
            return self.resolved(surgery).run(surgery)
        recipe = self.recipe == "dyt"
        fed = token_fed_trunks(surgery) if recipe else {}
        scaled = scale_trunk_inputs(surgery, fed, self.input_scale) if (
            fed and self.input_scale != "none") else []
        # DyT's LLaMA α0 by role where a token embedding feeds the trunk; its default otherwise
        by_role = self.llama_init or bool(fed)
        norms = [n for n in surgery.inspection.norms if n.node is None and self.selects(n.module)]
        blocks = _blocks(surgery)
        qk = qk_norm_modules(surgery.model, [n.module for n in norms], surgery.run_example)
        roles = _roles(surgery, blocks, [n.module for n in norms])
        seen = _record_inputs(surgery, [n.module for n in norms]) if self.calibrate else {}
        todo = []
        for norm in norms:
            inside = any(norm.module.startswith(b + ".") for b in blocks)
            if norm.module in qk and not self.qk_norms or not inside and not self.final_norms:
                continue
            if not isinstance(surgery.module(norm.module), ADyTModule):
                todo.append((norm, inside))
        spans = self._functional_spans(surgery, blocks)  # each check refuses up front
        layouts = {norm.module: _layout(surgery, norm) for norm, _ in todo}
        gates = {norm.module: _gate_form(surgery, norm) for norm, _ in todo}
        fused = _check_fused_paths(surgery, [norm.module for norm, _ in todo])
        new = []
        for norm, inside in todo:
            module = surgery.module(norm.module)
            role = roles.get(norm.module, "ffn" if inside else "final")
            norm = _with_width(surgery, norm, layouts[norm.module])
            d = norm.shape[-1] if norm.shape else None
            alpha0 = dyt_llama_alpha0(role, d or 0) if by_role else self.alpha0
            adyt = self._convert(module, norm, alpha0, layouts[norm.module])
            adyt.gate = gates[norm.module]
            if norm.module in fused:  # the parent reads these itself: kept, and guarded
                for read in fused[norm.module]:
                    value = getattr(module, read, None)
                    if not hasattr(adyt, read) and isinstance(value, (int, float, bool, str)):
                        setattr(adyt, read, value)
                adyt.register_forward_pre_hook(_CalledMark())
            if norm.module in seen:
                fit_adyt_(adyt, seen[norm.module])
            surgery.replace(norm.module, adyt)
            new.append(norm.module)
            parent, _, attr = norm.module.rpartition(".")
            if norm.module in fused:
                _guard_parent(surgery.module(parent), attr)
            if isinstance(surgery.module(parent), _FAST_PATH) and parent in surgery.trace.traces:
                surgery.graph(parent)  # reinstall traced: the fast path reads norm weights itself
        new += self._functional(surgery, spans, by_role)
        return new + scaled

    def after_commit(self, surgery: Surgery, new: list[str]) -> None:
        """The recipe's gain match, on the rewritten model (its trunk scale in place)."""
        if self.recipe == "dyt":
            adyts = [surgery.model.get_submodule(n) for n in new]
            match_output_scales(surgery, [m for m in adyts if isinstance(m, ADyTModule)])

    def _functional_spans(self, surgery: Surgery, blocks: set[str]) -> list[tuple]:
        """The functional norms in scope, each with its sub-graph (see `_span`, which refuses
        one it cannot convert)."""
        norms = [n for n in surgery.inspection.norms if n.node is not None
                 and self.selects(n.module) and n.module in surgery.trace.traces]
        spans = []
        for norm in norms:
            inside = any(norm.module == b or norm.module.startswith(b + ".") for b in blocks)
            if inside or self.final_norms:
                spans.append((norm, inside, _span(surgery, norm)))
        return spans

    def _functional(self, surgery: Surgery, spans: list[tuple], by_role: bool) -> list[str]:
        """Norms computed in a larger module's forward (`F.layer_norm`, an inline
        `x·rsqrt(mean(x²) + eps)·w`): the norm's sub-graph, gain and bias included, becomes a
        call of an ADyT module that holds the norm's own gain and bias parameters (shared, so
        their names stay)."""
        new = []
        for norm, inside, (x, chain, weight, bias, d) in spans:
            graph = surgery.graph(norm.module)
            role = "ffn" if inside else "final"
            alpha0 = dyt_llama_alpha0(role, d) if by_role else self.alpha0
            adyt = ADyTModule(d, alpha0=alpha0, bias=bias is not None, adaptive=self.adaptive)
            ref = weight if weight is not None else bias
            if ref is not None:
                adyt.to(device=ref.device, dtype=ref.dtype)
                adyt.alpha0.data = adyt.alpha0.data.float()
                adyt.grad_norm_ema.data = adyt.grad_norm_ema.data.float()
            if weight is not None:
                adyt.weight = weight  # the norm's own parameters: shared, not copied
            if bias is not None:
                adyt.bias = bias
            target = surgery.add_module(norm.module, "adyt", adyt)
            with graph.inserting_before(chain[0]):
                call = graph.call_module(target, (x,))
            for n in chain:  # every reader of the norm (AION's x_norm too) reads the ADyT
                for user in [u for u in n.users if u not in chain]:
                    user.replace_input_with(n, call)
            _erase_dead(graph, chain[-1], x)
            new.append(f"{norm.module}.{target}")
        return new

    def _convert(self, module: nn.Module, norm: Norm, alpha0: float,
                 layout: tuple[int, ...] | None) -> ADyTModule:
        with materialized(module):  # the norm's weights may be on disk (surgeon convert)
            adyt = ADyTModule.from_norm(module, alpha0=alpha0, adaptive=self.adaptive,
                                        channels_first=layout is not None)
            if norm.shape is None or len(norm.shape) != 1:
                return adyt
            if adyt.normalized_shape != norm.shape:
                # the norm's `weight` is no gain over its input (FalconMamba's parameter-free
                # dt/B/C norms hold a dummy buffer of the inner width): the probe below reads
                # the gain and bias it really applies, over the width it is called on
                adyt = ADyTModule(norm.shape, alpha0=alpha0, bias=adyt.bias is not None,
                                  adaptive=self.adaptive, channels_first=layout is not None,
                                  gate=adyt.gate)
            gain, bias = effective_affine(module, norm.shape[0], norm.eps, layout)
        with torch.no_grad():
            if not torch.allclose(adyt.weight.double(), gain, rtol=1e-3, atol=1e-5):
                adyt.weight.copy_(gain)
            if adyt.bias is not None and not torch.allclose(adyt.bias.double(), bias,
                                                            atol=1e-5):
                adyt.bias.copy_(bias)
        return adyt


def _parent_reads(surgery: Surgery, name: str) -> list[str]:
    """The attributes of norm `name` that its parent's forward reads itself (`self.norm.weight`,
    `self.norm.variance_epsilon`): a sign of a fused path that hands the norm's parameters to a
    kernel computing the norm itself (Mamba2's mixer in training, FalconMamba's dt/B/C norms)."""
    parent_name, _, attr = name.rpartition(".")
    try:
        source = inspect.getsource(type(surgery.module(parent_name)).forward)
    except (OSError, TypeError):
        return []
    return sorted(set(re.findall(rf"self\.{re.escape(attr)}\.(\w+)", source)))


def _check_fused_paths(surgery: Surgery, names: list[str]) -> dict[str, list[str]]:
    """Norm → the attributes its parent reads of it, for the norms whose parent has a fused
    path; refuses those the fused path is taken for on the example.

    Such a norm is converted only where its parent calls it as a module on the example in eval
    *and* in train mode (the fused path is not reachable here: no kernel is installed, the
    reference fallback runs the module path). The converted parent is then guarded: an
    `ADyT` stand-in gets the plain attributes the parent reads (`variance_epsilon`), and a
    forward of the parent that does not call its ADyT (a kernel installed or kernelised later,
    which would compute the old norm and bypass the ADyT) raises `FusedPathError` naming the
    module and the `exclude=` that skips it, rather than returning a silently different
    output."""
    reads = {n: r for n in names if (r := _parent_reads(surgery, n))}
    if not reads:
        return {}
    probe = ADyTModule(1)
    for name, attrs in reads.items():
        for read in attrs:
            value = getattr(surgery.module(name), read, None)
            if not hasattr(probe, read) and not isinstance(value, (int, float, bool, str)):
                raise PassError(f"adyt: {name.rpartition('.')[0] or 'the model'} reads "
                                f"{name}.{read} itself, which an ADyT cannot stand in for; "
                                f"skip it with exclude={name!r}")
    skipped = set(surgery.skipped_in_training(list(reads)))
    missing = [n for n in reads if n not in surgery.trace.calls]
    for name in [*missing, *[n for n in reads if n in skipped]]:
        parent = name.rpartition(".")[0]
        raise PassError(f"adyt: {parent or 'the model'} reads {name}.{reads[name][0]} itself "
                        f"and computes that norm without calling it (a fused kernel path, "
                        f"which would bypass an ADyT); skip it with exclude={name!r}")
    return reads


class FusedPathError(RuntimeError):
    """A parent whose forward reads its norm's attributes ran without calling its ADyT: a fused
    kernel computed the original norm instead (see `_check_fused_paths`)."""


class _CalledMark:
    """ADyT forward pre-hook: records that the ADyT ran (a plain attribute, no tensor op)."""

    def __call__(self, module: nn.Module, args: tuple) -> None:
        module.__dict__["_surgeon_called"] = True


@dataclass(frozen=True)
class _BypassGuard:
    """Parent forward pre-hook (`before=True`) and hook: the parent's ADyTs at `attrs` must
    run during its forward. Looks them up by name, so a deep copy guards its own children."""

    attrs: tuple[str, ...]
    before: bool

    def __call__(self, module: nn.Module, args: tuple, output: object = None) -> None:
        for attr in self.attrs:
            norm = getattr(module, attr, None)
            if not isinstance(norm, ADyTModule):
                continue
            if self.before:  # an instance `forward` is no run of the class's code: tracing's
                # replay of a recorded output, which calls no child; nothing to check then
                norm.__dict__["_surgeon_called"] = None if "forward" in module.__dict__ else False
            elif norm.__dict__.get("_surgeon_called") is False:
                raise FusedPathError(
                    f"{type(module).__name__}.{attr}: the forward computed this norm itself (a "
                    f"fused kernel path, installed or kernelised after adyt converted it) and "
                    f"bypassed its ADyT; convert again with adyt's exclude= naming it")


def _guard_parent(parent: nn.Module, attr: str) -> None:
    """Install (once per parent) the hooks of `_BypassGuard` for the ADyT at `attr`."""
    guards = [h for h in parent._forward_pre_hooks.values() if isinstance(h, _BypassGuard)]
    attrs = tuple(sorted({attr, *(a for g in guards for a in g.attrs)}))
    for hooks in (parent._forward_pre_hooks, parent._forward_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, _BypassGuard)]:
            del hooks[key]
    parent.register_forward_pre_hook(_BypassGuard(attrs, True))
    parent.register_forward_hook(_BypassGuard(attrs, False))


def _gate_form(surgery: Surgery, norm: Norm) -> str | None:
    """For a norm called with a second tensor (a gate, Mamba2's MambaRMSNormGated), where the
    gate multiplies: "before" (`norm(x·silu(g))`) or "after" (`norm(x)·silu(g)`), told by calling
    the norm on its recorded inputs; refuses any other gate. None for an ungated norm."""
    call = surgery.trace.calls.get(norm.module)
    tensors = [a for a in (call.args if call else ()) if isinstance(a, torch.Tensor)]
    tensors += [v for v in (call.kwargs.values() if call else ()) if isinstance(v, torch.Tensor)]
    if len(tensors) < 2:
        return None
    x, g = tensors[0], tensors[1]
    module = surgery.module(norm.module)
    with torch.no_grad(), materialized(module):
        try:
            out = module(x, g)
            for form, want in (("before", lambda: module(x * F.silu(g))),
                               ("after", lambda: module(x) * F.silu(g))):
                if torch.allclose(out, want(), rtol=1e-4, atol=1e-5):
                    return form
        except (RuntimeError, TypeError, ValueError):  # not a (tensor, gate) -> tensor norm
            pass
    raise PassError(f"adyt: {norm.module} takes a second tensor that is not a gate x·silu(gate) "
                    f"before or after the norm; skip it with exclude={norm.module!r}")


def _with_width(surgery: Surgery, norm: Norm, layout: tuple[int, ...] | None) -> Norm:
    """`norm` with the shape it normalises, read from its recorded input where inspection could
    not tell it (a parameter-free norm module: no weight gives its width)."""
    if norm.shape is not None:
        return norm
    call = surgery.trace.calls.get(norm.module)
    x = next((a for a in (call.args if call else ()) if isinstance(a, torch.Tensor)), None)
    if x is None or x.dim() < 1:
        return norm
    return dataclasses.replace(norm, shape=(x.shape[1] if layout else x.shape[-1],))


def _layout(surgery: Surgery, norm: Norm) -> tuple[int, ...] | None:
    """None for a norm over the last axis; the probe shape `(1, d, 1, ...)` for one over axis 1
    of its input (a `LayerNorm2d`: permute, norm, permute back; or a norm over dim 1), read from
    the norm's recorded call. Refuses a norm whose input has its features on neither axis."""
    call = surgery.trace.calls.get(norm.module)
    x = next((a for a in (call.args if call else ()) if isinstance(a, torch.Tensor)), None)
    if x is None or norm.shape is None or len(norm.shape) != 1 or x.dim() < 2:
        return None
    d = norm.shape[0]
    if x.shape[-1] == d:
        return None
    if x.dim() >= 3 and x.shape[1] == d:
        return (1, d) + (1,) * (x.dim() - 2)
    raise PassError(f"adyt: cannot tell which axis {norm.module} normalises (input "
                    f"{tuple(x.shape)}, width {d}); skip it with exclude={norm.module!r}")


def _span(surgery: Surgery, norm: Norm) -> tuple:
    """(input, last node, gain, bias, width) of the functional norm `norm`: the norm node, then
    casts, a multiply by a parameter (the gain) and an add of one (the bias)."""
    owner = surgery.module(norm.module)
    graph = surgery.graph(norm.module)
    node = node_named(graph, str(norm.node))
    x = norm_input(node, owner)
    weight = bias = None
    args = list(node.args) + [None] * 4
    if node.target in (F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm):
        weight = _param(owner, node.kwargs.get("weight", args[2]))
        if node.target in (F.layer_norm, torch.layer_norm):
            bias = _param(owner, node.kwargs.get("bias", args[3]))
    chain = [node]
    while True:  # casts, then `· gain`, then `+ bias`, each by the one user that continues
        step = [(u, *_step(owner, chain[-1], u)) for u in chain[-1].users]
        step = [s for s in step if s[1] == "cast" or s[1] == "mul" and weight is None and bias
                is None or s[1] == "add" and bias is None]
        if len(step) != 1:
            break
        user, what, param = step[0]
        chain.append(user)
        if what == "mul":
            weight = param
        elif what == "add":
            bias = param
            break
    d = norm.shape[-1] if norm.shape else None
    ref = weight if weight is not None else bias
    if ref is not None:
        d = ref.shape[-1] if ref.dim() == 1 else None
    if not isinstance(x, fx.Node) or d is None or norm.shape and len(norm.shape) != 1:
        raise PassError(f"adyt: cannot convert the norm {norm.node} in {norm.module or 'the model'}"
                        f" (its width or input is unknown, or it spans several axes); skip it "
                        f"with exclude={norm.module!r}")
    return x, chain, weight, bias, d


def _step(owner: nn.Module, value: fx.Node, user: fx.Node) -> tuple[str | None, object]:
    """How `user` continues a norm whose output so far is `value`: ("cast", None), ("mul", the
    gain), ("add", the bias), or (None, None)."""
    if user.op not in ("call_function", "call_method"):
        return None, None
    if strip_casts(user) is value:
        return "cast", None
    others = [a for a in user.args if a is not value]
    param = _param(owner, strip_casts(others[0])) if len(others) == 1 else None
    name = getattr(user.target, "__name__", str(user.target)).strip("_")
    if param is not None and name in ("mul", "add"):
        return name, param
    return None, None


def _param(owner: nn.Module, value: object) -> nn.Parameter | None:
    """The 1-D parameter a `get_attr` node reads, else None."""
    if isinstance(value, fx.Node) and value.op == "get_attr":
        try:
            p = owner.get_parameter(str(value.target))
        except AttributeError:
            return None
        return p if p.dim() == 1 else None
    return None


def _erase_dead(graph: fx.Graph, end: fx.Node, keep: fx.Node) -> None:
    """Erase `end` and what only it used, back to (not including) `keep`. Parameter reads stay:
    the traced module then keeps the norm's parameters under their own names."""
    frontier, erased = [end], set()
    while frontier:
        n = frontier.pop()
        if n is keep or n in erased or n.users or n.op in ("placeholder", "output", "get_attr"):
            continue
        erased.add(n)
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        frontier.extend(inputs)


# torch layers whose eval fast path reads their norms' weights and never calls the norm modules.
_FAST_PATH = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _record_inputs(surgery: Surgery, names: list[str]
                   ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Each norm's `(input, output)` at every call on the calibration batches (the example where
    none were given), for `fit_adyt_`; a gated norm gives its ungated part."""
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in names}
    busy: set[str] = set()  # a gated norm re-run below records nothing

    def recorder(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name in busy or not args or not isinstance(args[0], torch.Tensor):
                return
            x, gate = args[0], args[1] if len(args) > 1 else None
            if isinstance(gate, torch.Tensor):  # a gated norm: fit the ungated part
                busy.add(name)
                try:
                    if _gated_before(module, x, gate, output):
                        x = x * F.silu(gate)  # norm(x·silu(g)): the ADyT sees x·silu(g)
                    else:
                        output = module(x)  # norm(x)·silu(g): the ADyT's own part
                finally:
                    busy.discard(name)
            if isinstance(output, torch.Tensor):
                seen[name].append((x.detach(), output.detach()))
        return hook

    handles = [surgery.module(n).register_forward_hook(recorder(n)) for n in names]
    try:
        surgery.run_calibration()
    finally:
        for h in handles:
            h.remove()
    return {k: v for k, v in seen.items() if v}


def _gated_before(module: nn.Module, x: torch.Tensor, gate: torch.Tensor,
                  output: torch.Tensor) -> bool:
    """Whether the gated norm `module` multiplies its gate in before normalising."""
    try:
        return bool(torch.allclose(module(x * F.silu(gate)), output, rtol=1e-4, atol=1e-5))
    except (RuntimeError, TypeError):
        return False


_RESIDUAL_MODULES = (AionResidual, StreamMixer)


def _blocks(surgery: Surgery) -> set[str]:
    """The residual blocks: the trunks' blocks, and after `aion`/`hyper` the modules holding
    their residual modules (the trunks hyper-connections folded are not trunks any more)."""
    blocks = {b for t in surgery.inspection.trunks for b in t.blocks}
    for name, mt in surgery.trace.traces.items():
        if any(isinstance(c, _RESIDUAL_MODULES) for c in mt.module.children()):
            blocks.add(name)
    return blocks


def _roles(surgery: Surgery, blocks: set[str], norms: list[str]) -> dict[str, str]:
    """Norm module → "attention" (the first norm its block calls, which feeds the block's first
    branch) or "ffn" (the norms the block calls later), in the order of the example's run."""
    order = {n: surgery.trace.calls[n].order for n in norms if n in surgery.trace.calls}
    roles: dict[str, str] = {}
    for block in blocks:
        inside = sorted((n for n in order if n.startswith(block + ".")), key=order.get)
        for i, name in enumerate(inside):
            roles.setdefault(name, "attention" if i == 0 else "ffn")
    return roles
