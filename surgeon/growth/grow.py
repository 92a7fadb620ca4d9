"""`surgeon.grow(snapdir, dst)`: a deeper checkpoint whose new blocks start from an informed point.

The checkpoint to grow is the newest snapshot of `snapdir` (or `checkpoint=`); for a Trainer
output whose `snapshots/` a `SnapshotCallback` wrote, the model the run saved last; a
`SnapshotRecorder` directory holds weights only and needs `checkpoint=`, whose shapes must match
the snapshots'. Its block list is found by bytes (`insert.find_blocks`); `count` blocks go in
after block `after`, later blocks are renumbered, and the config gets the new depth
(`insert.widen_config`: that block list's depth, its per-layer lists, and where the config
derives block kinds from a cycled list or a period and offset, the entries that keep every block's
kind). The new blocks start as:

- `extrapolate` (default): each tensor of the source block moved along its trajectory over the
  snapshots (the AIether report's Algorithm 1, `geometry.extrapolate`); per-tensor τ, κ, β, γ, η
  and ‖ΔW‖/‖W‖ go to `growth.json`;
- `copy`: the source block byte for byte (progressive stacking);
- `zero`: the source block with what last writes each residual branch at its zero value (an
  output projection, a fused experts' `down_proj`, a post-norm's gain: `branches.branch_zeros`,
  from the traced graph), so the grown model computes what the original did; the zeroed block is
  run on its captured inputs and must return them (`check_identity`), else grow refuses;
- `random`: a fresh block, initialised as the model initialises its own (`_init_weights`).

Zero and random values are written under the checkpoint's names: a model whose experts
transformers fuses on load (one 3-D parameter) gets them split back as `save_pretrained` does.
The widened config is built on the meta device first, and each new block must be of the source
block's kind (`check_grown_blocks`: a config that derives block kinds from indices in a way
`widen_config` cannot rewrite is refused with the `--source` that fits). A parameter a block
shares with an earlier one (Zamba's shared transformer, stored once) is shared by new blocks too.

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
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.files.atomic import atomic_directory, check_destination
from surgeon.files.budget import check_grow_count
from surgeon.files.output import carry_files, tensor_progress
from surgeon.files.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX,
    SINGLE,
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
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
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
         progress: bool = False, trust_remote_code: bool = False) -> Growth:
    """Insert `count` blocks after block `after` (default: the last) of the newest checkpoint in
    `snapdir`, initialised by `init` from block `source` (default: the one they follow), and write
    the grown checkpoint to `dst`. See the module docstring. The checkpoint's own code
    (`auto_map`), needed to build it for `zero` / `random`, runs only with `trust_remote_code`."""
    start = time.perf_counter()
    check_grow_count(count)  # bounded before anything is read
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
    check_grow_count(count, found.count, found.prefix)  # at most doubles the model
    after = found.count - 1 if after is None else after
    moved = renumber(list(base), found, after, count)
    source = (after if after >= 0 else 0) if source is None else source
    if not 0 <= source < found.count:
        raise InsertionError(f"--source {source} is not a block: the checkpoint has blocks 0.."
                             f"{found.count - 1} under {found.prefix!r}")
    _check_shapes(snaps, base, base_dir, found, source, init)
    widened, changed = widen_config(config, found, after, count, source) if config else (None, [])
    if widened is not None:
        check_grown_blocks(widened, found, after, count, source, trust_remote_code)

    out: dict[str, Stored | torch.Tensor] = {new: base[old] for old, new in moved.items()}
    fresh, rows = _new_blocks(init, found, source, base, base_dir, snaps, settings,
                              trust_remote_code)
    first = first_only(found)  # T5's relative_attention_bias: it belongs to position 0
    for member in first if after == -1 else ():
        del out[found.key(count, member)]  # the old block 0, now at `count`, loses them
    added: list[str] = []
    for index in new_indices(after, count):
        for member, value in fresh.items():
            if index == 0 or member not in first:
                added.append(found.key(index, member))
                out[added[-1]] = value
        for member in first if index == 0 and source != 0 else ():
            added.append(found.key(0, member))
            out[added[-1]] = base[found.key(0, member)]
    new_params = sum(math.prod(out[k].shape) for k in added)
    copied = sum(v.nbytes for v in out.values() if isinstance(v, Stored))
    total = total_bytes(out.values())

    with atomic_directory(dest, overwrite=overwrite, sources=sources, label=_LABEL) as tmp:
        with tensor_progress(progress, len(out)) as advance:
            files = write_checkpoint(tmp, out, max_shard_size=max_shard_size, progress=advance)
        written = [f.name for f in files] + carry_files(base_dir, tmp, _not_carried)
        if widened is not None:
            (tmp / "config.json").write_text(json.dumps(widened, indent=2) + "\n")
            written.append("config.json")
        record = {"snapshots": Path(snapdir).expanduser().resolve().name,  # no local paths
                  "checkpoint": recorded_path(base_dir, Path(snapdir).expanduser()),
                  "blocks": found.prefix,
                  "after": after, "count": count, "source": source, "init": init,
                  "settings": asdict(settings),
                  "steps": snaps.steps if snaps is not None else [], "tensors": rows}
        (tmp / GROWTH).write_text(json.dumps(record, indent=2) + "\n")
        written.append(GROWTH)
    return Growth(str(snapdir), str(base_dir), str(dest), found.prefix,
                  (found.count, found.count + count), after, source, count, init,
                  len(added), new_params, copied, total - copied, changed,
                  sorted(written), time.perf_counter() - start, rows)


def first_only(blocks: Blocks) -> set[str]:
    """Members only block 0 has (T5's relative_attention_bias): the model builds them for the
    first position, so a block inserted elsewhere goes without, and one inserted first takes
    them from the old block 0. Only where block 0 is the others plus extras: a first block
    built otherwise (a dense MLP before MoE blocks) is a different block, not a position."""
    if blocks.count < 2:
        return set()
    head = set(blocks.members[blocks.indices[0]])
    rest = set().union(*(blocks.members[i] for i in blocks.indices[1:]))
    return head - rest if rest <= head else set()


def _sources(snapdir: Path, checkpoint: str | os.PathLike | None, init: str
             ) -> tuple[Snapshots | None, Path]:
    """(the snapshots, where there must be some, and the checkpoint directory to grow).

    A Trainer output directory with `SnapshotCallback`'s `snapshots/` grows the model the run
    saved last (the output directory itself after `trainer.save_model()`, else the newest
    `checkpoint-<step>/`); a `SnapshotRecorder` directory holds only weights, so it needs
    `checkpoint`."""
    is_model = (snapdir / "config.json").is_file() and checkpoint is None
    if init != "extrapolate" and is_model:
        return None, snapdir  # copy / zero / random need no trajectory
    snaps = open_snapshots(snapdir)
    if checkpoint is not None:
        return snaps, Path(checkpoint).expanduser()
    if snaps.layout == "recorder":
        return snaps, _recorded_base(snapdir, snaps)
    newest = snaps[len(snaps) - 1]
    if not (newest.path.is_dir() and (newest.path / "config.json").is_file()):
        raise InsertionError(f"the newest snapshot in {snapdir} ({newest.path}) is not a model "
                             "directory with config.json; pass --checkpoint DIR, the checkpoint "
                             "to grow")
    return snaps, newest.path


def _is_model(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (
        (directory / SINGLE).is_file() or (directory / INDEX).is_file())


def _saved_step(directory: Path) -> float:
    """The step a Trainer checkpoint was saved at (its trainer_state.json), else +inf: a model
    saved into the output directory by `trainer.save_model()` at the end of the run."""
    try:
        step = json.loads((directory / "trainer_state.json").read_text())["global_step"]
        return float(step) if isinstance(step, int) and not isinstance(step, bool) else math.inf
    except (OSError, ValueError, KeyError, TypeError):
        return math.inf


def _recorded_base(snapdir: Path, snaps: Snapshots) -> Path:
    """The checkpoint to grow beside recorder snapshots: the model of the Trainer run whose
    output directory `snapdir` is (SnapshotCallback's layout), or a one-line refusal."""
    last = snaps.steps[-1]
    where = f"{snaps.path} holds SnapshotRecorder weights (steps {snaps.steps[0]}..{last}), not "
    if snaps.path == snapdir:
        raise InsertionError(where + "a model to grow; pass --checkpoint DIR, the model saved "
                             "(save_pretrained) at the end of the run they were recorded in")
    found = [(int(m.group(1)), e) for e in snapdir.iterdir()
             if (m := _CHECKPOINT_DIR.fullmatch(e.name)) and e.is_dir() and _is_model(e)]
    if _is_model(snapdir):
        found.append((_saved_step(snapdir), snapdir))
    if not found:
        raise InsertionError(where + f"a model, and {snapdir} holds no saved model (config.json "
                             "and weights, or checkpoint-<step>/); call trainer.save_model() "
                             "after training, or pass --checkpoint DIR")
    step, base = max(found, key=lambda f: (f[0], f[1] == snapdir))
    if step < last:
        raise InsertionError(f"the newest model in {snapdir} ({base.name}, step {step:g}) is "
                             f"older than the last snapshot (step {last}); call "
                             "trainer.save_model() after training, or pass --checkpoint DIR")
    return base


def _check_shapes(snaps: Snapshots | None, base: Checkpoint, base_dir: Path, found: Blocks,
                  source: int, init: str) -> None:
    """Refuse a checkpoint whose tensors differ in shape from the snapshots' (another model
    than the one recorded), and an extrapolation from a block the snapshots do not hold."""
    if snaps is None:
        return
    for key in base:
        held = snaps.tied.get(key, key)
        if held in snaps.shapes and tuple(base[key].shape) != tuple(snaps.shapes[held]):
            raise InsertionError(
                f"{key!r} is {list(base[key].shape)} in the checkpoint {base_dir} but "
                f"{list(snaps.shapes[held])} in the snapshots in {snaps.path}; grow the "
                "checkpoint the snapshots were recorded from (--checkpoint DIR)")
    if init != "extrapolate":
        return
    lacking = [m for m in found.members[source]
               if snaps.tied.get(found.key(source, m), found.key(source, m)) not in snaps.shapes]
    if lacking:
        recorded = sorted({int(head) for k in snaps.keys if k.startswith(found.prefix)
                           and (head := k[len(found.prefix):].split(".", 1)[0]).isdigit()})
        raise InsertionError(
            f"the snapshots in {snaps.path} hold no {found.key(source, lacking[0])!r} to "
            f"extrapolate block {source} from (blocks recorded under {found.prefix!r}: "
            f"{recorded or 'none'}); pass --source with a recorded block, or --init copy")


def _read_config(directory: Path) -> dict[str, Any] | None:
    file = directory / "config.json"
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise InsertionError(f"{file} is not valid JSON: {e}") from e


def _new_blocks(init: str, blocks: Blocks, source: int, base: Checkpoint, base_dir: Path,
                snaps: Snapshots | None, settings: GrowthConfig, trust_remote_code: bool = False
                ) -> tuple[dict[str, Stored | torch.Tensor], list[dict[str, Any]]]:
    """One new block's tensors by member name, and growth.json's rows for them."""
    members = {m: base[blocks.key(source, m)] for m in blocks.members[source]}
    rows: list[dict[str, Any]] = []
    if init == "copy":
        return dict(members), [{"key": m, "from": s.key, "init": "copy"}
                               for m, s in members.items()]
    if init == "zero":
        zeroed = _branch_members(blocks, source, base_dir, members, trust_remote_code)
        fresh: dict[str, Stored | torch.Tensor] = {}
        for m, s in members.items():
            fresh[m] = zeroed.get(m, s)
            rows.append({"key": m, "from": s.key, "init": "zero" if m in zeroed else "copy"})
        return fresh, rows
    if init == "random":
        fresh = _random_block(blocks, source, base_dir, members, trust_remote_code)
        return fresh, [{"key": m, "init": "random"} for m in fresh]
    assert snaps is not None
    fresh = {}
    for m, s in members.items():
        trajectory = snaps.trajectory(s.key)
        value, geometry = extrapolate(trajectory, settings)
        fresh[m] = value.to(s.dtype)
        rows.append({"key": m, "from": s.key, "init": "extrapolate", **geometry.to_dict()})
    return fresh, rows


def _branch_members(blocks: Blocks, source: int, base_dir: Path, members: dict[str, Stored],
                    trust_remote_code: bool = False) -> dict[str, torch.Tensor]:
    """The new values of the members (relative to the block) that write its residual branches,
    from the model traced with its weights on disk: the writers' parameters at their zero values
    (`branches.branch_zeros`), under the checkpoint's names (a model whose experts are fused
    reads a checkpoint that stores them one by one: the fused parameter's zeros land in each)."""
    from surgeon.files.source import open_source
    from surgeon.files.weights import read_tensor
    from surgeon.graph.example_inputs import default_example
    from surgeon.graph.find import inspect_trace
    from surgeon.graph.tracing import trace_model
    from surgeon.growth.branches import branch_zeros

    opened = open_source(str(base_dir), trust_remote_code=trust_remote_code)
    block = f"{blocks.prefix}{source}"
    lazy = opened.lazy if opened.lazy is not None else contextlib.nullcontext()
    example = default_example(opened.model)
    with torch.no_grad(), lazy:
        trace = trace_model(opened.model, example)
        fills = branch_zeros(trace, inspect_trace(trace).residuals, block)
        check_identity(opened.model, block, fills, example)
    module = opened.model.get_submodule(block)
    # NaN marks "keep the stored value": it survives the checkpoint's renaming and re-fusing
    marks = {f"{block}.{n}": torch.full(p.shape, fills.get(f"{block}.{n}", math.nan))
             for n, p in module.named_parameters()}
    stored = _checkpoint_names(opened.model, opened.lazy is None, marks, block, members)
    out: dict[str, torch.Tensor] = {}
    for m, mark in stored.items():
        if mark.isnan().all():
            continue
        keep = mark.isnan()
        value = mark if not keep.any() else torch.where(keep, read_tensor(members[m]).float(),
                                                        mark)
        out[m] = value.to(members[m].dtype).contiguous()
    return out


def check_identity(model: torch.nn.Module, block: str, fills: dict[str, float],
                   example: dict[str, torch.Tensor]) -> None:
    """Run a copy of `block`, its parameters in `fills` (qualified names) set to their values,
    on the inputs it gets in `model(**example)`, and raise `BranchError` unless it returns its
    input: a graph walk that named the wrong writer (a router, a projection before a post-norm)
    must refuse rather than write a block that changes the model. Where the block cannot be run
    on its own (its inputs cannot be captured), the graph walk stands."""
    from surgeon.files.lazy import materialized
    from surgeon.growth.branches import BranchError

    module = model.get_submodule(block)
    seen: dict[str, Any] = {}

    def capture(_: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen.setdefault("call", (args, kwargs))

    handle = module.register_forward_hook(capture, with_kwargs=True)
    try:
        try:  # no cache: the block runs again below on the same inputs
            model(**example, use_cache=False)
        except TypeError:
            model(**example)
    except Exception:  # noqa: BLE001 - the trace ran this model; a second run is only a check
        return
    finally:
        handle.remove()
    if "call" not in seen:
        return
    args, kwargs = seen["call"]
    with materialized(module):
        probe = copy.deepcopy(module)
    for sub in probe.modules():  # LazyWeights' hooks belong to the original
        sub._forward_pre_hooks.clear()
        sub._forward_hooks.clear()
    for name, p in probe.named_parameters():
        if f"{block}.{name}" in fills:
            p.data.fill_(fills[f"{block}.{name}"])
    hidden = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(hidden, torch.Tensor):
        return
    try:
        out = probe(*args, **kwargs)
    except Exception:  # noqa: BLE001 - see the docstring
        return
    while isinstance(out, (tuple, list)) and out:
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.shape != hidden.shape:
        return
    delta = (out.float() - hidden.float()).abs().max().item()
    if delta > 1e-6 * max(hidden.float().abs().max().item(), 1.0):
        writers = ", ".join(sorted({n.rsplit(".", 1)[0] for n in fills}))
        raise BranchError(f"zeroing what the graph says writes the residual branches of {block} "
                          f"({writers}) leaves its output different from its input (max |Δ| "
                          f"{delta:.3g}): its branches are not all found; use another --init")


def check_grown_blocks(widened: dict[str, Any], blocks: Blocks, after: int, count: int,
                       source: int, trust_remote_code: bool = False) -> None:
    """Build the grown model from the widened config (parameters on the meta device) and raise
    `InsertionError` unless each new block has the source block's parameters: a config that
    derives each block's kind from its index in a way `widen_config` does not rewrite would
    build another kind of block there, and the checkpoint would not load. The error names
    the `--source` blocks that would fit. A config transformers cannot build from the widened
    entries is refused the same way; one built by a repository's own code is not checked."""
    try:
        import transformers
    except ImportError:
        return
    from surgeon.files.hf_config import decode_special_floats
    from surgeon.files.lazy import parameters_on_meta

    model_type = widened.get("model_type")
    if widened.get("auto_map") or model_type not in transformers.CONFIG_MAPPING:
        return
    archs = widened.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        return
    try:
        with parameters_on_meta():
            config = transformers.CONFIG_MAPPING[model_type].from_dict(
                decode_special_floats(widened))
            model = cls._from_config(config)
    except Exception as e:  # noqa: BLE001 - what transformers says, in one line
        text = " ".join(str(e).split())[:200]
        raise InsertionError(f"the config widened to {blocks.count + count} blocks does not "
                             f"build a {cls.__name__} ({type(e).__name__}: {text}); surgeon grow "
                             "cannot deepen this config") from None

    first = first_only(blocks)  # T5's relative_attention_bias: block 0's, wherever it comes from

    def kind(index: int) -> dict[str, tuple[int, ...]] | None:
        try:
            block = model.get_submodule(f"{blocks.prefix}{index}")
        except AttributeError:
            return None
        return {n: tuple(p.shape) for n, p in block.named_parameters() if n not in first}

    shift = lambda i: i + count if i > after else i  # noqa: E731
    wanted = kind(shift(source))
    if wanted is None:
        return  # the model names its blocks otherwise than the checkpoint
    for index in new_indices(after, count):
        built = kind(index)
        if built is not None and built != wanted:
            fits = [i for i in blocks.indices if kind(shift(i)) == built]
            hint = (f"pass --source {fits[0]} (blocks like it: {fits})" if fits else
                    "no block of the checkpoint is of that kind")
            differs = sorted(set(built) ^ set(wanted))[0]
            raise InsertionError(
                f"the grown config builds block {index} unlike block {source} (the config "
                f"derives each block's kind from its index: {differs!r} differs); {hint}, or "
                "another --after")


def _checkpoint_names(model: torch.nn.Module, renamed: bool, state: dict[str, torch.Tensor],
                      block: str, members: dict[str, Stored]) -> dict[str, torch.Tensor]:
    """`state` (the model's parameter names in `block`) under the checkpoint's member names.
    A model that transformers loaded with renaming (`renamed`: its parameter names are not the
    checkpoint's keys, e.g. experts fused into one 3-D parameter on load) gets the conversion
    reverted as `save_pretrained` reverts it; parameters the block shares with an earlier one
    (`shared_parameters`) are left out, as `save_pretrained` leaves them out. Raises
    `InsertionError` where the result is not the source block's keys."""
    shared = shared_parameters(model, block)
    state = {k: v for k, v in state.items() if k not in shared}
    if renamed and hasattr(model, "config"):
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    out = {k[len(block) + 1:]: v for k, v in state.items() if k.startswith(block + ".")}
    extra = sorted(set(out) - set(members))
    if extra:
        raise InsertionError(f"{block} built from the config has {extra[0]!r}, which the "
                             "checkpoint's block has not (the model names its parameters "
                             "otherwise); use --init copy or extrapolate")
    return out


def shared_parameters(model: torch.nn.Module, block: str) -> set[str]:
    """Qualified names of the parameters in `block` that are the same tensor as one registered
    earlier under another name (Zamba's hybrid blocks all run block 0's `shared_transf`): the
    checkpoint stores them once, under that first name, and a new block shares them too."""
    first = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    return {n for n, p in model.named_parameters(remove_duplicate=False)
            if n.startswith(block + ".") and first[id(p)] != n}


def _random_block(blocks: Blocks, source: int, base_dir: Path, members: dict[str, Stored],
                  trust_remote_code: bool = False) -> dict[str, Stored | torch.Tensor]:
    """A block initialised as the model initialises its own (transformers' `_init_weights`, else
    each submodule's `reset_parameters`), seeded, in the checkpoint's dtypes and under its names
    (fused experts stored one by one are split as `save_pretrained` splits them)."""
    from surgeon.files.source import open_source

    opened = open_source(str(base_dir), trust_remote_code=trust_remote_code)
    model = opened.model
    name = f"{blocks.prefix}{source}"
    block = copy.deepcopy(model.get_submodule(name)).to_empty(device="cpu")
    init = getattr(model, "_init_weights", None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(SEED)
        for p in block.parameters():  # transformers skips what it marks as loaded
            if hasattr(p, "_is_hf_initialized"):
                p._is_hf_initialized = False
        for module in block.modules():
            if init is not None:
                init(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
    state = _checkpoint_names(model, opened.lazy is None,
                              {f"{name}.{k}": v for k, v in block.state_dict().items()},
                              name, members)
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
    found = find_blocks({k: newest[k].nbytes for k in snaps.keys if k in newest}, blocks,
                        contiguous=False)  # a recorder's include= may keep only some blocks
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


def recorded_path(directory: Path, snapdir: Path) -> str:
    """How growth.json (published with the checkpoint) names `directory`: relative to the
    snapshot directory when inside it, else by its own name; never an absolute local path."""
    directory, snapdir = directory.resolve(), snapdir.resolve()
    if directory == snapdir or snapdir in directory.parents:
        return directory.relative_to(snapdir).as_posix()
    return directory.name
