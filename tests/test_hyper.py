"""Hyper-connections and mHC: parity with lucidrains, identity at init, mixing applied, Sinkhorn."""

from __future__ import annotations

import hyper_connections as lucidrains
import pytest
import torch
from torch import nn

from surgeon.nn import (
    HyperConnections,
    ManifoldHyperConnections,
    expand_streams,
    hyper_connections,
    reduce_streams,
    sinkhorn,
)

D = 16


def branch(pre_norm: bool = True) -> nn.Module:
    layers = [nn.LayerNorm(D)] if pre_norm else []
    return nn.Sequential(*layers, nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))


class PlainTrunk(nn.Module):
    """x ← x + f_l(x) for each branch: the network hyper-connections must reproduce at init."""

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for f in self.branches:
            x = x + f(x)
        return x


class StreamTrunk(nn.Module):
    """The same branches, each wrapped in a stream mixer; expand before, reduce after."""

    def __init__(self, mixers: list[nn.Module], n: int, mode: str = "mean") -> None:
        super().__init__()
        self.mixers, self.n, self.mode = nn.ModuleList(mixers), n, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = expand_streams(x, self.n)  # (n·b, t, d)
        for mixer in self.mixers:
            h = mixer(h)
        return reduce_streams(h, self.n, self.mode)  # (b, t, d)


def randomise(module: nn.Module, scale: float = 0.3) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def trunks(n: int, mhc: bool, pre_norm: bool = True, layers: int = 3, **kw):
    branches = [branch(pre_norm) for _ in range(layers)]
    plain = PlainTrunk(branches)
    mixers = [hyper_connections(n, D, mhc=mhc, layer_index=i, branch=f, **kw)
              for i, f in enumerate(branches)]
    return plain, StreamTrunk(mixers, n)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_hc_trunk_equals_plain_network_exactly_at_init(n: int) -> None:
    plain, streams = trunks(n, mhc=False, pre_norm=False)
    x = torch.randn(2, 5, D)
    assert torch.equal(streams(x), plain(x))


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("pre_norm", [True, False])
def test_mhc_trunk_within_1e_2_of_plain_network_at_init(n: int, pre_norm: bool) -> None:
    plain, streams = trunks(n, mhc=True, pre_norm=pre_norm)
    x = torch.randn(2, 5, D)
    ref = plain(x)
    rel = (streams(x) - ref).norm() / ref.norm()
    assert rel < 1e-2


def test_mhc_paper_home_bias_is_near_identity_for_pre_norm_branches() -> None:
    plain, streams = trunks(4, mhc=True, pre_norm=True, home_bias=3.0)
    x = torch.randn(2, 5, D)
    ref = plain(x)
    assert (streams(x) - ref).norm() / ref.norm() < 1e-2
    assert streams.mixers[0].pre_bias[0].item() == 3.0


def outer(h: torch.Tensor, n: int) -> torch.Tensor:
    """lucidrains' fold `(b·n, ...)` (stream inner) → ours `(n·b, ...)` (stream outer)."""
    return h.unflatten(0, (-1, n)).transpose(0, 1).flatten(0, 1)


def inner(h: torch.Tensor, n: int) -> torch.Tensor:
    """Ours `(n·b, ...)` → lucidrains' `(b·n, ...)`."""
    return h.unflatten(0, (n, -1)).transpose(0, 1).flatten(0, 1)


def lucidrains_pair(n: int, layer_index: int) -> tuple[nn.Module, nn.Module]:
    theirs = lucidrains.HyperConnections(n, dim=D, layer_index=layer_index)
    randomise(theirs)
    ours = HyperConnections(n, D, layer_index=layer_index)
    ours.load_state_dict(theirs.state_dict())  # same parameter names and shapes
    return ours, theirs


@pytest.mark.parametrize("n, layer_index", [(2, 0), (4, 1), (4, 6)])
@pytest.mark.parametrize("shape", [(5, D), (D,), (3, 5, D)])
def test_hc_parity_with_lucidrains(n: int, layer_index: int, shape: tuple[int, ...]) -> None:
    ours, theirs = lucidrains_pair(n, layer_index)
    h = torch.randn(2 * n, *shape)
    input_ours, add_ours = ours(outer(h, n))
    input_theirs, add_theirs = theirs(h)
    torch.testing.assert_close(input_ours, input_theirs, rtol=1e-5, atol=1e-6)
    y = torch.randn_like(input_ours)
    torch.testing.assert_close(inner(add_ours(y), n), add_theirs(y), rtol=1e-5, atol=1e-6)


def test_whole_trunk_parity_with_lucidrains_sum_and_mean_reduce() -> None:
    """lucidrains sums the streams (n × the plain network at init); `mode="sum"` matches it,
    the default mean is exactly that divided by n."""
    n, branches = 4, [branch() for _ in range(3)]
    theirs = [lucidrains.HyperConnections(n, dim=D, layer_index=i, branch=f)
              for i, f in enumerate(branches)]
    for m in theirs:
        randomise(m)
    ours = [HyperConnections(n, D, layer_index=i, branch=f) for i, f in enumerate(branches)]
    for a, b in zip(ours, theirs):
        a.load_state_dict(b.state_dict())
    init, expand, reduce = lucidrains.get_init_and_expand_reduce_stream_functions(n)
    x = torch.randn(2, 5, D)
    h = expand(x)
    for m in theirs:
        h = m(h)
    ref = reduce(h)
    torch.testing.assert_close(StreamTrunk(ours, n, "sum")(x), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(StreamTrunk(ours, n, "mean")(x), ref / n, rtol=1e-5, atol=1e-5)


def test_lucidrains_sum_reduce_multiplies_by_n_at_init() -> None:
    n, f = 4, branch()
    init, expand, reduce = lucidrains.get_init_and_expand_reduce_stream_functions(n)
    x = torch.randn(2, 5, D)
    out = reduce(lucidrains.HyperConnections(n, dim=D, layer_index=0, branch=f)(expand(x)))
    torch.testing.assert_close(out, n * (x + f(x)))
    ours = StreamTrunk([HyperConnections(n, D, branch=f)], n)
    assert torch.equal(ours(x), x + f(x))


def test_hc_width_and_depth_closed_form() -> None:
    """Static weights only (dynamic scales 0): branch input = Σ_s A[s,0]·H_s, residual t =
    Σ_s A[s,t]·H_s, new stream t = residual t + β_t·y. A permutation proves mixing is applied."""
    n = 3
    m = HyperConnections(n, D, layer_index=1)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        m.dynamic_alpha_scale.zero_(), m.dynamic_beta_scale.zero_()
        m.static_alpha[:, 0] = torch.tensor([0.2, 0.5, 0.3])
        m.static_alpha[:, 1:] = torch.eye(n)[perm]
        m.static_beta.copy_(torch.tensor([1.0, 0.5, -2.0]))
    h = torch.randn(n * 2, 5, D)
    hs = h.unflatten(0, (n, 2))  # (n, b, t, d)
    branch_input, residuals, beta = m.width_connection(h)
    torch.testing.assert_close(branch_input, 0.2 * hs[0] + 0.5 * hs[1] + 0.3 * hs[2])
    y = torch.randn(2, 5, D)
    out = m.depth_connection(y, residuals, beta).unflatten(0, (n, 2))
    for t in range(n):
        source = int(perm.argsort()[t])  # stream s feeds residual t where perm[s] == t
        torch.testing.assert_close(out[t], hs[source] + m.static_beta[t] * y)


def test_mhc_residual_mixing_is_applied() -> None:
    n = 3
    m = ManifoldHyperConnections(n, D)
    with torch.no_grad():
        m.res_bias.copy_(torch.randn(n, n))
    h = torch.randn(n * 2, 5, D)
    hs = h.unflatten(0, (n, 2))  # (n, b, t, d)
    _, residuals, _ = m.width_connection(h)
    residuals = residuals.unflatten(0, (n, 2))
    mix = sinkhorn(m.res_bias.detach())  # projections are 0: the same matrix for every token
    expected = torch.einsum("ij,jbtd->ibtd", mix, hs)
    torch.testing.assert_close(residuals, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(residuals, hs, atol=1e-2)


def test_home_stream_is_deterministic() -> None:
    a, b = HyperConnections(4, D, layer_index=6), HyperConnections(4, D, layer_index=6)
    assert a.home == 2 and torch.equal(a.static_alpha, b.static_alpha)
    assert a.static_alpha[:, 0].tolist() == [0.0, 0.0, 1.0, 0.0]


def test_tuple_outputs_keep_their_extras() -> None:
    """HF blocks return (hidden, *extras): only the hidden state goes back into the streams."""
    m = HyperConnections(2, D)
    branch_input, add = m(torch.randn(4, 5, D))
    out = add((torch.randn(2, 5, D), "cache"))
    assert out[0].shape == (4, 5, D) and out[1] == "cache"


def test_every_parameter_gets_a_finite_gradient() -> None:
    for mhc in (False, True):
        m = hyper_connections(4, D, mhc=mhc, branch=branch())
        randomise(m, 0.05)
        m(torch.randn(8, 5, D)).square().sum().backward()
        for name, p in m.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_reduce_modes_and_errors() -> None:
    h = torch.randn(6, 5, D)
    torch.testing.assert_close(reduce_streams(h, 3), h.unflatten(0, (3, 2)).mean(0))
    torch.testing.assert_close(reduce_streams(h, 3, "sum"), h.unflatten(0, (3, 2)).sum(0))
    with pytest.raises(ValueError, match="mean"):
        reduce_streams(h, 3, "max")
    with pytest.raises(ValueError, match="at least 2"):
        ManifoldHyperConnections(1, D)


def test_sinkhorn_is_doubly_stochastic() -> None:
    logits = torch.randn(16, 4, 4)
    s = sinkhorn(logits)
    torch.testing.assert_close(s.sum(-1), torch.ones(16, 4), atol=1e-4, rtol=0)
    torch.testing.assert_close(s.sum(-2), torch.ones(16, 4), atol=1e-6, rtol=0)
    assert (s > 0).all() and s.dtype == torch.float32
    assert sinkhorn(logits.bfloat16()).dtype == torch.float32
    extreme = torch.tensor([[200.0, -200.0], [-200.0, 200.0]])  # exp underflows without the floor
    assert torch.isfinite(sinkhorn(extreme)).all()


def test_sinkhorn_gradcheck_float64() -> None:
    logits = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(sinkhorn, (logits,))


@pytest.mark.parametrize("mhc", [False, True])
def test_channels_first_streams_for_conv_branches(mhc: bool) -> None:
    """Conv nets carry (b, c, h, w): the mixers move c last to mix and back afterwards."""
    convs = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(2)]
    plain = PlainTrunk(convs)
    mixers = [hyper_connections(4, 8, mhc=mhc, layer_index=i, branch=f)
              for i, f in enumerate(convs)]
    for m in mixers:
        m.channel_first = True
    x = torch.randn(2, 8, 5, 6)
    out = StreamTrunk(mixers, 4)(x)
    assert out.shape == x.shape and out.is_contiguous()
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0 if not mhc else 1e-5)
