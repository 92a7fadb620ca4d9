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
basis is formed either: the float64 velocity matrix is the only large object, and tensors can
stream from memory-mapped checkpoints one at a time. Everything is computed in float64 (the
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
from collections.abc import Sequence
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


def _unit(v: torch.Tensor) -> torch.Tensor:
    """`v/‖v‖`, or zeros for a zero vector (the report's `normalise`)."""
    norm = torch.linalg.vector_norm(v)
    return v / norm if norm > 0 else torch.zeros_like(v)


def _velocities(snapshots: Sequence[torch.Tensor]) -> torch.Tensor:
    """Check the snapshots and return their velocities, `(S−1, P)` float64."""
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


def _stretch(v: torch.Tensor, delta: torch.Tensor, eps: float) -> Trajectory:
    """τ and κ of velocities `v` `(S−1, P)` whose sum is `delta` `(P,)`."""
    speeds = torch.linalg.vector_norm(v, dim=1)  # (S−1,)
    length = torch.linalg.vector_norm(delta)
    tau = speeds.sum() / (length + eps)
    # Δ̂ exactly unit (an ε in its norm would leave κ ≈ ε/‖Δ‖ on a straight path); 0 if Δ = 0.
    direction = delta / length if length > 0 else torch.zeros_like(delta)
    along = (v @ direction).tolist()  # ⟨V_t, Δ̂⟩, S−1 numbers
    # row by row, so no second (S−1, P) matrix: ‖V_t − ⟨V_t,Δ̂⟩Δ̂‖
    across = sum(float(torch.linalg.vector_norm(torch.add(row, direction, alpha=-c)))
                 for row, c in zip(v, along))
    kappa = across / (sum(abs(c) for c in along) + eps)
    return Trajectory(tau=float(tau), kappa=kappa)


def _subspace(centred: torch.Tensor, scale: float, k_subspace: int) -> Subspace:
    """The centred velocities' singular subspace from their Gram matrix; `scale` = ‖V‖_F."""
    gram = centred @ centred.T  # (S−1, S−1)
    lam, u = torch.linalg.eigh(gram)  # ascending
    lam, u = lam.flip(0), u.flip(1)
    keep = lam > (RANK_RTOL * scale) ** 2
    rank = int(keep.sum())  # λ descending: the kept ones come first
    sigma = lam[:rank].sqrt()
    return Subspace(centred=centred, left=u[:, :rank], sigma=sigma, k=min(k_subspace, rank))


def _projected_unit(
    space: Subspace, vector: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`P_k x/(‖P_k x‖ + ε)` (the report's eq. 5) and the remainder `(I − P_k)x`, both `(P,)`."""
    projected = space.project(vector)
    outside = vector - projected
    return projected.div_(torch.linalg.vector_norm(projected) + eps), outside


def trajectory_stats(
    snapshots: Sequence[torch.Tensor], config: GrowthConfig | None = None
) -> Trajectory:
    """τ and κ of one tensor's snapshots (oldest first, S >= 3, any shape): the stagnation
    signal, without the subspace."""
    v = _velocities(snapshots)
    return _stretch(v, v.sum(0), (config or GrowthConfig()).eps)


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
    the record of how it was made. `W_new` has the last snapshot's shape, dtype and device."""
    config = config or GrowthConfig()
    eps = config.eps
    v = _velocities(snapshots)  # (S−1, P)
    last = snapshots[-1]
    steps = v.shape[0]
    delta = v.sum(0)  # Δ = W_{S−1} − W_0, (P,)
    mean_velocity = delta / steps  # V̄
    mean_acceleration = (v[-1] - v[0]) / (steps - 1)  # Ā: the second differences telescope
    stretch = _stretch(v, delta, eps)
    del delta
    scale = float(torch.linalg.vector_norm(v))
    v -= mean_velocity  # centred in place: v is Vc from here on
    space = _subspace(v, scale, config.k_subspace)
    space_k, space_rank = space.k, space.rank

    velocity_u, outside = _projected_unit(space, mean_velocity, eps)  # V̂_U, (I − P_k)V̄
    acceleration_u, _ = _projected_unit(space, mean_acceleration, eps)  # Â_U
    del mean_velocity, mean_acceleration
    if torch.linalg.vector_norm(outside) >= eps:
        escape, v_esc = "orthogonal", _unit(outside)
    else:
        escape, v_esc = "spectrum", _unit(space.spectrum(config.ell_orth))
    del outside, space, v  # the velocities are no longer needed

    tau, kappa = stretch.tau, stretch.kappa
    beta = config.beta0 / (tau + eps)
    gamma = config.gamma0 / (1.0 + kappa)
    eta = config.eta0 * max(0.0, tau - config.tau_crit) * max(0.0, kappa - config.kappa_crit)

    base = last.reshape(-1).double()  # W_{S−1}, (P,)
    update = velocity_u.mul_(beta).add_(acceleration_u, alpha=gamma).add_(v_esc, alpha=eta)
    del acceleration_u, v_esc
    w_new = (base + update).to(last.dtype)
    moved = torch.linalg.vector_norm(update.copy_(w_new).sub_(base))  # after rounding to dtype
    relative = float(moved / (torch.linalg.vector_norm(base) + eps))
    geometry = Geometry(tau=tau, kappa=kappa, beta=beta, gamma=gamma, eta=eta, k=space_k,
                        rank=space_rank, escape=escape, relative_update=relative)
    return w_new.reshape(last.shape), geometry
