"""Write a directory all at once: into a temporary sibling, renamed into place at the end.

A process killed at any moment leaves the destination absent (or as it was) or complete, never
half-written; its temporary directory, named after the destination and the writer's pid, is
removed by the next writer of the same destination once that pid is gone.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgeon.errors import SurgeonError

MARKER = "surgeon.json"  # a directory holding it was written by surgeon and may be replaced
MARKERS = (MARKER, "growth.json")  # what `surgeon convert` / `save` and `surgeon grow` write


class DestinationError(SurgeonError):
    """The destination directory cannot be written (exists, is a file, is the source...)."""


def check_destination(dest: Path, *, overwrite: bool) -> None:
    """Refuse a destination that exists (unless `overwrite`) or that is not ours to replace."""
    if not dest.exists():
        if dest.parent.exists() and not dest.parent.is_dir():
            raise DestinationError(f"{dest.parent} is a file, not a directory")
        return
    if not dest.is_dir():
        raise DestinationError(f"{dest} exists and is a file; choose another destination")
    if not overwrite:
        raise DestinationError(f"{dest} already exists; pass --overwrite (overwrite=True) to "
                               "replace it")
    if any(dest.iterdir()) and not any((dest / m).is_file() for m in MARKERS):
        raise DestinationError(f"{dest} exists and was not written by surgeon (no {MARKER} or "
                               f"{MARKERS[1]}); "
                               "refusing to replace it, remove it yourself")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep(dest: Path) -> None:
    """Remove temporary siblings of `dest` left by writers that were killed."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.surgeon-(?:tmp|old)-(\d+)-\w+")
    for entry in dest.parent.iterdir() if dest.parent.is_dir() else []:
        m = pattern.fullmatch(entry.name)
        if m and entry.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(entry, ignore_errors=True)


@contextmanager
def atomic_directory(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary directory beside `dest`; on success it becomes `dest` (an old
    `dest` is replaced only with `overwrite`); on any error or interrupt it is removed."""
    dest = Path(dest)
    check_destination(dest, overwrite=overwrite)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _sweep(dest)
    prefix = f".{dest.name}.surgeon-tmp-{os.getpid()}-"
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=dest.parent))
    try:
        yield tmp
        check_destination(dest, overwrite=overwrite)  # something may have appeared meanwhile
        os.chmod(tmp, 0o777 & ~_umask())
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.surgeon-old-{os.getpid()}-",
                                        dir=dest.parent))
            os.replace(dest, old)  # replaces the empty directory just made
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
