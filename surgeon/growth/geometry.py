"""Adaptive geometric extrapolation of one tensor's training trajectory (AIether report, Alg. 1).

From snapshots `W_0 … W_{S−1}` of one tensor (oldest first, flattened to vectors of P entries):

- velocities `V_t = W_t − W_{t−1}`, mean velocity `V̄ = (W_{S−1} − W_0)/(S−1)`, mean
  acceleration `Ā` (the mean of the second differences, `(V_{S−1} − V_1)/(S−2)`),
  `Δ = W_{S−1} − W_0`, `Δ̂ = Δ/‖Δ‖`;
- stretch `τ = Σ‖V_t‖/(‖Δ‖ + ε)` (1 on a straight path) and curvature
  `κ = Σ‖V_t − ⟨V_t,Δ̂⟩Δ̂‖ / (Σ|⟨V_t,Δ̂⟩| + ε)` (0 on a straight path);
- `P_k`, the projector on the top `k` right singular vectors `q_i` of the centred velocity
  matrix `V − V̄`; `V̂_U = P_k V̄/(‖P_k V̄‖ + ε)`, `Â_U = P_k Ā/(‖P_k Ā‖ + ε)`;
- escape: `normalise((I − P_k)V̄)`, or where that is below ε, `normalise(Σ_{i=k+1}^{k+ℓ} σ_i q_i)`;
- `β = β0/(τ + ε)`, `γ = γ0/(1 + κ)`, `η = η0·max(0, τ − τ_crit)·max(0, κ − κ_crit)` (the gate);
- `W_new = W_{S−1} + β·V̂_U + γ·Â_U + η·v_esc`, the same for 1-D tensors (biases, norm gains).

The subspace comes from the `(S−1)×(S−1)` Gram matrix of the centred velocities, never from an
SVD of the `(S−1)×P` matrix, and `P_k v` is applied as `Vcᵀ U_k Σ_k⁻² U_kᵀ Vc v`, so no `(P, k)`
basis is formed either. `extrapolate` streams the snapshots in column chunks (three reads), so
no `(S−1)×P` matrix exists at all: memory is one chunk of every snapshot plus `W_new`, and
tensors can come from memory-mapped checkpoints one at a time (`velocity_subspace`, for
inspection, still forms the velocities). Everything is computed in float64 (the
Gram route squares the condition number; float64 keeps it exact enough, see `RANK_RTOL`), and
`W_new` comes back in the last snapshot's dtype, shape and device.

Deterministic: nothing depends on the signs a decomposition gives its singular vectors. `P_k`
and the orthogonal escape are sign-free by construction; in the spectrum escape each `q_i` is
taken with its largest-magnitude entry positive (the first such entry on ties). Aligning `q_i`
with `V̄` cannot fix the sign there: that branch is taken exactly when `V̄` lies in the span of
`q_1 … q_k`, so `⟨q_i, V̄⟩ ≈ 0` for every `i > k`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

# A singular value of the centred velocities counts when it exceeds RANK_RTOL·‖V‖_F (the
# uncentred velocities' norm). The Gram route resolves σ_i only down to about √(eps64)·σ_1
# (1.5e-8), and `q_i` is orthonormal to about eps64·(σ_1/σ_i)²: 2e-6 at the cut. Measuring
# against ‖V‖_F rather than σ_1 of the centred matrix makes a straight path, whose centred
# velocities are rounding noise, rank 0.
RANK_RTOL = 1e-5


@dataclass(frozen=True)
class GrowthConfig:
    """The extrapolation's constants; the defaults are the report's.

    `beta0`, `gamma0`, `eta0` scale the subspace-velocity, acceleration and escape terms;
    `tau_crit`, `kappa_crit` are the stagnation thresholds (and the escape gate's); `k_subspace`
    is the projector's rank, `ell_orth` how many further singular vectors the spectrum escape
    sums; `eps` is the report's ε, guarding its divisions and choosing the escape branch
    (absolute, in the weights' units).
    """

    beta0: float = 0.1
    gamma0: float = 0.15
    eta0: float = 0.03
    tau_crit: float = 2.0
    kappa_crit: float = 0.5
    k_subspace: int = 10
    ell_orth: int = 5
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for name in ("beta0", "gamma0", "eta0", "tau_crit", "kappa_crit"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("k_subspace", "ell_orth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {self.eps!r}")


@dataclass(frozen=True)
class Trajectory:
    """How a path bends: stretch `tau` (1 when straight) and curvature `kappa` (0 when straight)."""

    tau: float
    kappa: float


@dataclass(frozen=True)
class Geometry:
    """What one tensor's extrapolation saw and did.

    `k` is the projector's rank (`min(k_subspace, rank)`), `rank` the numerical rank of the
    centred velocities, `escape` the branch of the escape direction ("orthogonal": `(I − P_k)V̄`,
    "spectrum": the next singular vectors), `relative_update` `‖W_new − W_{S−1}‖/(‖W_{S−1}‖ + ε)`
    measured on the returned tensor, after rounding to its dtype.
    """

    tau: float
    kappa: float
    beta: float
    gamma: float
    eta: float
    k: int
    rank: int
    escape: str
    relative_update: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Subspace:
    """The right singular vectors of the centred velocities `Vc`, held implicitly.

    `q_i = Vcᵀ u_i / σ_i` with `u_i` the Gram matrix's eigenvectors; only the `rank` singular
    values above the tolerance are kept, in descending order.
    """

    centred: torch.Tensor  # (S−1, P) float64: V − V̄
    left: torch.Tensor  # (S−1, rank) float64: u_1 … u_rank
    sigma: torch.Tensor  # (rank,) float64, descending
    k: int  # the projector's rank, <= rank

    @property
    def rank(self) -> int:
        return int(self.sigma.numel())

    def vector(self, i: int) -> torch.Tensor:
        """`q_i` (0-based, `(P,)`), with its largest-magnitude entry positive."""
        q = self.centred.T @ self.left[:, i] / self.sigma[i]
        return q * _canonical_sign(q)

    def basis(self, count: int | None = None) -> torch.Tensor:
        """The first `count` (default `k`) vectors as columns, `(P, count)`: for inspection;
        the extrapolation itself never forms it."""
        count = self.k if count is None else count
        return torch.stack([self.vector(i) for i in range(count)], dim=1)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        """`P_k v = Σ_{i≤k} q_i⟨q_i, v⟩ = Vcᵀ U_k Σ_k⁻² U_kᵀ Vc v`, for `v` of shape `(P,)`."""
        if self.k == 0:
            return torch.zeros_like(v)
        u = self.left[:, : self.k]  # (S−1, k)
        coeffs = u @ ((u.T @ (self.centred @ v)) / self.sigma[: self.k].square())  # (S−1,)
        return self.centred.T @ coeffs

    def spectrum(self, ell: int) -> torch.Tensor:
        """`Σ_{i=k+1}^{k+ℓ} σ_i q_i` over the singular values there are, `(P,)` (zero if none)."""
        total = torch.zeros(self.centred.shape[1], dtype=torch.float64, device=self.sigma.device)
        for i in range(self.k, min(self.k + ell, self.rank)):
            total += self.sigma[i] * self.vector(i)
        return total


def _canonical_sign(q: torch.Tensor) -> float:
    """±1 (0-dim) that makes `q`'s largest-magnitude entry positive (the first one on ties).
    `|−x| = |x|` exactly, so `q` and `−q` pick the same entry and end up identical."""
    return -1.0 if q[torch.argmax(q.abs())] < 0 else 1.0


def _check(snapshots: Sequence[torch.Tensor]) -> None:
    """Refuse snapshots the extrapolation cannot use, naming the first one at fault."""
    if len(snapshots) < 3:
        raise ValueError(f"extrapolation needs at least 3 snapshots (for an acceleration), "
                         f"got {len(snapshots)}")
    first = snapshots[0]
    for i, w in enumerate(snapshots):
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"snapshot {i} is a {type(w).__name__}, not a tensor")
        if not w.is_floating_point():
            raise ValueError(f"snapshot {i} has dtype {w.dtype}; snapshots must be floating point")
        if w.shape != first.shape:
            raise ValueError(f"snapshot {i} has shape {tuple(w.shape)}, snapshot 0 has "
                             f"{tuple(first.shape)}: all snapshots must have the same shape")
        if w.device != first.device:
            raise ValueError(f"snapshot {i} is on {w.device}, snapshot 0 on {first.device}")


def _velocities(snapshots: Sequence[torch.Tensor]) -> torch.Tensor:
    """Check the snapshots and return their velocities, `(S−1, P)` float64 (for inspection:
    `extrapolate` streams instead)."""
    _check(snapshots)
    first = snapshots[0]
    p = first.numel()
    v = torch.empty(len(snapshots) - 1, p, dtype=torch.float64, device=first.device)
    for t in range(1, len(snapshots)):  # one snapshot pair in float64 at a time
        torch.sub(snapshots[t].reshape(p).double(), snapshots[t - 1].reshape(p).double(),
                  out=v[t - 1])
        # A NaN or inf in either snapshot makes the row's sum non-finite (float64 cannot
        # overflow on a sum of float32 differences): one cheap reduction instead of a mask.
        if not bool(torch.isfinite(v[t - 1].sum())):
            for i in (t - 1, t):
                if not bool(torch.isfinite(snapshots[i]).all()):
                    raise ValueError(f"snapshot {i} has non-finite values (NaN or inf)")
            raise ValueError(f"the difference of snapshots {t - 1} and {t} overflows float64")
    return v


def _subspace(centred: torch.Tensor, scale: float, k_subspace: int) -> Subspace:
    """The centred velocities' singular subspace from their Gram matrix; `scale` = ‖V‖_F."""
    gram = centred @ centred.T  # (S−1, S−1)
    lam, u = torch.linalg.eigh(gram)  # ascending
    lam, u = lam.flip(0), u.flip(1)
    keep = lam > (RANK_RTOL * scale) ** 2
    rank = int(keep.sum())  # λ descending: the kept ones come first
    sigma = lam[:rank].sqrt()
    return Subspace(centred=centred, left=u[:, :rank], sigma=sigma, k=min(k_subspace, rank))


def trajectory_stats(
    snapshots: Sequence[torch.Tensor], config: GrowthConfig | None = None
) -> Trajectory:
    """τ and κ of one tensor's snapshots (oldest first, S >= 3, any shape): the stagnation
    signal, without the subspace (two streamed reads, as `extrapolate` makes them)."""
    eps = (config or GrowthConfig()).eps
    _check(snapshots)
    first = _first_pass(snapshots)
    across2 = torch.zeros_like(first.dots)
    for chunk in _chunks(snapshots):
        across2 += _across2(chunk, first)
    return Trajectory(tau=first.tau(eps), kappa=first.kappa(across2, eps))


def velocity_subspace(
    snapshots: Sequence[torch.Tensor], config: GrowthConfig | None = None
) -> Subspace:
    """The subspace `extrapolate` projects on, for inspection (`basis()`, `project(v)`)."""
    config = config or GrowthConfig()
    v = _velocities(snapshots)
    scale = float(torch.linalg.vector_norm(v))
    v -= v.sum(0) / v.shape[0]
    return _subspace(v, scale, config.k_subspace)


def stagnating(trajectory: Trajectory | Geometry, config: GrowthConfig | None = None) -> bool:
    """One evaluation's stagnation test: `τ >= τ_crit and κ >= κ_crit` (the trigger to grow is
    this holding for `patience` consecutive evaluations, which the caller counts)."""
    config = config or GrowthConfig()
    return trajectory.tau >= config.tau_crit and trajectory.kappa >= config.kappa_crit


def extrapolate(
    snapshots: Sequence[torch.Tensor], config: GrowthConfig | None = None
) -> tuple[torch.Tensor, Geometry]:
    """`W_new` for one tensor from its snapshots (oldest first, S >= 3, all of one shape), and
    the record of how it was made. `W_new` has the last snapshot's shape, dtype and device.

    Streamed: the snapshots are read in column chunks (at most `CHUNK_BYTES` of float64 for all
    S), three times — the centred velocities' Gram matrix and their products with V̄ and Ā; the
    norms that decide branches and scale terms, and the spectrum vectors' signs; then `W_new` —
    so memory is one chunk of every snapshot plus `W_new`, never S float64 copies of the
    tensor. Every vector formed is `Vcᵀc + w·V̄`, carried as its coefficients (S−1 numbers and
    w); V̄ and Vc are column-local, so each chunk computes its own exactly."""
    config = config or GrowthConfig()
    eps = config.eps
    _check(snapshots)
    last = snapshots[-1]
    first = _first_pass(snapshots)
    tau = first.tau(eps)
    lam, u = torch.linalg.eigh(first.gram)  # ascending
    lam, u = lam.flip(0), u.flip(1)
    rank = int((lam > (RANK_RTOL * first.scale) ** 2).sum())
    sigma, k = lam[:rank].sqrt(), min(config.k_subspace, rank)
    u_k = u[:, :k]

    def project(product: torch.Tensor) -> torch.Tensor:  # Vc x → c with P_k x = Vcᵀc
        return u_k @ ((u_k.T @ product) / sigma[:k].square())

    velocity_c, acceleration_c = project(first.by_velocity), project(first.by_acceleration)
    spectrum = [u[:, i] / sigma[i] for i in range(k, min(k + config.ell_orth, rank))]  # q_i

    # pass 2: curvature, ‖P_kV̄‖, ‖P_kĀ‖, ‖(I − P_k)V̄‖ from the vectors; q_i's signs
    across2 = torch.zeros_like(first.dots)
    norms2 = torch.zeros(3, dtype=torch.float64, device=last.device)
    coeffs = torch.stack([velocity_c, acceleration_c, -velocity_c], dim=1)  # (m, 3)
    peaks = [(0.0, 1.0)] * len(spectrum)  # each q_i's largest |entry| so far, and its sign
    for chunk in _chunks(snapshots):
        across2 += _across2(chunk, first)
        vectors = chunk.centred.T @ coeffs  # (n, 3)
        vectors[:, 2] += chunk.mean  # (I − P_k)V̄
        norms2 += torch.einsum("nj,nj->j", vectors, vectors)
        for i, c in enumerate(spectrum):
            q = chunk.centred.T @ c
            j = int(torch.argmax(q.abs()))
            if abs(float(q[j])) > peaks[i][0]:  # the first such entry on ties
                peaks[i] = (abs(float(q[j])), -1.0 if q[j] < 0 else 1.0)
    kappa = first.kappa(across2, eps)
    velocity_norm, acceleration_norm, outside_norm = norms2.sqrt().tolist()
    if outside_norm >= eps:  # normalise((I − P_k)V̄)
        escape, esc_c, esc_w = "orthogonal", -velocity_c / outside_norm, 1.0 / outside_norm
    else:  # normalise(Σ σ_i q_i), i = k+1 … k+ℓ
        esc_c = sum((sigma[k + i] * sign * c for i, (c, (_, sign)) in
                     enumerate(zip(spectrum, peaks))), torch.zeros_like(velocity_c))
        norm = float((esc_c @ first.gram @ esc_c).clamp_min(0).sqrt())
        escape, esc_c, esc_w = "spectrum", esc_c / norm if norm > 0 else esc_c * 0, 0.0

    beta = config.beta0 / (tau + eps)
    gamma = config.gamma0 / (1.0 + kappa)
    eta = config.eta0 * max(0.0, tau - config.tau_crit) * max(0.0, kappa - config.kappa_crit)
    update_c = (velocity_c * (beta / (velocity_norm + eps))
                + acceleration_c * (gamma / (acceleration_norm + eps)) + esc_c * eta)
    update_w = esc_w * eta

    # pass 3: W_new = W_{S−1} + Vcᵀ·update_c + update_w·V̄, rounded to the dtype per chunk
    w_new = torch.empty(last.numel(), dtype=last.dtype, device=last.device)
    moved2 = base2 = 0.0
    for chunk in _chunks(snapshots):
        w_new[chunk.columns] = chunk.last + chunk.centred.T @ update_c + update_w * chunk.mean
        moved = w_new[chunk.columns].double() - chunk.last
        moved2 += float(moved @ moved)
        base2 += float(chunk.last @ chunk.last)
    relative = math.sqrt(moved2) / (math.sqrt(base2) + eps)
    geometry = Geometry(tau=tau, kappa=kappa, beta=beta, gamma=gamma, eta=eta, k=k,
                        rank=rank, escape=escape, relative_update=relative)
    return w_new.reshape(last.shape), geometry


CHUNK_BYTES = 2 * 2**20  # one column chunk of all S snapshots in float64: cache-sized


@dataclass
class _Chunk:
    """Columns of the snapshots, float64: the velocities `(S−1, n)`, Δ = W_{S−1} − W_0 and
    their mean V̄ `(n,)`, the centred velocities, Ā `(n,)` and the last snapshot `(n,)`."""

    columns: slice
    velocities: torch.Tensor
    delta: torch.Tensor
    mean: torch.Tensor
    centred: torch.Tensor
    acceleration: torch.Tensor
    last: torch.Tensor


def _chunks(snapshots: Sequence[torch.Tensor]) -> Iterator[_Chunk]:
    """The snapshots, checked finite, in column chunks of at most `CHUNK_BYTES`."""
    flat = [w.reshape(-1) for w in snapshots]
    p, s = flat[0].numel(), len(flat)
    step = max(1024, CHUNK_BYTES // (8 * s))
    for start in range(0, max(p, 1), step):
        columns = slice(start, min(p, start + step))
        rows = torch.stack([f[columns].double() for f in flat])  # (S, n)
        v = rows[1:] - rows[:-1]
        # A NaN or inf in either snapshot makes the sum non-finite (float64 cannot overflow on
        # a sum of float32 differences): one cheap reduction instead of a mask.
        if not bool(torch.isfinite(v.sum())):
            for i in range(s):
                if not bool(torch.isfinite(rows[i]).all()):
                    raise ValueError(f"snapshot {i} has non-finite values (NaN or inf)")
            raise ValueError("the difference of two snapshots overflows float64")
        delta = rows[-1] - rows[0]  # Σ V_t (a sum over dim 0 is slow on CPU)
        mean = delta / (s - 1)
        yield _Chunk(columns, v, delta, mean, v - mean, (v[-1] - v[0]) / (s - 2), rows[-1])


@dataclass
class _FirstPass:
    """What one read of the snapshots gives: the centred Gram matrix `Vc Vcᵀ`, `Vc V̄` and
    `Vc Ā`, the speeds ‖V_t‖, ‖Δ‖ and ⟨V_t, Δ⟩."""

    gram: torch.Tensor
    by_velocity: torch.Tensor
    by_acceleration: torch.Tensor
    speeds2: torch.Tensor
    length: float
    dots: torch.Tensor

    @property
    def scale(self) -> float:  # ‖V‖_F, what the rank tolerance is relative to
        return float(self.speeds2.sum().sqrt())

    def along(self) -> torch.Tensor:  # ⟨V_t, Δ̂⟩
        return self.dots / self.length if self.length > 0 else torch.zeros_like(self.dots)

    def tau(self, eps: float) -> float:
        return float(self.speeds2.sqrt().sum()) / (self.length + eps)

    def kappa(self, across2: torch.Tensor, eps: float) -> float:
        return float(across2.sqrt().sum()) / (float(self.along().abs().sum()) + eps)


def _first_pass(snapshots: Sequence[torch.Tensor]) -> _FirstPass:
    m = len(snapshots) - 1
    device = snapshots[-1].device
    zeros = [torch.zeros(m, dtype=torch.float64, device=device) for _ in range(4)]
    gram = torch.zeros(m, m, dtype=torch.float64, device=device)
    by_velocity, by_acceleration, speeds2, dots = zeros
    length2 = 0.0
    for chunk in _chunks(snapshots):
        gram += chunk.centred @ chunk.centred.T
        by_velocity += chunk.centred @ chunk.mean
        by_acceleration += chunk.centred @ chunk.acceleration
        speeds2 += torch.einsum("tn,tn->t", chunk.velocities, chunk.velocities)
        dots += chunk.velocities @ chunk.delta
        length2 += float(chunk.delta @ chunk.delta)
    return _FirstPass(gram, by_velocity, by_acceleration, speeds2, math.sqrt(length2), dots)


def _across2(chunk: _Chunk, first: _FirstPass) -> torch.Tensor:
    """‖V_t − ⟨V_t,Δ̂⟩Δ̂‖² on the chunk's columns, `(S−1,)`: κ's numerator, squared."""
    if first.length == 0:
        across = chunk.velocities
    else:
        across = chunk.velocities - first.along()[:, None] * (chunk.delta / first.length)
    return torch.einsum("tn,tn->t", across, across)
