"""A pass that changes nothing says so: `NoEffectWarning` with a one-line reason (its patterns
select no module, or its scope holds nothing it rewrites), in Python and on the command line.
A pass that rewrites something, and a reload of a saved model, warn nothing."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from cli_runner import run
from zoo import ZOO

import surgeon
from surgeon import NoEffectWarning
from surgeon.applying import output_vector
from surgeon.graph.tracing import run_example

ROOT = Path(__file__).resolve().parent.parent
TINY_LLAMA = ROOT / "examples" / "tiny-llama"
CASES = {c.name: c for c in ZOO}

# (zoo model, pass, the reason the warning must give). A new pass joins with its rows.
NO_EFFECT = [
    ("hf_llama", "aion:include=decoder.*",
     "pass 'aion' changed nothing: include=decoder.* selects no module of LlamaForCausalLM "
     "(its modules are named like model, model.embed_tokens, model.layers); fix the patterns"),
    ("hf_llama", "hyper:exclude=*",
     "pass 'hyper' changed nothing: exclude=* selects no module of LlamaForCausalLM "
     "(its modules are named like model, model.embed_tokens, model.layers); fix the patterns"),
    ("hf_llama", "adyt:include=model.layers.*|lm_head,exclude=*norm*",
     "pass 'adyt' changed nothing: found no LayerNorm/RMSNorm modules and functional norms in "
     "the modules of LlamaForCausalLM that include=model.layers.*|lm_head exclude=*norm* "
     "selects; 2 modules in scope could not be traced (`surgeon inspect` says why)"),
    ("nanogpt", "aion:include=transformer.h.0.attn",
     "pass 'aion' changed nothing: found no residual adds in the modules of NanoGPT that "
     "include=transformer.h.0.attn selects"),
    ("hf_gpt2", "hyper:include=lm_head",
     "pass 'hyper' changed nothing: found no residual trunks in the modules of GPT2LMHeadModel "
     "that include=lm_head selects"),
    ("hf_llama", "aion:include=model.layers.0.self_attn",
     "pass 'aion' changed nothing: found no residual adds in the modules of LlamaForCausalLM "
     "that include=model.layers.0.self_attn selects; 1 module in scope could not be traced "
     "(`surgeon inspect` says why)"),
    ("resnet", "adyt", "pass 'adyt' changed nothing: found no LayerNorm/RMSNorm modules and "
                       "functional norms in TinyResNet"),
]


def no_effect_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, NoEffectWarning)]


@pytest.mark.parametrize("model, spec, reason", NO_EFFECT,
                         ids=[f"{m}-{p}" for m, p, _ in NO_EFFECT])
def test_a_pass_that_changes_nothing_warns_why(model: str, spec: str, reason: str) -> None:
    case = CASES[model]
    net, example = case.build().eval(), case.example()
    with torch.no_grad():
        before = output_vector(run_example(net, example))
    keys = sorted(net.state_dict())
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        surgeon.apply(net, spec, example)
    messages = no_effect_warnings(record)
    assert messages == [reason]
    assert next(w for w in record if w.category is NoEffectWarning).filename == __file__
    assert sorted(net.state_dict()) == keys and net.surgeon_drift[-1].modules == 0
    with torch.no_grad():
        assert torch.equal(output_vector(run_example(net, example)), before)


@pytest.mark.parametrize("spec", ["aion", "hyper", "adyt", "aion:include=model.layers.1"])
def test_a_pass_that_rewrites_warns_nothing(spec: str) -> None:
    case = CASES["hf_llama"]
    net = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEffectWarning)
        surgeon.apply(net, spec, case.example())
    assert net.surgeon_drift[-1].modules > 0


def test_reloading_a_model_with_a_no_effect_pass_is_quiet(tmp_path: Path) -> None:
    case = CASES["hf_llama"]
    net = case.build()
    with pytest.warns(NoEffectWarning):
        surgeon.apply(net, ["aion", "adyt:include=nothing"], case.example())
    surgeon.save(net, tmp_path / "out")
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoEffectWarning)
        again = surgeon.load(tmp_path / "out")
    assert [p["_type"] for p in again._surgeon_passes] == ["aion", "adyt"]


def test_the_cli_prints_the_warning_as_one_line_and_converts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run("convert", str(TINY_LLAMA), str(out), "-p", "aion", "-p", "adyt:include=nope.*",
                 "--quiet")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: pass 'adyt' changed nothing: include=nope.* selects no module of "
                     "LlamaForCausalLM (its modules are named like model, model.embed_tokens, "
                     "model.layers); fix the patterns"]
    assert (out / "surgeon.json").is_file()


def test_the_installed_command_prints_one_line_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "surgeon", "convert", str(TINY_LLAMA), str(tmp_path / "out"),
         "-p", "hyper:include=lm_head", "--quiet"], capture_output=True, text=True, cwd=ROOT,
        timeout=300)
    assert proc.returncode == 0, proc.stderr
    warning_lines = [line for line in proc.stderr.splitlines() if "changed nothing" in line]
    assert warning_lines == [
        "warning: pass 'hyper' changed nothing: found no residual trunks in the modules of "
        "LlamaForCausalLM that include=lm_head selects"]
    assert "NoEffectWarning" not in proc.stderr and "warnings.warn" not in proc.stderr
