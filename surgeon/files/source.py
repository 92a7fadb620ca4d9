"""How a base model is built from a SRC string: a local HF directory, a hub id, or a factory.

The CLI and `surgeon.convert`/`surgeon.load` name models by one string, resolved in this order:

- an existing local directory holding `config.json` and `model.safetensors` (or a sharded
  `model.safetensors.index.json`), built with transformers;
- `package.module:factory`, a function called with no arguments that returns an `nn.Module`
  (the current directory is importable, as with `python -m`; only for a factory the user
  names, never for one read from a file);
- a hub id `owner/name`, fetched with `huggingface_hub.snapshot_download` (config, safetensors and
  tokenizer files only), which honours `HF_HUB_OFFLINE` and the local cache, then loaded as a
  directory.

Only safetensors weights are loaded: pickle checkpoints can run code when read, so they are refused.
Nor does a checkpoint's own code run: every transformers call gets `trust_remote_code`
explicitly (False unless the user passed `trust_remote_code=True` / `--trust-remote-code`), so a
config's `auto_map` neither runs nor stops at transformers' interactive prompt.
Every failure the user can cause is a one-line `SourceError` naming the path, module or repo at
fault.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgeon.errors import TRUST_HINT, SourceError, UntrustedCodeError
from surgeon.files.hf_config import check_config_file, config_errors

if TYPE_CHECKING:
    from torch import nn

    from surgeon.files.lazy import LazyWeights

ACCEPTED = (
    "SRC must be a local directory with config.json and model.safetensors, a hub id 'owner/name', "
    "or 'package.module:factory'"
)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

_FACTORY = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_HUB_ID = re.compile(r"[\w][\w.-]*/[\w.-]*\w")


@dataclass
class LoadedModel:
    """A built base model and where it came from.

    `config` is the transformers config (None for a factory model without one), `path` the local
    directory the weights were read from (a hub snapshot for a hub id; None for a factory), and
    `description` a short line for the CLI, such as "LlamaForCausalLM from examples/tiny-llama".
    """

    model: nn.Module
    config: Any | None
    path: Path | None
    description: str


def load_model(src: str, *, revision: str | None = None,
               allow_pickle: bool = False, trust_remote_code: bool = False) -> LoadedModel:
    """Build the model that `src` names; `revision` (branch, tag or commit) is for hub ids only;
    `allow_pickle` reads .bin/.pt weights (with `weights_only=True`) where no safetensors are.
    A directory's or hub repo's own code (`auto_map`) runs only with `trust_remote_code`; a
    factory `src` is the caller's own choice and is imported either way.

    Raises `SourceError` with a one-line message for a source that cannot be used.
    """
    path = Path(src).expanduser()
    if path.exists():
        _no_revision(revision, f"the local path {src}")
        return _load_dir(path, src, allow_pickle=allow_pickle,
                         trust_remote_code=trust_remote_code)
    if _FACTORY.fullmatch(src):
        _no_revision(revision, f"the factory {src}")
        return load_factory(src)
    if src.startswith((".", "/", "~", "\\")) or src.count("/") > 1:
        raise SourceError(f"no such directory: {src}")
    if _HUB_ID.fullmatch(src) and ".." not in src and "--" not in src:
        return _load_hub(src, revision, allow_pickle, trust_remote_code)
    raise SourceError(f"cannot use {src!r} as a model source: {ACCEPTED}")


def is_factory(src: str) -> bool:
    """Whether `src` has the form `package.module:attribute[.attribute...]`."""
    return bool(_FACTORY.fullmatch(src))


def public_name(src: str) -> str:
    """What to record of the source `src` in files that may be published (surgeon.json, the
    model card): a hub id or a factory as given, a local path as its directory's name only,
    never the absolute path of the user's machine."""
    path = Path(src).expanduser()
    if path.exists() or not (_FACTORY.fullmatch(src) or _HUB_ID.fullmatch(src)):
        return path.resolve().name or src
    return src


def _no_revision(revision: str | None, what: str) -> None:
    if revision is not None:
        raise SourceError(f"revision {revision!r} applies to hub ids only, not to {what}")


def _one_line(err: BaseException) -> str:
    """An exception's message squeezed into one line (library messages often span several)."""
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _load_dir(path: Path, label: str, *, allow_pickle: bool = False, strict: bool = False,
              trust_remote_code: bool = False) -> LoadedModel:
    """Build a transformers model from a directory of config.json plus safetensors weights
    (or pickle weights, read with `weights_only=True`, when `allow_pickle`). Missing or
    mismatched weights are an error; so are checkpoint tensors the model has no place for when
    `strict` (a conversion must not drop them)."""
    from surgeon.files.budget import check_build, config_dtype

    config, cls = _dir_config(path, label, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code)
    if any((path / name).is_file() for name in WEIGHTS):  # shard names stay inside `path`
        from surgeon.files.weights import Checkpoint, WeightsError

        try:
            Checkpoint.open(path, getattr(config, "transformers_weights", None))
        except WeightsError as e:
            raise SourceError(f"cannot load {label} with {cls.__name__}: {e}") from e
    check_build(cls, config, path / "config.json", dtype=config_dtype(config))
    try:
        model, info = cls.from_pretrained(path, config=config, output_loading_info=True,
                                          ignore_mismatched_sizes=True,  # reported below
                                          use_safetensors=None if allow_pickle else True,
                                          trust_remote_code=trust_remote_code)
    except Exception as e:  # a bad checkpoint fails in many ways (shapes, headers, dtypes)
        raise SourceError(f"cannot load {label} with {cls.__name__}: {_one_line(e)}") from e
    checked = ("missing_keys", "mismatched_keys") + (("unexpected_keys",) if strict else ())
    wrong = [(what, info[what]) for what in checked if info.get(what)]
    if wrong:
        what, keys = wrong[0]
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)  # (key, shapes)
        raise SourceError(f"{label}: the weights do not match config.json ({what.replace('_', ' ')}"
                          f": {names[:3]})")
    model.eval()
    return LoadedModel(model, config, path.resolve(), f"{type(model).__name__} from {label}")


def _dir_config(path: Path, label: str, *, allow_pickle: bool = False,
                trust_remote_code: bool = False) -> tuple[Any, type]:
    """Check a model directory and read its config: (config, the transformers class to build).
    The class is one transformers exports (by the config's `architectures`), else AutoModel,
    which builds a repository's own class (`auto_map`) only with `trust_remote_code`."""
    if not path.is_dir():
        raise SourceError(f"{label} is a file, not a model directory; {ACCEPTED}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise SourceError(
            f"{label} has no config.json: a model directory needs config.json and "
            "model.safetensors (or model.safetensors.index.json), as save_pretrained writes them"
        )
    if not any((path / name).is_file() for name in WEIGHTS):
        pickles = sorted(p.name for p in path.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
        if pickles and not allow_pickle:
            raise SourceError(
                f"{path / pickles[0]} is a pickle checkpoint, which surgeon does not load by "
                "default (reading it can run code); pass --allow-pickle (allow_pickle=True) to "
                "read it with weights_only=True, or save the model as safetensors"
            )
        if not pickles:
            raise SourceError(f"{label} has no model.safetensors or "
                              "model.safetensors.index.json")
    check_config_file(config_file)  # one line naming the field, before transformers reads it
    try:
        import transformers
    except ImportError as e:
        raise SourceError(
            f"loading {label} needs transformers: pip install 'surgeon[hf]'"
        ) from e
    from surgeon.files.remote_code import MARK, RemoteCodeError, read_base_config

    try:
        if trust_remote_code and MARK not in _json_object(config_file):
            config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
        else:  # transformers' own config class for its model_type: no auto_map code, no prompt
            config = read_base_config(path)
    except RemoteCodeError as e:
        if not trust_remote_code and _names_code(config_file):
            raise UntrustedCodeError(
                f"{config_file} names code of its own (auto_map) that transformers would import "
                f"to build this model; {TRUST_HINT}") from e
        raise SourceError(str(e)) from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"cannot read {config_file}: {_one_line(e)}") from e

    archs = getattr(config, "architectures", None) or []
    name = archs[0] if archs and isinstance(archs[0], str) else ""
    cls = getattr(transformers, name, None) if name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    return config, cls


def _json_object(config_file: Path) -> dict[str, Any]:
    """A config.json's object; {} where it cannot be read (reading it properly reports that)."""
    import json

    try:
        data = json.loads(config_file.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _names_code(config_file: Path) -> bool:
    """Whether a config.json has an `auto_map` (classes defined by the repository's own code)."""
    return bool(_json_object(config_file).get("auto_map"))


def load_factory(src: str, *, cwd: bool = True) -> LoadedModel:
    """Import `package.module`, call `factory()` and check it returned an nn.Module. `cwd`:
    the current directory is importable (for a factory the user typed, not one from a file)."""
    from torch import nn

    model = call(src, cwd=cwd)
    if not isinstance(model, nn.Module):
        raise SourceError(f"{src}() returned a {type(model).__name__}, not a torch.nn.Module")
    config = getattr(model, "config", None)
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(config, transformers.PretrainedConfig):
        config = None
    return LoadedModel(model, config, None, f"{type(model).__name__} from {src}")


def load_example(spec: str) -> tuple | dict:
    """The example input `package.module:function` returns (a tuple of positional args or a
    dict of keyword args for the model's forward)."""
    if not _FACTORY.fullmatch(spec):
        raise SourceError(f"example {spec!r} must be 'package.module:function'")
    example = call(spec)
    if isinstance(example, list):
        example = tuple(example)
    if not isinstance(example, (tuple, dict)):
        raise SourceError(f"{spec}() returned a {type(example).__name__}, not a tuple of "
                          "positional args or a dict of keyword args")
    return example


def call(src: str, *, cwd: bool = True) -> Any:
    """Import `package.module` (with `cwd`, the current directory is importable) and call
    `function()`. A `SystemExit` raised on the way is an error too, never a silent exit."""
    module_name, attr_path = src.split(":", 1)
    here = os.getcwd()
    added = cwd and here not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, here)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise SourceError(f"cannot import module {module_name!r} for {src}: {e}") from e
        raise SourceError(f"importing {module_name!r} failed: {_one_line(e)}") from e
    except (Exception, SystemExit) as e:  # the user's module raised while importing
        raise SourceError(
            f"importing {module_name!r} failed: {_described(e)}"
        ) from e
    finally:
        if added:
            sys.path.remove(here)

    factory: Any = module
    for part in attr_path.split("."):
        if not hasattr(factory, part):
            raise SourceError(f"module {module_name!r} has no attribute {attr_path!r} (from {src})")
        factory = getattr(factory, part)
    if not callable(factory):
        raise SourceError(f"{src} is not callable (it is a {type(factory).__name__})")
    try:
        return factory()
    except (Exception, SystemExit) as e:
        raise SourceError(f"calling {src}() failed: {_described(e)}") from e


def _described(err: BaseException) -> str:
    """`Type: message` of an exception in one line (just `Type` when it has no message)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _load_hub(repo_id: str, revision: str | None, allow_pickle: bool = False,
              trust_remote_code: bool = False) -> LoadedModel:
    """Resolve a hub id to a local snapshot (cache first, per huggingface_hub) and load it."""
    at = f"{repo_id}@{revision}" if revision else repo_id
    snapshot = _hub_snapshot(repo_id, revision, allow_pickle,
                             trust_remote_code=trust_remote_code)
    loaded = _load_dir(snapshot, f"hub repo {at}", allow_pickle=allow_pickle,
                       trust_remote_code=trust_remote_code)
    loaded.description = f"{type(loaded.model).__name__} from hub {at} ({snapshot})"
    return loaded


def _hub_snapshot(repo_id: str, revision: str | None, allow_pickle: bool = False,
                  trust_remote_code: bool = False) -> Path:
    """The local snapshot directory of a hub repo (cache first, per huggingface_hub); its
    Python files only when the user trusts the repo's code."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.utils import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        patterns = (HUB_PATTERNS + (["*.bin", "*.pt"] if allow_pickle else [])
                    + (["*.py"] if trust_remote_code else []))
        snapshot = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except GatedRepoError as e:
        raise SourceError(
            f"hub repo {repo_id} is gated: accept its terms on the hub and log in (hf auth login)"
        ) from e
    except RepositoryNotFoundError as e:
        raise SourceError(
            f"hub repo {repo_id} not found (or private without a token), "
            f"and there is no local directory {repo_id}"
        ) from e
    except RevisionNotFoundError as e:
        raise SourceError(f"revision {revision or 'main'!r} not found in hub repo {repo_id}") from e
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            raise SourceError(
                f"{at} is not in the hub cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                f"set: fetch it once online, or give a local directory (none named {repo_id})"
            ) from e
        raise SourceError(
            f"cannot reach the hub for {at} and it is not in the hub cache "
            f"({constants.HF_HUB_CACHE}); no local directory {repo_id} either"
        ) from e
    except HFValidationError as e:
        raise SourceError(f"{repo_id!r} is not a valid hub id: {_one_line(e)}") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise SourceError(f"cannot fetch {at} from the hub: {_one_line(e)}") from e
    return Path(snapshot)



@dataclass
class Source:
    """A base model ready to be converted without loading its weights.

    Where `lazy` is set, `model`'s parameters are on the `meta` device, bound to the safetensors
    checkpoint they are read from while used (`surgeon.files.lazy.LazyWeights`); otherwise the model
    is in memory (pickle weights, keys transformers renames on load, or a factory without
    `--weights`). `directory` holds files to carry over (tokenizer, generation config); `base`
    says how `surgeon.load` rebuilds the model.
    """

    model: nn.Module
    lazy: LazyWeights | None
    directory: Path | None
    base: dict[str, Any]
    description: str


def open_source(src: str, *, revision: str | None = None, weights: str | None = None,
                allow_pickle: bool = False, trust_remote_code: bool = False) -> Source:
    """Resolve `src` as `load_model` does, but build the model with its parameters on the meta
    device, bound to its safetensors checkpoint. `weights` is a factory model's weights file;
    `trust_remote_code` lets a directory's or hub repo's own code (`auto_map`) run."""
    path = Path(src).expanduser()
    if weights is not None and (path.exists() or not _FACTORY.fullmatch(src)):
        raise SourceError(f"--weights applies to a 'package.module:factory' source, not {src}")
    if path.exists():
        _no_revision(revision, f"the local path {src}")
        return _open_dir(path, src, allow_pickle, trust_remote_code)
    if _FACTORY.fullmatch(src):
        _no_revision(revision, f"the factory {src}")
        return _open_factory(src, weights, allow_pickle)
    if src.startswith((".", "/", "~", "\\")) or src.count("/") > 1:
        raise SourceError(f"no such directory: {src}")
    if _HUB_ID.fullmatch(src) and ".." not in src and "--" not in src:
        at = f"{src}@{revision}" if revision else src
        return _open_dir(_hub_snapshot(src, revision, allow_pickle, trust_remote_code),
                         f"hub repo {at}", allow_pickle, trust_remote_code)
    raise SourceError(f"cannot use {src!r} as a model source: {ACCEPTED}")


def _hf_base(model: nn.Module) -> dict[str, Any]:
    return {"kind": "transformers", "class": type(model).__name__}


def _open_dir(path: Path, label: str, allow_pickle: bool,
              trust_remote_code: bool = False) -> Source:
    from surgeon.files.budget import check_build
    from surgeon.files.lazy import (
        LazyWeights,
        MismatchError,
        MissingTensorError,
        parameters_on_meta,
    )
    from surgeon.files.weights import INDEX, SINGLE, Checkpoint

    config, cls = _dir_config(path, label, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code)
    if (path / INDEX).is_file() or (path / SINGLE).is_file():
        # the file from_pretrained would load (transformers_weights, else the single file
        # before the index); checks every header and shard path before anything is built
        checkpoint = Checkpoint.open(path, getattr(config, "transformers_weights", None))
        check_build(cls, config, path / "config.json", stored=checkpoint)
        with parameters_on_meta(), config_errors(path / "config.json"):
            model = (cls.from_config(config, trust_remote_code=trust_remote_code)
                     if cls.__name__.startswith("Auto") else cls._from_config(config))
        model.eval()
        try:
            lazy = LazyWeights(model, checkpoint, label=label)
            return Source(model, lazy, path, _hf_base(model),
                          f"{type(model).__name__} from {label}")
        except MissingTensorError:
            pass  # keys transformers renames on load (older layouts): load in memory below
        except MismatchError as e:  # a shape or an extra tensor: no renaming explains it
            raise SourceError(str(e)) from e
    with quiet_transformers():  # a mismatch is reported below, in one line
        loaded = _load_dir(path, label, allow_pickle=allow_pickle, strict=True,
                           trust_remote_code=trust_remote_code)
    return Source(loaded.model, None, path, _hf_base(loaded.model), loaded.description)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Inside, transformers logs errors only and shows no progress bars (its multi-line load
    report would bury surgeon's one-line error)."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # nothing to quiet
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _open_factory(src: str, weights: str | None, allow_pickle: bool) -> Source:
    from surgeon.files.lazy import LazyWeights, parameters_on_meta
    from surgeon.files.weights import Checkpoint

    base = {"kind": "factory", "factory": src}
    if weights is None:
        loaded = load_factory(src)
        loaded.model.eval()  # as every other source: the passes measure and record in eval
        return Source(loaded.model, None, None, base, loaded.description)
    file = Path(weights).expanduser()
    if not file.is_file():
        raise SourceError(f"no such weights file: {weights}")
    if not file.name.endswith(PICKLE_SUFFIXES):
        checkpoint = Checkpoint.open(file)
        with parameters_on_meta():
            loaded = load_factory(src)
        loaded.model.eval()
        lazy = LazyWeights(loaded.model, checkpoint, label=str(file))
        return Source(loaded.model, lazy, None, base, f"{loaded.description} with {weights}")
    if not allow_pickle:
        raise SourceError(f"{file} is a pickle checkpoint, which surgeon does not load by default "
                          "(reading it can run code); pass --allow-pickle to read it with "
                          "weights_only=True, or save the weights as safetensors")
    import torch

    loaded = load_factory(src)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
        loaded.model.load_state_dict(state)
    except Exception as e:  # unpickling and key errors come in many types
        raise SourceError(f"cannot load {file} into {src}(): {_one_line(e)}") from e
    loaded.model.eval()
    return Source(loaded.model, None, None, base, f"{loaded.description} with {weights}")
