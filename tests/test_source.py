"""surgeon.files.source: every SRC form (local HF directory, factory, hub id from an offline cache)
and the one-line error each bad source gives. Nothing here touches the network."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from surgeon.errors import SourceError
from surgeon.files.source import LoadedModel, load_model

transformers = pytest.importorskip("transformers")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2() -> nn.Module:
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=128, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("llama")
    model = tiny_llama()
    model.save_pretrained(path)
    return path, {k: v.clone() for k, v in model.state_dict().items()}


def same_weights(model: nn.Module, expected: dict[str, torch.Tensor]) -> bool:
    got = model.state_dict()
    return got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def error_of(src: str, **kw: object) -> str:
    with pytest.raises(SourceError) as info:
        load_model(src, **kw)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- local directories -------------------------------------------------------------------------


def test_local_llama_dir_loads_its_class_and_weights(llama_dir):
    path, weights = llama_dir
    loaded = load_model(str(path))
    assert isinstance(loaded, LoadedModel)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert same_weights(loaded.model, weights)
    assert loaded.config.model_type == "llama"
    assert loaded.path == path.resolve()
    assert loaded.description == f"LlamaForCausalLM from {path}"
    assert not loaded.model.training


def test_local_gpt2_dir(tmp_path):
    model = tiny_gpt2()
    model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "GPT2LMHeadModel"
    assert same_weights(loaded.model, model.state_dict())


def test_sharded_safetensors_index(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load_model(str(tmp_path))
    assert same_weights(loaded.model, model.state_dict())


def test_missing_architectures_falls_back_to_automodel(llama_dir, tmp_path):
    path = copy_dir(llama_dir[0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    assert type(load_model(str(path)).model).__name__ == "LlamaModel"


def test_unknown_architecture_falls_back_to_automodel(llama_dir, tmp_path):
    path = copy_dir(llama_dir[0], tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForAnything"]
    (path / "config.json").write_text(json.dumps(config))
    assert type(load_model(str(path)).model).__name__ == "LlamaModel"


def test_missing_config_json_names_the_path(llama_dir, tmp_path):
    path = copy_dir(llama_dir[0], tmp_path / "m")
    (path / "config.json").unlink()
    message = error_of(str(path))
    assert str(path) in message and "config.json" in message


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "weights.pt"])
def test_pickle_only_dir_is_refused_naming_the_file(llama_dir, tmp_path, pickle_name):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(llama_dir[0] / "config.json", path)
    (path / pickle_name).write_bytes(b"not read")
    message = error_of(str(path))
    assert str(path / pickle_name) in message and "pickle" in message


def test_dir_without_weights(llama_dir, tmp_path):
    path = tmp_path / "m"
    path.mkdir()
    shutil.copy(llama_dir[0] / "config.json", path)
    assert "has no model.safetensors" in error_of(str(path))


def test_bad_config_json(llama_dir, tmp_path):
    path = copy_dir(llama_dir[0], tmp_path / "m")
    (path / "config.json").write_text("{not json")
    message = error_of(str(path))
    assert message.startswith(f"cannot read {path / 'config.json'}")


def test_corrupt_safetensors(llama_dir, tmp_path):
    path = copy_dir(llama_dir[0], tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x00" * 64)
    message = error_of(str(path))
    assert message.startswith(f"cannot load {path} with LlamaForCausalLM")


def test_file_is_not_a_model_dir(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    assert "is a file, not a model directory" in error_of(str(f))


def test_revision_is_for_hub_ids_only(llama_dir):
    assert "hub ids only" in error_of(str(llama_dir[0]), revision="main")


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("nope", "cannot use 'nope' as a model source: SRC must be"),
        ("not a model", "cannot use 'not a model' as a model source"),
        ("./no/such/dir", "no such directory: ./no/such/dir"),
        ("a/b/c", "no such directory: a/b/c"),
    ],
)
def test_other_sources_say_what_is_accepted(src, expected):
    assert expected in error_of(src)


# --- package.module:factory --------------------------------------------------------------------

FACTORIES = '''
import torch
from torch import nn

not_callable = 3

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))

def returns_list():
    return [nn.Linear(2, 2)]

def raises():
    raise RuntimeError("boom")

def gpt2():
    import transformers
    cfg = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    return transformers.GPT2LMHeadModel(cfg)

class Zoo:
    @staticmethod
    def build():
        return nn.Linear(3, 3)
'''


@pytest.fixture(scope="module")
def factory_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("factories")
    (path / "surgeon_test_factories.py").write_text(textwrap.dedent(FACTORIES))
    (path / "surgeon_test_broken.py").write_text("raise ValueError('bad module')\n")
    (path / "surgeon_test_needs_dep.py").write_text("import surgeon_no_such_dependency\n")
    sys.path.insert(0, str(path))
    yield path
    sys.path.remove(str(path))
    for name in ("surgeon_test_factories", "surgeon_test_broken", "surgeon_test_needs_dep"):
        sys.modules.pop(name, None)


def test_factory_returns_module(factory_dir):
    loaded = load_model("surgeon_test_factories:mlp")
    assert isinstance(loaded.model, nn.Sequential)
    assert loaded.config is None and loaded.path is None
    assert loaded.description == "Sequential from surgeon_test_factories:mlp"


def test_factory_dotted_attribute(factory_dir):
    assert isinstance(load_model("surgeon_test_factories:Zoo.build").model, nn.Linear)


def test_factory_hf_model_keeps_its_config(factory_dir):
    loaded = load_model("surgeon_test_factories:gpt2")
    assert loaded.config is not None and loaded.config.model_type == "gpt2"


def test_factory_from_current_directory(tmp_path, monkeypatch):
    (tmp_path / "surgeon_test_cwd_models.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Linear(2, 3)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "surgeon_test_cwd_models", raising=False)
    model = load_model("surgeon_test_cwd_models:make").model
    assert isinstance(model, nn.Linear) and model.out_features == 3
    sys.modules.pop("surgeon_test_cwd_models", None)


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("surgeon_no_such_module:make", "cannot import module 'surgeon_no_such_module'"),
        ("surgeon_test_broken:make", "importing 'surgeon_test_broken' failed: ValueError: bad"),
        ("surgeon_test_needs_dep:make", "No module named 'surgeon_no_such_dependency'"),
        ("surgeon_test_factories:missing", "module 'surgeon_test_factories' has no attribute"),
        ("surgeon_test_factories:not_callable", "is not callable (it is a int)"),
        ("surgeon_test_factories:returns_list", "returned a list, not a torch.nn.Module"),
        ("surgeon_test_factories:raises", "failed: RuntimeError: boom"),
    ],
)
def test_factory_errors_name_the_thing(factory_dir, src, expected):
    message = error_of(src)
    assert expected in message
    assert src.split(":")[0] in message


def test_factory_takes_no_revision(factory_dir):
    assert "hub ids only" in error_of("surgeon_test_factories:mlp", revision="v1")


# --- hub ids, from an offline cache ------------------------------------------------------------


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache in tmp_path with offline mode on; returns a function that adds a repo."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads the environment once, at import: patch the constants it consults.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    def add(repo_id: str, files_from: Path, names: list[str] | None = None) -> Path:
        repo = cache / ("models--" + repo_id.replace("/", "--"))
        snapshot = repo / "snapshots" / COMMIT
        snapshot.mkdir(parents=True)
        for f in sorted(files_from.iterdir()):
            if names is None or f.name in names:
                shutil.copy(f, snapshot / f.name)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(COMMIT)
        return snapshot

    add.cache = cache  # type: ignore[attr-defined]
    return add


def test_hub_id_from_offline_cache(offline_hub, llama_dir):
    snapshot = offline_hub("tiny-org/tiny-llama", llama_dir[0])
    loaded = load_model("tiny-org/tiny-llama")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert same_weights(loaded.model, llama_dir[1])
    assert loaded.path == snapshot.resolve()
    assert loaded.description.startswith("LlamaForCausalLM from hub tiny-org/tiny-llama (")


def test_hub_revision_by_commit_hash(offline_hub, llama_dir):
    offline_hub("tiny-org/tiny-llama", llama_dir[0])
    loaded = load_model("tiny-org/tiny-llama", revision=COMMIT)
    assert COMMIT in loaded.description


def test_hub_id_not_cached_offline(offline_hub):
    message = error_of("tiny-org/not-cached")
    assert message.startswith("tiny-org/not-cached is not in the hub cache")
    assert "HF_HUB_OFFLINE" in message and str(offline_hub.cache) in message


def test_hub_unknown_revision_offline(offline_hub, llama_dir):
    offline_hub("tiny-org/tiny-llama", llama_dir[0])
    assert error_of("tiny-org/tiny-llama", revision="v9").startswith(
        "tiny-org/tiny-llama@v9 is not in the hub cache"
    )


def test_hub_snapshot_without_safetensors(offline_hub, llama_dir):
    offline_hub("tiny-org/config-only", llama_dir[0], names=["config.json"])
    message = error_of("tiny-org/config-only")
    assert message == (
        "hub repo tiny-org/config-only has no model.safetensors or model.safetensors.index.json"
    )


def _http_error(cls_name: str) -> Exception:
    import huggingface_hub.utils as hub_utils

    response = SimpleNamespace(headers={}, request=None, status_code=404)
    return getattr(hub_utils, cls_name)("404 from the hub", response=response)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", "hub repo someone/missing not found"),
        ("GatedRepoError", "hub repo someone/missing is gated"),
        ("RevisionNotFoundError", "revision 'main' not found in hub repo someone/missing"),
    ],
)
def test_hub_errors_map_to_source_error(monkeypatch, error, expected):
    exc = _http_error(error)

    def fake_snapshot_download(*args: object, **kwargs: object) -> str:
        raise exc

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    message = error_of("someone/missing")
    assert message.startswith(expected)


def test_hub_download_asks_only_for_safe_files(monkeypatch, llama_dir):
    seen: dict[str, object] = {}

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        seen.update(kwargs, repo_id=repo_id)
        return str(llama_dir[0])

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    loaded = load_model("tiny-org/tiny-llama", revision="v1")
    assert seen == {
        "repo_id": "tiny-org/tiny-llama",
        "revision": "v1",
        "allow_patterns": ["*.json", "*.safetensors", "*.txt", "*.model"],
    }
    assert "hub tiny-org/tiny-llama@v1" in loaded.description
