"""Write a directory all at once: into a temporary sibling, renamed into place at the end.

A process killed at any moment leaves the destination absent (or as it was) or complete, never
half-written; its temporary directory, named after the destination and the writer's pid, is
removed by the next writer of the same destination once that pid is gone. Replacing an old
destination takes two renames (the old copy aside, the new one in); a writer killed between
them leaves the old copy aside, and the next writer of that destination puts it back before
anything else, so at no instant is the user's data only in a directory about to be swept.

What may be replaced is narrow: only a directory surgeon wrote (it holds `surgeon.json` or
`growth.json`) and that holds nothing but the files surgeon writes (`written_by_surgeon`),
never a directory that is, contains or lies inside a source the command reads.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import SurgeonError, SurgeonWarning
from surgeon.files.output import CARRIED, carried_names

MARKER = "surgeon.json"  # a directory holding it was written by surgeon and may be replaced
MARKERS = (MARKER, "growth.json")  # what `surgeon convert` / `save` and `surgeon grow` write
# Every other file the writing commands put into a directory: weights (single, index, shards),
# the model card and the example, and the files carried from the source (output.CARRIED).
# A writer that adds a file of another name lists it here, or --overwrite refuses the
# directories it wrote.
WRITTEN = frozenset({"model.safetensors", "model.safetensors.index.json", "README.md",
                     "example.safetensors", "surgeon_model.py",  # remote_code.MODULE
                     *MARKERS, *CARRIED})
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_SHOWN = 3  # foreign entries named in a refusal


class DestinationError(SurgeonError):
    """The destination directory cannot be written (exists, is a file, is the source...)."""


class RecoveredWarning(SurgeonWarning):
    """A destination that an interrupted --overwrite had moved aside was put back."""


def check_destination(dest: Path, *, overwrite: bool, sources: Iterable[str | os.PathLike] = (),
                      label: str = "output") -> None:
    """Refuse a destination that exists (unless `overwrite`) or that is not ours to replace:
    one that is, contains or lies inside one of `sources` (what the command reads; real paths,
    symlinks resolved), a file, or a directory holding files surgeon did not write. A
    destination an interrupted overwrite left aside is restored first. `label` names what is
    written ("converted checkpoint") in the advice."""
    dest = Path(dest)
    recover(dest)
    check_sources(dest, sources, label)
    if not dest.exists():
        if dest.parent.exists() and not dest.parent.is_dir():
            raise DestinationError(f"{dest.parent} is a file, not a directory")
        return
    if not dest.is_dir():
        raise DestinationError(f"{dest} exists and is a file; choose another destination")
    if not overwrite:
        raise DestinationError(f"{dest} already exists; pass --overwrite (overwrite=True) to "
                               "replace it")
    entries = sorted(dest.iterdir())
    if entries and not any((dest / m).is_file() for m in MARKERS):
        raise DestinationError(f"{dest} exists and was not written by surgeon (no {MARKER} or "
                               f"{MARKERS[1]}); "
                               "refusing to replace it, remove it yourself")
    ours = written_by_surgeon(dest)
    foreign = [e.name + ("/" if e.is_dir() and not e.is_symlink() else "")
               for e in entries if e.name not in ours or not _plain_file(e)]
    if foreign:
        more = f" and {len(foreign) - _SHOWN} more" if len(foreign) > _SHOWN else ""
        raise DestinationError(f"{dest} holds files surgeon did not write "
                               f"({', '.join(foreign[:_SHOWN])}{more}); refusing to replace it: "
                               "move them out, or choose another destination")


def check_sources(dest: Path, sources: Iterable[str | os.PathLike], label: str = "output"
                  ) -> None:
    """Refuse a `dest` that is, contains or lies inside one of `sources` (real paths: symlinks
    and `..` resolved), naming both."""
    target = Path(os.path.realpath(dest))
    for source in sources:
        real = Path(os.path.realpath(source))
        if target == real:
            raise DestinationError(f"{dest} is the source {real}; write the {label} to "
                                   "another directory")
        if target in real.parents:
            raise DestinationError(f"{dest} contains the source {real}; replacing it would "
                                   f"destroy the source: write the {label} elsewhere")
        if real in target.parents:
            raise DestinationError(f"{dest} is inside the source {real}; write the {label} "
                                   "elsewhere")


def written_by_surgeon(dest: Path) -> set[str]:
    """The names of files surgeon may have written into `dest`: `WRITTEN`, shard names, and
    the files its carried tokenizer config names (as `carry_files` chose them)."""
    names = WRITTEN | carried_names(dest)
    return names | {e.name for e in dest.iterdir() if _SHARD.fullmatch(e.name)}


def _plain_file(entry: Path) -> bool:
    return entry.is_file() and not entry.is_symlink()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temporaries(dest: Path, kind: str) -> list[tuple[int, Path]]:
    """(pid, path) of the `kind` ("tmp" or "old") siblings of `dest` left by dead writers."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.surgeon-{kind}-(\d+)-\w+")
    found = []
    for entry in sorted(dest.parent.iterdir()) if dest.parent.is_dir() else []:
        m = pattern.fullmatch(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            found.append((int(m.group(1)), entry))
    return found


def recover(dest: Path) -> Path | None:
    """Put back the old copy of `dest` that a writer killed between the two renames of an
    overwrite left aside (`dest` absent, the dead writer's `.surgeon-old-` sibling full);
    returns where it came from, or None when there was nothing to recover."""
    dest = Path(dest)
    if os.path.lexists(dest):
        return None
    aside = [(p.stat().st_mtime, p) for _, p in _temporaries(dest, "old") if _is_ours(p)]
    if not aside:
        return None
    old = max(aside)[1]  # the newest: what `dest` held last
    os.replace(old, dest)
    warnings.warn(f"{dest} was moved aside by an interrupted --overwrite and has been put "
                  f"back from {old.name}", RecoveredWarning, stacklevel=3)
    return old


def _is_ours(directory: Path) -> bool:
    return any((directory / m).is_file() for m in MARKERS)


def _sweep(dest: Path) -> None:
    """Remove temporary siblings of `dest` left by writers that were killed: their unfinished
    copies, and old copies set aside once `dest` is back in place (never the only copy of a
    directory surgeon wrote)."""
    present = os.path.lexists(dest)
    for kind in ("tmp", "old"):
        for _, entry in _temporaries(dest, kind):
            if kind == "tmp" or present or not _is_ours(entry):
                shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_directory(dest: str | os.PathLike, *, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = (),
                     label: str = "output") -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it becomes `dest` (an old
    `dest` is replaced only with `overwrite`, and as `check_destination` allows); on any error
    or interrupt it is removed. `sources`: what the writer reads, which `dest` must not touch."""
    dest = Path(dest)
    sources = list(sources)
    check_destination(dest, overwrite=overwrite, sources=sources, label=label)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest)
    prefix = f".{dest.name}.surgeon-tmp-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        yield tmp
        # something may have appeared meanwhile
        check_destination(dest, overwrite=overwrite, sources=sources, label=label)
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.surgeon-old-{os.getpid()}-",
                                        dir=dest.parent))
            os.replace(dest, old)  # replaces the empty directory just made
            # killed here: `dest` is absent, `old` full; the next writer's `recover` restores it
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
