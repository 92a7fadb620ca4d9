"""Fit an ADyT to the norm it replaces, on that norm's recorded inputs and outputs.

A trained model's norm inputs have rms anywhere from 0.01 to 100, so the slope `α·s` that makes
`w·tanh(α·s·x) + b` follow `norm(x)` spans several decades, far outside the range α(t) is
clamped to. The fit is local (one norm at a time, no backprop through the model) and cheap:
for each candidate slope `k` on a log grid of `DECADES` decades centred on `1/rms(x)` (then a
finer grid around the best), the per-channel least-squares gain and bias of the target on
`[tanh(k·x), 1]` have a closed form (ridge-regularised towards the norm's own gain and bias
with the weight of `PRIOR_ROWS` rows, for norms that see few rows); the slope with the least
error wins. A norm without
a bias (RMSNorm) fits the gain alone. The ADyT keeps α0, so α(t) stays where it was inside its
clamp range, and the slope goes into its `input_scale`: `s = k/α(t)`.

The slope is one scalar per norm (per-channel slopes would be another module); what no choice of
`k, w, b` can express is LayerNorm's subtraction of the per-token mean, and the per-token
rescaling itself (`tanh` is elementwise): the error left is reported by `fit_adyt_`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from surgeon.nn.adyt import ADyT

DECADES = 6.0  # the coarse grid spans 10^±3 around 1/rms(x)
COARSE = 49  # coarse grid points (8 a decade)
FINE = 17  # points of the refined grid, between the coarse neighbours of the best (±4 %)
MAX_ROWS = 16384  # rows (tokens) the fit uses at most, evenly spaced
COARSE_ROWS = 1024  # ... and the coarse scan, which only has to find the right neighbourhood
PRIOR_ROWS = 1.0  # the norm's own gain and bias count as this many rows (see least_squares)


@dataclass(frozen=True)
class Fit:
    """One norm's fitted slope `α·s`, and the fit's quality on the recorded inputs."""

    slope: float
    input_scale: float
    relative_error: float  # ‖ADyT(x) − norm(x)‖² / ‖norm(x) − mean‖² (0: exact; 1: no better
    cosine: float  # than a constant); cosine of ADyT(x) with norm(x), all values flattened


def as_rows(x: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """`x` as `(rows, channels)` float64: channels are the last axis, or axis 1 for a
    channels-first (`(b, c, h, w)`) norm."""
    if channels_first:
        x = x.movedim(1, -1)
    return x.reshape(-1, x.shape[-1]).double()


def subsample(x: torch.Tensor, y: torch.Tensor, limit: int = MAX_ROWS
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `limit` evenly spaced rows of `x` and `y` (the same ones)."""
    if len(x) <= limit:
        return x, y
    keep = torch.linspace(0, len(x) - 1, limit).long()
    return x[keep], y[keep]


def least_squares(t: torch.Tensor, y: torch.Tensor, bias: bool,
                  prior: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel (gain, bias, penalised squared error) of `y ≈ gain·t + bias` (bias 0
    without `bias`), closed form. `t`, `y`: `(rows, channels)` float64. `prior` (the norm's own
    gain and bias) is worth `PRIOR_ROWS` rows: a ridge penalty `PRIOR_ROWS·‖(gain, bias) −
    prior‖²` that keeps a fit on few rows (a final norm seeing one row per sample) from
    trading a tiny slope for a huge gain; on thousands of rows it changes next to nothing."""
    n = float(len(t))
    mu = PRIOR_ROWS if prior is not None else 0.0
    g0, b0 = prior if prior is not None else (torch.zeros(()), torch.zeros(()))
    stt, sty = t.pow(2).sum(0), (t * y).sum(0)
    if bias:  # the 2×2 normal equations of (gain, bias) per channel, solved by Cramer's rule
        st, sy = t.sum(0), y.sum(0)
        a, c, d = stt + mu, st, n + mu
        e, f = sty + mu * g0, sy + mu * b0
        det = (a * d - c * c).clamp_min(1e-300)
        gain, shift = (e * d - c * f) / det, (a * f - c * e) / det
    else:
        gain = (sty + mu * g0) / (stt + mu).clamp_min(1e-300)
        shift = torch.zeros_like(gain)
    error = (y - gain * t - shift).pow(2).sum()
    error = error + mu * ((gain - g0).pow(2).sum() + (shift - b0).pow(2).sum() * bias)
    return gain, shift, error


def fit_slope(x: torch.Tensor, y: torch.Tensor, bias: bool,
              prior: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """(slope, gain, bias, penalised squared error) of the best `y ≈ gain·tanh(slope·x) +
    bias` over `(rows, channels)` float64 `x`, `y` (`prior`: see `least_squares`): a log grid
    of `DECADES` decades around `1/rms(x)` (on `COARSE_ROWS` of the rows), then a finer one
    between the best point's neighbours (on all)."""
    rms = float(x.pow(2).mean().sqrt())
    centre = 1.0 / rms if rms > 0 else 1.0
    half = DECADES / 2
    grid = torch.logspace(-half, half, COARSE, dtype=torch.float64) * centre

    def scan_rows(slopes: torch.Tensor, x: torch.Tensor, y: torch.Tensor
                  ) -> tuple[int, list[tuple]]:
        results = [least_squares(torch.tanh(k * x), y, bias, prior) for k in slopes.tolist()]
        best = min(range(len(results)), key=lambda i: float(results[i][2]))
        return best, results

    i, _ = scan_rows(grid, *subsample(x, y, COARSE_ROWS))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    fine = torch.logspace(float(lo.log10()), float(hi.log10()), FINE, dtype=torch.float64)
    j, results = scan_rows(fine, x, y)
    gain, shift, error = results[j]
    return float(fine[j]), gain, shift, float(error)


@torch.no_grad()
def fit_adyt_(adyt: ADyT, calls: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Fit:
    """Fit `adyt` to the norm whose `(input, output)` at each call on the calibration batches
    were recorded (a gated norm's ungated part): its `input_scale` (slope / α(t)), gain and
    bias (where it has one), in place, on all calls' rows together. α0 is left as it is."""
    first = adyt.channels_first
    rows = torch.cat([as_rows(x, first) for x, _ in calls])
    want = torch.cat([as_rows(y, first) for _, y in calls])
    rows, want = subsample(rows, want)
    prior = (adyt.weight.detach().double().reshape(-1).to(rows.device),
             (adyt.bias if adyt.bias is not None else adyt.weight).detach().double()
             .reshape(-1).to(rows.device) * (adyt.bias is not None))
    slope, gain, shift, error = fit_slope(rows, want, adyt.bias is not None, prior)
    alpha = float(adyt.alpha())
    adyt.input_scale.data = torch.full((1,), slope / alpha, dtype=torch.float32,
                                       device=adyt.input_scale.device)
    adyt.weight.copy_(gain.view(adyt.weight.shape).to(adyt.weight))
    if adyt.bias is not None:
        adyt.bias.copy_(shift.view(adyt.bias.shape).to(adyt.bias))
    fitted = gain * torch.tanh(slope * rows) + shift
    spread = (want - want.mean()).pow(2).sum().clamp_min(1e-300)
    cosine = torch.nn.functional.cosine_similarity(fitted.flatten(), want.flatten(), dim=0,
                                                   eps=1e-30)
    return Fit(slope, slope / alpha, error / float(spread), float(cosine))
