"""Weight snapshots taken during training: found on disk, checked, read one tensor at a time.

Growth extrapolates a block's weights from where training took them, so it needs the same
tensors at several steps. `open_snapshots(path)` reads three layouts:

- a Hugging Face `Trainer` output directory: `checkpoint-<step>/` folders, each holding
  `model.safetensors` or a sharded `model.safetensors.index.json` (other files and folders,
  such as `runs/` or `optimizer.pt`, are ignored);
- a flat directory of `*.safetensors` files whose names end in the step (`step_100.safetensors`,
  `model-000200.safetensors`: the last integer in the name is the step);
- the directory a `SnapshotRecorder` writes: `surgeon-snapshots.json` listing the steps and
  their `step-<step>.safetensors` files (it takes precedence when present), also found as the
  `snapshots/` folder of a Trainer output directory, where `SnapshotCallback` writes it.

Snapshots are ordered by step, and checked before any tensor is read: at least `min_count` of
them, no step twice, the same keys with the same shapes and dtypes in each. `trajectory(key)`
reads one key from every snapshot, oldest first, and refuses NaN or Inf values.

`SnapshotRecorder` writes snapshots from any training loop (`recorder(step)` after the
optimizer step); `surgeon.integrations.snapshots.SnapshotCallback` runs one inside `Trainer`.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import SurgeonError
from surgeon.files.weights import INDEX, SINGLE, Checkpoint, WeightsError, contained

MANIFEST = "surgeon-snapshots.json"
CALLBACK_DIR = "snapshots"  # SnapshotCallback's directory inside the Trainer's output_dir
FORMAT = "surgeon-snapshots"
VERSION = 1

_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)")
_SHARD = re.compile(r".*-\d+-of-\d+\.safetensors")
_LAST_INT = re.compile(r"(\d+)(?!.*\d)")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# What Trainer pickles beside the weights in every checkpoint-<step>/: never model weights.
_TRAINER_STATE = re.compile(
    r"(optimizer|scheduler|scaler|training_args)\.(pt|bin)|rng_state(_\d+)?\.pth")


class SnapshotError(SurgeonError):
    """Snapshots that cannot be used for growth, or a recorder that cannot write them."""


@dataclass(frozen=True)
class Snapshot:
    """One training step's weights: `step`, the file or directory `path`, its `checkpoint`."""

    step: int
    path: Path
    checkpoint: Checkpoint


KeySelection = str | Sequence[str] | None


def _prefixes(selection: KeySelection, name: str = "keys") -> list[str] | None:
    if selection is None:
        return None
    prefixes = [selection] if isinstance(selection, str) else list(selection)
    if not prefixes or not all(isinstance(p, str) and p for p in prefixes):
        raise SnapshotError(f"{name}={selection!r}: give key prefixes such as "
                            "'model.layers.3.', or None for all keys")
    return prefixes


def _selected(keys: Sequence[str], prefixes: list[str] | None) -> list[str]:
    if prefixes is None:
        return list(keys)
    return [k for k in keys if any(k.startswith(p) for p in prefixes)]


class Snapshots:
    """Snapshots of the same tensors, ordered by step (oldest first), all checked alike.

    `keys` are the tensors every snapshot holds (sorted), `shapes` and `dtypes` their types.
    `tied` maps a key the recorder stored once under another name to that name.
    """

    def __init__(self, path: Path, layout: str, snapshots: list[Snapshot], keys: list[str],
                 tied: Mapping[str, str] | None = None):
        self.path = path
        self.layout = layout
        self.snapshots = snapshots
        self.keys = keys
        first = snapshots[0].checkpoint
        self.shapes: dict[str, tuple[int, ...]] = {k: first[k].shape for k in keys}
        self.dtypes: dict[str, torch.dtype] = {k: first[k].dtype for k in keys}
        self.tied = dict(tied or {})

    @property
    def steps(self) -> list[int]:
        return [s.step for s in self.snapshots]

    def __len__(self) -> int:
        return len(self.snapshots)

    def __iter__(self) -> Iterator[Snapshot]:
        return iter(self.snapshots)

    def __getitem__(self, index: int) -> Snapshot:
        return self.snapshots[index]

    def __repr__(self) -> str:
        return (f"Snapshots({str(self.path)!r}, layout={self.layout!r}, steps={self.steps}, "
                f"{len(self.keys)} keys)")

    def _resolve(self, key: str) -> str:
        if key in self.shapes:
            return key
        if self.tied.get(key) in self.shapes:
            return self.tied[key]
        near = [k for k in self.keys if k.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]][:3]
        hint = f"; keys such as {', '.join(map(repr, near or self.keys[:3]))}"
        raise SnapshotError(f"the snapshots in {self.path} have no key {key!r}{hint}")

    def trajectory(self, key: str) -> list[torch.Tensor]:
        """`key` read from every snapshot, oldest first (fresh CPU tensors, one per step).
        Raises `SnapshotError` naming the step when one holds NaN or Inf."""
        key = self._resolve(key)
        out = []
        for snap in self.snapshots:
            tensor = self._read(snap, key)
            _check_finite(tensor, key, snap)
            out.append(tensor)
        return out

    def check_finite(self, keys: KeySelection = None) -> None:
        """Read `keys` (all by default; prefixes select) from every snapshot, one tensor at a
        time, and raise `SnapshotError` at the first NaN or Inf."""
        prefixes = _prefixes(keys)
        chosen = _selected(self.keys, prefixes)
        if prefixes is not None:
            _check_matches(prefixes, chosen, f"the snapshots in {self.path}")
        for key in chosen:
            for snap in self.snapshots:
                _check_finite(self._read(snap, key), key, snap)

    @staticmethod
    def _read(snap: Snapshot, key: str) -> torch.Tensor:
        try:
            return snap.checkpoint.read(key)
        except WeightsError as e:
            raise SnapshotError(f"step {snap.step}: {e}") from e


def _check_finite(tensor: torch.Tensor, key: str, snap: Snapshot) -> None:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        return
    if tensor.is_floating_point() and bool(torch.isfinite(tensor.sum(dtype=torch.float64))):
        return  # one reduction instead of a mask
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = tensor[~finite]
        what = "NaN" if bool(torch.isnan(bad).any()) else "Inf"
        raise SnapshotError(
            f"{key!r} holds {what} ({bad.numel()} of {tensor.numel()} values) at step "
            f"{snap.step} ({snap.checkpoint[key].file}); training diverged by then: use only "
            "the snapshots before it")


def _check_matches(prefixes: list[str], keys: Sequence[str], where: str) -> None:
    for prefix in prefixes:
        if not any(k.startswith(prefix) for k in keys):
            raise SnapshotError(f"no key in {where} starts with {prefix!r}; keys look like "
                                f"{', '.join(map(repr, list(keys)[:3]))}")


def open_snapshots(path: str | os.PathLike, *, keys: KeySelection = None,
                   min_count: int = 3) -> Snapshots:
    """The snapshots in the directory `path` (Trainer output, flat step files or a recorder's
    directory; a Trainer output whose `snapshots/` a `SnapshotCallback` wrote gives those),
    ordered by step. `keys`: a key prefix or prefixes (e.g. "model.layers.3.") to
    keep only those tensors; each must match. Checks everything but the values, which
    `trajectory` checks as it reads them."""
    path = Path(path)
    prefixes = _prefixes(keys)
    if not isinstance(min_count, int) or min_count < 1:
        raise SnapshotError(f"min_count={min_count!r} must be an int >= 1")
    if not path.exists():
        raise SnapshotError(f"{path} does not exist; pass the directory that holds the "
                            "training snapshots (Trainer's output_dir)")
    if not path.is_dir():
        raise SnapshotError(f"{path} is a file, not a directory of snapshots; pass the "
                            "directory holding checkpoint-<step>/ folders or step files")
    tied: dict[str, str] = {}
    if not (path / MANIFEST).is_file() and (path / CALLBACK_DIR / MANIFEST).is_file():
        path = path / CALLBACK_DIR  # a Trainer output_dir with SnapshotCallback's snapshots
    if (path / MANIFEST).is_file():
        layout = "recorder"
        manifest = _read_manifest(path / MANIFEST)
        tied = manifest["tied"]
        found = [(entry["step"], path / entry["file"]) for entry in manifest["snapshots"]]
    else:
        layout, found = _discover(path)
    snapshots = [Snapshot(step, where, _open_one(where, step)) for step, where in found]
    snapshots.sort(key=lambda s: s.step)
    for a, b in zip(snapshots, snapshots[1:]):
        if a.step == b.step:
            raise SnapshotError(f"two snapshots in {path} are step {a.step}: {a.path.name} and "
                                f"{b.path.name}; remove one")
    if len(snapshots) < min_count:
        steps = ", ".join(str(s.step) for s in snapshots) or "none"
        raise SnapshotError(
            f"found {len(snapshots)} snapshots in {path} (steps: {steps}), growth needs at "
            f"least {min_count}; save more often (save_steps, or the recorder's every=) or "
            "keep more of them (save_total_limit, keep=)")
    common = _check_consistent(path, snapshots, prefixes)
    return Snapshots(path, layout, snapshots, common,
                     {k: v for k, v in tied.items() if v in common})


def _open_one(where: Path, step: int) -> Checkpoint:
    try:
        return Checkpoint.open(where)
    except WeightsError as e:
        raise SnapshotError(f"snapshot of step {step}: {e}") from e


def _discover(path: Path) -> tuple[str, list[tuple[int, Path]]]:
    entries = sorted(path.iterdir())
    dirs = [(int(m.group(1)), e) for e in entries
            if e.is_dir() and (m := _CHECKPOINT_DIR.fullmatch(e.name))]
    if dirs:
        for step, d in dirs:
            _check_trainer_checkpoint(d)
        return "trainer", dirs
    if (path / INDEX).is_file():
        raise SnapshotError(f"{path} is one sharded checkpoint ({INDEX}), not a directory of "
                            "snapshots; pass a directory of checkpoint-<step>/ folders (Trainer's "
                            "output_dir) or of step files")
    files = [e for e in entries if e.is_file() and e.name.endswith(".safetensors")]
    shards = [e for e in files if _SHARD.fullmatch(e.name)]
    if shards:
        raise SnapshotError(f"{shards[0]} is a shard of one checkpoint (its index is missing), "
                            "not a snapshot; snapshots need the step in the name, such as "
                            "step_100.safetensors")
    stepped = [(int(m.group(1)), e) for e in files
               if (m := _LAST_INT.search(e.name[: -len(".safetensors")]))]
    if stepped:
        return "files", stepped
    if files:
        raise SnapshotError(f"{files[0]} has no step in its name and {path} holds no "
                            "checkpoint-<step>/ folders; name snapshots like "
                            "step_100.safetensors, or record them with SnapshotRecorder")
    pickles = [e for e in entries if e.is_file() and e.name.endswith(_PICKLE_SUFFIXES)]
    if pickles:
        raise SnapshotError(_pickle_message(pickles[0]))
    raise SnapshotError(f"no snapshots in {path}: expected checkpoint-<step>/ folders (Trainer "
                        "output), *.safetensors files with the step in the name, or a "
                        f"{MANIFEST} written by SnapshotRecorder")


def _check_trainer_checkpoint(d: Path) -> None:
    if (d / INDEX).is_file() or (d / SINGLE).is_file():
        return
    names = sorted(e.name for e in d.iterdir())
    weights = [n for n in names if n.endswith(_PICKLE_SUFFIXES) and not _TRAINER_STATE.fullmatch(n)]
    weights.sort(key=lambda n: not n.startswith("pytorch_model"))
    if weights:
        raise SnapshotError(_pickle_message(d / weights[0]))
    if "adapter_model.safetensors" in names:
        raise SnapshotError(f"{d} holds a PEFT adapter (adapter_model.safetensors), not the "
                            "model's weights; growth needs snapshots of the full model")
    raise SnapshotError(f"{d} has no {SINGLE} or {INDEX}; the checkpoint is incomplete (the "
                        "run was interrupted while saving?): remove it")


def _pickle_message(file: Path) -> str:
    return (f"{file} is a pickle checkpoint; surgeon reads safetensors only (Trainer writes "
            "model.safetensors by default): re-save it with save_pretrained, or "
            "safetensors.torch.save_file(torch.load(...))")


def _check_consistent(path: Path, snapshots: list[Snapshot],
                      prefixes: list[str] | None) -> list[str]:
    first = snapshots[0]
    keys = sorted(_selected(list(first.checkpoint), prefixes))
    if prefixes is not None:
        _check_matches(prefixes, keys, f"{first.path} (step {first.step})")
    if not keys:
        raise SnapshotError(f"{first.path} (step {first.step}) holds no tensors")
    wanted = set(keys)
    for snap in snapshots[1:]:
        have = set(_selected(list(snap.checkpoint), prefixes))
        if have != wanted:
            missing = sorted(wanted - have)
            if missing:
                odd, lacks, has = missing[0], snap, first
            else:
                odd, lacks, has = sorted(have - wanted)[0], first, snap
            n = len(wanted ^ have)
            raise SnapshotError(
                f"step {lacks.step} ({lacks.path}) has no key {odd!r}, which step {has.step} "
                f"({has.path}) has ({n} key{'s differ' if n > 1 else ' differs'}); every "
                "snapshot must hold the same tensors")
        for key in keys:
            a, b = first.checkpoint[key], snap.checkpoint[key]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise SnapshotError(
                    f"{key!r} is {_type(a)} in step {first.step} ({a.file}) but {_type(b)} in "
                    f"step {snap.step} ({b.file}); snapshots must come from one model")
    return keys


def _type(stored: Any) -> str:
    return f"{str(stored.dtype).removeprefix('torch.')} {list(stored.shape)}"


def _read_manifest(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{file} cannot be read ({e}); delete it to read the directory's "
                            "files by name") from e
    try:
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, not {FORMAT!r}")
        if data.get("version") != VERSION:
            raise ValueError(f"version {data.get('version')!r}; this surgeon reads {VERSION}")
        entries = data["snapshots"]
        snapshots = [{"step": int(e["step"]), "file": str(e["file"])} for e in entries]
        tied = {str(k): str(v) for k, v in (data.get("tied") or {}).items()}
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{file} is not a valid snapshot manifest ({e}); delete it to read "
                            "the directory's files by name") from e
    for entry in snapshots:
        name = entry["file"]
        try:  # a plain name, and no symlink out of the directory
            inside = Path(name).name == name and contained(file.parent, name, str(file))
        except WeightsError as e:
            raise SnapshotError(f"{e}; remove its entry (step {entry['step']})") from e
        if not inside or not (file.parent / name).is_file():
            raise SnapshotError(f"{file} lists {name!r} for step {entry['step']}, which is not "
                                f"a file in {file.parent}; restore it or remove its entry")
    return {**data, "snapshots": snapshots, "tied": tied}


class SnapshotRecorder:
    """Writes the model's weights every `every` steps as `directory/step-<step>.safetensors`.

        recorder = SnapshotRecorder(model, "snapshots", every=100, keep=20)
        for step in range(1, steps + 1):
            ...; optimizer.step()
            recorder(step)          # records when step % every == 0

    `include`: key prefixes (e.g. "model.layers.3.") to record only those tensors; all of
    `model.state_dict()` by default. `keep`: at most this many snapshots stay, the oldest
    deleted first. `surgeon-snapshots.json` lists the recorded steps and is replaced atomically
    after each new file, so the directory always reads whole. Tensors that share memory (tied
    weights) are stored once, under the first key; the manifest's `tied` maps the others to it.
    A directory recorded before is continued; recording a step not after the last one drops
    the recorded steps from it on (they belong to a run that was rewound). It holds weights
    only, so `surgeon grow DIR DST --checkpoint MODEL_DIR` names the model to grow.
    """

    def __init__(self, model: torch.nn.Module, directory: str | os.PathLike, *, every: int,
                 keep: int | None = None, include: KeySelection = None):
        check_every_keep(every, keep)
        self.model = model
        self.directory = Path(directory)
        self.every = every
        self.keep = keep
        self.include = _prefixes(include, "include")
        if self.include is not None:
            _check_matches(self.include, list(model.state_dict()), "the model's state_dict")
        if self.directory.exists() and not self.directory.is_dir():
            raise SnapshotError(f"{self.directory} is a file; the recorder needs a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.entries: list[dict[str, Any]] = []
        if (self.directory / MANIFEST).is_file():
            self.entries = _read_manifest(self.directory / MANIFEST)["snapshots"]

    @property
    def steps(self) -> list[int]:
        return [e["step"] for e in self.entries]

    def tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors a snapshot stores (detached, CPU, contiguous, none sharing memory) and
        the tied keys left out, each mapped to the key that holds its tensor."""
        state = self.model.state_dict(keep_vars=False)
        keys = _selected(list(state), self.include)
        out: dict[str, torch.Tensor] = {}
        tied: dict[str, str] = {}
        seen: dict[tuple, str] = {}
        storages: set[tuple] = set()
        for key in keys:
            t = state[key].detach()
            if t.numel() == 0:
                out[key] = t.to("cpu").contiguous().clone()
                continue
            storage = (t.device, t.untyped_storage().data_ptr())
            view = (*storage, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
            if view in seen:
                tied[key] = seen[view]
                continue
            seen[view] = key
            c = t.to("cpu").contiguous()
            if storage in storages and c.untyped_storage().data_ptr() == storage[1]:
                c = c.clone()  # another view of memory an earlier entry holds: save_file refuses
            storages.add(storage)
            out[key] = c
        return out, tied

    def record(self, step: int) -> Path:
        """Write the snapshot of `step` now, whatever `every` says; returns its file."""
        from surgeon.files.weights import write_file

        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise SnapshotError(f"step {step!r} must be a non-negative int")
        tensors, tied = self.tensors()
        self._check_continues(tensors)
        name = f"step-{step}.safetensors"
        final = self.directory / name
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.directory)
        os.close(fd)
        try:
            write_file(Path(tmp), tensors, metadata={"step": str(step)})
            os.chmod(tmp, file_mode())  # mkstemp makes it 0600; snapshots are ordinary files
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        later = [e for e in self.entries if e["step"] >= step]
        entries = [e for e in self.entries if e["step"] < step] + [{"step": step, "file": name}]
        dropped = later + (entries[: len(entries) - self.keep] if self.keep else [])
        if self.keep:
            entries = entries[-self.keep:]
        self._write_manifest(entries, tied)
        self.entries = entries
        kept = {e["file"] for e in entries}
        for e in dropped:
            if e["file"] not in kept:
                (self.directory / e["file"]).unlink(missing_ok=True)
        return final

    def _check_continues(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Refuse to add snapshots of other tensors to a directory recorded before."""
        if not self.entries:
            return
        last = self.directory / self.entries[-1]["file"]
        try:
            before = Checkpoint.open(last)
        except WeightsError as e:
            raise SnapshotError(f"{e}; delete {self.directory} or record into another") from e
        now = {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()}
        was = {k: (s.shape, s.dtype) for k, s in before.items()}
        if now != was:
            odd = sorted(set(now) ^ set(was)) or sorted(k for k in now if now[k] != was[k])
            raise SnapshotError(f"{self.directory} holds snapshots of other tensors ({odd[0]!r} "
                                f"differs from {last.name}); record into a new directory or "
                                "delete it")

    def maybe_record(self, step: int) -> Path | None:
        """Record `step` if it is a multiple of `every`; the file written, or None."""
        return self.record(step) if step % self.every == 0 else None

    __call__ = maybe_record

    def _write_manifest(self, entries: list[dict[str, Any]], tied: dict[str, str]) -> None:
        data = {"format": FORMAT, "version": VERSION, "every": self.every, "keep": self.keep,
                "include": self.include, "tied": tied, "snapshots": entries}
        fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=self.directory)
        try:
            os.chmod(tmp, file_mode())
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(data, indent=2) + "\n")
            os.replace(tmp, self.directory / MANIFEST)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def check_every_keep(every: Any, keep: Any) -> None:
    """Refuse an `every` below 1 or a `keep` below 3 (growth needs three snapshots)."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise SnapshotError(f"every={every!r}: record every N steps with an int N >= 1")
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 3):
        raise SnapshotError(f"keep={keep!r}: growth needs at least 3 snapshots, so keep >= 3 "
                            "(or None to keep them all)")


def file_mode() -> int:
    """The mode a plain `open(..., "w")` gives a new file: 0666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask
