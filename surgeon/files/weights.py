"""Safetensors checkpoints read and written tensor by tensor: sharded, validated, byte-copied.

A checkpoint is `model.safetensors`, or shards listed by `model.safetensors.index.json`. Reading
parses and checks each file's header (a truncated or corrupt file is named before any tensor is
used) and reads one tensor at a time with `pread`, so nothing holds the whole model. Writing lays
the tensors out in sorted key order, cuts shards at `max_shard_size` as transformers does, and
copies tensors that come unchanged from a source file with `os.copy_file_range` (in the kernel,
as `cp` does); only tensors computed in memory pass through Python. Within a file, tensors are
laid out widest dtype first, so each one's data is aligned to its element size. The same
tensors give the same bytes every time.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import SurgeonError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
DEFAULT_MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "C64": torch.complex64,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class WeightsError(SurgeonError):
    """A safetensors file or index that cannot be read, or a shard size that cannot be used."""


@dataclass(frozen=True)
class Stored:
    """Where one tensor's bytes lie: `file`, absolute byte `start`, `nbytes`, and its type."""

    key: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path: Path) -> tuple[dict[str, Stored], dict[str, str]]:
    """Parse and check one safetensors file's header: (tensors by key, `__metadata__`).

    Every number is checked against the file's size before it is used, so a crafted header
    (a length of 2^60, offsets past the end, a shape whose product overflows) is refused
    before anything proportional to it is read or allocated."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path} is not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER, size - 8):
                raise WeightsError(f"{path} is not a safetensors file, or is truncated (header "
                                   f"of {n} bytes in a {size}-byte file)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise WeightsError(f"cannot read {path}: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError is a
        # ValueError, as is an integer of more than 4300 digits; deep nesting recurses
        raise WeightsError(f"{path} has a corrupt safetensors header "
                           f"({_one_line(e)})") from e
    if not isinstance(header, dict):
        raise WeightsError(f"{path} has a corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise WeightsError(f"{path}: __metadata__ must map names to strings; the file is corrupt")
    base, end, entries = 8 + n, 0, {}
    # by (begin, end), as safetensors orders them: an empty tensor comes before one at its offset
    for key, info in sorted(header.items(), key=lambda kv: _offsets(path, kv, size - base)):
        begin, stop = _offsets(path, (key, info), size - base)
        dtype = DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
        if dtype is None:
            raise WeightsError(f"{path}: tensor {key!r} has an unknown dtype {info.get('dtype')!r}")
        shape = info.get("shape", ())
        if not isinstance(shape, (list, tuple)) or not all(
                _is_int(s) and s >= 0 for s in shape):
            raise WeightsError(f"{path}: tensor {key!r} has an invalid shape {_short(shape)}")
        shape = tuple(shape)
        count = 1
        for s in shape:
            count *= s
            if count * dtype.itemsize > size:  # stop before the product grows without bound
                break
        if begin != end or stop - begin != count * dtype.itemsize:
            raise WeightsError(f"{path}: tensor {key!r} has inconsistent data offsets "
                               f"[{begin}, {stop}] for shape {_short(list(shape))}; the file is "
                               "corrupt")
        entries[key] = Stored(key, path, dtype, shape, base + begin, stop - begin)
        end = stop
    if base + end != size:
        what = "truncated" if base + end > size else "longer than its header says"
        raise WeightsError(f"{path} is {what} ({size} bytes, the header needs {base + end}); "
                           "re-download or re-save it")
    return entries, metadata


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...]"


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(err).__name__)


def _offsets(path: Path, item: tuple[str, Any], data_size: int) -> tuple[int, int]:
    """A tensor's (begin, end) offsets, checked to be ints inside the `data_size` bytes that
    follow the header."""
    key, info = item
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    if not (isinstance(offsets, (list, tuple)) and len(offsets) == 2
            and all(_is_int(v) for v in offsets)):
        raise WeightsError(f"{path}: tensor {key!r} has no valid data_offsets; the file is "
                           "corrupt")
    begin, stop = offsets
    if not 0 <= begin <= stop:
        raise WeightsError(f"{path}: tensor {key!r} has data offsets [{begin}, {stop}]")
    if stop > data_size:  # before anything trusts the offsets
        size = path.stat().st_size
        raise WeightsError(f"{path} is truncated ({size} bytes, the header needs "
                           f"{size - data_size + stop}); re-download or re-save it")
    return begin, stop


def checkpoint_root(directory: Path) -> Path:
    """The directory a checkpoint's files must stay inside: `directory` itself (resolved), or,
    for a snapshot in the huggingface_hub cache (`models--o--n/snapshots/<rev>`, whose files are
    symlinks into `models--o--n/blobs`), the repo's cache folder."""
    real = directory.resolve()
    repo = real.parent.parent
    if (real.parent.name == "snapshots" and repo.name.startswith("models--")
            and (repo / "blobs").is_dir()):
        return repo
    return real


def contained(directory: Path, name: Any, what: str, root: Path | None = None) -> Path:
    """`directory / name` for a file name read from a file (`what` says where, for the
    message), refused unless it is a relative path that stays inside `root` (default:
    `checkpoint_root(directory)`) once resolved, symlinks included."""
    if not isinstance(name, str) or not name:
        raise WeightsError(f"{what} names {_short(name)} where a file name belongs")
    root = checkpoint_root(directory) if root is None else root
    try:
        path = directory / name
        real = path.resolve()
    except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop
        raise WeightsError(f"{what} names {name!r}, which cannot be resolved "
                           f"({_one_line(e)})") from e
    if Path(name).is_absolute() or not (real == root or root in real.parents):
        raise WeightsError(f"{what} names {name!r}, which resolves to {real}, outside {root}; "
                           "a checkpoint's files must lie inside its directory")
    return path


class Checkpoint(Mapping[str, Stored]):
    """The tensors of a safetensors checkpoint directory (or one file), by key, read lazily."""

    def __init__(self, entries: dict[str, Stored], files: list[Path]):
        self.entries = entries
        self.files = files

    @classmethod
    def open(cls, path: str | os.PathLike, name: str | None = None) -> Checkpoint:
        """`path`: a `.safetensors` file, or a directory with `model.safetensors` or an index.

        In a directory, the file transformers loads is read: `name` where given (the config's
        `transformers_weights`), else `model.safetensors` before the index, as
        `from_pretrained` chooses. Every file named inside the directory (the index's shards)
        must lie in it, symlinks resolved."""
        path = Path(path)
        if path.is_file():
            return cls(read_header(path)[0], [path])
        chosen = weights_file(path, name)
        if chosen.name.endswith(".index.json"):
            return cls._sharded(chosen, path)
        return cls(read_header(chosen)[0], [chosen])

    @classmethod
    def _sharded(cls, index: Path, directory: Path | None = None) -> Checkpoint:
        directory = index.parent if directory is None else directory
        weight_map = read_index(index)
        root = checkpoint_root(directory)
        entries: dict[str, Stored] = {}
        files = []
        for name in sorted(set(weight_map.values())):
            shard = contained(index.parent, name, f"{index} (weight_map)", root)
            if not shard.is_file():
                raise WeightsError(f"{shard} is listed in {index.name} but missing; re-download "
                                   "or re-save the checkpoint")
            files.append(shard)
            for key, stored in read_header(shard)[0].items():
                if weight_map.get(key) == name:
                    entries[key] = stored
        missing = sorted(set(weight_map) - set(entries))
        if missing:
            raise WeightsError(f"{index.parent / weight_map[missing[0]]} has no tensor "
                               f"{missing[0]!r}, which {index.name} places there")
        return cls(entries, files)

    def __getitem__(self, key: str) -> Stored:
        return self.entries[key]

    def __iter__(self):  # noqa: ANN204
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.entries.values())

    def read(self, key: str) -> torch.Tensor:
        """A fresh CPU tensor holding `key` (one `pread`; nothing else is loaded)."""
        return read_tensor(self.entries[key])


def weights_file(directory: Path, name: str | None = None) -> Path:
    """The weights file of a checkpoint directory that transformers' `from_pretrained` loads:
    `name` (a config's `transformers_weights`), else `model.safetensors`, else the index; each
    checked to lie inside the directory."""
    if name is not None:
        suffixes = (".safetensors", ".safetensors.index.json")
        if not (isinstance(name, str) and name.endswith(suffixes)):
            raise WeightsError(f"{directory / 'config.json'}: transformers_weights {_short(name)} "
                               "is not a .safetensors file or index")
        chosen = contained(directory, name, f"{directory / 'config.json'} (transformers_weights)")
        if not chosen.is_file():
            raise WeightsError(f"{chosen}, which config.json names as its transformers_weights, "
                               "is missing")
        return chosen
    for candidate in (SINGLE, INDEX):  # transformers' order: the single file wins
        if (directory / candidate).is_file():
            return contained(directory, candidate, str(directory))
    raise WeightsError(f"{directory} has no {SINGLE} or {INDEX}")


def read_index(index: Path) -> dict[str, str]:
    """An index's `weight_map` (tensor name -> shard file name), its JSON types checked."""
    try:
        if index.stat().st_size > MAX_HEADER:
            raise WeightsError(f"{index} is {index.stat().st_size} bytes, too large for a "
                               "safetensors index")
        data = json.loads(index.read_text())
    except OSError as e:
        raise WeightsError(f"cannot read {index}: {e.strerror or e}") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{index} is not a safetensors index: {_one_line(e)}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{index} is not a safetensors index: the file holds a "
                           f"{_json_type(data)}, not an object")
    if "weight_map" not in data:
        raise WeightsError(f"{index} is not a safetensors index: it has no weight_map")
    weight_map = data["weight_map"]
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index} is not a safetensors index: weight_map is a "
                           f"{_json_type(weight_map)}, not an object of tensor name -> file name")
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name:
            raise WeightsError(f"{index} is not a safetensors index: weight_map[{key!r}] is "
                               f"{_short(name)}, not a file name")
    return weight_map


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def read_tensor(stored: Stored) -> torch.Tensor:
    """Read one stored tensor into new memory."""
    buffer = torch.empty(stored.nbytes, dtype=torch.uint8)
    view = byte_view(buffer)
    with open(stored.file, "rb", buffering=0) as f:
        done = 0
        while done < stored.nbytes:
            got = f.readinto(view[done:]) if f.seek(stored.start + done) >= 0 else 0
            if not got:
                raise WeightsError(f"{stored.file} ended while reading {stored.key!r}; the file "
                                   "changed or is truncated")
            done += got
    return buffer.view(stored.dtype).view(stored.shape)


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview of a contiguous CPU tensor's bytes, without a copy and without
    numpy (`Tensor.numpy()` fails where numpy is not installed, which torch does not require).
    The caller keeps `tensor` alive while the view is used."""
    if not (tensor.device.type == "cpu" and tensor.is_contiguous()):
        raise ValueError("byte_view needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_ubyte * nbytes).from_address(tensor.data_ptr())).cast("B")


def parse_size(size: int | str) -> int:
    """Bytes in `size`: an int, or '5GB', '500MB', '2GiB' (decimal and binary units)."""
    if isinstance(size, int):
        value = size
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", size, re.IGNORECASE)
        if m is None:
            raise WeightsError(f"max shard size {size!r} is not a size such as 5GB or 500MB")
        power = "KMGT".find(m.group(2).upper()) + 1 if m.group(2) else 0
        value = int(float(m.group(1)) * (1024 if m.group(3) else 1000) ** power)
    if value <= 0:
        raise WeightsError(f"max shard size {size!r} must be positive")
    return value


def plan_shards(sizes: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Keys in sorted order, cut into shards of at most `max_shard_size` bytes (a tensor larger
    than that gets a shard of its own), as transformers cuts them."""
    shards: list[list[str]] = [[]]
    used = 0
    for key in sorted(sizes):
        if shards[-1] and used + sizes[key] > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(key)
        used += sizes[key]
    return shards


def write_checkpoint(out: Path, tensors: Mapping[str, Stored | torch.Tensor], *,
                     max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                     metadata: dict[str, str] | None = None,
                     progress: Callable[[int], None] | None = None) -> list[Path]:
    """Write `tensors` into the directory `out` as `model.safetensors`, or as shards plus
    `model.safetensors.index.json` when they exceed `max_shard_size`. A `Stored` value is copied
    byte for byte from its file; a tensor is written from memory. `progress(nbytes)` is called
    after each tensor. Returns the files written."""
    limit = parse_size(max_shard_size)
    sizes = {k: _nbytes(v) for k, v in tensors.items()}
    shards = plan_shards(sizes, limit)
    metadata = {"format": "pt", **(metadata or {})}
    if len(shards) == 1:
        names = [SINGLE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, keys in zip(names, shards):
        # Within a file, widest dtypes first (as safetensors lays them out): every tensor's
        # data stays aligned to its element size, so readers can map it without a copy.
        keys = sorted(keys, key=lambda k: (-_itemsize(tensors[k]), k))
        _write_file(out / name, [(k, tensors[k]) for k in keys], metadata, progress)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return [out / n for n in names] + [out / INDEX]
    return [out / names[0]]


def write_file(path: Path, tensors: Mapping[str, Stored | torch.Tensor], *,
               metadata: dict[str, str] | None = None) -> Path:
    """Write `tensors` into the one safetensors file `path`, laid out as `write_checkpoint`
    lays out a shard (safetensors' own `save_file` needs numpy; this needs torch only)."""
    keys = sorted(tensors, key=lambda k: (-_itemsize(tensors[k]), k))
    _write_file(Path(path), [(k, tensors[k]) for k in keys],
                {"format": "pt", **(metadata or {})}, None)
    return Path(path)


def _itemsize(value: Stored | torch.Tensor) -> int:
    return value.dtype.itemsize


def _nbytes(value: Stored | torch.Tensor) -> int:
    return value.nbytes if isinstance(value, Stored) else value.numel() * value.element_size()


def _describe(value: Stored | torch.Tensor) -> tuple[str, list[int]]:
    if isinstance(value, Stored):
        return NAMES[value.dtype], list(value.shape)
    if value.dtype not in NAMES:
        raise WeightsError(f"cannot store a {value.dtype} tensor in safetensors")
    return NAMES[value.dtype], list(value.shape)


def _write_file(path: Path, items: list[tuple[str, Stored | torch.Tensor]],
                metadata: dict[str, str], progress: Callable[[int], None] | None) -> None:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, value in items:
        dtype, shape = _describe(value)
        header[key] = {"dtype": dtype, "shape": shape,
                       "data_offsets": [offset, offset + _nbytes(value)]}
        offset += _nbytes(value)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb", buffering=0) as f:  # unbuffered: copy_file_range moves the fd too
        _write_all(f, struct.pack("<Q", len(text)) + text)
        for _, value in items:
            if isinstance(value, Stored):
                _copy_bytes(value, f)
            else:
                data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                _write_all(f, byte_view(data))
            if progress is not None:
                progress(_nbytes(value))


def _copy_bytes(stored: Stored, out: Any) -> None:
    """Append `stored`'s bytes to the open file `out`, in the kernel where the OS allows."""
    with open(stored.file, "rb", buffering=0) as src:
        done = 0
        while done < stored.nbytes:
            count = min(stored.nbytes - done, 1 << 30)
            try:
                n = os.copy_file_range(src.fileno(), out.fileno(), count, stored.start + done)
            except OSError:  # another file system, or an old kernel: copy through user space
                n = 0
            if n == 0:
                src.seek(stored.start + done)
                chunk = src.read(min(count, 64 << 20))
                if not chunk:
                    raise WeightsError(f"{stored.file} ended while copying {stored.key!r}; the "
                                       "file changed or is truncated")
                _write_all(out, chunk)
                n = len(chunk)
            done += n


def _write_all(out: Any, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[out.write(view):]


def total_bytes(values: Iterable[Stored | torch.Tensor]) -> int:
    return sum(_nbytes(v) for v in values)
