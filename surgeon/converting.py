"""`surgeon.convert(src, dst, passes)`: a checkpoint in, a converted checkpoint out.

The base model is built with its parameters on the `meta` device and bound to the source's
safetensors files (`surgeon.files.source.open_source`); the passes run with each module's
weights read while it is called (`surgeon.files.lazy`), so memory holds about one block, never
the model. The destination gets the layout of `surgeon.save`: tensors that come through
unchanged are copied byte for byte from the source files, only new ones are written from memory,
shards are cut at `max_shard_size`, and everything is written beside `dst` and renamed into
place at the end. The same inputs give byte-identical files."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from surgeon.applying import apply, require_calibrating_pass
from surgeon.checkpoint import tensors_to_write, write_recipe
from surgeon.errors import ExampleError
from surgeon.files.atomic import MARKER, atomic_directory, check_destination
from surgeon.files.calibration import DEFAULT_LENGTH, read_calibration
from surgeon.files.card import write_card
from surgeon.files.output import carry_files, tensor_progress
from surgeon.files.recipe_file import CALIBRATION, EXAMPLE, RECIPE
from surgeon.files.remote_code import write_remote_code
from surgeon.files.source import PICKLE_SUFFIXES, Source, load_example, open_source, public_name
from surgeon.files.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    INDEX,
    Stored,
    checkpoint_root,
    parse_size,
    total_bytes,
    write_checkpoint,
)
from surgeon.recipe import PassConfig, PassError, parse_pass

# Source files that are not carried over into the converted directory.
_NOT_CARRIED = (".safetensors", INDEX, "README.md", RECIPE, ".gitattributes") + PICKLE_SUFFIXES
_LABEL = "converted checkpoint"
SEED = 0  # passes that draw random numbers draw the same ones every time


@dataclass
class Conversion:
    """What `convert` did: the CLI's summary and its `--json` output."""

    source: str
    destination: str
    model: str
    streamed: bool  # weights read from disk as needed (False: the model was loaded in memory)
    passes: list[dict[str, Any]]  # name, modules, step, promise, max_abs, cosine, calibrated
    new_parameters: int  # elements of parameters the passes created
    tensors: int
    copied_bytes: int  # copied unchanged from the source files
    written_bytes: int  # computed in memory
    files: list[str]
    carried: list[str]  # the source's config and tokenizer files copied into DST
    seconds: float
    phases: dict[str, float]  # seconds: "open" the source, run the "passes", "write" DST
    pushed_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def convert(src: str, dst: str | os.PathLike, passes: list[str | PassConfig], *,
            revision: str | None = None, weights: str | None = None,
            example: str | tuple | dict | None = None,
            max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
            allow_pickle: bool = False, progress: bool = False,
            trust_remote_code: bool = False, exclude: tuple[str, ...] | list[str] = (),
            calibration: str | os.PathLike | list | None = None,
            calibration_length: int = DEFAULT_LENGTH) -> Conversion:
    """Convert the model `src` (a local HF directory, a hub id, or `package.module:factory` with
    `weights=FILE.safetensors`) with `passes` and write it to the directory `dst`.

    `example` is the input the passes trace with (a tuple or dict, or `package.module:function`
    returning one; transformers models need none). An existing `dst` is replaced only with
    `overwrite`. `progress` shows tqdm bars on stderr. A directory's or hub repo's own code
    (`auto_map` in its config) runs only with `trust_remote_code`; a factory `src` and an
    `example` function are the caller's own and run either way. Files written record `src` by
    its name (a hub id, a factory, a directory's name), never a local absolute path. `exclude`
    (fnmatch patterns of module names) keeps every pass off those modules. `calibration` (a
    file of token ids or text, see `surgeon.files.calibration`, text cut into windows of
    `calibration_length` tokens; or a list of batches as `surgeon.apply` takes) is what a
    calibrating pass (`adyt:calibrate=true`) fits on instead of the example. Every
    user mistake raises a
    `SurgeonError` before anything is written, and nothing is left behind.
    """
    start = time.perf_counter()
    configs = [parse_pass(p) for p in passes]
    if not configs:
        raise PassError("give at least one pass, e.g. -p aion -p hyper:streams=4 -p adyt")
    parse_size(max_shard_size)
    dest = Path(dst).expanduser()
    given = [p for p in (Path(src).expanduser(), weights and Path(weights).expanduser())
             if p and p.exists()]
    check_destination(dest, overwrite=overwrite, sources=given, label=_LABEL)
    if calibration is not None:
        require_calibrating_pass(configs)
    if isinstance(example, str):
        example = load_example(example)

    source = open_source(src, revision=revision, weights=weights, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)
    opened = time.perf_counter()
    sources = read_paths(source, given)
    check_destination(dest, overwrite=overwrite, sources=sources, label=_LABEL)
    model = source.model
    if example is None and getattr(model, "config", None) is None:
        raise ExampleError(f"no example input for {type(model).__name__}: pass --example "
                           "package.module:function (returning a tuple of positional args or a "
                           "dict of keyword args for its forward)")
    if isinstance(calibration, (str, os.PathLike)):
        calibration = _read_calibration(calibration, source, calibration_length)
    model._surgeon_base = source.base
    before = {name for name, _ in model.named_parameters()}  # a replaced module keeps its names
    if progress:
        _say(f"rewriting {type(model).__name__} with {', '.join(c.name for c in configs)}")
    lazy = source.lazy if source.lazy is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), torch.no_grad(), lazy:
        torch.manual_seed(SEED)
        apply(model, configs, example, exclude=tuple(exclude), calibration=calibration)
    rewritten = time.perf_counter()

    tensors = tensors_to_write(model, source.lazy)
    copied = sum(v.nbytes for v in tensors.values() if isinstance(v, Stored))
    total = total_bytes(tensors.values())
    new = sum(p.numel() for name, p in model.named_parameters() if name not in before)
    with atomic_directory(dest, overwrite=overwrite, sources=sources, label=_LABEL) as tmp:
        with tensor_progress(progress, len(tensors)) as advance:
            files = write_checkpoint(tmp, tensors, max_shard_size=max_shard_size,
                                     progress=advance)
        carried = carry_files(source.directory, tmp, _not_carried)
        remote = (write_remote_code(tmp, source.base.get("class", ""))  # transformers loads
                  if source.base.get("kind") == "transformers" else [])  # DST converted
        name = public_name(src)  # published with --push-to-hub: no local absolute path
        write_recipe(tmp, model, source.base, {"source": {"name": name, "revision": revision}})
        write_card(tmp, model, name, new)
        written = [f.name for f in files] + carried + remote + [RECIPE, "README.md"]
        written += [EXAMPLE] if (tmp / EXAMPLE).is_file() else []  # a factory's example
        written += [CALIBRATION] if (tmp / CALIBRATION).is_file() else []
    end = time.perf_counter()
    return Conversion(
        source=src, destination=str(dest), model=type(model).__name__,
        streamed=source.lazy is not None,
        passes=[{"name": d.pass_name, "modules": d.modules, "step": d.step,
                 "promise": d.promise, "max_abs": d.max_abs, "cosine": d.cosine,
                 "calibrated": d.calibrated}
                for d in model.surgeon_drift],
        new_parameters=new, tensors=len(tensors), copied_bytes=copied,
        written_bytes=total - copied,
        files=sorted(written), carried=carried, seconds=end - start,
        phases={"open": opened - start, "passes": rewritten - opened, "write": end - rewritten})


def _read_calibration(path: str | os.PathLike, source: Source, length: int
                      ) -> list[torch.Tensor]:
    """The batches of the `--calibration` file `path` for `source`'s model: ids bounded by its
    vocabulary, text tokenised by its own tokenizer (local files only, no remote code), cut
    into windows of `length` tokens (at most its config's max_position_embeddings)."""
    config = getattr(source.model, "config", None)
    text_config = getattr(config, "get_text_config", lambda: config)()
    vocab = getattr(text_config, "vocab_size", None)
    longest = getattr(text_config, "max_position_embeddings", None)
    if isinstance(longest, int) and longest < length:
        length = longest

    def tokenizer() -> object:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(source.directory), local_files_only=True,
                                                 trust_remote_code=False)
        except Exception as e:  # no tokenizer files, or ones transformers cannot read
            raise ExampleError(f"--calibration {path}: the source has no tokenizer surgeon can "
                               f"load ({type(e).__name__}); give token ids (.json or "
                               ".safetensors) instead") from None

    return read_calibration(path, vocab_size=vocab if isinstance(vocab, int) else None,
                            tokenizer=tokenizer if source.directory is not None else None,
                            length=length)


def read_paths(source: Source, given: list[Path]) -> list[Path]:
    """Every path convert reads: what the user gave, the source directory (and the hub cache
    folder its files link into), and the weights files themselves."""
    paths = list(given)
    if source.directory is not None:
        paths += [source.directory, checkpoint_root(source.directory)]
    if source.lazy is not None:
        paths += source.lazy.checkpoint.files
    return paths


def _not_carried(name: str) -> bool:
    return name.endswith(_NOT_CARRIED) or name == MARKER


def _say(line: str) -> None:
    import sys

    print(line, file=sys.stderr, flush=True)
