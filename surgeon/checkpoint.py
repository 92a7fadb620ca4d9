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
installed ones. `surgeon.json` is checked against its schema (`surgeon.files.recipe_file`)
before any of it is used, so a damaged or crafted file is one line naming the file and the
field.
"""

from __future__ import annotations

import dataclasses
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

from surgeon.errors import TRUST_HINT, CheckpointError, NoEffectWarning, UntrustedCodeError
from surgeon.files.atomic import atomic_directory
from surgeon.files.budget import check_example_file, check_example_tensors, example_shapes
from surgeon.files.digests import output_digest, record_digests
from surgeon.files.hf_config import (
    build_model,
    check_config_file,
    config_errors,
    decode_special_floats,
)
from surgeon.files.recipe_file import (
    CALIBRATION,
    EXAMPLE,
    FORMAT,
    RECIPE,
    one_line,
    read_json,
    read_recipe,
)
from surgeon.files.remote_code import RemoteCodeError, base_config_dict, write_remote_code
from surgeon.files.weights import (
    DEFAULT_MAX_SHARD_SIZE,
    Checkpoint,
    Stored,
    write_checkpoint,
    write_file,
)
from surgeon.integrations.wrappers import base_class, full_state_dict, unwrap
from surgeon.version import __version__

if TYPE_CHECKING:
    from surgeon.files.lazy import LazyWeights

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
        raise CheckpointError(f"cannot read {path / EXAMPLE}: {one_line(e)}") from None
    values = record.get("values", {})
    items = [(k, tensors[k] if k in tensors else values.get(k)) for k in record["keys"]]
    return dict(items) if record["kind"] == "dict" else tuple(v for _, v in items)


def _calibration_record(batches: list[tuple | dict], out: Path) -> dict[str, Any]:
    """Write the calibration batches a pass fitted on to `out/calibration.safetensors` (tensor
    `"{i}.{key}"` for batch i's entry key), so `surgeon verify --against` replays the
    conversion exactly; the record says how to put them back together."""
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for i, batch in enumerate(batches):
        items = list(batch.items()) if isinstance(batch, dict) else [
            (str(j), v) for j, v in enumerate(batch)]
        values = {}
        for key, value in items:
            if isinstance(value, torch.Tensor):
                tensors[f"{i}.{key}"] = value.detach().cpu().contiguous()
            elif value is None or isinstance(value, (bool, int, float, str)):
                values[key] = value
            else:
                raise CheckpointError(f"calibration batch {i} entry {key!r} is a "
                                      f"{type(value).__name__}: only tensors and plain values "
                                      "can be saved with the recipe")
        records.append({"kind": "dict" if isinstance(batch, dict) else "tuple",
                        "keys": [k for k, _ in items], "values": values})
    if tensors:
        write_file(out / CALIBRATION, tensors)
    return {"batches": records}


def read_calibration_batches(record: dict[str, Any] | None, path: Path) -> list | None:
    """The calibration batches `_calibration_record` wrote (None where none were recorded)."""
    if record is None:
        return None
    file = path / CALIBRATION
    try:
        tensors = load_file(str(file)) if file.is_file() else {}
    except Exception as e:  # a damaged file fails in safetensors' own ways
        raise CheckpointError(f"cannot read {file}: {one_line(e)}") from None
    batches = []
    for i, entry in enumerate(record["batches"]):
        values = entry.get("values", {})
        items = [(k, tensors.get(f"{i}.{k}", values.get(k))) for k in entry["keys"]]
        batches.append(dict(items) if entry["kind"] == "dict" else tuple(v for _, v in items))
    return batches


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
    """Write `surgeon.json` (and `example.safetensors` when the example is not the default,
    `calibration.safetensors` when a pass calibrated on batches of their own), with the digest
    of every tensor already written into `out` and of the example's and batches'."""
    recipe = {
        "format": FORMAT,
        "versions": _versions(),
        "base": reference,
        **(extra or {}),
        "example": _example_record(getattr(model, "_surgeon_example", None), out),
        **({"calibration": _calibration_record(model._surgeon_calibration, out)}
           if getattr(model, "_surgeon_calibration", None) is not None else {}),
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


def save_into(model: nn.Module, path: str | os.PathLike) -> Path:
    """Add what `surgeon.load` needs (surgeon's weights, config, `surgeon.json`) to a directory
    the model's own save method has just written, such as `Trainer.save_model`'s output or a
    `checkpoint-*` directory; other files there (optimizer, trainer state) are left alone."""
    model, _ = unwrap(model)
    if getattr(model, "_surgeon_passes", None) is None:
        raise CheckpointError(f"{type(model).__name__} was not converted with surgeon.apply")
    dest = Path(path)
    reference = _base_reference(model, None)
    write_checkpoint(dest, tensors_to_write(model), max_shard_size=DEFAULT_MAX_SHARD_SIZE)
    if reference["kind"] == "transformers":
        model.config.to_json_file(str(dest / "config.json"))
        write_remote_code(dest, reference.get("class", ""))
    write_recipe(dest, model, reference)
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

    try:  # surgeon's marks (model_type surgeon_*, auto_map) undone; nothing imported
        data = base_config_dict(read_json(config_file), config_file)
    except RemoteCodeError as e:
        raise CheckpointError(str(e)) from None
    # transformers' validation errors: one line naming the file and the field
    with quiet_transformers(), config_errors(config_file, CheckpointError, data):
        config = config_cls.from_dict(
            decode_special_floats({k: v for k, v in data.items() if k != "auto_map"}))
    model_type = getattr(config_cls, "model_type", "")
    stored = data.get("model_type") if model_type else None
    if isinstance(stored, str) and stored != model_type and stored in transformers.CONFIG_MAPPING:
        raise CheckpointError(f"{config_file} is a {stored!r} config; base.class {name} in "
                              f"{recipe_file} needs a {model_type!r} one")
    return build_model(cls, config, config_file, CheckpointError)  # memory checked first


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
            if value.dim() == 0 and tuple(target.shape) == (1,):  # a scalar stored 0-dim, as
                value = value.reshape(1)  # surgeon did before its scalars became (1,) for FSDP
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
