"""LayerNorm / RMSNorm modules → `ADyT` (or plain DyT), weights carried over.

The norm's effective gain and bias are read by probing it with a zero-mean, unit-variance input
and its negation, so any parametrisation (Gemma's `x·(1 + w)`, a missing bias) comes out right;
where the probe agrees with the stored `weight`, the stored tensor is copied exactly.
Norms outside the residual trunk's blocks are "final" norms; norms whose output feeds attention's
queries or keys through parameter-free ops (found by following the example's tensors, not by
width: a hierarchical model's early stages are narrow too) are "qk" norms; both are selectable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from surgeon.files.lazy import materialized
from surgeon.graph.attention_inputs import qk_norm_modules
from surgeon.graph.report import Norm
from surgeon.graph.rewrite import Surgery
from surgeon.nn.adyt import ADyT as ADyTModule
from surgeon.nn.adyt import dyt_llama_alpha0
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
    rewrites: ClassVar[str] = "LayerNorm/RMSNorm modules"

    adaptive: bool = True
    alpha0: float = bounded(0.5, 0, 100, open_low=True)
    llama_init: bool = False  # DyT's per-role α0 (attention / ffn / final), shrinking with width
    final_norms: bool = True
    qk_norms: bool = False
    calibrate: bool = False  # fit each α0 on the example so the outputs move less


    def run(self, surgery: Surgery) -> list[str]:
        norms = [n for n in surgery.inspection.norms if n.node is None and self.selects(n.module)]
        blocks = {b for t in surgery.inspection.trunks for b in t.blocks}
        qk = qk_norm_modules(surgery.model, [n.module for n in norms], surgery.run_example)
        roles = _roles(surgery)
        seen = _record_inputs(surgery, [n.module for n in norms]) if self.calibrate else {}
        todo = []
        for norm in norms:
            inside = any(norm.module.startswith(b + ".") for b in blocks)
            if norm.module in qk and not self.qk_norms or not inside and not self.final_norms:
                continue
            if not isinstance(surgery.module(norm.module), ADyTModule):
                todo.append((norm, inside))
        layouts = {norm.module: _layout(surgery, norm) for norm, _ in todo}  # refuse up front
        new = []
        for norm, inside in todo:
            module = surgery.module(norm.module)
            role = roles.get(norm.module, "ffn" if inside else "final")
            d = norm.shape[-1] if norm.shape else None
            alpha0 = dyt_llama_alpha0(role, d or 0) if self.llama_init else self.alpha0
            adyt = self._convert(module, norm, alpha0, layouts[norm.module])
            if norm.module in seen:
                fit_alpha0_(adyt, *seen[norm.module])
            surgery.replace(norm.module, adyt)
            new.append(norm.module)
            parent = norm.module.rpartition(".")[0]
            if isinstance(surgery.module(parent), _FAST_PATH) and parent in surgery.trace.traces:
                surgery.graph(parent)  # reinstall traced: the fast path reads norm weights itself
        return new

    def _convert(self, module: nn.Module, norm: Norm, alpha0: float,
                 layout: tuple[int, ...] | None) -> ADyTModule:
        with materialized(module):  # the norm's weights may be on disk (surgeon convert)
            adyt = ADyTModule.from_norm(module, alpha0=alpha0, adaptive=self.adaptive,
                                        channels_first=layout is not None)
            if norm.shape is None or len(norm.shape) != 1:
                return adyt
            gain, bias = effective_affine(module, norm.shape[0], norm.eps, layout)
        with torch.no_grad():
            if not torch.allclose(adyt.weight.double(), gain, rtol=1e-3, atol=1e-5):
                adyt.weight.copy_(gain)
            if adyt.bias is not None and not torch.allclose(adyt.bias.double(), bias,
                                                            atol=1e-5):
                adyt.bias.copy_(bias)
        return adyt


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


# torch layers whose eval fast path reads their norms' weights and never calls the norm modules.
_FAST_PATH = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _record_inputs(surgery: Surgery, names: list[str]) -> dict[str, tuple[torch.Tensor, ...]]:
    """Each norm's input and output on the example, for calibration."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}

    def recorder(name: str):  # noqa: ANN202
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = (args[0].detach(), output.detach())
        return hook

    handles = [surgery.module(n).register_forward_hook(recorder(n)) for n in names]
    try:
        surgery.run_example()
    finally:
        for h in handles:
            h.remove()
    return seen


@torch.no_grad()
def fit_alpha0_(adyt: ADyTModule, x: torch.Tensor, target: torch.Tensor) -> float:
    """Set `adyt.alpha0` so that α(t) (as it is now) minimises the squared error to the norm's
    output on `x`: a log-spaced scan over the allowed α, refined once around the best."""
    x, target = x.float(), target.float()
    if adyt.channels_first:  # (b, c, ...) → (b, ..., c): the weight broadcasts over the last axis
        x, target = x.movedim(1, -1), target.movedim(1, -1)
    lo, hi = (adyt.alpha_min, adyt.alpha_max) if adyt.adaptive else (1e-3, 1e2)

    def error(alpha: torch.Tensor) -> torch.Tensor:  # alpha: (k,)
        y = torch.tanh(alpha.view(-1, *[1] * x.dim()) * x) * adyt.weight.float()
        if adyt.bias is not None:
            y = y + adyt.bias.float()
        return (y - target).pow(2).flatten(1).mean(1)

    grid = torch.logspace(torch.log10(torch.tensor(lo)), torch.log10(torch.tensor(hi)), 64)
    best = grid[error(grid).argmin()]
    fine = torch.linspace(best / 1.15, best * 1.15, 64).clamp(lo, hi)
    alpha = float(fine[error(fine).argmin()])
    scale = 1.0 + adyt.lam / (adyt.eps + float(adyt.grad_norm_ema)) if adyt.adaptive else 1.0
    adyt.alpha0.fill_(alpha / scale)
    return alpha


def _roles(surgery: Surgery) -> dict[str, str]:
    """Norm module → "attention" (feeds a block's first residual branch) or "ffn" (later ones)."""
    roles: dict[str, str] = {}
    seen: dict[str, int] = {}
    for r in surgery.inspection.residuals:
        k = seen[r.module] = seen.get(r.module, -1) + 1
        if r.x_norm is None:
            continue
        graph = surgery.trace.traces[r.module].graph
        node = next((n for n in graph.nodes if n.name == r.x_norm), None)
        if node is not None and node.op == "call_module":
            roles[f"{r.module}.{node.target}"] = "attention" if k == 0 else "ffn"
    return roles
