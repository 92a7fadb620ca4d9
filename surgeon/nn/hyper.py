"""Hyper-connections: n residual streams with learned width and depth mixing (Zhu et al. 2024).

The streams are folded into the batch, **stream index outermost**: a stream tensor `H` is
`(n·b, ...)`, i.e. `H.unflatten(0, (n, -1))[s]` is stream s. With the streams outermost, code
between blocks that flattens or splits the leading dimensions (`h.view(-1, d)`, window
partitions, `view(b, t, d)` with the first size scaled by n) keeps each stream's rows together,
so the mixers can always regroup `H` as `(n, positions, d)` whatever the layout in between.
`expand_streams` copies the input into every stream before the first block and
`reduce_streams` averages them after the last one (a **mean**, so a trunk of hyper-connected
blocks equals the plain residual network exactly at init; lucidrains' `sum` multiplies the
output by n and is available as `mode="sum"`). lucidrains folds the stream index innermost
(`(b·n, ...)`); the parameters are the same, only the fold differs.

Per block, `width_connection(H)` gives the branch its input and the mixed residual streams (a
stream tensor like `H`), the block runs its branch, and `depth_connection(y, residuals, beta)`
adds the output back. The residual streams may pass through the block's own shortcut (a cast, a
strided projection) in between: where that changes the number of positions (a downsampling
block), the depth weights are the per-sample mean of the per-position ones. With `branch=` set,
`forward(H, *args)` does all three. The home stream is `layer_index mod n`: deterministic,
unlike lucidrains' Python `random` fallback, which differs across processes. Parameter names
follow lucidrains' `HyperConnections`, so its state dict loads into this one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from surgeon.nn.scalars import promote_scalars, scalar_parameter


def expand_streams(x: torch.Tensor, num_streams: int) -> torch.Tensor:
    """Copy `x` into every stream: `(b, ...)` → `(n·b, ...)`, stream index outermost."""
    return x.unsqueeze(0).expand(num_streams, *x.shape).reshape(-1, *x.shape[1:])


def reduce_streams(h: torch.Tensor, num_streams: int, mode: str = "mean") -> torch.Tensor:
    """Merge the streams: `(n·b, ...)` → `(b, ...)`, by `mean` (default) or `sum`.

    The mean is taken as `H_0 + Σ_s (H_s − H_0) / n`, which is exact when the streams agree (as
    they do at init), for any n, and no less accurate otherwise.
    """
    hs = h.unflatten(0, (num_streams, -1))  # (n, b, ...)
    if mode == "sum":
        return hs.sum(0)
    if mode != "mean":
        raise ValueError(f"reduce mode must be 'mean' or 'sum', got {mode!r}")
    first = hs[0]  # (b, ...)
    return first + (hs[1:] - first.unsqueeze(0)).sum(0) / num_streams


CARRIED_STREAMS = "_surgeon_streams"  # the attribute `suspend_streams` sets on its output


def suspend_streams(h: torch.Tensor, num_streams: int, mode: str, trunk: str) -> torch.Tensor:
    """`reduce_streams`, its output carrying the streams `h` for `resume_streams`.

    For a trunk whose caller may skip blocks (LayerDrop): each block hands on one stream's
    tensor `(b, ...)` as the plain network does, and the next block that runs takes up the
    streams again, so a skipped block is an identity on the n streams and the trunk's callers
    see `(b, ...)` whichever blocks ran."""
    out = reduce_streams(h, num_streams, mode)
    setattr(out, CARRIED_STREAMS, (trunk, h))
    return out


def resume_streams(x: torch.Tensor, num_streams: int, trunk: str) -> torch.Tensor:
    """The streams `x` was reduced from by `suspend_streams` in a block of the same trunk, or
    where it was not (the trunk's first block that runs) `x` copied into every stream."""
    carried = getattr(x, CARRIED_STREAMS, None)
    if carried is not None and carried[0] == trunk and \
            carried[1].shape[0] == num_streams * x.shape[0]:
        return carried[1]
    return expand_streams(x, num_streams)


def stream_shape(h: torch.Tensor, num_streams: int) -> torch.Size:
    """The shape of one stream of `h` `(n·b, ...)`: `(b, ...)` (what code written for the
    plain network reads off the tensor)."""
    return torch.Size((h.shape[0] // num_streams, *h.shape[1:]))


def stream_size(h: torch.Tensor, num_streams: int, dim: int) -> int:
    """`stream_shape(h, n)[dim]`."""
    return stream_shape(h, num_streams)[dim]


def stream_numel(h: torch.Tensor, num_streams: int) -> int:
    """The number of elements of one stream of `h`."""
    return h.numel() // num_streams


def _sizes(sizes: tuple) -> list:
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        return list(sizes[0])
    return list(sizes)


def stream_view(h: torch.Tensor, num_streams: int, method: str, *sizes: Any) -> torch.Tensor:
    """`h.<method>(*sizes)` (view, reshape, expand) for sizes written for one stream: the first
    size, unless -1, is scaled by n, which keeps the streams outermost."""
    new = _sizes(sizes)
    if new and new[0] != -1:
        new[0] = new[0] * num_streams
    return getattr(h, method)(*new)


def stream_unflatten(h: torch.Tensor, num_streams: int, dim: int, sizes: Any) -> torch.Tensor:
    """`h.unflatten(dim, sizes)` for sizes written for one stream."""
    sizes = list(sizes)
    if dim == 0 and sizes and sizes[0] != -1:
        sizes[0] = sizes[0] * num_streams
    return h.unflatten(dim, sizes)


def stream_permute(h: torch.Tensor, num_streams: int, method: str, *dims: Any) -> torch.Tensor:
    """`h.<method>(*dims)` (permute, transpose, movedim, swapaxes) applied to each stream: the
    streams stay outermost when the op moves the batch dimension."""
    rank = h.dim()

    def shift(d: Any) -> Any:
        if isinstance(d, (tuple, list)):
            return type(d)(shift(x) for x in d)
        return d % rank + 1

    args = [shift(d) for d in dims]
    if method == "permute":
        args = [0, *shift(_sizes(tuple(dims)))]
    return getattr(h.unflatten(0, (num_streams, -1)), method)(*args).flatten(0, 1)


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


def mix_streams(
    hs: torch.Tensor, pre: torch.Tensor, res: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Width mixing: streams `hs (n, m, d)`, weights `pre (m, n)` and `res (m, k, n)` → the
    branch input `Σ_s pre·H_s (m, d)` and the residual streams `Σ_s res·H_s (k, m, d)`.

    Eager runs one batched matmul over the m positions (fewest kernels). Under torch.compile two
    einsums over the streams' own layout instead: no slice of a (1+k)-wide product to scatter
    back in backward and no position-major copy of the streams, which inductor fuses better.
    """
    if torch.compiler.is_compiling():
        branch_input = torch.einsum("mn,nmd->md", pre, hs)
        return branch_input, torch.einsum("mkn,nmd->kmd", res, hs)
    mix = torch.cat([pre.unsqueeze(-2), res], dim=-2) @ hs.transpose(0, 1)  # (m, 1+k, d)
    return mix[:, 0], mix[:, 1:].transpose(0, 1)


class StreamMixer(nn.Module):
    """What the hyper-connection modules share: the three-step protocol and `forward`.

    `feature_axis` is the axis of the stream that holds the features (the pass sets it per
    residual add: -1 for tokens `(b, t, d)` and channels-last images, 1 for `(b, c, h, w)`);
    the mixers move it last to mix and back afterwards. Subclasses implement `_width` on the
    streams as `(n, m, d)`."""

    _surgeon_atomic = True  # tracing treats it as a leaf: passes never rewrite it again

    def __init__(self, num_streams: int, layer_index: int, branch: nn.Module | None) -> None:
        super().__init__()
        self.num_streams = num_streams
        self.layer_index = layer_index
        self.home = layer_index % num_streams  # deterministic: the same in every process
        self.branch = branch
        self.feature_axis = -1

    @property
    def channel_first(self) -> bool:
        """Whether the features are on axis 1 (`(b, c, ...)` streams of conv nets)."""
        return self.feature_axis == 1

    @channel_first.setter
    def channel_first(self, value: bool) -> None:
        self.feature_axis = 1 if value else -1

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # lucidrains' and older surgeon checkpoints store the scales 0-dim
        promote_scalars(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return (f"num_streams={self.num_streams}, layer_index={self.layer_index}, "
                f"home={self.home}, feature_axis={self.feature_axis}")

    def _back(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """A features-last tensor back in the stream's layout, with `like`'s strides (a norm or
        a convolution picks its kernel, and so its rounding, by them; the rewrite is meant to
        be exact at init)."""
        if self.feature_axis not in (-1, t.dim() - 1):
            t = t.movedim(-1, self.feature_axis)
        if like.is_contiguous():
            return t.contiguous()
        out = torch.empty_like(like)  # like's strides where it is dense
        return out.copy_(t)

    def width_connection(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`H (n·b, ...)` → branch input `(b, ...)`, residual streams `(n·b, ...)` and the depth
        weights `(n, b, p)` (p positions per sample)."""
        n = self.num_streams
        last = h.movedim(self.feature_axis, -1)  # (n·b, ..., d)
        branch_input, residuals, beta = self._width(last.reshape(n, -1, last.shape[-1]))
        one = (last.shape[0] // n, *last.shape[1:])
        return (self._back(branch_input.reshape(one), h.unflatten(0, (n, -1))[0]),
                self._back(residuals.reshape(last.shape), h), beta.reshape(n, one[0], -1))

    def _width(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`hs (n, m, d)` → branch input `(m, d)`, residuals `(n, m, d)`, depth weights `(n, m)`."""
        raise NotImplementedError

    def depth_connection(
        self, branch_output: torch.Tensor, residuals: torch.Tensor, beta: torch.Tensor,
        *more_outputs: torch.Tensor,
    ) -> torch.Tensor:
        """`residuals + beta ⊗ branch_output` → the new streams `(n·b, ...)`.

        `more_outputs` are further branch outputs of the same residual (a parallel block's
        attention and MLP), added one after the other as the plain block adds them. Where the
        branch output has other positions than the block's input (a strided block), `beta` is
        averaged over the positions of each sample."""
        n = self.num_streams
        axis = self.feature_axis % branch_output.dim()
        positions = [s for i, s in enumerate(branch_output.shape) if i != axis]  # (b, *p)
        if beta.shape[-1] != math.prod(positions[1:]):
            beta = beta.mean(-1, keepdim=True)  # (n, b, 1): per sample
            weight = beta.reshape(n, positions[0], *[1] * (len(positions) - 1))
        else:
            weight = beta.reshape(n, *positions)  # (n, b, *p)
        weight = weight.unsqueeze(axis + 1)  # (n, b, ...) with 1 on the feature axis
        # elementwise in the layout the plain block adds in (so in its memory format)
        out = residuals.unflatten(0, (n, -1))  # (n, b, ...)
        for y in (branch_output, *more_outputs):
            out = out + weight.to(y.dtype) * y.unsqueeze(0)
        return out.flatten(0, 1)  # (n·b, ...)

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

    def _width(self, hs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = self.num_streams  # hs: (n, m, d)
        # norm(H) @ W without writing norm(H): fold the gain into W, scale the logits by 1/‖H‖;
        # alpha's and beta's projections go through one matmul.
        gain = (self.norm.gamma + 1).unsqueeze(-1)  # (d, 1)
        w = torch.cat([self.dynamic_alpha_fn, self.dynamic_beta_fn.unsqueeze(-1)], 1) * gain
        inv = self.norm.scale / torch.linalg.vector_norm(hs, dim=-1, keepdim=True).clamp_min(1e-12)
        logits = self._act((hs @ w.to(hs.dtype)) * inv)  # (n, m, 2+n)
        alpha = (logits[..., : n + 1] * self.dynamic_alpha_scale.reshape(())
                 + self.static_alpha.unsqueeze(1))  # (n, m, 1+n)
        beta = (logits[..., n + 1] * self.dynamic_beta_scale.reshape(())
                + self.static_beta.unsqueeze(1))  # (n, m)
        alpha = alpha.to(hs.dtype).permute(1, 2, 0)  # (m, 1+n, n): [m, j, s] weighs H_s into j
        branch_input, residuals = mix_streams(hs, alpha[:, 0], alpha[:, 1:])
        return branch_input, residuals, beta  # (m, d), (n, m, d), (n, m)
