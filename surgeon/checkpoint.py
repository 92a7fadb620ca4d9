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
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from surgeon.errors import TRUST_HINT, NoEffectWarning, SurgeonError, UntrustedCodeError
from surgeon.files.atomic import atomic_directory
from surgeon.files.budget import check_example_file, check_example_tensors, example_shapes
from surgeon.files.hf_config import build_model, check_config_file
from surgeon.files.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    Checkpoint,
    Stored,
    write_checkpoint,
    write_file,
)
from surgeon.version import __version__

if TYPE_CHECKING:
    from surgeon.files.lazy import LazyWeights

RECIPE = "surgeon.json"
EXAMPLE = "example.safetensors"
FORMAT = 1


class CheckpointError(SurgeonError):
    """A converted checkpoint cannot be written or read back."""


def _base_reference(model: nn.Module, base: str | None) -> dict[str, Any]:
    if base is not None:
        return {"kind": "factory", "factory": base}
    if getattr(model, "_surgeon_base", None):
        return dict(model._surgeon_base)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_file") and hasattr(model, "save_pretrained"):
        return {"kind": "transformers", "class": type(model).__name__}
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


def tensors_to_write(model: nn.Module, lazy: LazyWeights | None = None
                     ) -> dict[str, Stored | torch.Tensor]:
    """The converted model's state dict with tied tensors once: a parameter still on disk
    (bound by `lazy`) as its stored bytes, everything else as the tensor in memory. A tied group
    keeps the key the source checkpoint used, else its first key in state-dict order."""
    chosen: dict[Any, str] = {}
    out: dict[str, Stored | torch.Tensor] = {}
    for key, value in model.state_dict(keep_vars=True).items():
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
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write `surgeon.json` (and `example.safetensors` when the example is not the default)."""
    recipe = {
        "format": FORMAT,
        "versions": _versions(),
        "base": reference,
        **(extra or {}),
        "example": _example_record(getattr(model, "_surgeon_example", None), out),
        "passes": getattr(model, "_surgeon_passes", []),
        "manifest": {"modules": list(getattr(model, "_surgeon_manifest", [])),
                     "parameters": sorted(model.state_dict())},
        "drift": [dataclasses.asdict(d) for d in getattr(model, "surgeon_drift", [])],
        "check": output_signature(getattr(model, "_surgeon_output", None)),
    }
    (out / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def output_signature(vector: torch.Tensor | None, samples: int = 16) -> dict[str, Any] | None:
    """A few numbers that pin the converted model's output on the example: its size, norm and
    evenly spaced values, so `surgeon verify` can tell that a reload computes the same."""
    if vector is None:
        return None
    picks = torch.linspace(0, vector.numel() - 1, min(samples, vector.numel())).long()
    return {"numel": vector.numel(), "norm": float(vector.norm()),
            "sample": [float(v) for v in vector[picks]]}


def save(model: nn.Module, path: str | os.PathLike, *, base: str | None = None,
         max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = True) -> Path:
    """Write `model` (converted with `surgeon.apply`) to the directory `path`.

    `base` names a `package.module:factory` that builds the unconverted model; transformers
    models need none. Weights are cut into shards of at most `max_shard_size`. The directory is
    written beside `path` and renamed into place; an existing `path` is replaced only if
    `overwrite` and it was written by surgeon.
    """
    dest = Path(path)
    if getattr(model, "_surgeon_passes", None) is None:
        raise CheckpointError(f"{type(model).__name__} was not converted with surgeon.apply; "
                              "save it with its own save method")
    reference = _base_reference(model, base)
    with atomic_directory(dest, overwrite=overwrite) as tmp:
        write_checkpoint(tmp, tensors_to_write(model), max_shard_size=max_shard_size)
        if reference["kind"] == "transformers":
            model.config.to_json_file(str(tmp / "config.json"))
        write_recipe(tmp, model, reference)
    return dest


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

    try:
        with quiet_transformers():
            config = config_cls.from_pretrained(path)
    except Exception as e:  # transformers' validation raises many types
        raise CheckpointError(f"cannot read {config_file} as a {config_cls.__name__}: "
                              f"{_one_line(e)}") from e
    model_type = getattr(config_cls, "model_type", "")
    stored = _read_json(config_file).get("model_type") if model_type else None
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
                                        "sample": (True, _list_of(_number))}))),
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


def load(path: str | os.PathLike, *, trust_remote_code: bool = False) -> nn.Module:
    """Rebuild a model written by `surgeon.save`: base, passes, manifest check, strict weights.

    A base built by a `package.module:factory` (a model that is not a transformers class) is
    imported and called only with `trust_remote_code=True`: a checkpoint from elsewhere could
    name any function. Only installed passes are replayed."""
    from surgeon.applying import apply

    root = Path(path)
    recipe_file = root / RECIPE
    recipe = read_recipe(root)
    reference, manifest = recipe["base"], recipe["manifest"]
    passes = _replayed_passes(recipe["passes"], recipe_file)
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
    load_weights(model, root)
    model._surgeon_base = reference
    return model


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a safetensors checkpoint (file, directory, single or sharded) into `model`, strictly:
    every state-dict entry (a tied group through any one of its keys) and nothing else."""
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
