"""Where new blocks go in a checkpoint: the block list, the renumbered keys, the wider config.

A transformer's blocks are the integer-indexed module list that holds most of its parameters
(`model.layers.{i}`, `transformer.h.{i}`, `encoder.layer.{i}`). Inserting `count` blocks after
block `after` shifts the keys of every later block by `count` and opens new indices for the new
ones; the config's depth (`num_hidden_layers`, `n_layer`, `num_layers`, ...) grows by `count`,
and per-layer lists (`layer_types`) get the source block's entry for each new block. Everything
here works on key names, sizes and the config's JSON, so nothing is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from surgeon.errors import SurgeonError

DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")


class InsertionError(SurgeonError):
    """The checkpoint's blocks, or the requested insertion, cannot be used."""


@dataclass(frozen=True)
class Blocks:
    """The block list of a checkpoint: `prefix` (e.g. "model.layers."), the block indices in
    order, and each block's keys relative to its own prefix (e.g. "mlp.down_proj.weight")."""

    prefix: str
    indices: tuple[int, ...]
    members: Mapping[int, tuple[str, ...]]

    @property
    def count(self) -> int:
        return len(self.indices)

    def key(self, index: int, member: str) -> str:
        return f"{self.prefix}{index}.{member}"


def find_blocks(sizes: Mapping[str, int], prefix: str | None = None) -> Blocks:
    """The integer-indexed prefix holding most bytes in `sizes` (key → nbytes), or `prefix`
    (with or without its trailing dot). Its indices must run 0..n-1."""
    totals: dict[str, int] = {}
    for key, size in sizes.items():  # every integer component names a list (nested ones too)
        parts = key.split(".")
        for j, part in enumerate(parts[:-1]):
            if part.isdigit():
                head = ".".join(parts[:j]) + "." if j else ""
                totals[head] = totals.get(head, 0) + size
    if prefix is not None:
        chosen = prefix if prefix.endswith(".") or prefix == "" else prefix + "."
        if chosen not in totals:
            known = ", ".join(sorted(totals)) or "none"
            raise InsertionError(f"no integer-indexed blocks under {prefix!r} in the checkpoint "
                                 f"(block lists found: {known})")
    elif not totals:
        raise InsertionError("the checkpoint has no integer-indexed block list (keys like "
                             "'model.layers.0.…'); name one with --blocks PREFIX")
    else:  # most bytes; on a tie the outer list
        chosen = max(totals, key=lambda p: (totals[p], -len(p)))
    by_index: dict[int, list[str]] = {}
    for key in sizes:
        if key.startswith(chosen):
            head, dot, rest = key[len(chosen):].partition(".")
            if dot and head.isdigit():
                by_index.setdefault(int(head), []).append(rest)
    indices = tuple(sorted(by_index))
    if indices != tuple(range(len(indices))):
        raise InsertionError(f"the blocks under {chosen!r} are numbered {list(indices)[:8]}, not "
                             "0..n-1")
    return Blocks(chosen, indices, {i: tuple(sorted(by_index[i])) for i in indices})


def renumber(keys: list[str] | tuple[str, ...], blocks: Blocks, after: int, count: int
             ) -> dict[str, str]:
    """Old key → new key with `count` blocks inserted after block `after` (-1: before the first);
    keys outside the block list keep their names."""
    check_insertion(blocks, after, count)
    out = {}
    for key in keys:
        new = key
        if key.startswith(blocks.prefix):
            head, dot, rest = key[len(blocks.prefix):].partition(".")
            if dot and head.isdigit() and int(head) > after:
                new = f"{blocks.prefix}{int(head) + count}.{rest}"
        out[key] = new
    return out


def new_indices(after: int, count: int) -> range:
    return range(after + 1, after + 1 + count)


def check_insertion(blocks: Blocks, after: int, count: int) -> None:
    if count < 1:
        raise InsertionError(f"--count must be at least 1, got {count}")
    if not -1 <= after < blocks.count:
        raise InsertionError(f"--after {after} is not a block: the checkpoint has blocks 0.."
                             f"{blocks.count - 1} under {blocks.prefix!r} (-1 inserts first)")


def widen_config(config: dict[str, Any], blocks: Blocks, after: int, count: int,
                 source: int) -> tuple[dict[str, Any], list[str]]:
    """A copy of the config JSON `config` with `count` more blocks, and the names of the entries
    changed. The depth entry equal to the block count grows; every list with one entry per block
    gets `source`'s entry at each new index. Nested configs (`text_config`) are searched too."""
    check_insertion(blocks, after, count)
    changed: list[str] = []

    def visit(node: dict[str, Any], path: str) -> dict[str, Any]:
        out = dict(node)
        for name, value in node.items():
            where = f"{path}{name}"
            if name in DEPTH_KEYS and value == blocks.count:
                out[name] = value + count
                changed.append(where)
            elif isinstance(value, list) and len(value) == blocks.count and blocks.count > 1:
                out[name] = value[:after + 1] + [value[source]] * count + value[after + 1:]
                changed.append(where)
            elif isinstance(value, dict):
                out[name] = visit(value, where + ".")
        return out

    widened = visit(config, "")
    if not any(c.rsplit(".", 1)[-1] in DEPTH_KEYS for c in changed):
        raise InsertionError(f"config.json has no depth entry equal to the {blocks.count} blocks "
                             f"under {blocks.prefix!r} ({', '.join(DEPTH_KEYS)}); the config "
                             "does not match the weights")
    return widened, changed
