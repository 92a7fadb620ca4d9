"""A transformers `config.json` checked before a model is built from it.

A damaged or crafted config (`num_attention_heads: 0`, a negative vocabulary, an `rope_scaling`
of junk, a string where a number belongs, an integer `dtype`) makes transformers raise anything
from its own validation error to a ZeroDivisionError deep inside a module's constructor.
`check_config_file` refuses the common cases by field before transformers sees them, then lets
transformers validate the whole config (the config class is resolved by `model_type` inside
transformers: nothing is imported from the file); `config_errors` turns whatever a build still
raises into one line naming the file and, where it can be told, the field.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgeon.errors import SourceError, SurgeonError

# Fields that count or size something: when present (not null) a whole number >= 1.
POSITIVE = frozenset((
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "n_embd", "n_layer", "n_head",
    "n_positions", "n_inner", "n_ctx", "d_model", "d_ff", "d_kv", "num_layers", "num_heads",
    "num_decoder_layers", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "ffn_dim", "num_channels",
    "image_size", "patch_size", "embed_dim", "hidden_dim", "dim", "n_layers", "n_heads",
))
MAX_SIZE = 2**31  # no size field of a real model comes near this
MAX_STAGES = 64  # a per-stage list (depths, heads per stage) is short
FLOAT_DTYPES = frozenset(("float32", "float16", "bfloat16", "float64", "float", "half", "double",
                          "auto"))
DTYPE_FIELDS = ("dtype", "torch_dtype")
_FIELD = re.compile(r"field '(\w+)'")
# What transformers and the model code raise for a config they cannot use.
BUILD_ERRORS = (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, IndexError,
                RuntimeError, OverflowError, AssertionError, RecursionError, ArithmeticError)


def _bad(config_file: Path, field: str, value: Any, want: str,
         error: type[SurgeonError]) -> SurgeonError:
    shown = json.dumps(value) if not isinstance(value, str) else repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return error(f"{config_file}: field {field!r} is {shown}; {want}")


def _check_fields(data: dict[str, Any], config_file: Path, prefix: str,
                  error: type[SurgeonError]) -> None:
    try:
        from transformers.activations import ACT2FN
    except ImportError:  # checked again when transformers is imported to build
        ACT2FN = None  # noqa: N806
    for key, value in data.items():
        field = f"{prefix}{key}"
        if isinstance(value, float) and not math.isfinite(value):
            raise _bad(config_file, field, value, "it must be a finite number", error)
        if isinstance(value, dict) and (key.endswith("_config") or key in ("encoder", "decoder")):
            _check_fields(value, config_file, f"{field}.", error)
        elif key in POSITIVE and value is not None:
            # a hierarchical model sizes each stage (Swin's num_heads, SegFormer's
            # num_attention_heads, CvT's embed_dim, an image's (h, w)): a short list of them
            values = value if isinstance(value, list) and 1 <= len(value) <= MAX_STAGES \
                else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE
                       for v in values):
                raise _bad(config_file, field, value, f"it must be a whole number from 1 to "
                           f"{MAX_SIZE} (or a list of up to {MAX_STAGES}, one per stage)", error)
        elif key in DTYPE_FIELDS and value is not None:
            names = value.values() if isinstance(value, dict) else [value]
            if not all(isinstance(v, str) and v.removeprefix("torch.") in FLOAT_DTYPES
                       for v in names):
                raise _bad(config_file, field, value, "a model's weights need a floating-point "
                           "dtype (float32, float16, bfloat16)", error)
        elif (key.endswith(("_act", "_act_fn")) or key == "activation_function") and (
                isinstance(value, str) and ACT2FN is not None and value not in ACT2FN):
            raise _bad(config_file, field, value, "it must name an activation transformers "
                       "knows (silu, gelu, relu, ...)", error)


_FLOAT_TAGS = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def decode_special_floats(obj: Any) -> Any:
    """`obj` with transformers' tags for floats JSON cannot hold (`{"__float__": "Infinity"}`,
    which `save_pretrained` writes for Mamba-2's `time_step_limit` (0, inf)) as those floats,
    as transformers reads them back."""
    if isinstance(obj, dict):
        if set(obj) == {"__float__"} and isinstance(obj["__float__"], str) and obj[
                "__float__"] in _FLOAT_TAGS:
            return _FLOAT_TAGS[obj["__float__"]]
        return {k: decode_special_floats(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_special_floats(v) for v in obj]
    return obj


def read_config_json(config_file: str | os.PathLike,
                     error: type[SurgeonError] = SourceError) -> dict[str, Any]:
    """The JSON object in `config_file`, special floats decoded (`decode_special_floats`);
    anything else (bad JSON, deep nesting, a huge integer, not an object) is one line."""
    config_file = Path(config_file)
    try:
        data = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"cannot read {config_file}: {e}") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError, 4300-digit ints, nesting
        raise error(f"cannot read {config_file}: not valid JSON ({one_line(e)})") from None
    if not isinstance(data, dict):
        raise error(f"cannot read {config_file}: it holds a JSON {type(data).__name__}, not an "
                    "object")
    return decode_special_floats(data)


def check_config_file(config_file: str | os.PathLike,
                      error: type[SurgeonError] = SourceError) -> None:
    """Refuse a `config.json` a model cannot be built from, in one line naming the file and the
    field, before transformers or any model code reads it."""
    config_file = Path(config_file)
    data = read_config_json(config_file, error)
    _check_fields(data, config_file, "", error)
    try:
        from transformers import CONFIG_MAPPING
    except ImportError:
        return
    model_type = data.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return  # AutoConfig says what it makes of it
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoConfig says its warnings again when it reads the file
    try:
        with warnings.catch_warnings(), config_errors(config_file, error, data):
            warnings.simplefilter("ignore")
            CONFIG_MAPPING[model_type].from_dict(decode_special_floats(data))
    finally:
        hf_logging.set_verbosity(verbosity)


def build_model(cls: type, config: Any, config_file: str | os.PathLike,
                error: type[SurgeonError] = SourceError) -> Any:
    """`cls(config)`, refused first when it would not fit in memory (`budget.check_build`), and
    what the build raises for an unusable config as one line naming `config_file`."""
    from surgeon.files.budget import check_build

    check_build(cls, config, config_file)
    with config_errors(config_file, error):
        return cls(config)


def one_line(err: BaseException) -> str:
    """An exception's message in one line, its type named where the message alone is unclear."""
    text = " ".join(str(err).split())
    if isinstance(err, (KeyError, ZeroDivisionError, AttributeError, IndexError)) or not text:
        return f"{type(err).__name__}: {text}" if text else type(err).__name__
    return text


def _field_of(err: BaseException, data: dict[str, Any] | None) -> str | None:
    """The config field an error is about: named by transformers' validation, or a key (or a
    string value) of the config that the message mentions."""
    text = str(err)
    found = _FIELD.search(text)
    if found:
        return found.group(1)
    if not data:
        return None
    flat: list[tuple[str, Any]] = []
    for key, value in data.items():
        flat.append((key, value))
        if isinstance(value, dict):
            flat += [(f"{key}.{k}", v) for k, v in value.items()]
    for key, _ in flat:
        if re.search(rf"\b{re.escape(key.rpartition('.')[2])}\b", text):
            return key
    for key, value in flat:
        if isinstance(value, str) and len(value) > 1 and f"'{value}'" in text:
            return key
    return None


@contextmanager
def config_errors(config_file: str | os.PathLike, error: type[SurgeonError] = SourceError,
                  data: dict[str, Any] | None = None) -> Iterator[None]:
    """Inside, what transformers or the model code raises for an unusable config becomes one
    `error` line naming `config_file` and the field where it can be told (`data`: the file's
    JSON, read from `config_file` where omitted). A `SurgeonError` passes through."""
    try:
        yield
    except SurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 - transformers' own validation errors included
        if not isinstance(e, BUILD_ERRORS) and type(e).__module__.split(".")[0] not in (
                "transformers", "huggingface_hub"):
            raise
        if data is None:
            try:
                data = read_config_json(config_file, error)
            except SurgeonError:
                data = None
        field = _field_of(e, data)
        where = f"field {field!r}: " if field else ""
        raise error(f"{config_file}: {where}a model cannot be built from it "
                    f"({one_line(e)})") from None
