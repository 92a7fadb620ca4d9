"""Growing a trained model deeper: new blocks extrapolated from the training trajectory.

`snapshots` reads (and records) a run's snapshots; `geometry` turns one tensor's snapshots into
the extrapolated tensor (the AIether report's Algorithm 1) and says whether training has
stagnated; `insert` finds the block list and renumbers keys and config; `branches` finds the
projections a function-preserving (zero) block must zero; `grow` writes the grown checkpoint.
"""

from surgeon.growth.geometry import (
    Geometry,
    GrowthConfig,
    Subspace,
    Trajectory,
    extrapolate,
    stagnating,
    trajectory_stats,
    velocity_subspace,
)

__all__ = [
    "Geometry",
    "GrowthConfig",
    "Subspace",
    "Trajectory",
    "extrapolate",
    "stagnating",
    "trajectory_stats",
    "velocity_subspace",
]
