"""Where new blocks go in a checkpoint: the block list, the renumbered keys, the wider config.

A transformer's blocks are the integer-indexed module list that holds most of its parameters
(`model.layers.{i}`, `transformer.h.{i}`, `encoder.layer.{i}`). Inserting `count` blocks after
block `after` shifts the keys of every later block by `count` and opens new indices for the new
ones; the config's depth (`num_hidden_layers`, `n_layer`, `num_layers`, ...) grows by `count`,
and per-layer lists (`layer_types`) get the source block's entry for each new block. Everything
here works on key names, sizes and the config's JSON, so nothing is loaded.
"""

from __future__ import annotations

import copy
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


def find_blocks(sizes: Mapping[str, int], prefix: str | None = None, *,
                contiguous: bool = True) -> Blocks:
    """The integer-indexed prefix holding most bytes in `sizes` (key → nbytes), or `prefix`
    (with or without its trailing dot). Its indices must run 0..n-1 unless not `contiguous`
    (snapshots recorded with `include=` hold only some blocks)."""
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
    if contiguous and indices != tuple(range(len(indices))):
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


# Config entries that hold one value per block (transformers 5 declares no metadata for this;
# these are the lists its configs validate against `num_hidden_layers`, or document so).
PER_LAYER_KEYS = ("layer_types", "mlp_layer_types", "num_attention_heads_per_layer",
                  "num_key_value_heads_per_layer", "no_rope_layers", "attention_layers",
                  "layers_block_type", "layer_rope_theta")
# Per-block lists the config cycles over the depth (Recurrent Gemma's `block_types`: block i is
# `block_types[i % len]`): written out in full at the new depth, so every block keeps its kind.
CYCLED_KEYS = ("block_types",)
# Per-block lists stored run-length encoded, `[[pattern, repeats], ...]` (GPT-Neo's
# `attention_types`, from which the config derives `attention_layers` when loaded).
RUN_LENGTH_KEYS = ("attention_types",)
# (period, offset) pairs from which a config derives each block's kind: block i is of the kind
# where i % period == offset (Jamba's attention and MoE blocks; transformers 5 keeps no list).
PERIOD_KEYS = (("attn_layer_period", "attn_layer_offset"),
               ("expert_layer_period", "expert_layer_offset"))
# Config entries that list block indices (the blocks that are dense, MoE, sliding...).
LAYER_INDEX_KEYS = ("mlp_only_layers", "moe_layers", "local_layer_ids", "attn_layer_indices")
# A per-block list whose values are block indices (the layer whose KV cache a layer reads).
LAYER_SOURCE_KEYS = ("kv_source_layers",)
# Depth entries that count one side of an encoder-decoder, and nested configs named for a part.
_SIDE_DEPTH = {"encoder": ("encoder_layers", "num_encoder_layers"),
               "decoder": ("decoder_layers", "num_decoder_layers")}
_PART_WORDS = {"encoder": ("encoder",), "decoder": ("decoder",),
               "text_config": ("language", "text", "llm"),
               "vision_config": ("vision", "visual", "image"),
               "audio_config": ("audio", "speech")}
_ALL_DEPTH = (*DEPTH_KEYS, *_SIDE_DEPTH["encoder"], *_SIDE_DEPTH["decoder"])


def _side(prefix: str) -> str | None:
    words = prefix.lower().replace("_", ".").split(".")
    found = [side for side in ("encoder", "decoder") if side in words]
    return found[0] if len(found) == 1 else None


def _depth_side(node: dict[str, Any], name: str) -> str | None:
    """Which side of an encoder-decoder the depth entry `name` of `node` counts, if any: T5's
    `num_layers` counts the encoder where `num_decoder_layers` sits beside it."""
    for side, keys in _SIDE_DEPTH.items():
        if name in keys:
            return side
    if name in ("num_layers", "num_hidden_layers") and any(k in node for k in _SIDE_DEPTH[
            "decoder"]):
        return "encoder"
    return None


def widen_config(config: dict[str, Any], blocks: Blocks, after: int, count: int,
                 source: int) -> tuple[dict[str, Any], list[str]]:
    """A copy of the config JSON `config` with `count` more blocks in the list `blocks`, and the
    names of the entries changed.

    Only the depth of the grown list changes: in an encoder-decoder (T5's `num_layers` and
    `num_decoder_layers`, BART's `encoder_layers` and `decoder_layers`, nested `encoder` /
    `decoder` configs) the side the prefix names, and in a composite config the part it names
    (`text_config` for `language_model.…`). Beside that depth, the lists transformers keeps one
    entry per block (`PER_LAYER_KEYS`, such as `layer_types`) get `source`'s entry at each new
    index, cycled lists (`CYCLED_KEYS`) are written out in full, lists of block indices
    (`LAYER_INDEX_KEYS`) are renumbered, and a period and offset (`PERIOD_KEYS`) are set so that
    every old block keeps its kind and each new block gets `source`'s (`InsertionError` where no
    period and offset can say that); no other entry is touched, whatever its length. Raises
    `InsertionError` for a config whose depth does not match, or one with a `per_layer_config`,
    which surgeon cannot renumber."""
    check_insertion(blocks, after, count)
    side = _side(blocks.prefix)
    words = set(blocks.prefix.lower().replace("_", ".").split("."))
    candidates: list[tuple[tuple[str, ...], str]] = []  # (path of the dict, depth key)

    def collect(node: dict[str, Any], path: tuple[str, ...]) -> None:
        for name, value in node.items():
            if isinstance(value, dict):
                collect(value, (*path, name))
            elif name in _ALL_DEPTH and value == blocks.count and not isinstance(value, bool):
                other = _depth_side(node, name)
                if side is not None and other is not None and other != side:
                    continue  # the other side's depth
                if side is not None and any(p in _SIDE_DEPTH and p != side for p in path):
                    continue  # a nested config of the other side
                candidates.append((path, name))

    collect(config, ())
    named = [c for c in candidates if all(
        p not in _PART_WORDS or words & set(_PART_WORDS[p]) for p in c[0])]
    candidates = named or candidates
    if not candidates:
        raise InsertionError(f"config.json has no depth entry equal to the {blocks.count} blocks "
                             f"under {blocks.prefix!r} ({', '.join(DEPTH_KEYS)}); the config "
                             "does not match the weights")
    widened = copy.deepcopy(config)
    changed: list[str] = []
    for path in dict.fromkeys(p for p, _ in candidates):
        node = widened
        for part in path:
            node = node[part]
        where = "".join(f"{p}." for p in path)
        for name in sorted(n for p, n in candidates if p == path):
            node[name] += count
            changed.append(where + name)
        if node.get("per_layer_config"):
            raise InsertionError(f"config.json's {where}per_layer_config overrides settings per "
                                 "block; surgeon grow cannot renumber it: grow a model without it")
        changed += _widen_lists(node, where, blocks.count, after, count, source)
        changed += _widen_periods(node, where, blocks.count, after, count, source)
    return widened, sorted(changed)


def _widen_lists(node: dict[str, Any], where: str, depth: int, after: int, count: int,
                 source: int) -> list[str]:
    """Widen, in place, the per-block lists and renumber the block-index lists of `node`."""
    changed = []
    shift = lambda i: i + count if i > after else i  # noqa: E731
    for name, value in list(node.items()):
        if not isinstance(value, list):
            continue
        if name in PER_LAYER_KEYS and len(value) >= depth:
            node[name] = value[:after + 1] + [value[source]] * count + value[after + 1:]
        elif name in CYCLED_KEYS and value:
            layers = [value[i % len(value)] for i in range(depth)]
            node[name] = layers[:after + 1] + [layers[source]] * count + layers[after + 1:]
        elif name in RUN_LENGTH_KEYS and (layers := _expand_runs(value)) is not None and len(
                layers) == depth:
            layers = layers[:after + 1] + [layers[source]] * count + layers[after + 1:]
            runs: list[list[Any]] = []
            for kind in layers:  # re-encoded: one-entry patterns, consecutive ones merged
                if runs and runs[-1][0] == [kind]:
                    runs[-1][1] += 1
                else:
                    runs.append([[kind], 1])
            node[name] = runs
        elif name in LAYER_SOURCE_KEYS and len(value) == depth and _ints(value):
            own = value[source] == source
            new = [i if own else shift(value[source]) for i in new_indices(after, count)]
            kept = [shift(v) for v in value]
            node[name] = kept[:after + 1] + new + kept[after + 1:]
        elif name in LAYER_INDEX_KEYS and _ints(value):
            extra = list(new_indices(after, count)) if source in value else []
            node[name] = sorted([shift(v) for v in value] + extra)
        else:
            continue
        if node[name] != value:
            changed.append(where + name)
    return changed


def _expand_runs(value: list[Any]) -> list[Any] | None:
    """`[[pattern, repeats], ...]` as one entry per block, or None if `value` is not that."""
    layers: list[Any] = []
    for item in value:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], list)
                and isinstance(item[1], int) and not isinstance(item[1], bool)):
            return None
        layers.extend(item[0] * item[1])
    return layers


def _ints(value: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _period_marks(period: int, offset: int, depth: int) -> list[bool]:
    return [i % period == offset for i in range(depth)]


def _period_fit(want: list[bool], period: int) -> tuple[int, int] | None:
    """The (period, offset) that marks exactly the blocks `want` marks: `period` with another
    offset if one does, else the one other that can (the offset is the first marked block, the
    period the gap to the second, or one past the end); None if none does."""
    depth = len(want)
    marked = [i for i, w in enumerate(want) if w]
    if not marked:
        other = (depth + 1, depth)  # an offset past the last block
    elif len(marked) > 1:
        other = (marked[1] - marked[0], marked[0])
    else:
        other = (max(marked[0] + 1, depth - marked[0]), marked[0])
    for p, o in [*((period, o) for o in range(period)), other]:
        if _period_marks(p, o, depth) == want:
            return p, o
    return None


def _widen_periods(node: dict[str, Any], where: str, depth: int, after: int, count: int,
                   source: int) -> list[str]:
    """Set, in place, each (period, offset) pair of `node` so that the grown depth keeps every
    old block's kind and gives the new ones `source`'s; raise `InsertionError` naming the entry,
    and the --source / --after that the pairs can express, where no pair does."""
    pairs = [(pk, ok, node[pk], node[ok]) for pk, ok in PERIOD_KEYS
             if _ints([node.get(pk), node.get(ok)]) and node[pk] >= 1]

    def fits(a: int, s: int) -> bool:
        return all(_period_fit(_grown_marks(p, o, depth, a, count, s), p) is not None
                   for _, _, p, o in pairs)

    changed = []
    for period_key, offset_key, period, offset in pairs:
        fit = _period_fit(_grown_marks(period, offset, depth, after, count, source), period)
        if fit is None:
            sources = [s for s in range(depth) if fits(after, s)]
            afters = [a for a in range(-1, depth) if fits(a, max(a, 0))]
            hint = " or ".join(([f"--source {sources[0]} (fits: {sources})"] if sources else [])
                               + ([f"--after {afters[-1]} (fits: {afters})"] if afters else []))
            hint = f"pass {hint}" if hint else "no single --source or --after fits"
            raise InsertionError(
                f"config.json's {where}{period_key} / {offset_key} ({period}, {offset}) derive "
                f"each block's kind from its index, and none make {count} new block(s) after "
                f"block {after} of block {source}'s kind while the others keep theirs; {hint}")
        if fit != (period, offset):
            node[period_key], node[offset_key] = fit
            changed += [where + period_key] if fit[0] != period else []
            changed += [where + offset_key] if fit[1] != offset else []
    return changed


def _grown_marks(period: int, offset: int, depth: int, after: int, count: int,
                 source: int) -> list[bool]:
    marks = _period_marks(period, offset, depth)
    return marks[:after + 1] + [marks[source]] * count + marks[after + 1:]
