"""`surgeon.save` and `surgeon.load`: a converted model as safetensors plus its recipe.

A saved directory holds `model.safetensors` (tied weights stored once, by
`safetensors.torch.save_model`), the base model's `config.json` where it has one, the example the
passes were applied with (`example.safetensors`, unless it was the default for a transformers
config), and `surgeon.json`: versions, how to rebuild the base, the ordered pass configs and a
manifest of the modules the passes created or replaced. Loading rebuilds the base, replays the
passes, checks the manifest and loads the weights strictly. Nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

import surgeon
from surgeon.errors import SurgeonError

RECIPE = "surgeon.json"
WEIGHTS = "model.safetensors"
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
    if tensors:
        save_file(tensors, str(out / EXAMPLE))
    return {"kind": "dict" if isinstance(example, dict) else "tuple",
            "keys": [k for k, _ in items], "values": values}


def _read_example(record: dict[str, Any], path: Path) -> Any:
    if record.get("default"):
        return None
    tensors = load_file(str(path / EXAMPLE)) if (path / EXAMPLE).is_file() else {}
    values = record.get("values", {})
    items = [(k, tensors[k] if k in tensors else values.get(k)) for k in record["keys"]]
    return dict(items) if record["kind"] == "dict" else tuple(v for _, v in items)


def _versions() -> dict[str, str]:
    versions = {"surgeon": surgeon.__version__, "torch": torch.__version__}
    try:
        import transformers

        versions["transformers"] = transformers.__version__
    except ImportError:
        pass
    return versions


def save(model: nn.Module, path: str | os.PathLike, *, base: str | None = None) -> Path:
    """Write `model` (converted with `surgeon.apply`) to the directory `path`.

    `base` names a `package.module:factory` that builds the unconverted model; transformers
    models need none. The directory is written beside `path` and renamed into place.
    """
    dest = Path(path)
    passes = getattr(model, "_surgeon_passes", None)
    if passes is None:
        raise CheckpointError(f"{type(model).__name__} was not converted with surgeon.apply; "
                              "save it with its own save method")
    reference = _base_reference(model, base)
    if dest.exists() and not dest.is_dir():
        raise CheckpointError(f"{dest} exists and is not a directory")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_model(model, str(tmp / WEIGHTS))
        config = getattr(model, "config", None)
        if reference["kind"] == "transformers":
            config.to_json_file(str(tmp / "config.json"))
        recipe = {
            "format": FORMAT,
            "versions": _versions(),
            "base": reference,
            "example": _example_record(getattr(model, "_surgeon_example", None), tmp),
            "passes": passes,
            "manifest": {"modules": list(getattr(model, "_surgeon_manifest", [])),
                         "parameters": sorted(model.state_dict())},
        }
        (tmp / RECIPE).write_text(json.dumps(recipe, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _rebuild_base(reference: dict[str, Any], path: Path) -> nn.Module:
    kind = reference.get("kind")
    if kind == "transformers":
        try:
            import transformers
        except ImportError as e:
            raise CheckpointError(f"loading {path} needs transformers: pip install "
                                  "'surgeon[hf]'") from e
        cls = getattr(transformers, reference.get("class", ""), None)
        if cls is None:
            raise CheckpointError(f"{path / RECIPE}: transformers has no class "
                                  f"{reference.get('class')!r}")
        config = transformers.AutoConfig.from_pretrained(path)
        return cls(config)
    if kind == "factory":
        from surgeon.source import _load_factory

        return _load_factory(reference["factory"]).model
    raise CheckpointError(f"{path / RECIPE}: unknown base kind {kind!r}")


def load(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by `surgeon.save`: base, passes, manifest check, strict weights."""
    from surgeon.applying import apply

    root = Path(path)
    recipe_file = root / RECIPE
    if not recipe_file.is_file():
        raise CheckpointError(f"{root} has no {RECIPE}: it was not written by surgeon.save")
    try:
        recipe = json.loads(recipe_file.read_text())
        reference, passes = recipe["base"], recipe["passes"]
        manifest = recipe["manifest"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{recipe_file} is not a surgeon recipe: {e}") from None
    if recipe.get("format", 0) > FORMAT:
        raise CheckpointError(f"{recipe_file} has format {recipe['format']}, newer than this "
                              f"surgeon reads ({FORMAT}); upgrade surgeon")
    model = _rebuild_base(reference, root)
    model.eval()
    apply(model, passes, _read_example(recipe.get("example", {"default": True}), root))
    built = list(getattr(model, "_surgeon_manifest", []))
    if built != list(manifest.get("modules", [])):
        missing = sorted(set(manifest.get("modules", [])) - set(built))
        extra = sorted(set(built) - set(manifest.get("modules", [])))
        raise CheckpointError(f"{recipe_file}: replaying the passes built other modules than the "
                              f"manifest lists (missing: {missing[:3]}, unexpected: {extra[:3]}); "
                              "the checkpoint or the model code has changed")
    keys = sorted(model.state_dict())
    if keys != sorted(manifest.get("parameters", keys)):
        diff = sorted(set(keys) ^ set(manifest["parameters"]))
        raise CheckpointError(f"{recipe_file}: the rebuilt model's state-dict keys differ from "
                              f"the manifest ({diff[:3]})")
    missing, unexpected = load_model(model, str(root / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{root / WEIGHTS} does not match the rebuilt model (missing "
                              f"{sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    model._surgeon_base = reference
    return model
