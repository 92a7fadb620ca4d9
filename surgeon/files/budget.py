"""Bounds on what a file or an option can make surgeon allocate, read or write.

A hostile or mistaken number (a config asking for 10⁵ layers, 7B-sized defaults on a laptop, an
example of 65 536 tokens, `grow --count 100000`) must be refused in one line before the memory or
the disk is spent, not after the kernel kills the process:

- `check_build` estimates the parameters a transformers config describes from models built on
  the `meta` device at depth 1 and 2 (nothing allocated, fast for any depth) and refuses a build
  that needs more memory than the machine has available, or far more parameters than the
  checkpoint it is bound to holds;
- `require_memory` is the shared refusal (passes call it for the parameters they add);
- `check_example_file` / `check_example_tensors` bound the example a recipe carries;
- `check_grow_count` bounds how many blocks one `surgeon grow` inserts.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from surgeon.errors import SurgeonError

# An example is for tracing and checking, a few short sequences: every integer tensor (token
# ids, masks, positions) holds at most MAX_EXAMPLE_IDS elements, all tensors together at most
# MAX_EXAMPLE_ELEMENTS (16 MiB of float32: an image batch of 16 at 224²).
MAX_EXAMPLE_IDS = 16_384
MAX_EXAMPLE_ELEMENTS = 2**22
# `surgeon grow` inserts at most the current depth in one run (the model at most doubles), and
# never more than this.
MAX_GROW_COUNT = 1024
# The config attributes that count blocks (after the config's attribute_map).
DEPTH_FIELDS = ("num_hidden_layers", "num_layers", "num_decoder_layers", "encoder_layers",
                "decoder_layers")


class BudgetError(SurgeonError):
    """A build, an example or an insertion that needs more memory or work than surgeon allows
    or the machine has."""


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux `MemAvailable`); elsewhere the free
    physical pages where the OS tells them; None where nothing can be told (no check then)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def format_bytes(n: float) -> str:
    """`26.8 GB`, `512.0 MB`: decimal units, as disk and memory sizes are quoted."""
    for unit in ("B", "kB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def require_memory(need: int, what: str, fix: str) -> None:
    """Refuse `what` (a phrase: "config.json's model") in one line when it needs more than the
    memory available now; `fix` says what to do instead."""
    have = available_memory()
    if have is not None and need > have:
        raise BudgetError(f"{what} needs about {format_bytes(need)} of memory, more than this "
                          f"machine has available ({format_bytes(have)}); {fix}")


def _depths(config: Any) -> dict[str, int]:
    mapping = getattr(config, "attribute_map", {}) or {}
    found: dict[str, int] = {}
    for name in DEPTH_FIELDS:
        real = mapping.get(name, name)
        value = getattr(config, real, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            found.setdefault(real, value)
    return found


def _with_depth(config: Any, depths: dict[str, int]) -> Any:
    """A copy of `config` with the given block counts (per-layer lists cut to fit)."""
    small = copy.deepcopy(config)
    old = _depths(config)
    for name, depth in depths.items():
        setattr(small, name, depth)
    for key, value in vars(small).items():  # layer_types and other per-layer lists
        if isinstance(value, list) and len(value) in old.values() and len(value) > 1:
            setattr(small, key, value[:max(depths.values())])
    return small


def _count_on_meta(cls: type, config: Any) -> int:
    from surgeon.files.lazy import parameters_on_meta

    with parameters_on_meta(), torch.device("meta"):
        build = cls.from_config if cls.__name__.startswith("Auto") else cls._from_config
        model = build(config)
    return sum(p.numel() for p in model.parameters())


def estimate_parameters(cls: type, config: Any) -> int | None:
    """The parameter count of `cls` built from the transformers `config`, from builds on the
    meta device at depth 1 and 2 per block-count field, extrapolated linearly (exact for
    stacks of equal blocks); None where such a build fails (the caller's build then reports)."""
    depths = _depths(config)
    try:
        if not depths:
            return _count_on_meta(cls, config)
        ones = dict.fromkeys(depths, 1)
        base = _count_on_meta(cls, _with_depth(config, ones))
        total = base
        for name, depth in depths.items():
            if depth > 1:
                per_block = _count_on_meta(cls, _with_depth(config, {**ones, name: 2})) - base
                total += (depth - 1) * per_block
        return total
    except Exception:  # noqa: BLE001 - a config the reduced build cannot take: no estimate
        return None


def config_dtype(config: Any) -> torch.dtype | None:
    """The floating dtype a transformers config asks its weights in (None: not said)."""
    for attr in ("dtype", "torch_dtype"):
        value = getattr(config, attr, None)
        if isinstance(value, str):
            value = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(value, torch.dtype) and value.is_floating_point:
            return value
    return None


def check_build(cls: type, config: Any, config_file: str | os.PathLike, *,
                dtype: torch.dtype | None = None,
                stored: Mapping[str, Any] | None = None) -> None:
    """Refuse to build `cls(config)` when its parameters need more memory than is available
    (`dtype`: what they are built in, the default dtype where None); for a model whose weights
    stay on disk (`stored`: the checkpoint's tensors, each with a `shape`), refuse a config that
    describes far more parameters than the checkpoint holds (it cannot match, and building
    even on meta costs per block)."""
    estimate = estimate_parameters(cls, config)
    if estimate is None:
        return
    name = getattr(cls, "__name__", str(cls))
    if stored is not None:
        stored_elements = sum(math.prod(s.shape) for s in stored.values())
        if estimate > 2 * stored_elements + 2**20:
            raise BudgetError(f"{config_file} describes a {name} of about {estimate:,} "
                              f"parameters, but its weights hold {stored_elements:,} values; "
                              "the config does not match the weights")
        return
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    require_memory(estimate * itemsize,
                   f"{config_file} describes a {name} of about {estimate:,} parameters, which",
                   "check the config's sizes, or load it on a machine with more memory")


def check_example_tensors(shapes: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                          label: str) -> None:
    """Refuse an example (name → (shape, dtype)) larger than an example needs to be."""
    total = 0
    for key, (shape, dtype) in shapes.items():
        count = 1
        for s in shape:
            count *= int(s)
        total += count
        if not (dtype.is_floating_point or dtype.is_complex) and count > MAX_EXAMPLE_IDS:
            raise BudgetError(f"{label}: example tensor {key!r} holds {count:,} values "
                              f"(shape {list(shape)}); an example of ids or masks holds at most "
                              f"{MAX_EXAMPLE_IDS:,}: use a few short sequences")
    if total > MAX_EXAMPLE_ELEMENTS:
        raise BudgetError(f"{label}: the example holds {total:,} values, more than the "
                          f"{MAX_EXAMPLE_ELEMENTS:,} an example may have; use a smaller batch")


def check_example_file(path: str | os.PathLike) -> None:
    """`check_example_tensors` on an `example.safetensors`, from its header (nothing read)."""
    from surgeon.files.weights import read_header

    entries, _ = read_header(Path(path))
    check_example_tensors({k: (s.shape, s.dtype) for k, s in entries.items()}, str(path))


def example_shapes(tensors: Iterable[tuple[str, torch.Tensor]]
                   ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name → (shape, dtype) of in-memory example tensors, for `check_example_tensors`."""
    return {k: (tuple(t.shape), t.dtype) for k, t in tensors}


def check_grow_count(count: int, depth: int | None = None, prefix: str = "") -> None:
    """Refuse `--count` that is not a whole number from 1 to `MAX_GROW_COUNT`, or (given the
    block list's `depth`) more than the blocks the checkpoint already has."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise BudgetError(f"--count must be at least 1 (a whole number), got {count!r}")
    limit = MAX_GROW_COUNT if depth is None else min(MAX_GROW_COUNT, depth)
    if count > limit:
        where = f"the checkpoint's {depth} blocks under {prefix!r}" if depth is not None else (
            f"{MAX_GROW_COUNT}")
        raise BudgetError(f"--count {count} is more than one grow inserts (at most {where}: "
                          "the model at most doubles); grow in steps")
