"""Helpers the writing commands share: a progress bar over tensors, and carrying a source
directory's other files (config, tokenizer, generation config) into the output."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def tensor_progress(enabled: bool, total: int) -> Any:
    """Yield a `progress(nbytes)` callback that advances a tqdm bar (on stderr) one tensor per
    call; without `enabled`, a callback that does nothing."""
    if not enabled:
        yield lambda _: None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="tensor", desc="writing", leave=False)
    try:
        yield lambda _: bar.update(1)
    finally:
        bar.close()


def carry_files(directory: Path | None, out: Path, skip: Callable[[str], bool]) -> list[str]:
    """Copy the regular files of `directory` whose names `skip` rejects not into `out`; returns
    their names (sorted)."""
    if directory is None:
        return []
    carried = []
    for entry in sorted(directory.iterdir()):
        if entry.is_file() and not skip(entry.name):
            shutil.copyfile(entry, out / entry.name)
            carried.append(entry.name)
    return carried
