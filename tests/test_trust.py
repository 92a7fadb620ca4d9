"""A checkpoint never runs code unless the user opts in, and a damaged surgeon.json is one line.

Crafted checkpoint directories (a surgeon.json whose base names `os:fork`, `sys:exit` or a
module that writes a marker file when imported; a transformers base that is no model class; a
pass that is not installed; a config.json with an `auto_map`; surgeon.json of the wrong JSON
types) are refused by `surgeon.load`, `surgeon.verify` and the CLI with one line (exit 1),
nothing imported (`sys.modules`, the marker), nothing written. With `trust_remote_code=True`
a factory base from the zoo loads, and a repository's own code runs. Plug-ins cannot take a
built-in pass's name and a broken one is a warning. Files surgeon writes record the source by
name, never by an absolute local path.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import shutil
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_runner import run
from test_convert import one_error_line
from zoo import ZOO, hf_llama, tokens

import surgeon
from surgeon import recipe
from surgeon.checkpoint import FORMAT, CheckpointError
from surgeon.errors import SourceError, SurgeonError, UntrustedCodeError
from surgeon.files.source import load_model
from surgeon.recipe import PluginWarning, registered

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "examples" / "tiny-llama"
MARKER_MODULE = "surgeon_trust_marker"
MARKER_CODE = "from pathlib import Path\nPath({marker!r}).write_text('imported')\n" \
              "def make():\n    return None\n"


@pytest.fixture(autouse=True)
def _no_stdin_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing may stop at a prompt: reading stdin fails the test."""
    def refuse(*args: Any) -> str:
        raise AssertionError("something asked on stdin")

    monkeypatch.setattr(builtins, "input", refuse)


@pytest.fixture(scope="module")
def factory_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NanoGPT from the zoo with AION, saved with base `zoo:NanoGPT` (a factory base)."""
    case = next(c for c in ZOO if c.name == "nanogpt")
    model = case.build().eval()
    surgeon.apply(model, ["aion"], case.example())
    return surgeon.save(model, tmp_path_factory.mktemp("factory") / "nanogpt", base="zoo:NanoGPT")


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama from the zoo with AION (a transformers base)."""
    model = hf_llama().eval()
    surgeon.apply(model, ["aion"], {"input_ids": tokens(128)})
    return surgeon.save(model, tmp_path_factory.mktemp("hf") / "llama")


def fingerprint(directory: Path) -> dict[str, str]:
    """Every file under `directory` with the sha256 of its bytes."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def edit_recipe(directory: Path, change: Callable[[dict], Any]) -> None:
    file = directory / "surgeon.json"
    data = json.loads(file.read_text())
    replaced = change(data)
    file.write_text(replaced if isinstance(replaced, str) else json.dumps(data))


def set_base(**base: str) -> Callable[[dict], None]:
    return lambda r: r.__setitem__("base", base)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from an empty directory that holds the marker module, with neither it nor '' on
    sys.path (as when `surgeon` runs from a console script): an import of the module can only
    come from surgeon putting the current directory on sys.path."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / f"{MARKER_MODULE}.py").write_text(MARKER_CODE.format(marker=str(tmp_path / "MARKER")))
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(cwd), ".")])
    sys.modules.pop(MARKER_MODULE, None)
    return tmp_path


# -- code named by surgeon.json ---------------------------------------------------------------

# (checkpoint fixture, edit of surgeon.json, the error line's middle, error class)
CODE_CASES = {
    "os-fork": ("factory_checkpoint", set_base(kind="factory", factory="os:fork"),
                "wants to import and call 'os:fork' to rebuild its base model",
                UntrustedCodeError),
    "sys-exit": ("factory_checkpoint", set_base(kind="factory", factory="sys:exit"),
                 "wants to import and call 'sys:exit' to rebuild its base model",
                 UntrustedCodeError),
    "marker-module": ("factory_checkpoint",
                      set_base(kind="factory", factory=f"{MARKER_MODULE}:make"),
                      f"wants to import and call '{MARKER_MODULE}:make'", UntrustedCodeError),
    "tempfile": ("factory_checkpoint", set_base(kind="factory", factory="tempfile:mkdtemp"),
                 "wants to import and call 'tempfile:mkdtemp'", UntrustedCodeError),
    "class-pipeline": ("hf_checkpoint", set_base(kind="transformers", **{"class": "pipeline"}),
                       "base.class 'pipeline' is not a model class that transformers",
                       CheckpointError),
    "class-auto": ("hf_checkpoint", set_base(kind="transformers", **{"class": "AutoModel"}),
                   "base.class 'AutoModel' is not a model class", CheckpointError),
    "class-config": ("hf_checkpoint", set_base(kind="transformers", **{"class": "LlamaConfig"}),
                     "base.class 'LlamaConfig' is not a model class", CheckpointError),
    "class-a-path": ("hf_checkpoint",
                     set_base(kind="transformers", **{"class": f"{MARKER_MODULE}.Model"}),
                     f"base.class '{MARKER_MODULE}.Model' is not a model class", CheckpointError),
    "class-private": ("hf_checkpoint", set_base(kind="transformers", **{"class": "_LazyModule"}),
                      "base.class '_LazyModule' is not a model class", CheckpointError),
    "factory-not-a-name": ("factory_checkpoint", set_base(kind="factory", factory="os.system"),
                           "base.factory 'os.system' is not 'package.module:function'",
                           CheckpointError),
    "pass-not-installed": ("hf_checkpoint",
                           lambda r: r["passes"].insert(0, {"_type": MARKER_MODULE,
                                                            "_version": 1, "_data": {}}),
                           f"passes[0] is '{MARKER_MODULE}', a pass that is not installed here",
                           CheckpointError),
}


def crafted(request: pytest.FixtureRequest, name: str, tmp_path: Path,
            edit: Callable[[dict], Any]) -> Path:
    directory = Path(shutil.copytree(request.getfixturevalue(name), tmp_path / "ckpt"))
    edit_recipe(directory, edit)
    return directory


@pytest.mark.parametrize("case", list(CODE_CASES))
def test_code_named_by_a_checkpoint_is_not_run(case, request, isolated, monkeypatch):
    fixture, edit, middle, error = CODE_CASES[case]
    directory = crafted(request, fixture, isolated, edit)
    before = fingerprint(isolated)
    calls: list[str] = []
    monkeypatch.setattr("os.fork", lambda: calls.append("fork"))  # never reached
    for attempt in (lambda: surgeon.load(directory), lambda: surgeon.verify(directory)):
        with pytest.raises(error) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith(f"{directory / 'surgeon.json'}") and middle in message
        assert "\n" not in message
    line = one_error_line(run("verify", str(directory)))
    assert line == f"error: {message}"
    if error is UntrustedCodeError:
        assert message.endswith("pass --trust-remote-code (trust_remote_code=True in Python)")
    assert calls == [] and MARKER_MODULE not in sys.modules
    assert not (isolated / "MARKER").exists()
    assert fingerprint(isolated) == before  # nothing written, nothing changed


def test_a_trusted_factory_base_is_not_imported_from_the_current_directory(
        request, isolated):
    directory = crafted(request, "factory_checkpoint", isolated,
                        set_base(kind="factory", factory=f"{MARKER_MODULE}:make"))
    with pytest.raises(SourceError, match=f"cannot import module '{MARKER_MODULE}'"):
        surgeon.load(directory, trust_remote_code=True)
    line = one_error_line(run("verify", "--trust-remote-code", str(directory)))
    assert line.startswith(f"error: cannot import module '{MARKER_MODULE}'")
    assert MARKER_MODULE not in sys.modules and not (isolated / "MARKER").exists()


def test_a_trusted_sys_exit_base_fails_verify_instead_of_exiting_quietly(request, tmp_path):
    directory = crafted(request, "factory_checkpoint", tmp_path,
                        set_base(kind="factory", factory="sys:exit"))
    with pytest.raises(SourceError, match=r"calling sys:exit\(\) failed: SystemExit"):
        surgeon.verify(directory, trust_remote_code=True)
    line = one_error_line(run("verify", "--trust-remote-code", str(directory)))
    assert line == "error: calling sys:exit() failed: SystemExit"


def test_opting_in_loads_a_factory_base(factory_checkpoint):
    loaded = surgeon.load(factory_checkpoint, trust_remote_code=True)
    assert type(loaded).__name__ == "NanoGPT" and not loaded.training
    assert surgeon.verify(factory_checkpoint, trust_remote_code=True).ok
    result = run("verify", "--trust-remote-code", str(factory_checkpoint))
    assert result.exit_code == 0 and "result: ok" in result.stdout


def test_a_checkpoint_with_nothing_recorded_does_not_verify(request, tmp_path):
    directory = crafted(request, "hf_checkpoint", tmp_path, lambda r: r.update(check=None))
    result = surgeon.verify(directory)
    assert not result.ok
    assert result.failures == [f"{directory / 'surgeon.json'} records no output to compare the "
                               "reloaded model with; verify it --against its source"]
    assert run("verify", str(directory)).exit_code == 1


# -- a config's auto_map ----------------------------------------------------------------------

CONFIG_CODE = '''
from pathlib import Path
Path({marker!r}).write_text("imported")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "{model_type}"
'''
MODELING_CODE = '''
from transformers import LlamaForCausalLM
from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
'''


def with_auto_map(directory: Path, marker: Path, model_type: str) -> Path:
    """Give `directory`'s config.json an auto_map to code in the directory that writes
    `marker` when imported."""
    file = directory / "config.json"
    config = json.loads(file.read_text())
    config["model_type"] = model_type
    config["architectures"] = ["EvilForCausalLM"]
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM",
                          "AutoModel": "modeling_evil.EvilForCausalLM"}
    file.write_text(json.dumps(config))
    (directory / "configuration_evil.py").write_text(
        CONFIG_CODE.format(marker=str(marker), model_type=model_type))
    (directory / "modeling_evil.py").write_text(MODELING_CODE)
    return directory


@pytest.fixture
def remote_code_source(tmp_path: Path) -> Path:
    """tiny-llama whose config names code of its own, for a model type transformers lacks."""
    source = Path(shutil.copytree(TINY_LLAMA, tmp_path / "evil-llama"))
    return with_auto_map(source, tmp_path / "MARKER", "evil_llama")


# How each command reads a source: (SRC, DST) -> its arguments.
SOURCE_COMMANDS = {
    "convert": lambda src, dst: ["convert", src, dst, "-p", "aion"],
    "inspect": lambda src, dst: ["inspect", src],
    "grow": lambda src, dst: ["grow", src, dst, "--init", "zero"],
    "verify-against": lambda src, dst: ["verify", "CHECKPOINT", "--against", src],
}


@pytest.mark.parametrize("command", list(SOURCE_COMMANDS))
def test_a_source_auto_map_is_refused_even_when_stdin_says_yes(command, remote_code_source,
                                                               hf_checkpoint, tmp_path,
                                                               monkeypatch):
    monkeypatch.undo()  # the CLI gets "y" on stdin: it must not read it
    before = fingerprint(tmp_path)
    dst = tmp_path / "out"
    args = SOURCE_COMMANDS[command](str(remote_code_source), str(dst))
    args = [str(hf_checkpoint) if a == "CHECKPOINT" else a for a in args]
    line = one_error_line(run(*args, input="y\n"))
    assert line == (f"error: {remote_code_source / 'config.json'} names code of its own "
                    "(auto_map) that transformers would import to build this model; surgeon "
                    "runs a checkpoint's code only if you trust it: pass --trust-remote-code "
                    "(trust_remote_code=True in Python)")
    assert not (tmp_path / "MARKER").exists() and not dst.exists()
    assert fingerprint(tmp_path) == before
    with pytest.raises(UntrustedCodeError, match="names code of its own"):
        surgeon.convert(str(remote_code_source), dst, ["aion"])
    assert not (tmp_path / "MARKER").exists()


def test_trusting_a_source_runs_its_code(remote_code_source, tmp_path, remote_code_cache):
    loaded = load_model(str(remote_code_source), trust_remote_code=True)
    assert type(loaded.model).__name__ == "EvilForCausalLM"
    assert (tmp_path / "MARKER").read_text() == "imported"
    assert list((remote_code_cache / "transformers_modules").iterdir())  # copied there


def test_a_converted_checkpoint_auto_map_is_never_run(hf_checkpoint, tmp_path):
    """surgeon.load builds its transformers base with the class's own config class."""
    directory = Path(shutil.copytree(hf_checkpoint, tmp_path / "ckpt"))
    with_auto_map(directory, tmp_path / "MARKER", "llama")
    loaded = surgeon.load(directory)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    assert surgeon.verify(directory).ok
    result = run("verify", str(directory), input="y\n")
    assert result.exit_code == 0 and "result: ok" in result.stdout
    assert not (tmp_path / "MARKER").exists()


# -- surgeon.json of the wrong shape ----------------------------------------------------------


def nested(depth: int) -> Callable[[dict], str]:
    return lambda r: json.dumps(r)[:-1] + ', "deep": ' + "[" * depth + "]" * depth + "}"


# (edit of surgeon.json, the error line after "<file>")
SCHEMA_CASES = {
    "a-list": (lambda r: "[]", ": must be an object, not a list"),
    "format-string": (lambda r: r.update(format="1"),
                      ": format must be an integer, not a string"),
    "format-bool": (lambda r: r.update(format=True),
                    ": format must be an integer, not a boolean"),
    "format-newer": (lambda r: r.update(format=FORMAT + 1),
                     f" has format {FORMAT + 1}, newer than this surgeon reads ({FORMAT}); "
                     "upgrade surgeon"),
    "format-missing": (lambda r: r.pop("format"), ": format is missing"),
    "digits-5000": (lambda r: json.dumps(r)[:-1] + ', "format2": ' + "9" * 5000 + "}",
                    " is not valid JSON: Exceeds the limit (4300 digits) for integer string "
                    "conversion: value has 5000 digits; use sys.set_int_max_str_digits() to "
                    "increase the limit"),
    "huge-integer": (lambda r: r.update(format=10**1000), ": format is out of range"),
    "deep-nesting": (nested(100_000), " is nested too deeply to be read"),
    "unknown-key": (lambda r: r.update(surprise=1),
                    ": surprise is not a key surgeon knows (known: base, calibration, check, "
                    "digests, drift, dtype, example, format, manifest, passes, source, versions)"),
    "base-a-list": (lambda r: r.update(base=["os", "fork"]),
                    ": base must be an object, not a list"),
    "base-kind": (lambda r: r.update(base={"kind": "python", "code": "x"}),
                  ": base.kind must be 'transformers' or 'factory'"),
    "base-extra-key": (lambda r: r["base"].update(module="os"),
                       ": base.module is not a key surgeon knows (known: class, kind)"),
    "passes-an-object": (lambda r: r.update(passes={"aion": {}}),
                         ": passes must be a list, not an object"),
    "pass-data-a-list": (lambda r: r["passes"][0].update(_data=[1, 2]),
                         ": passes[0]._data must be an object, not a list"),
    "pass-version-string": (lambda r: r["passes"][0].update(_version="1"),
                            ": passes[0]._version must be an integer, not a string"),
    "pass-option-deep": (lambda r: r["passes"][0]["_data"].update(include=[[[[["x"]]]]]),
                         ": passes[0]._data.include[0][0][0][0] is nested too deeply"),
    "pass-option-huge": (lambda r: r["passes"][0]["_data"].update(epsilon=10**400),
                         ": passes[0]._data.epsilon is out of range"),
    "pass-option-unknown": (lambda r: r["passes"][0]["_data"].update(bogus=1),
                            ": passes[0]: pass 'aion': unknown option 'bogus'"),
    "manifest-modules-int": (lambda r: r["manifest"].update(modules=3),
                             ": manifest.modules must be a list, not an integer"),
    "manifest-null-name": (lambda r: r["manifest"]["parameters"].append(None),
                           ": manifest.parameters[{n}] must be a string, not null"),
    "example-junk": (lambda r: r.update(example={"kind": "set", "keys": []}),
                     ": example.kind must be one of dict, tuple"),
    "drift-unknown-key": (lambda r: r["drift"][0].update(colour="red"),
                          ": drift[0].colour is not a key surgeon knows"),
    "check-sample-strings": (lambda r: r["check"].update(sample=["a"]),
                             ": check.sample[0] must be a number, not a string"),
    "versions-a-number": (lambda r: r["versions"].update(torch=2),
                          ": versions.torch must be a string, not an integer"),
}


@pytest.mark.parametrize("case", list(SCHEMA_CASES))
def test_a_malformed_recipe_is_one_line_naming_the_file_and_field(case, hf_checkpoint,
                                                                  tmp_path):
    edit, tail = SCHEMA_CASES[case]
    directory = Path(shutil.copytree(hf_checkpoint, tmp_path / "ckpt"))
    n = len(json.loads((directory / "surgeon.json").read_text())["manifest"]["parameters"])
    edit_recipe(directory, edit)
    expected = f"{directory / 'surgeon.json'}{tail.format(n=n)}"
    before = fingerprint(tmp_path)
    for attempt in (surgeon.load, surgeon.verify):
        with pytest.raises(CheckpointError) as caught:
            attempt(directory)
        assert str(caught.value).startswith(expected), str(caught.value)
    line = one_error_line(run("verify", str(directory)))
    assert line.startswith(f"error: {expected}")
    assert fingerprint(tmp_path) == before


# -- plug-ins ---------------------------------------------------------------------------------


class EntryPoint:
    def __init__(self, name: str, load: Callable[[], None]) -> None:
        self.name, self.value, self._load = name, f"plugin_{name}", load

    def load(self) -> None:
        self._load()


def broken() -> None:
    raise ImportError("No module named 'plugin_broken'")


def clash() -> None:
    @recipe.register
    class NotAion(recipe.PassConfig):
        name = "aion"


def stomp() -> None:
    recipe._REGISTRY["adyt"] = recipe.PassConfig


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    def install(*eps: EntryPoint) -> None:
        monkeypatch.setattr(recipe, "_loaded", False)
        monkeypatch.setattr(recipe, "_REGISTRY", dict(recipe._REGISTRY))
        monkeypatch.setattr(recipe, "entry_points", lambda group: list(eps))
    return install


def test_builtin_names_win_and_a_broken_plugin_is_skipped(plugins):
    builtin = registered()
    plugins(EntryPoint("broken", broken), EntryPoint("clash", clash),
            EntryPoint("stomp", stomp))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        passes = registered()
        registered()  # loaded once: said once
    said = [str(w.message) for w in caught if issubclass(w.category, PluginWarning)]
    assert said == [
        "pass plug-in 'broken' (plugin_broken) is skipped: it failed to load (ImportError: No "
        "module named 'plugin_broken')",
        "pass plug-in 'clash' (plugin_clash) is skipped: it failed to load (PassError: pass name "
        "'aion' is taken by passes.aion.AION; test_trust.clash.<locals>.NotAion cannot replace "
        "it (give it another name, or register(..., replace=True) to replace it on purpose))",
        "pass plug-in 'stomp' (plugin_stomp) replaced the built-in pass 'adyt'; the built-in is "
        "kept"]
    assert passes == builtin


def test_a_broken_plugin_does_not_break_the_cli(plugins, hf_checkpoint):
    plugins(EntryPoint("broken", broken))
    result = run("verify", str(hf_checkpoint))
    assert result.exit_code == 0 and "result: ok" in result.stdout
    assert result.stderr == ("warning: pass plug-in 'broken' (plugin_broken) is skipped: it "
                             "failed to load (ImportError: No module named 'plugin_broken')\n")


def test_replacing_a_pass_on_purpose(plugins):
    plugins()
    registered()

    class Mine(recipe.PassConfig):
        name = "aion"

    with pytest.raises(SurgeonError, match="pass name 'aion' is taken by passes.aion.AION"):
        recipe.register(Mine)
    recipe.register(Mine, replace=True)
    assert registered()["aion"] is Mine


# -- no absolute local paths in what may be published -----------------------------------------


def text_files(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in directory.iterdir()
            if p.suffix in (".json", ".md")}


def test_written_files_name_the_source_without_local_paths(tmp_path):
    source = Path(shutil.copytree(TINY_LLAMA, tmp_path / "models" / "tiny-llama")).resolve()
    converted = tmp_path / "converted"
    surgeon.convert(str(source), converted, ["aion"])
    grown = tmp_path / "grown"
    surgeon.grow(str(source), grown, init="copy")
    for directory in (converted, grown):
        for name, text in text_files(directory).items():
            assert str(tmp_path) not in text and str(ROOT) not in text, (directory, name)
    recipe_ = json.loads((converted / "surgeon.json").read_text())
    assert recipe_["source"] == {"name": "tiny-llama", "revision": None}
    assert "Converted from `tiny-llama`" in (converted / "README.md").read_text()
    record = json.loads((grown / "growth.json").read_text())
    assert (record["snapshots"], record["checkpoint"]) == ("tiny-llama", ".")
    with torch.no_grad():  # and the conversion still loads
        surgeon.load(converted)(input_ids=tokens(512))


def test_the_model_card_of_a_factory_base_shows_the_opt_in(tmp_path):
    from surgeon.files.card import write_card

    case = next(c for c in ZOO if c.name == "nanogpt")
    model = surgeon.apply(case.build().eval(), ["aion"], case.example())
    model._surgeon_base = {"kind": "factory", "factory": "zoo:NanoGPT"}
    write_card(tmp_path, model, "zoo:NanoGPT", 0)
    card = (tmp_path / "README.md").read_text()
    assert ('model = surgeon.load("path/to/this/directory", trust_remote_code=True)  # runs '
            "zoo:NanoGPT") in card
    assert "`surgeon verify path/to/this/directory --trust-remote-code`" in card
