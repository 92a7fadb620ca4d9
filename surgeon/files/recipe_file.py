"""`surgeon.json`, the recipe of a converted checkpoint: its name, format and schema.

The file says how to rebuild the base model, which passes to replay and what the conversion
produced. It is checked against `RECIPE_SCHEMA` before any of it is used, so a damaged or
crafted file is one line naming the file and the field, never a traceback or an import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from surgeon.errors import CheckpointError

RECIPE = "surgeon.json"
EXAMPLE = "example.safetensors"
CALIBRATION = "calibration.safetensors"  # the batches a calibrating pass fitted on, if given
# 2: config.json is marked for transformers (model_type surgeon_<type>, undone by
# `read_base_config`, which a format-1 reader lacks: it would stop at transformers'
# trust_remote_code error), and `digests` and `dtype` are recorded. Format 1 is still read.
FORMAT = 2


def one_line(err: BaseException) -> str:
    """An exception's message in one line (its type where it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def read_json(file: Path) -> Any:
    """A JSON file's value; a file that is not JSON (or too deep, or with a number Python
    refuses) is a one-line CheckpointError naming it."""
    try:
        return json.loads(file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read {file}: {one_line(e)}") from None
    except RecursionError:
        raise CheckpointError(f"{file} is nested too deeply to be read") from None
    except ValueError as e:  # JSONDecodeError, and integers of more than 4300 digits
        raise CheckpointError(f"{file} is not valid JSON: {one_line(e)}") from None


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
          "promise": (False, _optional(_number)),
          "calibrated": (False, _optional(_object({
              "inputs": (True, _one_of("calibration", "example")), "batches": (True, _integer),
              "cosine": (True, _number), "max_abs": (True, _number)})))}
RECIPE_SCHEMA: dict[str, tuple[bool, Any]] = {
    "format": (True, _integer),
    "versions": (False, _string_map),
    "base": (True, _base),
    "source": (False, _object({"name": (True, _string), "revision": (False, _optional(_string))})),
    "example": (False, _example),
    "calibration": (False, _object({"batches": (True, _list_of(_example))})),
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
                                "example": (False, _digest_map),
                                "calibration": (False, _digest_map)})),
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
    return check_recipe(read_json(recipe_file), recipe_file)
