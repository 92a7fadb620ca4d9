"""Hyper-connections: n residual streams with learned width and depth mixing (Zhu et al. 2024).

The streams are folded into the batch: a stream tensor `H` is `(b·n, ..., d)`, stream index
inner, so the code between blocks keeps its shapes. `expand_streams` copies the input into every
stream before the first block and `reduce_streams` averages them after the last one (a **mean**,
so a trunk of hyper-connected blocks equals the plain residual network exactly at init;
lucidrains' `sum` multiplies the output by n and is available as `mode="sum"`).

Per block, `width_connection(H)` gives the branch its input and the mixed residual streams, the
block runs its branch, and `depth_connection(y, residuals, beta)` adds the output back. With
`branch=` set, `forward(H, *args)` does all three. The home stream is `layer_index mod n`:
deterministic, unlike lucidrains' Python `random` fallback, which differs across processes.
Parameter names follow lucidrains' `HyperConnections`, so its state dict loads into this one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.nn.scalars import promote_scalars, scalar_parameter


def expand_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Copy `x` into every stream: `(b, ..., d)` → `(b·n, ..., d)`."""
    return x.repeat_interleave(num_streams, dim=0)


def reduce_streams(h: torch.Tensor, num_streams: int, mode: str = "mean") -> torch.Tensor:
    """Merge the streams: `(b·n, ..., d)` → `(b, ..., d)`, by `mean` (default) or `sum`.

    The mean is taken as `H_0 + Σ_s (H_s − H_0) / n`, which is exact when the streams agree (as
    they do at init), for any n, and no less accurate otherwise.
    """
    hs = h.unflatten(0, (-1, num_streams))  # (b, n, ..., d)
    if mode == "sum":
        return hs.sum(1)
    if mode != "mean":
        raise ValueError(f"reduce mode must be 'mean' or 'sum', got {mode!r}")
    first = hs[:, 0]  # (b, ..., d)
    return first + (hs[:, 1:] - first.unsqueeze(1)).sum(1) / num_streams


class ExpandStreams(nn.Module):
    """`expand_streams` as a module, for `nn.Sequential` models."""

    def __init__(self, num_streams: int) -> None:
        super().__init__()
        self.num_streams = num_streams

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expand_streams(x, self.num_streams)


class ReduceStreams(nn.Module):
    """`reduce_streams` as a module, for `nn.Sequential` models."""

    def __init__(self, num_streams: int, mode: str = "mean") -> None:
        super().__init__()
        if mode not in ("mean", "sum"):
            raise ValueError(f"reduce mode must be 'mean' or 'sum', got {mode!r}")
        self.num_streams, self.mode = num_streams, mode

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return reduce_streams(h, self.num_streams, self.mode)


class StreamRMSNorm(nn.Module):
    """RMSNorm over the last dimension with a zero-initialised gain offset (`x̂·(1 + gamma)`)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * self.scale * (self.gamma + 1)


def unfold_streams(h: torch.Tensor, num_streams: int) -> torch.Tensor:
    """`(b·n, ..., d)` → `(b, n, p, d)`, p the product of the middle dimensions (a view)."""
    return h.reshape(h.shape[0] // num_streams, num_streams, -1, h.shape[-1])


def mix_streams(
    hs: torch.Tensor, pre: torch.Tensor, res: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Width mixing: `hs (b, n, p, d)`, weights `pre (b, p, n)` and `res (b, p, m, n)` → the
    branch input `Σ_n pre·hs (b, p, d)` and the residual streams `Σ_n res·hs (b, m, p, d)`.

    Eager runs one batched matmul over (b, p) (fewest kernels). Under torch.compile two einsums
    over the stream's own layout instead: no slice of a (1+m)-wide product to scatter back in
    backward and no token-major copy of the stream, which inductor fuses better.
    """
    if torch.compiler.is_compiling():
        branch_input = torch.einsum("bpn,bnpd->bpd", pre, hs)
        return branch_input, torch.einsum("bpmn,bnpd->bmpd", res, hs)
    mix = torch.cat([pre.unsqueeze(-2), res], dim=-2) @ hs.transpose(1, 2)  # (b, p, 1+m, d)
    return mix[:, :, 0], mix[:, :, 1:].transpose(1, 2)


class StreamMixer(nn.Module):
    """What the hyper-connection modules share: the three-step protocol and `forward`."""

    _surgeon_atomic = True  # tracing treats it as a leaf: passes never rewrite it again

    def __init__(self, num_streams: int, layer_index: int, branch: nn.Module | None) -> None:
        super().__init__()
        self.num_streams = num_streams
        self.layer_index = layer_index
        self.home = layer_index % num_streams  # deterministic: the same in every process
        self.branch = branch
        # Channels-first streams `(b·n, d, ...)` (conv nets) are mixed with d moved last.
        self.channel_first = False

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # lucidrains' and older surgeon checkpoints store the scales 0-dim
        promote_scalars(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"num_streams={self.num_streams}, layer_index={self.layer_index}, home={self.home}"

    def width_connection(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`H (b·n, ..., d)` → branch input `(b, ..., d)`, residuals `(b, n, p, d)`, and the
        depth weights `(b, n, p)`."""
        if not self.channel_first:
            return self._width(h)
        branch_input, residuals, beta = self._width(h.movedim(1, -1))
        # contiguous: convolutions on a channels-last view pick other kernels and round
        # differently, and the rewrite is meant to be exact at init
        return branch_input.movedim(-1, 1).contiguous(), residuals, beta

    def _width(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def depth_connection(
        self, branch_output: torch.Tensor, residuals: torch.Tensor, beta: torch.Tensor
    ) -> torch.Tensor:
        """`residuals + beta ⊗ branch_output` → the new streams `(b·n, ..., d)`."""
        y = branch_output.movedim(1, -1) if self.channel_first else branch_output
        b, n, p, d = residuals.shape
        out = residuals + beta.to(y.dtype).unsqueeze(-1) * y.reshape(b, 1, p, d)  # (b, n, p, d)
        out = out.reshape(b * n, *y.shape[1:])
        return out.movedim(-1, 1).contiguous() if self.channel_first else out

    def forward(self, h: torch.Tensor, *branch_args: Any, **branch_kwargs: Any) -> Any:
        """With a `branch`: the new streams. Without one (lucidrains' protocol): the branch
        input and a function that takes the branch output and returns the new streams."""
        branch_input, residuals, beta = self.width_connection(h)

        def add_residual(branch_output: Any) -> Any:
            if isinstance(branch_output, (tuple, list)):  # (hidden, *extras), as HF blocks return
                first = self.depth_connection(branch_output[0], residuals, beta)
                return type(branch_output)((first, *branch_output[1:]))
            return self.depth_connection(branch_output, residuals, beta)

        if self.branch is None:
            return branch_input, add_residual
        return add_residual(self.branch(branch_input, *branch_args, **branch_kwargs))


class HyperConnections(StreamMixer):
    """Static + dynamic hyper-connections over `num_streams` streams of width `dim`.

    Init (REFERENCE.md): `static_alpha = [e_home | I_n]`, `static_beta = 1`, dynamic weights 0
    with scales 0.01, so the branch sees the home stream and every stream gets `+ y`.
    """

    def __init__(
        self,
        num_streams: int,
        dim: int,
        *,
        layer_index: int = 0,
        branch: nn.Module | None = None,
        tanh: bool = True,
    ) -> None:
        if num_streams < 1:
            raise ValueError(f"num_streams must be at least 1, got {num_streams}")
        super().__init__(num_streams, layer_index, branch)
        n = num_streams
        self.tanh = tanh
        self.norm = StreamRMSNorm(dim)
        home = F.one_hot(torch.tensor([self.home]), n).float().T  # (n, 1)
        self.static_alpha = nn.Parameter(torch.cat([home, torch.eye(n)], dim=1))  # (n, 1+n)
        self.dynamic_alpha_fn = nn.Parameter(torch.zeros(dim, 1 + n))
        self.dynamic_alpha_scale = scalar_parameter(1e-2)  # (1,): FSDP shards no 0-dim param
        self.static_beta = nn.Parameter(torch.ones(n))
        self.dynamic_beta_fn = nn.Parameter(torch.zeros(dim))
        self.dynamic_beta_scale = scalar_parameter(1e-2)

    def _act(self, t: torch.Tensor) -> torch.Tensor:
        return torch.tanh(t) if self.tanh else t

    def _width(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_streams
        hs = unfold_streams(h, n)  # (b, n, p, d)
        # norm(H) @ W without writing norm(H): fold the gain into W, scale the logits by 1/‖H‖;
        # alpha's and beta's projections go through one matmul.
        gain = (self.norm.gamma + 1).unsqueeze(-1)  # (d, 1)
        w = torch.cat([self.dynamic_alpha_fn, self.dynamic_beta_fn.unsqueeze(-1)], 1) * gain
        inv = self.norm.scale / torch.linalg.vector_norm(hs, dim=-1, keepdim=True).clamp_min(1e-12)
        logits = self._act((hs @ w.to(hs.dtype)) * inv)  # (b, n, p, 2+n)
        alpha = logits[..., : n + 1] * self.dynamic_alpha_scale.reshape(()) \
            + self.static_alpha.unsqueeze(1)  # (b, n, p, 1+n)
        beta = logits[..., n + 1] * self.dynamic_beta_scale.reshape(()) \
            + self.static_beta.unsqueeze(-1)  # (b, n, p)
        alpha = alpha.to(hs.dtype).permute(0, 2, 3, 1)  # (b, p, 1+n, n)
        branch_input, residuals = mix_streams(hs, alpha[:, :, 0], alpha[:, :, 1:])
        return branch_input.reshape(-1, *h.shape[1:]), residuals, beta
