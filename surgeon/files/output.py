"""Helpers the writing commands share: a progress bar over tensors, and carrying a source
directory's other checkpoint files (config, tokenizer, generation config) into the output:
an allow-list, never through a symlink that leaves the source."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonWarning
from surgeon.files.weights import checkpoint_root


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


# The files a checkpoint directory consists of besides its weights, which a writing command
# carries from SRC into DST: the model and generation configs, and the tokenizer's and
# processor's files (transformers' names for them). Anything else in SRC (a `.env`, notes,
# a training run's state) stays behind.
CARRIED = frozenset({
    "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "sentencepiece.model", "spm.model", "source.spm", "target.spm",
    "bpe.codes", "vocab.model",
    "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
    "feature_extractor_config.json", "image_processor_config.json",
})
TOKENIZER_CONFIG = "tokenizer_config.json"
_MAX_CONFIG = 16 * 2**20  # a tokenizer config larger than this is not read for file names


def carried_names(directory: Path) -> set[str]:
    """The names `carry_files` takes from `directory`: `CARRIED`, plus the plain file names
    that its tokenizer config names in `*_file` entries (`vocab_file: "spm.model"`)."""
    names = set(CARRIED)
    config = directory / TOKENIZER_CONFIG
    try:
        if config.is_file() and config.stat().st_size <= _MAX_CONFIG:
            data = json.loads(config.read_text())
        else:
            data = {}
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        data = {}  # a broken tokenizer config is carried as it is; transformers reports it
    if isinstance(data, dict):
        for key, value in data.items():
            if (key.endswith("_file") and isinstance(value, str) and value
                    and Path(value).name == value and value not in (".", "..")):
                names.add(value)
    return names


def carry_files(directory: Path | None, out: Path,
                skip: Callable[[str], bool] | None = None) -> list[str]:
    """Copy the checkpoint files of `directory` (`carried_names`; none that `skip` rejects)
    into `out`; returns their names (sorted).

    Only regular files are carried, and a symlink only where it resolves inside the
    directory (or, for a hub cache snapshot, inside the repo's cache folder): a
    `tokenizer.model -> ~/.ssh/id_rsa` is not carried, with a warning. A config's
    `transformers_weights` (naming SRC's weights file) is dropped from the copy, since DST's
    weights are surgeon's own files."""
    if directory is None:
        return []
    root = checkpoint_root(directory)
    carried = []
    for name in sorted(carried_names(directory)):
        entry = directory / name
        if not os.path.lexists(entry) or (skip is not None and skip(name)):
            continue
        real = entry.resolve()
        if not (root in real.parents and real.is_file()):
            what = f"a symlink to {real}, outside {root}" if entry.is_symlink() else (
                "not a regular file")
            warnings.warn(f"{entry} is {what}; not carried (copy the file itself into the "
                          "source to carry it)", CarryWarning, stacklevel=2)
            continue
        if name == "config.json":
            _copy_config(real, out / name)
        else:
            shutil.copyfile(real, out / name)
        carried.append(name)
    return carried


class CarryWarning(SurgeonWarning):
    """A file of the source was not carried into the destination (it leaves the source)."""


def _copy_config(src: Path, dst: Path) -> None:
    try:
        data = json.loads(src.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        data = None
    if isinstance(data, dict) and "transformers_weights" in data:
        del data["transformers_weights"]
        dst.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    else:
        shutil.copyfile(src, dst)
