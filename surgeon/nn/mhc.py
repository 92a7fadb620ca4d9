"""mHC, manifold-constrained hyper-connections (DeepSeek, arXiv 2512.24880).

The residual streams mix through a doubly-stochastic matrix (Sinkhorn projection, fp32), so the
streams' mean is carried through every block; the branch reads a sigmoid-weighted sum of the
streams and writes back with weights `2·sigmoid(·)`. Same protocol and stream layout as
`surgeon.nn.hyper`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from surgeon.nn.hyper import HyperConnections, StreamMixer, mix_streams
from surgeon.nn.scalars import scalar_parameter


def sinkhorn(logits: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Project `(..., n, n)` logits onto doubly-stochastic matrices (rows and columns sum to 1).

    `exp` of the max-shifted logits (shift detached), then alternating row / column
    normalisation, in fp32 or wider. Shifted logits are floored at -80 so that no entry
    underflows to 0 (a row of zeros would divide 0 by 0); below that the floor changes nothing
    a float32 sum can see.
    """
    z = logits.to(torch.promote_types(logits.dtype, torch.float32))
    z = z - z.amax(dim=(-2, -1), keepdim=True).detach()
    m = z.clamp_min(-80.0).exp()  # (..., n, n)
    for _ in range(iters):
        m = m / m.sum(dim=-1, keepdim=True)  # rows
        m = m / m.sum(dim=-2, keepdim=True)  # columns
    return m


class ManifoldHyperConnections(StreamMixer):
    """mHC (DeepSeek 2025): `H' = H_res·H + H_postᵀ·f(H_pre·H)` with `H_pre = sigmoid(·)`,
    `H_post = 2·sigmoid(·)` and `H_res = sinkhorn(·)` (fp32), each a bias plus a scaled
    projection of the RMS-normalised flattened streams (`n·d`).

    Init: `b_post = 0`, `b_res = 6I − 3` (the paper's), projections 0, scales 0.01, and
    `b_pre = −3` off the home stream. The paper puts +3 on the home stream; by default this
    module puts the logit that makes `Σ H_pre = 1` (1.80 for n = 4) so the branch sees the
    stream unscaled and the output starts within ~1e-6 of the plain network for any branch, not
    only for a branch that normalises its input. Pass `home_bias=3.0` for the paper's value.
    """

    def __init__(
        self,
        num_streams: int,
        dim: int,
        *,
        layer_index: int = 0,
        branch: nn.Module | None = None,
        sinkhorn_iters: int = 20,
        home_bias: float | None = None,
    ) -> None:
        if num_streams < 2:
            raise ValueError(f"mHC needs at least 2 streams, got {num_streams}")
        super().__init__(num_streams, layer_index, branch)
        n = num_streams
        self.sinkhorn_iters = sinkhorn_iters
        if home_bias is None:
            p_home = 1.0 - (n - 1) / (1.0 + math.exp(3.0))  # 1 − (n−1)·sigmoid(−3)
            home_bias = math.log(p_home / (1.0 - p_home))
        self.gamma = nn.Parameter(torch.zeros(n, dim))  # gain offset of the flattened RMSNorm
        self.pre_proj = nn.Parameter(torch.zeros(n, dim, n))
        self.post_proj = nn.Parameter(torch.zeros(n, dim, n))
        self.res_proj = nn.Parameter(torch.zeros(n, dim, n * n))
        self.pre_scale = scalar_parameter(1e-2)
        self.post_scale = scalar_parameter(1e-2)
        self.res_scale = scalar_parameter(1e-2)
        pre_bias = torch.full((n,), -3.0)
        pre_bias[self.home] = home_bias
        self.pre_bias = nn.Parameter(pre_bias)
        self.post_bias = nn.Parameter(torch.zeros(n))
        self.res_bias = nn.Parameter(6.0 * torch.eye(n) - 3.0)

    def coefficients(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hs (n, m, d)` → fp32 `H_pre (m, n)`, `H_post (m, n)`, `H_res (m, n, n)`."""
        n = self.num_streams
        x = hs.float()
        rms = x.pow(2).mean(dim=(0, 2), keepdim=True).add(1e-6).rsqrt()  # (1, m, 1)
        x = x * rms * (self.gamma.unsqueeze(1) + 1)  # (n, m, d), normalised over n·d
        proj = torch.cat([self.pre_proj, self.post_proj, self.res_proj], dim=-1)  # (n, d, 2n+n²)
        logits = torch.einsum("smd,sde->me", x, proj.float())  # one matmul: (m, 2n+n²)
        pre, post, res = logits.split([n, n, n * n], dim=-1)
        h_pre = torch.sigmoid(self.pre_scale.reshape(()) * pre + self.pre_bias)
        h_post = 2 * torch.sigmoid(self.post_scale.reshape(()) * post + self.post_bias)
        res = self.res_scale.reshape(()) * res.unflatten(-1, (n, n)) + self.res_bias  # (m, n, n)
        return h_pre, h_post, sinkhorn(res, self.sinkhorn_iters)

    def _width(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_pre, h_post, h_res = self.coefficients(hs)  # hs: (n, m, d)
        branch_input, residuals = mix_streams(hs, h_pre.to(hs.dtype), h_res.to(hs.dtype))
        return branch_input, residuals, h_post.transpose(0, 1)  # (m, d), (n, m, d), (n, m)


def hyper_connections(
    num_streams: int, dim: int, *, mhc: bool = False, **kwargs: Any
) -> HyperConnections | ManifoldHyperConnections:
    """`HyperConnections` or, with `mhc=True`, `ManifoldHyperConnections`."""
    cls: Callable[..., Any] = ManifoldHyperConnections if mhc else HyperConnections
    return cls(num_streams, dim, **kwargs)
