"""`surgeon.save` and `surgeon.load`: a converted model as safetensors plus its recipe.

A saved directory holds `model.safetensors` or shards with an index (tied weights stored once;
`surgeon.files.weights`), the base model's `config.json` where it has one, the example the
passes were applied with (`example.safetensors`, unless it was the default for a transformers
config), and `surgeon.json`: versions, how to rebuild the base, the ordered pass configs and a
manifest of the modules the passes created or replaced. Loading rebuilds the base, replays the
passes, checks the manifest and loads the weights strictly. Nothing is pickled.

A checkpoint runs no code of its own unless the user opts in (`trust_remote_code=True`): a
transformers base is a class transformers exports, looked up by name; a `package.module:factory`
base is imported only with the opt-in, and never from the current directory; passes are the
installed ones. `surgeon.json` is checked against its schema (`check_recipe`) before any of it
is used, so a damaged or crafted file is one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from surgeon.errors import TRUST_HINT, NoEffectWarning, SurgeonError, UntrustedCodeError
from surgeon.files.atomic import atomic_directory
from surgeon.files.budget import check_example_file, check_example_tensors, example_shapes
from surgeon.files.hf_config import build_model, check_config_file, config_errors
from surgeon.files.remote_code import RemoteCodeError, base_config_dict, write_remote_code
from surgeon.files.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    Checkpoint,
    Stored,
    byte_view,
    write_checkpoint,
    write_file,
)
from surgeon.version import __version__

if TYPE_CHECKING:
    from surgeon.files.lazy import LazyWeights

RECIPE = "surgeon.json"
EXAMPLE = "example.safetensors"
# 2: config.json is marked for transformers (model_type surgeon_<type>, undone by
# `read_base_config`, which a format-1 reader lacks: it would stop at transformers'
# trust_remote_code error), and `digests` and `dtype` are recorded. Format 1 is still read.
FORMAT = 2


class CheckpointError(SurgeonError):
    """A converted checkpoint cannot be written or read back."""


def _base_reference(model: nn.Module, base: str | None) -> dict[str, Any]:
    if base is not None:
        return {"kind": "factory", "factory": base}
    if getattr(model, "_surgeon_base", None):
        return dict(model._surgeon_base)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file") and hasattr(model, "save_pretrained"):
        return {"kind": "transformers", "class": base_class(model).__name__}
    raise CheckpointError(f"cannot tell how to rebuild {type(model).__name__}: pass "
                          "base='package.module:factory' (a function returning the unconverted "
                          "model)")


def _example_record(example: Any, out: Path) -> dict[str, Any]:
    if example is None:
        return {"default": True}
    if isinstance(example, dict):
        items = list(example.items())
    elif isinstance(example, (tuple, list)):
        items = [(str(i), v) for i, v in enumerate(example)]
    else:
        raise CheckpointError(f"cannot save an example of type {type(example).__name__}")
    tensors, values = {}, {}
    for key, value in items:
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().contiguous()
        elif value is None or isinstance(value, (bool, int, float, str)):
            values[key] = value
        else:
            raise CheckpointError(f"example entry {key!r} is a {type(value).__name__}: only "
                                  "tensors and plain values can be saved with the recipe")
    check_example_tensors(example_shapes(tensors.items()), "the example given to surgeon.apply")
    if tensors:
        write_file(out / EXAMPLE, tensors)
    return {"kind": "dict" if isinstance(example, dict) else "tuple",
            "keys": [k for k, _ in items], "values": values}


def read_example(record: dict[str, Any], path: Path) -> Any:
    if record.get("default"):
        return None
    if (path / EXAMPLE).is_file():
        check_example_file(path / EXAMPLE)  # bounded before anything is read
    try:
        tensors = load_file(str(path / EXAMPLE)) if (path / EXAMPLE).is_file() else {}
    except Exception as e:  # a damaged file fails in safetensors' own ways
        raise CheckpointError(f"cannot read {path / EXAMPLE}: {_one_line(e)}") from None
    values = record.get("values", {})
    items = [(k, tensors[k] if k in tensors else values.get(k)) for k in record["keys"]]
    return dict(items) if record["kind"] == "dict" else tuple(v for _, v in items)


def _versions() -> dict[str, str]:
    versions = {"surgeon": __version__, "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


def tensors_to_write(model: nn.Module, lazy: LazyWeights | None = None, *,
                     state: dict[str, torch.Tensor] | None = None
                     ) -> dict[str, Stored | torch.Tensor]:
    """The converted model's state dict (or `state`, one gathered from FSDP shards) with tied
    tensors once: a parameter still on disk (bound by `lazy`) as its stored bytes, everything
    else as the tensor in memory. A tied group keeps the key the source checkpoint used, else
    its first key in state-dict order."""
    chosen: dict[Any, str] = {}
    out: dict[str, Stored | torch.Tensor] = {}
    for key, value in (model.state_dict(keep_vars=True) if state is None else state).items():
        stored_key = lazy.key_of(value) if lazy is not None else None
        identity = id(value) if stored_key or value.is_meta else (
            value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
            value.stride(), value.dtype)
        if stored_key is None and value.is_meta:
            raise CheckpointError(f"{key} has no values (it is on the meta device)")
        if identity in chosen:
            if stored_key != key:
                continue
            del out[chosen[identity]]
        chosen[identity] = key
        out[key] = lazy.checkpoint[stored_key] if stored_key else value.detach()
    return out


def write_recipe(out: Path, model: nn.Module, reference: dict[str, Any],
                 extra: dict[str, Any] | None = None, *,
                 state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Write `surgeon.json` (and `example.safetensors` when the example is not the default),
    with the digest of every tensor already written into `out` and of the example's."""
    recipe = {
        "format": FORMAT,
        "versions": _versions(),
        "base": reference,
        **(extra or {}),
        "example": _example_record(getattr(model, "_surgeon_example", None), out),
        "passes": getattr(model, "_surgeon_passes", []),
        "manifest": {"modules": list(getattr(model, "_surgeon_manifest", [])),
                     "parameters": sorted(model.state_dict() if state is None else state)},
        "drift": [dataclasses.asdict(d) for d in getattr(model, "surgeon_drift", [])],
        "check": output_signature(getattr(model, "_surgeon_output", None)),
        "dtype": model_dtype(model),
    }
    recipe["digests"] = record_digests(out)
    (out / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def output_signature(vector: torch.Tensor | None, samples: int = 16) -> dict[str, Any] | None:
    """A few numbers that pin the converted model's output on the example: its size, norm and
    evenly spaced values, so `surgeon verify` can tell that a reload computes the same within a
    tolerance, and the sha256 of the whole output (float64), which tells it computes the same
    bits."""
    if vector is None:
        return None
    picks = torch.linspace(0, vector.numel() - 1, min(samples, vector.numel())).long()
    return {"numel": vector.numel(), "norm": float(vector.norm()),
            "sample": [float(v) for v in vector[picks]], "sha256": output_digest(vector)}


def output_digest(vector: torch.Tensor) -> str:
    """sha256 of an output vector's float64 bytes."""
    data = vector.detach().to(torch.float64).cpu().contiguous()
    return hashlib.sha256(byte_view(data)).hexdigest()  # no numpy: torch does not require it


DIGEST_CHUNK = 16 << 20  # bytes hashed per read


def tensor_digests(checkpoint: Checkpoint) -> dict[str, dict[str, Any]]:
    """Per tensor of `checkpoint`: its dtype, shape and the sha256 of its raw bytes, read back
    from the file (just written, the bytes are still in the page cache). Tensors are hashed on
    a few threads (hashlib releases the GIL), so this costs about one read of the checkpoint
    spread over the cores."""
    from concurrent.futures import ThreadPoolExecutor

    from surgeon.files.weights import NAMES

    entries = sorted(checkpoint.values(), key=lambda s: -s.nbytes)  # the largest first
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        hashes = dict(zip((s.key for s in entries), pool.map(stored_sha256, entries)))
    return {key: {"dtype": NAMES[checkpoint[key].dtype], "shape": list(checkpoint[key].shape),
                  "sha256": hashes[key]} for key in sorted(hashes)}


def stored_sha256(stored: Stored) -> str:
    """sha256 of one stored tensor's bytes, read in chunks of `DIGEST_CHUNK`."""
    digest, done = hashlib.sha256(), 0
    buffer = bytearray(min(DIGEST_CHUNK, stored.nbytes))
    with open(stored.file, "rb", buffering=0) as f:
        f.seek(stored.start)
        while done < stored.nbytes:
            view = memoryview(buffer)[:min(DIGEST_CHUNK, stored.nbytes - done)]
            got = f.readinto(view)
            if not got:
                raise CheckpointError(f"{stored.file} ended while reading {stored.key!r}; the "
                                      "file changed or is truncated")
            digest.update(view[:got])
            done += got
    return digest.hexdigest()


def record_digests(out: Path) -> dict[str, Any]:
    """What `surgeon.json` records so `surgeon verify` can prove every byte surgeon wrote: the
    digests of the weights and of the example's tensors."""
    record: dict[str, Any] = {"algorithm": "sha256",
                              "weights": tensor_digests(Checkpoint.open(out))}
    if (out / EXAMPLE).is_file():
        record["example"] = tensor_digests(Checkpoint.open(out / EXAMPLE))
    return record


def save(model: nn.Module, path: str | os.PathLike, *, base: str | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = True) -> Path:
    """Write `model` (converted with `surgeon.apply`) to the directory `path`.

    `base` names a `package.module:factory` that builds the unconverted model; transformers
    models need none. Weights are cut into shards of at most `max_shard_size`. The directory is
    written beside `path` and renamed into place; an existing `path` is replaced only if
    `overwrite` and it was written by surgeon.
    """
    dest = Path(path)
    wrapper = type(model).__name__
    model, sharded = unwrap(model)
    if getattr(model, "_surgeon_passes", None) is None:
        inside = f" (inside {wrapper})" if wrapper != type(model).__name__ else ""
        raise CheckpointError(f"{type(model).__name__}{inside} was not converted with "
                              "surgeon.apply; save it with its own save method")
    reference = _base_reference(model, base)
    # Under FSDP every rank holds a shard: all of them gather (a collective every rank must
    # call), rank 0 writes. Under DDP and the like each rank holds it all: rank 0 writes.
    state = full_state_dict(sharded) if sharded is not None else None
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not distributed:
        _write(dest, model, reference, state, max_shard_size, overwrite)
        return dest
    failure: list[str | None] = [None]
    try:
        if dist.get_rank() == 0:
            _write(dest, model, reference, state, max_shard_size, overwrite)
    except Exception as e:  # every rank hears of it, none waits for a checkpoint that failed
        failure = [str(e) or type(e).__name__]
        raise
    finally:
        dist.broadcast_object_list(failure, src=0)  # also: no rank reads `dest` before rank 0
    if failure[0] is not None:
        raise CheckpointError(f"rank 0 could not write {dest}: {failure[0]}")
    return dest


def _write(dest: Path, model: nn.Module, reference: dict[str, Any],
           state: dict[str, torch.Tensor] | None, max_shard_size: int | str,
           overwrite: bool) -> None:
    with atomic_directory(dest, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, tensors_to_write(model, state=state), max_shard_size=max_shard_size)
        if reference["kind"] == "transformers":
            model.config.to_json_file(str(tmp / "config.json"))
            write_remote_code(tmp, reference.get("class", ""))  # transformers loads DST converted
        write_recipe(tmp, model, reference, state=state)


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The module inside the wrappers training puts around a model: `torch.compile`'s
    OptimizedModule, DistributedDataParallel and DataParallel (as `accelerate` and DeepSpeed
    also wrap), FSDP1's FullyShardedDataParallel. Returns (the module, the FSDP module whose
    shards must be gathered, None if none). An FSDP2 (`fully_shard`) model is the module itself,
    of a subclass of its own class (see `base_class`), and also gathered."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    sharded = None
    for _ in range(16):
        name = type(model).__name__
        fsdp1 = _fsdp_classes()[0]
        if name == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (DistributedDataParallel, DataParallel)) or (
                name == "DeepSpeedEngine" and isinstance(getattr(model, "module", None),
                                                         nn.Module)):
            model = model.module
        elif fsdp1 is not None and isinstance(model, fsdp1):
            sharded = sharded or model
            model = model.module
        else:
            break
    fsdp2 = _fsdp_classes()[1]
    if sharded is None and fsdp2 is not None and isinstance(model, fsdp2):
        sharded = model
    return model, sharded


def _fsdp_classes() -> tuple[type | None, type | None]:
    """(FSDP1's FullyShardedDataParallel, FSDP2's FSDPModule), None where torch lacks one."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        FullyShardedDataParallel = None  # noqa: N806
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None  # noqa: N806
    return FullyShardedDataParallel, FSDPModule


def base_class(model: nn.Module) -> type:
    """`model`'s class, or for an FSDP2 model (whose class `fully_shard` swapped for a subclass
    named FSDP<name>) the class it had before."""
    fsdp2 = _fsdp_classes()[1]
    if fsdp2 is not None and isinstance(model, fsdp2):
        return next(c for c in type(model).__mro__[1:] if not issubclass(c, fsdp2))
    return type(model)


def full_state_dict(sharded: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of an FSDP model, gathered onto rank 0's CPU (every rank must call
    this; ranks other than 0 get an empty dict)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(sharded, options=StateDictOptions(full_state_dict=True,
                                                                  cpu_offload=True))


def _rebuild_base(reference: dict[str, Any], path: Path, trust_remote_code: bool = False
                  ) -> nn.Module:
    """The unconverted model `reference` (surgeon.json's checked `base`) names. A transformers
    base is a `PreTrainedModel` subclass transformers exports, built from config.json with its
    own config class (a config's `auto_map` is never consulted); a factory base is imported and
    called only with `trust_remote_code`, and not from the current directory."""
    recipe_file = path / RECIPE
    if reference["kind"] == "factory":
        from surgeon.files.source import is_factory, load_factory

        factory = reference["factory"]
        if not is_factory(factory):
            raise CheckpointError(f"{recipe_file}: base.factory {factory!r} is not "
                                  "'package.module:function'")
        if not trust_remote_code:
            raise UntrustedCodeError(f"{recipe_file} wants to import and call {factory!r} to "
                                     f"rebuild its base model; {TRUST_HINT}")
        return load_factory(factory, cwd=False).model
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError(f"loading {path} needs transformers: pip install "
                              "'surgeon[hf]'") from e
    name = reference["class"]
    cls = None
    if name.isidentifier() and not name.startswith("_"):
        try:
            cls = getattr(transformers, name, None)
        except Exception:  # a class whose backend is missing raises on lookup
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{recipe_file}: base.class {name!r} is not a model class that "
                              f"transformers {transformers.__version__} exports")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path} has no config.json, which its base {name} is built from")
    check_config_file(config_file, CheckpointError)  # one line, not a traceback
    config_cls = cls.config_class
    if not (isinstance(config_cls, type) and issubclass(config_cls, transformers.PretrainedConfig)
            and config_cls is not transformers.PretrainedConfig):
        raise CheckpointError(f"{recipe_file}: base.class {name!r} has no config class of its "
                              "own to read config.json with")
    from surgeon.files.source import quiet_transformers

    try:  # surgeon's marks (model_type surgeon_*, auto_map) undone; nothing imported
        data = base_config_dict(_read_json(config_file), config_file)
    except RemoteCodeError as e:
        raise CheckpointError(str(e)) from None
    # transformers' validation errors: one line naming the file and the field
    with quiet_transformers(), config_errors(config_file, CheckpointError, data):
        config = config_cls.from_dict({k: v for k, v in data.items() if k != "auto_map"})
    model_type = getattr(config_cls, "model_type", "")
    stored = data.get("model_type") if model_type else None
    if isinstance(stored, str) and stored != model_type and stored in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"{config_file} is a {stored!r} config; base.class {name} in "
                              f"{recipe_file} needs a {model_type!r} one")
    return build_model(cls, config, config_file, CheckpointError)  # memory checked first


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _read_json(file: Path) -> Any:
    """A JSON file's value; a file that is not JSON (or too deep, or with a number Python
    refuses) is a one-line CheckpointError naming it."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {_one_line(e)}") from None
    except RecursionError:
        raise CheckpointError(f"{file} is nested too deeply to be read") from None
    except ValueError as e:  # JSONDecodeError, and integers of more than 4300 digits
        raise CheckpointError(f"{file} is not valid JSON: {_one_line(e)}") from None


# -- the schema of surgeon.json ---------------------------------------------------------------
# Each entry: key -> (required, check). A check takes (value, field) and raises _Bad(field,
# what) for a value of the wrong type or range; `check_recipe` names the file. To add a key to
# surgeon.json, add its line here (and bump FORMAT when older surgeons must refuse it).

_MAX_INT = 2**63  # larger integers are nothing surgeon writes (and slow to print)


class _Bad(Exception):
    def __init__(self, field: str, what: str) -> None:
        super().__init__(f"{field} {what}")


def _integer(value: Any, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad(field, f"must be an integer, not {_kind(value)}")
    if abs(value) >= _MAX_INT:
        raise _Bad(field, "is out of range")


def _number(value: Any, field: str) -> None:
    if isinstance(value, int) and not isinstance(value, bool):
        _integer(value, field)
    elif not isinstance(value, float):
        raise _Bad(field, f"must be a number, not {_kind(value)}")


def _string(value: Any, field: str) -> None:
    if not isinstance(value, str):
        raise _Bad(field, f"must be a string, not {_kind(value)}")


def _optional(check: Any) -> Any:
    def run(value: Any, field: str) -> None:
        if value is not None:
            check(value, field)
    return run


def _list_of(check: Any) -> Any:
    def run(value: Any, field: str) -> None:
        if not isinstance(value, list):
            raise _Bad(field, f"must be a list, not {_kind(value)}")
        for i, item in enumerate(value):
            check(item, f"{field}[{i}]")
    return run


def _object(keys: dict[str, tuple[bool, Any]]) -> Any:
    def run(value: Any, field: str) -> None:
        _fields(value, field, keys)
    return run


def _fields(value: Any, field: str, keys: dict[str, tuple[bool, Any]]) -> None:
    if not isinstance(value, dict):
        raise _Bad(field, f"must be an object, not {_kind(value)}")
    prefix = f"{field}." if field else ""
    for key in value:
        if key not in keys:
            raise _Bad(f"{prefix}{key[:40]}", f"is not a key surgeon knows (known: "
                                         f"{', '.join(sorted(keys))})")
    for key, (required, check) in keys.items():
        if key in value:
            check(value[key], f"{prefix}{key}")
        elif required:
            raise _Bad(f"{prefix}{key}", "is missing")


def _string_map(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise _Bad(field, f"must be an object, not {_kind(value)}")
    for key, item in value.items():
        _string(item, f"{field}.{key}")


def _plain_value(value: Any, field: str) -> None:
    if value is None or isinstance(value, (bool, str, float)):
        return
    _integer(value, field)


def _base(value: Any, field: str) -> None:
    kind = value.get("kind") if isinstance(value, dict) else None
    if kind == "transformers":
        _fields(value, field, {"kind": (True, _string), "class": (True, _string)})
    elif kind == "factory":
        _fields(value, field, {"kind": (True, _string), "factory": (True, _string)})
    elif isinstance(value, dict):
        raise _Bad(f"{field}.kind", "must be 'transformers' or 'factory'")
    else:
        raise _Bad(field, f"must be an object, not {_kind(value)}")


def _example(value: Any, field: str) -> None:
    if isinstance(value, dict) and "default" in value:
        _fields(value, field, {"default": (True, _true)})
        return
    _fields(value, field, {"kind": (True, _one_of("dict", "tuple")),
                           "keys": (True, _list_of(_string)),
                           "values": (False, _values)})


def _values(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise _Bad(field, f"must be an object, not {_kind(value)}")
    for key, item in value.items():
        _plain_value(item, f"{field}.{key}")


def _true(value: Any, field: str) -> None:
    if value is not True:
        raise _Bad(field, "must be true")


def _one_of(*allowed: str) -> Any:
    def run(value: Any, field: str) -> None:
        if value not in allowed:
            raise _Bad(field, f"must be one of {', '.join(allowed)}")
    return run


def _pass(value: Any, field: str) -> None:
    _fields(value, field, {"_type": (True, _string), "_version": (True, _integer),
                           "_data": (True, _options)})


def _options(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise _Bad(field, f"must be an object, not {_kind(value)}")
    for key, item in value.items():
        _option_value(item, f"{field}.{key}")


def _option_value(value: Any, field: str, depth: int = 0) -> None:
    """A pass option: a plain value, or lists / objects of them a few levels deep (the pass's
    own `from_options` checks the rest)."""
    if isinstance(value, (list, dict)):
        if depth >= 4:
            raise _Bad(field, "is nested too deeply")
        items = enumerate(value) if isinstance(value, list) else value.items()
        for key, item in items:
            _option_value(item, f"{field}[{key}]" if isinstance(value, list) else
                          f"{field}.{key}", depth + 1)
    else:
        _plain_value(value, field)


def _digest_map(value: Any, field: str) -> None:
    if not isinstance(value, dict):
        raise _Bad(field, f"must be an object, not {_kind(value)}")
    for key, item in value.items():
        _fields(item, f"{field}.{key}", {"dtype": (True, _string), "sha256": (True, _string),
                                        "shape": (True, _list_of(_integer))})


_DRIFT = {"pass_name": (True, _string), "max_abs": (True, _number), "cosine": (True, _number),
          "modules": (True, _integer), "step": (False, _number),
          "promise": (False, _optional(_number))}
RECIPE_SCHEMA: dict[str, tuple[bool, Any]] = {
    "format": (True, _integer),
    "versions": (False, _string_map),
    "base": (True, _base),
    "source": (False, _object({"name": (True, _string), "revision": (False, _optional(_string))})),
    "example": (False, _example),
    "passes": (True, _list_of(_pass)),
    "manifest": (True, _object({"modules": (True, _list_of(_string)),
                                "parameters": (False, _list_of(_string))})),
    "drift": (False, _list_of(_object(_DRIFT))),
    "check": (False, _optional(_object({"numel": (True, _integer), "norm": (True, _number),
                                        "sample": (True, _list_of(_number)),
                                        "sha256": (False, _string)}))),
    "dtype": (False, _optional(_string)),
    "digests": (False, _object({"algorithm": (True, _one_of("sha256")),
                                "weights": (True, _digest_map),
                                "example": (False, _digest_map)})),
}


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
             int: "an integer", float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def check_recipe(recipe: Any, file: str | os.PathLike) -> dict[str, Any]:
    """`recipe` (surgeon.json's parsed value) if it has surgeon.json's shape (`RECIPE_SCHEMA`):
    the right JSON type for every field, no unknown keys, integers in range, a format this
    surgeon reads; else a one-line CheckpointError naming `file` and the field."""
    try:
        _fields(recipe, "", RECIPE_SCHEMA)
    except _Bad as e:
        raise CheckpointError(f"{file}: {str(e).strip()}") from None
    if recipe["format"] > FORMAT:
        raise CheckpointError(f"{file} has format {recipe['format']}, newer than this "
                              f"surgeon reads ({FORMAT}); upgrade surgeon")
    if recipe["format"] < 1:
        raise CheckpointError(f"{file}: format {recipe['format']} is not a surgeon format")
    return recipe


def read_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """The checked `surgeon.json` of the checkpoint directory `path` (see `check_recipe`)."""
    root = Path(path)
    recipe_file = root / RECIPE
    if not recipe_file.is_file():
        raise CheckpointError(f"{root} has no {RECIPE}: it was not written by surgeon.save")
    return check_recipe(_read_json(recipe_file), recipe_file)


def _replayed_passes(passes: list[dict[str, Any]], recipe_file: Path) -> list[Any]:
    """The pass configs a recipe names, from the installed passes only: a pass that is not
    installed is an error (a checkpoint cannot make surgeon import one)."""
    from surgeon.recipe import PassError, config_from_json, registered

    known = registered()
    configs = []
    for i, spec in enumerate(passes):
        if spec["_type"] not in known:
            raise CheckpointError(f"{recipe_file}: passes[{i}] is {spec['_type']!r}, a pass "
                                  f"that is not installed here (installed: "
                                  f"{', '.join(sorted(known))}); install the plug-in that "
                                  "provides it")
        try:
            configs.append(config_from_json(spec))
        except PassError as e:
            raise CheckpointError(f"{recipe_file}: passes[{i}]: {e}") from None
    return configs


def load(path: str | os.PathLike, *, dtype: torch.dtype | str | None = None,
         trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model written by `surgeon.save`: base, passes, manifest check, strict weights.

    Every tensor keeps the dtype it is stored in (a bf16 checkpoint loads as bf16, as the
    conversion ran), and the base is built in the dtype its config names, as transformers
    builds it; `dtype` (a torch dtype or its name, e.g. "float32") casts the floating-point
    tensors afterwards. A base built by a `package.module:factory` (a model that is not a
    transformers class) is imported and called only with `trust_remote_code=True`: a checkpoint
    from elsewhere could name any function. Only installed passes are replayed."""
    from surgeon.applying import apply

    wanted = resolve_dtype(dtype)
    root = Path(path)
    recipe_file = root / RECIPE
    recipe = read_recipe(root)
    reference, manifest = recipe["base"], recipe["manifest"]
    passes = _replayed_passes(recipe["passes"], recipe_file)
    built_in = recipe.get("dtype") if reference.get("kind") == "transformers" else None
    with _default_dtype(built_in):  # as transformers builds it from the config (and convert did)
        model = _rebuild_base(reference, root, trust_remote_code)
    model.eval()
    with warnings.catch_warnings():  # a pass that changed nothing said so when it was applied
        warnings.simplefilter("ignore", NoEffectWarning)
        apply(model, passes, read_example(recipe.get("example", {"default": True}), root))
    built = list(getattr(model, "_surgeon_manifest", []))
    if built != list(manifest.get("modules", [])):
        missing = sorted(set(manifest.get("modules", [])) - set(built))
        extra = sorted(set(built) - set(manifest.get("modules", [])))
        raise CheckpointError(f"{recipe_file}: replaying the passes built other modules than the "
                              f"manifest lists (missing: {missing[:3]}, unexpected: {extra[:3]}); "
                              "the checkpoint or the model code has changed")
    keys, optional = sorted(model.state_dict()), optional_keys(model)
    listed = set(manifest.get("parameters", keys))
    keys = [k for k in keys if k in listed or k not in optional]  # older checkpoints lack some
    if keys != sorted(listed):
        diff = sorted(set(keys) ^ set(manifest["parameters"]))
        raise CheckpointError(f"{recipe_file}: the rebuilt model's state-dict keys differ from "
                              f"the manifest ({diff[:3]})")
    load_weights(model, root, keep_dtype=True)
    if wanted is not None:
        model.to(wanted)
    model._surgeon_base = reference
    return model


# from_pretrained's options that say where the files are, or that transformers passes on itself
_HUB_OPTIONS = ("cache_dir", "force_download", "proxies", "revision", "token", "local_files_only",
                "subfolder", "config", "trust_remote_code", "adapter_kwargs", "code_revision")


def from_pretrained(path: str | os.PathLike, *model_args: Any, **kwargs: Any) -> nn.Module:
    """What `AutoModelFor*.from_pretrained(DST, trust_remote_code=True)` calls (through the
    `surgeon_model.py` surgeon writes into DST): `surgeon.load(DST)`, with transformers' `dtype`
    (or `torch_dtype`) and a single-device `device_map`; a hub id is fetched first. Options
    surgeon cannot honour are refused by name rather than ignored."""
    dtype = kwargs.pop("dtype", None)
    dtype = kwargs.pop("torch_dtype", None) if dtype is None else dtype
    device = kwargs.pop("device_map", None)
    hub = {k: kwargs.pop(k) for k in _HUB_OPTIONS if k in kwargs}
    unsupported = sorted(k for k, v in kwargs.items() if not k.startswith("_") and v is not None)
    if model_args or unsupported or hub.get("adapter_kwargs") or hub.get("subfolder"):
        what = unsupported + (["positional arguments"] if model_args else []) + (
            ["adapter_kwargs"] if hub.get("adapter_kwargs") else []) + (
            ["subfolder"] if hub.get("subfolder") else [])
        raise CheckpointError(f"{path} was converted by surgeon, which loads it without "
                              f"{', '.join(what)}; load it with surgeon.load and adjust the model "
                              "afterwards")
    if isinstance(device, dict) or (device is not None and str(device) == "auto"):
        raise CheckpointError(f"{path} was converted by surgeon, which loads it on one device: "
                              "pass device_map='cpu' or 'cuda', not a map")
    root = Path(path)
    if not root.is_dir():
        from huggingface_hub import snapshot_download

        from surgeon.files.source import HUB_PATTERNS

        root = Path(snapshot_download(str(path), revision=hub.get("revision"),
                                      allow_patterns=HUB_PATTERNS,
                                      cache_dir=hub.get("cache_dir"), token=hub.get("token"),
                                      local_files_only=bool(hub.get("local_files_only"))))
    model = load(root, dtype=None if dtype == "auto" else dtype)
    return model.to(device) if device is not None else model


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """`dtype` as a floating-point torch dtype ("bfloat16", "torch.float16", torch.float32);
    None and "auto" (keep the checkpoint's dtypes) give None."""
    if dtype is None or dtype == "auto":
        return None
    found = dtype if isinstance(dtype, torch.dtype) else getattr(
        torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise CheckpointError(f"dtype {dtype!r} is not a floating-point torch dtype; use one of "
                              "float32, bfloat16, float16, float64 or auto")
    return found


@contextmanager
def _default_dtype(name: Any) -> Iterator[None]:
    """Inside, torch's default dtype is the recorded `name` (a floating-point dtype's name);
    anything else leaves it as it is."""
    found = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        yield
        return
    before = torch.get_default_dtype()
    torch.set_default_dtype(found)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def model_dtype(model: nn.Module) -> str | None:
    """The dtype most of `model`'s floating-point parameter elements have ("bfloat16"), or None.
    Recorded in surgeon.json: `load` builds the base in it and `verify` sets its tolerance."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return str(max(counts, key=counts.get)).removeprefix("torch.") if counts else None


def load_weights(model: nn.Module, path: str | os.PathLike, *, keep_dtype: bool = False) -> None:
    """Copy a safetensors checkpoint (file, directory, single or sharded) into `model`, strictly:
    every state-dict entry (a tied group through any one of its keys) and nothing else. With
    `keep_dtype`, a floating-point tensor keeps the dtype it is stored in (else it is cast to
    the model's)."""
    checkpoint = Checkpoint.open(path)
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for key, value in state.items():
        groups.setdefault(id(value), []).append(key)
    absent = [g for g in groups.values() if not any(k in checkpoint for k in g)]
    optional = optional_keys(model)
    rebuild: dict[int, tuple[nn.Module, list[str]]] = {}  # records to rebuild, by module
    for key in (g[0] for g in absent if g[0] in optional):
        rebuild.setdefault(id(optional[key]), (optional[key], []))[1].append(
            key.rpartition(".")[2])
    missing = [g[0] for g in absent if g[0] not in optional]
    unexpected = sorted(set(checkpoint) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the rebuilt model (missing "
                              f"{sorted(missing)[:3]}, unexpected {unexpected[:3]})")
    with torch.no_grad():
        for group in groups.values():
            key = next((k for k in group if k in checkpoint), None)
            if key is None:  # an optional record, rebuilt below
                continue
            value, target = checkpoint.read(key), state[group[0]]
            if value.shape != target.shape:
                raise CheckpointError(f"{checkpoint[key].file}: {key} has shape "
                                      f"{list(value.shape)}, the rebuilt model wants "
                                      f"{list(target.shape)}")
            if target.is_floating_point() and not value.is_floating_point():
                raise CheckpointError(f"{checkpoint[key].file}: {key} is stored as {value.dtype}, "
                                      "not a floating-point dtype; the checkpoint is damaged")
            if keep_dtype and value.dtype != target.dtype and value.is_floating_point() and (
                    target.is_floating_point()):
                target.data = value  # the same Parameter (ties kept), in the stored dtype
            else:
                target.copy_(value)
        for module, names in rebuild.values():
            module.reset_optional_state_(tuple(names))


def optional_keys(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict keys that a checkpoint may lack, each with its module: records the module
    rebuilds from the rest of its state (its `optional_state`, reset by
    `reset_optional_state_`), such as AION's `step_count` and `alpha_cached`, which surgeon
    checkpoints written before AionResidual carried them do not hold."""
    return {f"{name}.{key}" if name else key: module for name, module in model.named_modules()
            for key in getattr(module, "optional_state", ())}
