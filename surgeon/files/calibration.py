"""Calibration inputs from a file, for `surgeon convert --calibration FILE`.

A pass that calibrates (`adyt:calibrate=true`) fits the converted modules on real inputs
rather than the random example. FILE holds token ids, or text that the checkpoint's own
tokenizer turns into ids:

- `.safetensors`: an integer `input_ids` tensor `(N, T)`, N sequences of T tokens;
- `.json`: a list of lists of ints (sequences of equal length are batched together);
- `.txt`: UTF-8 text, tokenised with the source's tokenizer (transformers' AutoTokenizer from
  the source directory, local files only, never its remote code) and cut into consecutive
  windows of `length` tokens (default `DEFAULT_LENGTH`; a shorter tail is dropped unless it is
  all there is).

Sequences go `BATCH` to a batch. Every mistake (a missing or unreadable file, another suffix,
ids that are not integers in `[0, vocab_size)`, more than `MAX_TOKENS` tokens) is a one-line
`ExampleError` naming the file and what to give instead, raised before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from surgeon.errors import ExampleError

DEFAULT_LENGTH = 256  # tokens per window cut from a .txt file
BATCH = 8  # sequences per calibration batch
MAX_TOKENS = 1 << 20  # more would only cost memory: the fit uses at most ~32k rows per norm
_FORMATS = "a .safetensors file with an input_ids tensor (N, T), a .json list of lists of " \
    "token ids, or a .txt file"


def read_calibration(path: str | Path, *, vocab_size: int | None = None,
                     tokenizer: Callable[[], object] | None = None,
                     length: int = DEFAULT_LENGTH) -> list[torch.Tensor]:
    """The calibration batches in `path`: tensors `(b, T)` of token ids (int64). `tokenizer`
    builds the tokenizer a .txt file needs (None: the source has none); `vocab_size` bounds
    the ids where it is known."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ExampleError(f"--calibration {path}: no such file; give {_FORMATS}")
    if length < 2:
        raise ExampleError(f"--calibration-length must be at least 2 tokens, got {length}")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        sequences = _from_safetensors(file)
    elif suffix == ".json":
        sequences = _from_json(file)
    elif suffix == ".txt":
        sequences = _from_text(file, tokenizer, length)
    else:
        raise ExampleError(f"--calibration {path}: cannot read a {suffix or 'suffix-less'} file;"
                           f" give {_FORMATS}")
    if not sequences or any(s.numel() == 0 for s in sequences):
        raise ExampleError(f"--calibration {path}: holds no tokens (or an empty sequence)")
    total = sum(s.numel() for s in sequences)
    if total > MAX_TOKENS:
        raise ExampleError(f"--calibration {path}: {total:,} tokens, more than the "
                           f"{MAX_TOKENS:,} calibration uses; give fewer")
    top = max(int(s.max()) for s in sequences)
    if min(int(s.min()) for s in sequences) < 0 or vocab_size is not None and top >= vocab_size:
        raise ExampleError(f"--calibration {path}: token ids must lie in [0, {vocab_size}) for "
                           f"this model (found up to {top}); tokenise with its own tokenizer")
    return _batches(sequences)


def _from_safetensors(file: Path) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
    except Exception as e:  # a damaged file fails in safetensors' own ways
        raise ExampleError(f"--calibration {file}: not a readable safetensors file "
                           f"({type(e).__name__}); give {_FORMATS}") from None
    ids = tensors.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ExampleError(f"--calibration {file}: needs an integer tensor input_ids of shape "
                           f"(N, T), found {sorted(tensors) or 'no tensors'}")
    return list(ids.long())


def _from_json(file: Path) -> list[torch.Tensor]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExampleError(f"--calibration {file}: not readable JSON ({e.__class__.__name__}); "
                           "give a list of lists of token ids") from None
    ok = isinstance(data, list) and all(
        isinstance(s, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in s)
        for s in data)
    if not ok:
        raise ExampleError(f"--calibration {file}: must be a list of lists of token ids (ints),"
                           " e.g. [[1, 2, 3], [4, 5, 6]]")
    return [torch.tensor(s, dtype=torch.long) for s in data]


def _from_text(file: Path, tokenizer: Callable[[], object] | None, length: int
               ) -> list[torch.Tensor]:
    if tokenizer is None:
        raise ExampleError(f"--calibration {file}: a .txt file needs the source's tokenizer, and "
                           "it has none; give token ids (.json or .safetensors) instead")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ExampleError(f"--calibration {file}: not readable UTF-8 text "
                           f"({e.__class__.__name__})") from None
    tok = tokenizer()
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if ids.numel() > MAX_TOKENS:
        ids = ids[:MAX_TOKENS]  # the rest of a long text would only cost memory
    if ids.numel() <= length:
        return [ids]
    return list(ids[: ids.numel() // length * length].view(-1, length))


def _batches(sequences: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sequences of equal length, `BATCH` at a time, in file order within each length."""
    by_length: dict[int, list[torch.Tensor]] = {}
    for s in sequences:
        by_length.setdefault(s.numel(), []).append(s.reshape(-1))
    out = []
    for group in by_length.values():
        out += [torch.stack(group[i:i + BATCH]) for i in range(0, len(group), BATCH)]
    return out
