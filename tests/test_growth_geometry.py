"""surgeon.growth.geometry: τ and κ, the Gram-route subspace against the SVD, sign independence,
the escape gate and branches, W_new against a direct transcription of Algorithm 1, dtypes and
shapes, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from surgeon.growth import (
    GrowthConfig,
    Trajectory,
    extrapolate,
    stagnating,
    trajectory_stats,
    velocity_subspace,
)
from surgeon.growth.geometry import RANK_RTOL

F64 = torch.float64


def random_walk(steps: int, p: int, seed: int, drift: float = 0.3) -> list[torch.Tensor]:
    """S = steps + 1 snapshots of a noisy drift, float64, shape (p,)."""
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(p, generator=g, dtype=F64)
    d = torch.randn(p, generator=g, dtype=F64)
    v = drift * d + torch.randn(steps, p, generator=g, dtype=F64)
    return list(torch.cat([w0[None], w0 + v.cumsum(0)]))


def path(*points: tuple[float, ...], p: int = 6) -> list[torch.Tensor]:
    """Snapshots at the given points, padded with zeros to p entries."""
    out = []
    for point in points:
        w = torch.zeros(p, dtype=F64)
        w[: len(point)] = torch.tensor(point, dtype=F64)
        out.append(w)
    return out


def reference(snapshots: list[torch.Tensor], cfg: GrowthConfig) -> tuple[torch.Tensor, dict]:
    """Algorithm 1 transcribed directly: full SVD, explicit P×P projector (small P only)."""
    eps = cfg.eps
    w = torch.stack([s.reshape(-1).double() for s in snapshots])  # (S, P)
    s_count = len(snapshots)
    v = w[1:] - w[:-1]
    v_bar = (w[-1] - w[0]) / (s_count - 1)
    a_bar = (v[1:] - v[:-1]).mean(0)
    delta = w[-1] - w[0]
    d_hat = delta / delta.norm()
    tau = float(v.norm(dim=1).sum() / (delta.norm() + eps))
    along = v @ d_hat
    kappa = float((v - along[:, None] * d_hat).norm(dim=1).sum() / (along.abs().sum() + eps))
    _, sigma, vh = torch.linalg.svd(v - v.mean(0), full_matrices=False)
    rank = int((sigma > RANK_RTOL * v.norm()).sum())
    k = min(cfg.k_subspace, rank)
    q = vh[:k].T
    proj = q @ q.T
    v_u = proj @ v_bar / ((proj @ v_bar).norm() + eps)
    a_u = proj @ a_bar / ((proj @ a_bar).norm() + eps)
    outside = v_bar - proj @ v_bar
    if outside.norm() >= eps:
        esc = outside / outside.norm()
    else:
        esc = torch.zeros_like(v_bar)
        for i in range(k, min(k + cfg.ell_orth, rank)):
            qi = vh[i] * (1.0 if vh[i][vh[i].abs().argmax()] > 0 else -1.0)
            esc += sigma[i] * qi
        esc = esc / esc.norm() if esc.norm() > 0 else esc
    beta = cfg.beta0 / (tau + eps)
    gamma = cfg.gamma0 / (1 + kappa)
    eta = cfg.eta0 * max(0.0, tau - cfg.tau_crit) * max(0.0, kappa - cfg.kappa_crit)
    w_new = w[-1] + beta * v_u + gamma * a_u + eta * esc
    record = dict(tau=tau, kappa=kappa, beta=beta, gamma=gamma, eta=eta, k=k, rank=rank)
    return w_new.reshape(snapshots[-1].shape), record


# --- a straight line -------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 4, 11])
def test_straight_line(steps: int) -> None:
    g = torch.Generator().manual_seed(steps)
    w0, d = torch.randn(50, generator=g, dtype=F64), 3 * torch.randn(50, generator=g, dtype=F64)
    snaps = [w0 + t * d for t in range(steps + 1)]
    w_new, geo = extrapolate(snaps)
    assert geo.tau == pytest.approx(1.0, abs=1e-9)
    assert geo.kappa == pytest.approx(0.0, abs=1e-9)
    assert geo.eta == 0.0
    assert geo.beta == pytest.approx(0.1 / (geo.tau + 1e-8), rel=1e-15)
    assert geo.gamma == pytest.approx(0.15 / (1 + geo.kappa), rel=1e-15)
    # By hand: every V_t = d, so the centred velocities are 0, P_k = 0 (rank 0) and
    # V̂_U = Â_U = 0 (Ā = 0 as well); the escape is V̄/‖V̄‖ but gated off (η = 0).
    assert (geo.rank, geo.k, geo.escape) == (0, 0, "orthogonal")
    assert torch.equal(w_new, snaps[-1])
    assert geo.relative_update == 0.0
    stats = trajectory_stats(snaps)
    assert (stats.tau, stats.kappa) == (geo.tau, geo.kappa)


# --- τ, κ and the gate on paths with known values --------------------------------------------

S2, S10 = math.sqrt(2), math.sqrt(10)
PATHS = {
    # name: (points, τ, κ)
    "straight": (((0, 0), (1, 0), (2, 0), (3, 0)), 1.0, 0.0),
    "back and forth": (((0,), (3,), (1,), (4,), (2,)), 5.0, 0.0),  # τ high, κ = 0
    "one bend": (((0, 0), (1, 1), (2, 0)), S2, 1.0),  # κ high, τ < 2
    "zig-zag": (((0, 0), (1, 3), (2, 0), (3, 3), (4, 0)), S10, 3.0),  # both above
}


@pytest.mark.parametrize("name", PATHS)
def test_stretch_curvature_and_gate(name: str) -> None:
    points, tau, kappa = PATHS[name]
    cfg = GrowthConfig()
    snaps = path(*points)
    w_new, geo = extrapolate(snaps, cfg)
    length = math.dist(points[0], points[-1])
    assert geo.tau == pytest.approx(tau * length / (length + 1e-8), rel=1e-12)
    assert geo.kappa == pytest.approx(kappa, rel=1e-7, abs=1e-12)  # Σ|⟨V_t,Δ̂⟩| + ε
    gate = max(0.0, geo.tau - cfg.tau_crit) * max(0.0, geo.kappa - cfg.kappa_crit)
    assert geo.eta == pytest.approx(cfg.eta0 * gate, rel=1e-12, abs=0)
    on = tau >= cfg.tau_crit and kappa >= cfg.kappa_crit
    assert (geo.eta > 0) is on and stagnating(geo, cfg) is on
    ref, rec = reference(snaps, cfg)
    torch.testing.assert_close(w_new, ref, rtol=0, atol=1e-12)


def test_zigzag_eta_value() -> None:
    _, geo = extrapolate(path(*PATHS["zig-zag"][0]))
    assert geo.eta == pytest.approx(0.03 * (S10 - 2.0) * (3.0 - 0.5), rel=1e-8)


@pytest.mark.parametrize("tau, kappa, expected", [
    (2.0, 0.5, True), (1.999, 5.0, False), (5.0, 0.499, False), (3.0, 1.0, True),
])
def test_stagnating(tau: float, kappa: float, expected: bool) -> None:
    assert stagnating(Trajectory(tau, kappa)) is expected


# --- the whole extrapolation against a direct transcription ----------------------------------

@pytest.mark.parametrize("steps, p, k_subspace", [
    (2, 7, 10), (4, 7, 2), (11, 7, 10), (11, 1000, 3), (4, 1000, 10), (19, 300, 10),
])
def test_matches_direct_algorithm(steps: int, p: int, k_subspace: int) -> None:
    cfg = GrowthConfig(k_subspace=k_subspace)
    snaps = random_walk(steps, p, seed=steps * p + k_subspace)
    w_new, geo = extrapolate(snaps, cfg)
    ref, rec = reference(snaps, cfg)
    torch.testing.assert_close(w_new, ref, rtol=0, atol=1e-10)
    for key in ("tau", "kappa", "beta", "gamma", "eta"):
        assert getattr(geo, key) == pytest.approx(rec[key], rel=1e-12), key
    assert (geo.k, geo.rank) == (rec["k"], rec["rank"])
    assert geo.beta == pytest.approx(cfg.beta0 / (geo.tau + cfg.eps), rel=1e-15)
    assert geo.gamma == pytest.approx(cfg.gamma0 / (1 + geo.kappa), rel=1e-15)
    moved = (w_new - snaps[-1]).norm() / (snaps[-1].norm() + cfg.eps)
    assert geo.relative_update == pytest.approx(float(moved), rel=1e-12)
    assert json.loads(json.dumps(geo.to_dict())) == geo.to_dict()


def test_never_calls_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("full SVD called")

    monkeypatch.setattr(torch.linalg, "svd", refuse)
    monkeypatch.setattr(torch, "svd", refuse)
    extrapolate(random_walk(11, 1000, seed=0))


# --- the subspace ----------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 4, 11])
@pytest.mark.parametrize("p", [7, 1000])
def test_projector_equals_svd_and_is_idempotent(steps: int, p: int) -> None:
    snaps = random_walk(steps, p, seed=10 * steps + p)
    space = velocity_subspace(snaps)
    w = torch.stack(snaps)
    v = w[1:] - w[:-1]
    _, sigma, vh = torch.linalg.svd(v - v.mean(0), full_matrices=False)
    assert space.k == min(10, steps - 1, p)  # the centred velocities have rank min(S−2, P)
    q_svd = vh[: space.k].T
    q = space.basis()
    torch.testing.assert_close(q @ q.T, q_svd @ q_svd.T, rtol=0, atol=1e-10)
    torch.testing.assert_close(q.T @ q, torch.eye(space.k, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(space.sigma[: space.k], sigma[: space.k], rtol=1e-10, atol=0)
    x = torch.randn(p, dtype=F64, generator=torch.Generator().manual_seed(1))
    once = space.project(x)
    torch.testing.assert_close(once, q_svd @ (q_svd.T @ x), rtol=0, atol=1e-10)
    torch.testing.assert_close(space.project(once), once, rtol=0, atol=1e-12)


def spectrum_path(ell: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """V̄ = 0.1·e1, centred velocities 3·(1,1,−1,−1)e1 + 2·(1,−1,1,−1)e2 + (1,−1,−1,1)e3:
    singular vectors e1, e2, e3 with σ = 6, 4, 2, so with k = 1, V̄ lies in P_1 and the escape
    is normalise(4·e2 + 2·e3) (ℓ = 2) or e2 (ℓ = 1)."""
    c = torch.tensor([[3, 2, 1], [3, -2, -1], [-3, 2, -1], [-3, -2, 1]], dtype=F64)
    v = torch.zeros(4, 6, dtype=F64)
    v[:, :3] = c
    v[:, 0] += 0.1
    w0 = torch.linspace(-1, 1, 6, dtype=F64)
    snaps = list(torch.cat([w0[None], w0 + v.cumsum(0)]))
    esc = torch.zeros(6, dtype=F64)
    esc[1:3] = torch.tensor([4.0, 2.0]) if ell == 2 else torch.tensor([1.0, 0.0])
    return snaps, esc / esc.norm()


@pytest.mark.parametrize("ell", [1, 2])
def test_spectrum_escape(ell: int) -> None:
    cfg = GrowthConfig(k_subspace=1, ell_orth=ell, tau_crit=0.0, kappa_crit=0.0)
    snaps, esc = spectrum_path(ell)
    w_new, geo = extrapolate(snaps, cfg)
    assert (geo.escape, geo.k, geo.rank) == ("spectrum", 1, 3)
    assert geo.eta == pytest.approx(cfg.eta0 * geo.tau * geo.kappa, rel=1e-15) and geo.eta > 0
    e1 = torch.zeros(6, dtype=F64)
    e1[0] = 1
    # V̂_U = e1·0.1/(0.1 + ε); Ā = (V_4 − V_1)/3 has e1 part −2, so Â_U = −e1·2/(2 + ε)
    by_hand = (snaps[-1] + geo.beta * 0.1 / (0.1 + 1e-8) * e1 - geo.gamma * 2 / (2 + 1e-8) * e1
               + geo.eta * esc)
    torch.testing.assert_close(w_new, by_hand, rtol=0, atol=1e-12)
    ref, _ = reference(snaps, cfg)
    torch.testing.assert_close(w_new, ref, rtol=0, atol=1e-12)


# --- signs -----------------------------------------------------------------------------------

CASES = {
    "orthogonal": (lambda: random_walk(11, 1000, seed=3), GrowthConfig(k_subspace=4)),
    "spectrum": (lambda: spectrum_path(2)[0],
                 GrowthConfig(k_subspace=1, tau_crit=0.0, kappa_crit=0.0)),
    "full rank": (lambda: random_walk(11, 7, seed=4),
                        GrowthConfig(k_subspace=7, tau_crit=0.0, kappa_crit=0.0)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pattern", ["all", "alternate", "first"])
def test_singular_vector_signs_change_nothing(
    case: str, pattern: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    make, cfg = CASES[case]
    snaps = make()
    w_plain, geo_plain = extrapolate(snaps, cfg)
    basis_plain = velocity_subspace(snaps, cfg).basis(velocity_subspace(snaps, cfg).rank)
    eigh = torch.linalg.eigh

    def flipped(a: torch.Tensor, *args, **kwargs):
        lam, u = eigh(a, *args, **kwargs)
        signs = torch.ones(u.shape[1], dtype=u.dtype)
        if pattern == "all":
            signs = -signs
        elif pattern == "alternate":
            signs[::2] = -1
        else:
            signs[-1] = -1  # eigh is ascending: the top singular vector
        return lam, u * signs

    monkeypatch.setattr(torch.linalg, "eigh", flipped)
    w_flipped, geo_flipped = extrapolate(snaps, cfg)
    assert torch.equal(w_flipped, w_plain)
    assert geo_flipped == geo_plain
    space = velocity_subspace(snaps, cfg)
    assert torch.equal(space.basis(space.rank), basis_plain)
    if case != "orthogonal":
        assert geo_plain.escape == "spectrum"


# --- dtypes, shapes, degenerate and bad input ------------------------------------------------

@pytest.mark.parametrize("shape", [(), (1,), (16,), (3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, F64])
def test_shape_and_dtype_kept(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    p = math.prod(shape)
    snaps = [w.reshape(shape).to(dtype) for w in random_walk(5, p, seed=p)]
    w_new, geo = extrapolate(snaps)
    assert w_new.shape == torch.Size(shape) and w_new.dtype == dtype
    ref, _ = reference(snaps, GrowthConfig())  # the same algorithm on the rounded snapshots
    torch.testing.assert_close(w_new, ref.to(dtype))
    assert math.isfinite(geo.relative_update)


def test_constant_trajectory() -> None:
    w = torch.randn(3, 4)
    snaps = [w.clone() for _ in range(5)]
    w_new, geo = extrapolate(snaps)
    assert torch.equal(w_new, w)
    values = geo.to_dict()
    assert all(math.isfinite(x) for x in values.values() if isinstance(x, float))
    assert (geo.tau, geo.kappa, geo.eta, geo.k, geo.rank) == (0.0, 0.0, 0.0, 0, 0)
    assert geo.beta == pytest.approx(0.1 / 1e-8) and geo.gamma == 0.15
    assert geo.escape == "spectrum" and geo.relative_update == 0.0


@pytest.mark.parametrize("snaps, message", [
    ([torch.zeros(3)] * 2, "at least 3 snapshots"),
    ([torch.zeros(3), torch.zeros(3), torch.zeros(4)], r"snapshot 2 has shape \(4,\)"),
    ([torch.zeros(3), torch.zeros(3), torch.tensor([0.0, float("nan"), 0.0])],
     "snapshot 2 has non-finite"),
    ([torch.zeros(3), torch.tensor([float("inf"), 0.0, 0.0]), torch.zeros(3)],
     "snapshot 1 has non-finite"),
    ([torch.zeros(3, dtype=torch.int64)] * 3, "floating point"),
])
def test_bad_snapshots(snaps: list[torch.Tensor], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        extrapolate(snaps)
    with pytest.raises(ValueError, match=message):
        trajectory_stats(snaps)


@pytest.mark.parametrize("option, value", [
    ("beta0", -0.1), ("eta0", float("nan")), ("tau_crit", float("inf")), ("k_subspace", 0),
    ("ell_orth", 1.5), ("eps", 0.0), ("k_subspace", True),
])
def test_config_validation(option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        GrowthConfig(**{option: value})


@pytest.mark.parametrize("case", CASES)
def test_streamed_in_chunks_gives_the_same(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks far smaller than the tensor (as for a large one) change only float64 rounding."""
    import surgeon.growth.geometry as geometry

    make, cfg = CASES[case]
    snaps = make()
    snaps = [s.repeat(-(-5000 // s.numel())) for s in snaps]  # P ≥ 5000: chunks of 1024
    whole, geo = extrapolate(snaps, cfg)
    monkeypatch.setattr(geometry, "CHUNK_BYTES", 1)
    chunked, geo_chunked = extrapolate(snaps, cfg)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    assert (geo_chunked.k, geo_chunked.rank, geo_chunked.escape) == (geo.k, geo.rank, geo.escape)
    for name in ("tau", "kappa", "beta", "gamma", "eta", "relative_update"):
        assert getattr(geo_chunked, name) == pytest.approx(getattr(geo, name), rel=1e-9, abs=1e-12)
    bad = [s.clone() for s in snaps]
    bad[2][-1] = float("nan")  # in the last chunk only
    with pytest.raises(ValueError, match="snapshot 2 has non-finite values"):
        extrapolate(bad, cfg)
