"""A converted checkpoint that transformers loads converted, or refuses: never the base model.

Left as the base model wrote it, DST's `config.json` made `AutoModelFor*.from_pretrained(DST)`
build the unconverted class, drop the passes' parameters as "unexpected" and return a model
whose output differs from the converted one. So surgeon marks the config the way remote-code
repositories on the hub do: `model_type` becomes `surgeon_<type>` (a type transformers does not
know, so without `trust_remote_code=True` transformers raises its own error asking for it),
`architectures` and `auto_map` name classes in `surgeon_model.py`, a small module written
beside it whose `from_pretrained` returns `surgeon.load(DST)`. The base's own `model_type` and
`architectures` are kept under the `surgeon` key; `read_base_config` reads the config back as
the base model's without importing anything from the directory.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.files.hf_config import decode_special_floats
from surgeon.version import __version__

MODULE = "surgeon_model.py"
CONFIG = "config.json"
MARK = "surgeon"  # config.json key holding the base's model_type and architectures
PREFIX = "surgeon_"

TEMPLATE = '''"""Loads this directory as the model surgeon {version} converted it.

`{auto}.from_pretrained(DIR, trust_remote_code=True)` returns exactly what
`surgeon.load(DIR)` returns (it needs `pip install surgeon`). Without trust_remote_code,
transformers refuses this directory: its plain {base} would load without the converted modules.
"""

from transformers import {base}, {config}


class {config_name}({config}):
    model_type = "{model_type}"


class {name}({base}):
    config_class = {config_name}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        try:
            from surgeon.checkpoint import from_pretrained
        except ImportError as e:
            raise ImportError("this checkpoint was converted by surgeon; pip install surgeon "
                              "to load it") from e
        return from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
'''


class RemoteCodeError(SurgeonError):
    """A converted checkpoint's config.json cannot be marked or read back."""


def auto_classes(model_type: str, class_name: str) -> list[str]:
    """The transformers Auto classes that build `class_name` for `model_type` (e.g.
    AutoModelForCausalLM for LlamaForCausalLM), found in transformers' own mappings."""
    from transformers.models.auto import modeling_auto

    found = []
    for name, auto in sorted(vars(modeling_auto).items()):
        if not (name.startswith("AutoModel") and isinstance(auto, type)):
            continue
        names = getattr(getattr(auto, "_model_mapping", None), "_model_mapping", None)
        built = names.get(model_type) if isinstance(names, dict) else None
        if built == class_name or (isinstance(built, (list, tuple)) and class_name in built):
            found.append(name)
    return found


def write_remote_code(out: Path, class_name: str) -> list[str]:
    """Mark `out/config.json` (a transformers config of the base class `class_name`) and write
    `out/surgeon_model.py`, so transformers' Auto classes load `out` converted with
    `trust_remote_code=True` and refuse it without. Returns the files written ([] where `out`
    has no config.json or transformers maps no Auto class to `class_name`)."""
    file = out / CONFIG
    if not file.is_file():
        return []
    data = base_config_dict(_read(file), file)
    model_type = data.get("model_type")
    if not isinstance(model_type, str):
        raise RemoteCodeError(f"{file} has no model_type; cannot mark it as converted")
    autos = auto_classes(model_type, class_name)
    if not autos:
        return []
    import transformers

    config_class = transformers.CONFIG_MAPPING[model_type].__name__
    name, config_name = f"Surgeon{class_name}", f"Surgeon{config_class}"
    auto = next((a for a in autos if a != "AutoModel"), autos[0])  # the one the docstring names
    text = TEMPLATE.format(version=__version__, auto=auto,
                           base=class_name, config=config_class, name=name,
                           config_name=config_name, model_type=PREFIX + model_type)
    (out / MODULE).write_text(text)
    module = MODULE.removesuffix(".py")
    marked = {**data, MARK: {"model_type": model_type,
                             "architectures": data.get("architectures")},
              "model_type": PREFIX + model_type, "architectures": [name],
              "auto_map": {"AutoConfig": f"{module}.{config_name}",
                           **{auto: f"{module}.{name}" for auto in autos}}}
    file.write_text(json.dumps(marked, indent=2, sort_keys=True) + "\n")
    return [MODULE]


def base_config_dict(data: Any, file: Path) -> dict[str, Any]:
    """`data` (a parsed config.json) as the base model wrote it: surgeon's marks undone."""
    if not isinstance(data, dict):
        raise RemoteCodeError(f"{file} is not a JSON object")
    mark = data.get(MARK)
    if mark is None:
        return data
    if not (isinstance(mark, dict) and isinstance(mark.get("model_type"), str)):
        raise RemoteCodeError(f"{file}: '{MARK}' is not surgeon's record of the base model")
    data = {k: v for k, v in data.items() if k not in (MARK, "auto_map")}
    data["model_type"] = mark["model_type"]
    if mark.get("architectures") is None:
        data.pop("architectures", None)
    else:
        data["architectures"] = mark["architectures"]
    return data


def read_base_config(path: Path) -> Any:
    """The transformers config of the base model in the directory `path`, built by transformers'
    own config class for its `model_type`: nothing in the directory is imported or run (its
    `auto_map` is ignored)."""
    import transformers

    file = path / CONFIG
    data = base_config_dict(_read(file), file)
    model_type = data.get("model_type")
    try:
        config_class = transformers.CONFIG_MAPPING[model_type]
    except (KeyError, TypeError):
        raise RemoteCodeError(f"{file}: transformers {transformers.__version__} knows no "
                              f"model_type {model_type!r}") from None
    try:
        return config_class.from_dict(
            decode_special_floats({k: v for k, v in data.items() if k != "auto_map"}))
    except (ValueError, TypeError, KeyError) as e:
        raise RemoteCodeError(f"{file} is not a valid {config_class.__name__}: "
                              f"{' '.join(str(e).split())}") from e


def _read(file: Path) -> Any:
    try:
        return decode_special_floats(json.loads(file.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise RemoteCodeError(f"cannot read {file}: {e}") from e
