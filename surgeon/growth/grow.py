"""`surgeon.grow(snapdir, dst)`: a deeper checkpoint whose new blocks start from an informed point.

The checkpoint to grow is the newest snapshot of `snapdir` (or `checkpoint=`). Its block list is
found by bytes (`insert.find_blocks`); `count` blocks go in after block `after`, later blocks are
renumbered, and the config gets the new depth. The new blocks start as:

- `extrapolate` (default): each tensor of the source block moved along its trajectory over the
  snapshots (the AIether report's Algorithm 1, `geometry.extrapolate`); per-tensor τ, κ, β, γ, η
  and ‖ΔW‖/‖W‖ go to `growth.json`;
- `copy`: the source block byte for byte (progressive stacking);
- `zero`: the source block with the projections that write its residual branches at zero, so the
  grown model computes what the original did (`branches.branch_outputs`, from the traced graph);
- `random`: a fresh block, initialised as the model initialises its own (`_init_weights`).

Like `surgeon convert`, every unchanged tensor is copied byte for byte, shards are cut at
`max_shard_size`, the directory is written beside `dst` and renamed into place, and the same
inputs give the same bytes.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.files.atomic import atomic_directory, check_destination
from surgeon.files.output import carry_files, tensor_progress
from surgeon.files.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    Checkpoint,
    Stored,
    parse_size,
    total_bytes,
    write_checkpoint,
)
from surgeon.growth.geometry import GrowthConfig, extrapolate
from surgeon.growth.insert import (
    Blocks,
    InsertionError,
    find_blocks,
    new_indices,
    renumber,
    widen_config,
)
from surgeon.growth.snapshots import Snapshots, open_snapshots

INITS = ("extrapolate", "copy", "zero", "random")
GROWTH = "growth.json"
SEED = 0
_LABEL = "grown checkpoint"
# Files of a Trainer checkpoint that belong to the run, not to the model.
_RUN_FILES = ("trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt",
              "scaler.pt", "rng_state")
_NOT_CARRIED = (".safetensors", "model.safetensors.index.json", ".bin", ".pt", ".pth", ".pkl",
                ".gitattributes")


@dataclass
class Growth:
    """What `grow` did: the CLI's summary and its `--json` output."""

    snapshots: str
    checkpoint: str
    destination: str
    blocks: str  # the block list's prefix, e.g. "model.layers."
    depth: tuple[int, int]  # blocks before and after
    after: int
    source: int
    count: int
    init: str
    new_tensors: int
    new_parameters: int
    copied_bytes: int
    written_bytes: int
    config_changes: list[str]
    files: list[str]
    seconds: float
    tensors: list[dict[str, Any]] = field(default_factory=list)  # growth.json's per-tensor rows

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def grow(snapdir: str | os.PathLike, dst: str | os.PathLike, *, after: int | None = None,
         count: int = 1, init: str = "extrapolate", source: int | None = None,
         blocks: str | None = None, checkpoint: str | os.PathLike | None = None,
         settings: GrowthConfig | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
         progress: bool = False) -> Growth:
    """Insert `count` blocks after block `after` (default: the last) of the newest checkpoint in
    `snapdir`, initialised by `init` from block `source` (default: the one they follow), and write
    the grown checkpoint to `dst`. See the module docstring."""
    start = time.perf_counter()
    if init not in INITS:
        raise InsertionError(f"--init {init!r} is not one of {', '.join(INITS)}")
    parse_size(max_shard_size)
    settings = settings or GrowthConfig()
    dest = Path(dst).expanduser()
    given = [Path(p).expanduser() for p in (snapdir, checkpoint) if p is not None]
    check_destination(dest, overwrite=overwrite, sources=given, label=_LABEL)
    snaps, base_dir = _sources(Path(snapdir).expanduser(), checkpoint, init)
    base = Checkpoint.open(base_dir)
    sources = given + [base_dir, *base.files] + (
        [p for s in snaps for p in (s.path, *s.checkpoint.files)] if snaps is not None else [])
    check_destination(dest, overwrite=overwrite, sources=sources, label=_LABEL)
    config = _read_config(base_dir)
    found = find_blocks({k: s.nbytes for k, s in base.items()}, blocks)
    after = found.count - 1 if after is None else after
    moved = renumber(list(base), found, after, count)
    source = (after if after >= 0 else 0) if source is None else source
    if not 0 <= source < found.count:
        raise InsertionError(f"--source {source} is not a block: the checkpoint has blocks 0.."
                             f"{found.count - 1} under {found.prefix!r}")
    widened, changed = widen_config(config, found, after, count, source) if config else (None, [])

    out: dict[str, Stored | torch.Tensor] = {new: base[old] for old, new in moved.items()}
    fresh, rows = _new_blocks(init, found, source, base, base_dir, snaps, settings)
    for index in new_indices(after, count):
        for member, value in fresh.items():
            out[found.key(index, member)] = value
    new_params = count * sum(math.prod(v.shape) for v in fresh.values())
    copied = sum(v.nbytes for v in out.values() if isinstance(v, Stored))
    total = total_bytes(out.values())

    with atomic_directory(dest, overwrite=overwrite, sources=sources, label=_LABEL) as tmp:
        with tensor_progress(progress, len(out)) as advance:
            files = write_checkpoint(tmp, out, max_shard_size=max_shard_size, progress=advance)
        written = [f.name for f in files] + carry_files(base_dir, tmp, _not_carried)
        if widened is not None:
            (tmp / "config.json").write_text(json.dumps(widened, indent=2) + "\n")
            written.append("config.json")
        record = {"snapshots": str(snapdir), "checkpoint": str(base_dir), "blocks": found.prefix,
                  "after": after, "count": count, "source": source, "init": init,
                  "settings": asdict(settings),
                  "steps": snaps.steps if snaps is not None else [], "tensors": rows}
        (tmp / GROWTH).write_text(json.dumps(record, indent=2) + "\n")
        written.append(GROWTH)
    return Growth(str(snapdir), str(base_dir), str(dest), found.prefix,
                  (found.count, found.count + count), after, source, count, init,
                  len(fresh) * count, new_params, copied, total - copied, changed,
                  sorted(written), time.perf_counter() - start, rows)


def _sources(snapdir: Path, checkpoint: str | os.PathLike | None, init: str
             ) -> tuple[Snapshots | None, Path]:
    """(the snapshots, where there must be some, and the checkpoint directory to grow)."""
    is_model = (snapdir / "config.json").is_file() and checkpoint is None
    if init != "extrapolate" and is_model:
        return None, snapdir  # copy / zero / random need no trajectory
    snaps = open_snapshots(snapdir)
    if checkpoint is not None:
        return snaps, Path(checkpoint).expanduser()
    newest = snaps[len(snaps) - 1]
    if not (newest.path.is_dir() and (newest.path / "config.json").is_file()):
        raise InsertionError(f"the newest snapshot in {snapdir} ({newest.path}) is not a model "
                             "directory with config.json; pass --checkpoint DIR, the checkpoint "
                             "to grow")
    return snaps, newest.path


def _read_config(directory: Path) -> dict[str, Any] | None:
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InsertionError(f"{file} is not valid JSON: {e}") from e


def _new_blocks(init: str, blocks: Blocks, source: int, base: Checkpoint, base_dir: Path,
                snaps: Snapshots | None, settings: GrowthConfig
                ) -> tuple[dict[str, Stored | torch.Tensor], list[dict[str, Any]]]:
    """One new block's tensors by member name, and growth.json's rows for them."""
    members = {m: base[blocks.key(source, m)] for m in blocks.members[source]}
    rows: list[dict[str, Any]] = []
    if init == "copy":
        return dict(members), [{"key": m, "from": s.key, "init": "copy"}
                               for m, s in members.items()]
    if init == "zero":
        zeroed = _branch_members(blocks, source, base_dir)
        fresh: dict[str, Stored | torch.Tensor] = {}
        for m, s in members.items():
            hit = any(m.startswith(z + ".") for z in zeroed)
            fresh[m] = torch.zeros(s.shape, dtype=s.dtype) if hit else s
            rows.append({"key": m, "from": s.key, "init": "zero" if hit else "copy"})
        return fresh, rows
    if init == "random":
        fresh = _random_block(blocks, source, base_dir, members)
        return fresh, [{"key": m, "init": "random"} for m in fresh]
    assert snaps is not None
    fresh = {}
    for m, s in members.items():
        trajectory = snaps.trajectory(s.key)
        value, geometry = extrapolate(trajectory, settings)
        fresh[m] = value.to(s.dtype)
        rows.append({"key": m, "from": s.key, "init": "extrapolate", **geometry.to_dict()})
    return fresh, rows


def _branch_members(blocks: Blocks, source: int, base_dir: Path) -> list[str]:
    """Member prefixes (relative to the block) of the modules writing its residual branches,
    from the model traced with its weights on disk."""
    from surgeon.files.source import open_source
    from surgeon.graph.example_inputs import default_example
    from surgeon.graph.find import inspect_trace
    from surgeon.graph.tracing import trace_model
    from surgeon.growth.branches import branch_outputs

    opened = open_source(str(base_dir))
    block = f"{blocks.prefix}{source}"
    lazy = opened.lazy if opened.lazy is not None else contextlib.nullcontext()
    with torch.no_grad(), lazy:
        trace = trace_model(opened.model, default_example(opened.model))
        names = branch_outputs(trace, inspect_trace(trace).residuals, block)
    return [n[len(block) + 1:] for n in names]


def _random_block(blocks: Blocks, source: int, base_dir: Path,
                  members: dict[str, Stored]) -> dict[str, Stored | torch.Tensor]:
    """A block initialised as the model initialises its own (transformers' `_init_weights`, else
    each submodule's `reset_parameters`), seeded, in the checkpoint's dtypes."""
    from surgeon.files.source import open_source

    model = open_source(str(base_dir)).model
    block = copy.deepcopy(model.get_submodule(f"{blocks.prefix}{source}")).to_empty(device="cpu")
    init = getattr(model, "_init_weights", None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        for module in block.modules():
            if init is not None:
                init(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
    state = block.state_dict()
    missing = sorted(set(members) - set(state))
    if missing:
        raise InsertionError(f"a fresh {type(block).__name__} has no {missing[0]!r}; use another "
                             "--init")
    return {m: state[m].to(s.dtype).contiguous() for m, s in members.items()}


def _not_carried(name: str) -> bool:
    """Weights, the config (written widened), and the training run's own files."""
    return (name.endswith(_NOT_CARRIED) or name in ("config.json", "README.md", GROWTH)
            or name.startswith(_RUN_FILES))


@dataclass(frozen=True)
class BlockTrend:
    """τ and κ of one block's whole parameter vector over the snapshots, and the verdict."""

    index: int
    tau: float
    kappa: float
    stagnating: bool


def check(snapdir: str | os.PathLike, *, blocks: str | None = None,
          settings: GrowthConfig | None = None) -> list[BlockTrend]:
    """Per block of `snapdir`'s snapshots: τ and κ of the block's parameters taken as one vector
    (accumulated tensor by tensor, so one tensor's snapshots are in memory at a time), and
    whether it stagnates (τ ≥ τ_crit and κ ≥ κ_crit)."""
    settings = settings or GrowthConfig()
    snaps = open_snapshots(Path(snapdir).expanduser())
    newest = snaps[len(snaps) - 1].checkpoint
    found = find_blocks({k: newest[k].nbytes for k in snaps.keys if k in newest}, blocks)
    trends = []
    for index in found.indices:
        steps = len(snaps) - 1
        speed2 = torch.zeros(steps, dtype=torch.float64)  # Σ over tensors of ‖V_t‖²
        along = torch.zeros(steps, dtype=torch.float64)  # Σ of ⟨V_t, Δ⟩
        span2 = torch.zeros((), dtype=torch.float64)  # ‖Δ‖²
        for member in found.members[index]:
            w = torch.stack([t.double().flatten() for t in snaps.trajectory(
                found.key(index, member))])  # (S, P)
            v = w[1:] - w[:-1]  # (S-1, P)
            delta = w[-1] - w[0]
            speed2 += (v * v).sum(1)
            along += v @ delta
            span2 += delta @ delta
        span = span2.sqrt()
        eps = settings.eps
        tau = float(speed2.sqrt().sum() / (span + eps))
        parallel = along / (span + eps)  # ⟨V_t, Δ̂⟩
        across = (speed2 - parallel**2).clamp_min(0).sqrt()
        kappa = float(across.sum() / (parallel.abs().sum() + eps))
        trends.append(BlockTrend(index, tau, kappa,
                                 tau >= settings.tau_crit and kappa >= settings.kappa_crit))
    return trends
