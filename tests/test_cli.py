"""The `surgeon` command line: `inspect` tables and JSON on the embedded tiny Llama, `--version`,
and one `error:` line with exit code 1 (no traceback) for a bad source."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_runner import run

from surgeon import __version__

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "examples" / "tiny-llama"


@pytest.fixture(scope="module")
def inspect_text():
    result = run("inspect", str(TINY_LLAMA))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_inspect_prints_tables_with_counts(inspect_text):
    out = inspect_text
    assert out.startswith(f"model: LlamaForCausalLM from {TINY_LLAMA}\n")
    assert "Residual adds (4)\n  module          kind      source\n" in out
    assert "Norms (5)\n  module" in out
    assert "Residual trunks (1)\n" in out
    assert "  2       model.layers.0 ... model.layers.1\n" in out
    assert "Untraced modules (" in out
    assert ("counts: 4 residual adds (pre_norm 4), 5 norms (rms_norm 5), 1 trunk (carrying 4 of "
            "the adds), ") in out


def test_inspect_norm_rows(inspect_text):
    rows = [line.split() for line in inspect_text.splitlines() if "_layernorm " in line]
    assert len(rows) == 4
    for row in rows:
        assert row[1:5] == ["rms_norm", "(64,)", "1e-06", "True"]
        assert row[5].startswith("modeling_llama.py:")


def test_inspect_json():
    result = run("inspect", str(TINY_LLAMA), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"residuals", "norms", "trunks", "untraced", "counts"} <= data.keys()
    assert data["counts"]["residuals"] == len(data["residuals"]) == 4
    assert {r["kind"] for r in data["residuals"]} == {"pre_norm"}
    assert [n["module"] for n in data["norms"]][-1] == "model.norm"
    assert data["trunks"] == [{"blocks": ["model.layers.0", "model.layers.1"]}]


@pytest.mark.parametrize(
    ("src", "expected"),
    [
        ("nope", "error: cannot use 'nope' as a model source: SRC must be"),
        ("./no/such/dir", "error: no such directory: ./no/such/dir"),
        ("surgeon_no_such_module:make", "error: cannot import module 'surgeon_no_such_module'"),
        (str(ROOT / "examples"), f"error: {ROOT / 'examples'} has no config.json"),
    ],
)
def test_bad_source_is_one_error_line(src, expected):
    result = run("inspect", src)
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected)
    assert "Traceback" not in result.output


def test_revision_on_local_dir_is_an_error():
    result = run("inspect", str(TINY_LLAMA), "--revision", "main")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: revision 'main' applies to hub ids only")


def test_factory_model_without_example_asks_for_one():
    result = run("inspect", "torch.nn:Identity")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no example input for Identity")
    assert "pass --example package.module:function" in lines[0]


def test_version():
    result = run("--version")
    assert result.exit_code == 0
    assert result.stdout == f"surgeon, version {__version__}\n"


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "surgeon", "--version"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"surgeon, version {__version__}\n"
