"""The command line's help and messages: every --help shows examples, every option a message
names exists on the command that prints it, `list-passes` lists the passes with their options,
defaults and promises, Ctrl-C exits 130 in one line, and transformers' own progress bars and
warnings stay out of `inspect`/`verify` unless -v."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_runner import run
from safetensors.torch import load_file

from surgeon.cli import main
from surgeon.recipe import registered

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "examples" / "tiny-llama"
FACTORY = '''
import time
import torch


def build():
    from transformers.utils import logging
    logging.get_logger("transformers.configuration_utils").warning("a transformers warning")
    return torch.nn.Sequential(torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))


def example():
    return (torch.randn(2, 8),)


def slow():
    open("started", "w").close()
    time.sleep(60)
'''


def surgeon_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "surgeon", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def factory_dir(tmp_path: Path) -> Path:
    (tmp_path / "smallnet.py").write_text(FACTORY)
    return tmp_path


@pytest.fixture(scope="module")
def pickle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its weights as pytorch_model.bin only."""
    out = tmp_path_factory.mktemp("pickled")
    shutil.copy(TINY_LLAMA / "config.json", out / "config.json")
    torch.save(load_file(str(TINY_LLAMA / "model.safetensors")), out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize("command", [
    None, "inspect", "convert", "verify", "list-passes",
    "grow",
])
def test_every_help_shows_an_example(command: str | None) -> None:
    result = run(*([command] if command else []), "--help")
    assert result.exit_code == 0, result.output
    examples = [line.strip() for line in result.stdout.split("Examples:\n", 1)[1].splitlines()]
    assert examples and all(line.startswith("surgeon ") for line in examples if line)
    if command:
        assert any(line.startswith(f"surgeon {command}") for line in examples)


def test_every_command_is_covered() -> None:
    assert set(main.commands) == {"inspect", "convert", "verify", "grow", "list-passes"}


def test_list_passes_json_matches_the_registry() -> None:
    result = run("list-passes", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert set(rows) == set(registered()) >= {"aion", "hyper", "adyt"}
    for name, cls in registered().items():
        assert rows[name]["rewrites"] == cls.rewrites
        assert rows[name]["promise"] == cls().preserves()
    options = {o["name"]: o for o in rows["aion"]["options"]}
    assert options["preset"] == {"name": "preset", "type": "aion | deepnorm | preln | rezero",
                                 "default": "aion"}
    assert options["include"] == {"name": "include", "type": "patterns, |-separated",
                                  "default": []}
    assert {o["name"]: o["default"] for o in rows["hyper"]["options"]}["streams"] == 4
    assert rows["aion"]["runs_before"] == ["hyper"] and rows["adyt"]["promise"] is None


def test_list_passes_text() -> None:
    result = run("list-passes")
    assert result.exit_code == 0, result.output
    blocks = {b.split(":", 1)[0]: b for b in result.stdout.strip().split("\n\n")}
    assert set(blocks) == set(registered())
    aion = blocks["aion"].splitlines()
    assert aion[1:4] == ["  rewrites: residual adds",
                         "  promise (defaults): keeps the output within 1e-05 (relative)",
                         "  must come before: hyper"]
    assert aion[4].split() == ["option", "default", "type"]
    assert aion[5].split() == ["preset", "aion", "aion", "|", "deepnorm", "|", "preln", "|",
                               "rezero"]
    assert "  promise (defaults): none; it changes what the model computes" in blocks["adyt"]
    assert any(line.split()[:2] == ["alpha0", "0.5"] for line in blocks["adyt"].splitlines())


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_pickle_message_names_an_option_the_command_has(command: str, pickle_dir: Path,
                                                        tmp_path: Path) -> None:
    if command == "inspect":
        args = ["inspect", str(pickle_dir)]
    else:
        converted = tmp_path / "converted"
        assert run("convert", str(TINY_LLAMA), str(converted), "-p", "aion", "-q").exit_code == 0
        args = ["verify", str(converted), "--against", str(pickle_dir)]
    refused = run(*args)
    assert refused.exit_code == 1
    assert "pass --allow-pickle" in refused.stderr and len(refused.stderr.splitlines()) == 1
    allowed = run(*args, "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output
    last = allowed.stdout.strip().splitlines()[-1]
    assert last == "result: ok" if command == "verify" else last.startswith("counts: 4 residual")


def test_inspect_factory_with_example_and_quiet(factory_dir: Path) -> None:
    asked = surgeon_cli("inspect", "smallnet:build", cwd=factory_dir)
    assert asked.returncode == 1
    assert asked.stderr.startswith("error: no example input for Sequential: pass --example "
                                   "package.module:function")
    done = surgeon_cli("inspect", "smallnet:build", "--example", "smallnet:example", "--json",
                       cwd=factory_dir)
    assert done.returncode == 0, done.stderr
    assert [n["module"] for n in json.loads(done.stdout)["norms"]] == ["0"]
    assert done.stderr == ""  # the factory's transformers warning is not shown without -v
    loud = surgeon_cli("inspect", "smallnet:build", "--example", "smallnet:example", "-v",
                       cwd=factory_dir)
    assert loud.returncode == 0 and "a transformers warning" in loud.stderr


def test_transformers_progress_bars_only_with_verbose() -> None:
    quiet = surgeon_cli("inspect", str(TINY_LLAMA))
    assert quiet.returncode == 0 and quiet.stderr == ""
    loud = surgeon_cli("inspect", str(TINY_LLAMA), "--verbose")
    assert loud.returncode == 0 and "Loading weights" in loud.stderr
    assert loud.stdout == quiet.stdout


def test_ctrl_c_exits_130_with_one_line(factory_dir: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # SIGINT back to its default in the child: a test run started in the background of a
    # shell inherits SIGINT ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "surgeon", "inspect", "smallnet:slow"],
                            cwd=factory_dir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (factory_dir / "started").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (130, "", "interrupted\n")


def test_keyboard_interrupt_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import surgeon.files.source as source

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(source, "load_model", interrupted)
    result = run("inspect", str(TINY_LLAMA))
    assert (result.exit_code, result.stdout, result.stderr) == (130, "", "interrupted\n")
