"""surgeon.verify and `surgeon verify`: a fresh conversion verifies (with and without --against
its source) with its preserving passes at step 0; a changed weight, a recorded drift above a
pass's promise and a weights file that lacks or adds a key each fail with exit code 1."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_convert import PASSES, PRESERVING, one_error_line, run
from zoo import hf_gpt2

from surgeon.checkpoint import CheckpointError
from surgeon.converting import convert
from surgeon.verifying import MATCH, verify

pytest.importorskip("transformers")

MODEL = "GPT2LMHeadModel"
CHANGED = "transformer.wte.weight"  # tied to lm_head: stored once, moves every logit
DIGEST_FAILURE = (f"tensor {CHANGED} in model.safetensors differs from what surgeon wrote (its "
                  "sha256, dtype or shape changed)")


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    hf_gpt2().eval().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dst(src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion, shared; tests that tamper with it work on a copy."""
    out = tmp_path_factory.mktemp("converted") / "gpt2"
    convert(str(src), out, list(PASSES))
    return out


@pytest.fixture
def copy(dst: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(dst, tmp_path / "gpt2"))


def recorded_drift(path: Path) -> list[dict]:
    return json.loads((path / "surgeon.json").read_text())["drift"]


def check_rows(rows: list[dict], recorded: list[dict]) -> None:
    """The drift table: every pass ok, the preserving ones at step 0 within their promise."""
    assert [r["name"] for r in rows] == [p.split(":")[0] for p in PASSES]
    # adyt: 5 norms (the recipe's trunk scale is opt-in)
    assert [r["modules"] for r in rows] == [d["modules"] for d in recorded] == [4, 4, 5]
    for row, rec in zip(rows, recorded):
        assert row["ok"] is True
        assert row["promise"] == PRESERVING.get(row["name"]) == rec["promise"]
        if row["name"] in PRESERVING:
            assert row["step"] == 0.0 and row["max_abs"] == 0.0
        else:
            assert row["step"] == pytest.approx(rec["step"], rel=1e-6) and row["step"] > 0.1


# -- a fresh conversion -----------------------------------------------------------------------


@pytest.mark.parametrize("against", [False, True], ids=["recorded", "against-source"])
def test_verify_python_api(src, dst, against):
    result = verify(dst, str(src) if against else None)
    assert result.ok and result.failures == []
    assert result.path == str(dst) and result.model == MODEL
    assert result.against == (str(src) if against else None)
    assert result.reload_difference == 0.0
    assert result.source_difference == (0.0 if against else None)
    check_rows(result.passes, recorded_drift(dst))
    assert result.to_dict()["ok"] is True


@pytest.mark.parametrize("against", [False, True], ids=["recorded", "against-source"])
def test_verify_cli_table(src, dst, against):
    result = run("verify", str(dst), *(["--against", str(src)] if against else []))
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"checkpoint: {dst} ({MODEL}), reloaded strictly"
    assert lines[1].endswith(" checked against their sha256") and lines[1].startswith("tensors: ")
    assert lines[2] == "output on the example vs conversion: relative difference 0"
    if against:
        assert lines[3] == f"output vs {src} converted afresh: relative difference 0"
    title = f"Drift against {src} (3)" if against else "Drift recorded at conversion (3)"
    rows = lines[lines.index(title) + 2:lines.index(title) + 5]
    assert rows[0].split() == ["aion", "4", "0", "1e-05", "0", "1.000000", "ok"]
    assert rows[1].split() == ["hyper", "4", "0", "1e-05", "0", "1.000000", "ok"]
    assert rows[2].split()[:2] == ["adyt", "5"] and rows[2].split()[3] == "-"
    assert rows[2].split()[-1] == "ok"
    assert lines[-1] == "result: ok"


def test_verify_cli_json(src, dst):
    result = run("verify", str(dst), "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["failures"] == []
    assert data["reload_difference"] == 0.0 and data["source_difference"] is None
    check_rows(data["passes"], recorded_drift(dst))


# -- tampered checkpoints ---------------------------------------------------------------------


def rewrite_weights(path: Path, edit) -> None:
    """Rewrite model.safetensors with `edit(tensors)` applied (same file name and metadata)."""
    file = path / "model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def nudge(tensors: dict[str, torch.Tensor]) -> None:
    tensors[CHANGED] = tensors[CHANGED] + 0.05


def test_changed_weight_fails_against_the_source(src, copy):
    rewrite_weights(copy, nudge)
    result = run("verify", str(copy), "--against", str(src), "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["ok"] is False
    assert data["source_difference"] > MATCH and data["reload_difference"] > MATCH
    assert len(data["failures"]) == 3  # the tensor's digest, then both outputs
    assert data["failures"][0] == DIGEST_FAILURE
    assert data["failures"][1].startswith("the reloaded model's output differs from the one "
                                          "recorded at conversion (relative ")
    assert data["failures"][2].startswith(f"the checkpoint's output differs from {src} "
                                          "converted with its passes (relative ")
    assert [r["ok"] for r in data["passes"]] == [True, True, True]  # the passes kept promises
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.stderr
    assert line == f"error: {copy} failed verification: {DIGEST_FAILURE}"


def test_changed_weight_fails_the_recorded_signature(copy):
    rewrite_weights(copy, nudge)
    result = run("verify", str(copy))
    assert result.exit_code == 1
    assert result.stdout.splitlines()[-1] == "result: FAILED (2 problems)"
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.stderr
    assert line == f"error: {copy} failed verification: {DIGEST_FAILURE}"
    second = verify(copy).failures[1]
    assert second.startswith("the reloaded model's output differs from the one recorded at "
                             "conversion (relative ")
    relative = float(second.rsplit("relative ", 1)[1].rstrip(")"))
    assert relative > MATCH


# pass, recorded step, whether verify passes: a preserving pass that moved the output more than
# it promised fails, naming the pass; within the promise it passes.
DRIFT_EDITS = [
    pytest.param("aion", 0.01, False, id="aion-above"),
    pytest.param("hyper", 2e-5, False, id="hyper-above"),
    pytest.param("aion", 5e-6, True, id="aion-within"),
]


@pytest.mark.parametrize("name, step, ok", DRIFT_EDITS)
def test_recorded_drift_above_the_promise_fails(copy, name, step, ok):
    recipe = json.loads((copy / "surgeon.json").read_text())
    row = next(d for d in recipe["drift"] if d["pass_name"] == name)
    row["step"] = step
    (copy / "surgeon.json").write_text(json.dumps(recipe, indent=2))

    result = run("verify", str(copy))
    table = [line.split() for line in result.stdout.splitlines()
             if line.startswith(f"  {name} ")]
    assert len(table) == 1 and table[0][2] == f"{step:.3g}"
    if ok:
        assert result.exit_code == 0, result.output
        assert table[0][-1] == "ok" and result.stdout.endswith("result: ok\n")
        return
    assert result.exit_code == 1
    assert table[0][-1] == "DRIFTED"
    assert result.stdout.splitlines()[-1] == "result: FAILED (1 problem)"
    promise = f"{PRESERVING[name]:g}"
    assert result.stderr == (f"error: {copy} failed verification: pass {name} promises to "
                             f"preserve the output within {promise} but moved it by "
                             f"{step:.3g}\n")


# What is done to the weights file, and the message's tail.
KEY_EDITS = [
    pytest.param(lambda t: t.pop("transformer.h.0.aion_0.alpha0"),
                 "(missing ['transformer.h.0.aion_0.alpha0'], unexpected [])", id="missing"),
    pytest.param(lambda t: t.update({"extra.weight": torch.zeros(2)}),
                 "(missing [], unexpected ['extra.weight'])", id="unexpected"),
]


@pytest.mark.parametrize("edit, tail", KEY_EDITS)
def test_weights_with_other_keys_are_one_error_line(copy, edit, tail):
    rewrite_weights(copy, edit)
    line = one_error_line(run("verify", str(copy)))
    assert line == f"error: {copy} does not match the rebuilt model {tail}"
    with pytest.raises(CheckpointError, match="does not match the rebuilt model"):
        verify(copy)


def test_not_a_converted_checkpoint(src):
    line = one_error_line(run("verify", str(src)))
    assert line == (f"error: {src} has no surgeon.json: it was not written by surgeon.save")
