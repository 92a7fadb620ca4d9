"""surgeon.apply is all or nothing: a failure at any point of any pass (also KeyboardInterrupt)
leaves the model exactly as it was (same module and parameter objects, same state_dict keys
and values, same output), and the error names the module, its class and the exclude= that
skips it."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from zoo import ZOO, ZooCase

import surgeon
from surgeon.applying import apply
from surgeon.errors import ModuleError, PromiseError
from surgeon.graph import rewrite, tracing
from surgeon.graph.tracing import run_example
from surgeon.nn.aion import AionResidual

CASES = {c.name: c for c in ZOO}


class Injected(RuntimeError):
    """The failure the tests inject."""


def fingerprint(model: torch.nn.Module, example: tuple | dict) -> dict[str, Any]:
    """Everything `apply` must put back: module and parameter objects by name, classes,
    modes, state_dict, plain attributes of the root, and the eval output on the example."""
    model.eval()
    with torch.no_grad():
        out = run_example(model, example)
    out = out if isinstance(out, torch.Tensor) else next(
        v for v in (out.values() if isinstance(out, dict) else out)
        if isinstance(v, torch.Tensor))
    return {
        "modules": [(n, id(m), type(m), m.training) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "attrs": sorted(model.__dict__),
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
        "out": out.clone(),
    }


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["modules"] == before["modules"]
    assert after["params"] == before["params"]
    assert list(after["state"]) == list(before["state"])
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    assert after["attrs"] == before["attrs"]
    assert after["hooks"] == before["hooks"]
    assert torch.equal(after["out"], before["out"])


def fail_on_call(monkeypatch: pytest.MonkeyPatch, owner: Any, attr: str, n: int,
                 error: BaseException) -> list[int]:
    """Make `owner.attr` raise `error` on its `n`-th call (the calls before run normally)."""
    original = getattr(owner, attr)
    count = [0]

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        if count[0] == n:
            raise error
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapped)
    return count


# (where, object, attribute, which call fails): midway through a pass's edits, midway through
# installing the rewritten modules, while seeding AION on the example, tracing the second
# pass, and the last run on the example.
POINTS = {
    "add_module": (rewrite.Surgery, "add_module", 2),
    "replace": (rewrite.Surgery, "replace", 2),
    "after_commit": (AionResidual, "preserve_", 2),
    "second_trace": (rewrite, "trace_model", 2),
    "final_run": (rewrite.Surgery, "run_example", 2),
}
ROWS = [(case, point) for case in ("nanogpt", "hf_gpt2", "hf_bert", "resnet", "mixer",
                                   "encoder_post_norm", "layerdrop", "window_pad")
        for point in POINTS]


@pytest.mark.parametrize("case, point", ROWS)
def test_failure_leaves_model_unchanged(case: str, point: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    zc: ZooCase = CASES[case]
    torch.manual_seed(0)
    model, example = zc.build(), zc.example()
    before = fingerprint(model, example)
    owner, attr, n = POINTS[point]
    count = fail_on_call(monkeypatch, owner, attr, n, Injected("injected failure"))
    with pytest.raises((Injected, ModuleError)) as info:
        apply(model, ["aion", "adyt"], example)
    assert count[0] >= n  # the failure did happen midway, after earlier calls changed things
    if isinstance(info.value, ModuleError):
        assert "injected failure" in str(info.value) and "exclude=[" in str(info.value)
    assert_same(before, fingerprint(model, example))
    monkeypatch.undo()
    apply(model, ["aion", "adyt"], example)  # and the model still converts afterwards
    assert sum(isinstance(m, AionResidual) for m in model.modules()) == sum(
        zc.residuals.values())


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(2)])
def test_interrupt_leaves_model_unchanged(error: BaseException,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    zc = CASES["hf_llama"]
    model, example = zc.build(), zc.example()
    before = fingerprint(model, example)
    fail_on_call(monkeypatch, rewrite.Surgery, "replace", 3, error)
    with pytest.raises(type(error)):
        apply(model, ["aion", "hyper"], example)
    assert_same(before, fingerprint(model, example))


def test_failure_in_later_apply_keeps_earlier_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model converted once, then a failing second apply: back to the converted model."""
    zc = CASES["nanogpt"]
    model, example = zc.build(), zc.example()
    apply(model, ["aion"], example)
    before = fingerprint(model, example)
    passes = list(model._surgeon_passes)
    fail_on_call(monkeypatch, rewrite.Surgery, "replace", 2, Injected("late"))
    with pytest.raises((Injected, ModuleError)):
        apply(model, ["adyt"], example)
    assert_same(before, fingerprint(model, example))
    assert model._surgeon_passes == passes


def test_buffers_a_forward_wrote_are_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """BatchNorm running statistics (written by a forward in train mode) come back."""
    zc = CASES["resnet"]
    model, example = zc.build(), zc.example()
    model.train()
    bn = model.stem[1]
    stats = bn.running_mean.clone()
    real = rewrite.Surgery.commit

    def commit_then_train(self: rewrite.Surgery) -> list[str]:
        real(self)
        self.model.train()
        run_example(self.model, self.example)  # writes running stats
        raise Injected("after a train-mode run")

    monkeypatch.setattr(rewrite.Surgery, "commit", commit_then_train)
    with pytest.raises((Injected, ModuleError)):
        apply(model, ["aion"], example)
    assert torch.equal(bn.running_mean, stats)
    assert model.training and all(m.training for m in model.modules())


def test_torch_error_in_rewritten_module_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rewritten module that fails on the example: a ModuleError naming the block, its class
    and the exclude= that skips it; then that exclude= works."""
    zc = CASES["nanogpt"]
    model, example = zc.build(), zc.example()
    before = fingerprint(model, example)
    real = AionResidual.forward

    def broken(self: AionResidual, x: torch.Tensor, *rest: Any) -> torch.Tensor:
        if self is getattr(model.transformer.h[1], "aion_0", None):
            return torch.cat([x, x]) @ x  # a bare torch shape error
        return real(self, x, *rest)

    monkeypatch.setattr(AionResidual, "forward", broken)
    with pytest.raises(ModuleError) as info:
        apply(model, ["aion"], example)
    err = info.value
    assert err.module == "transformer.h.1" and err.exclude == ("transformer.h.1",)
    assert err.module_class == "Block" and err.pass_name == "aion"
    msg = str(err)
    assert "\n" not in msg and "RuntimeError" in msg and "exclude=['transformer.h.1']" in msg
    assert "--exclude 'transformer.h.1'" in msg
    assert_same(before, fingerprint(model, example))
    apply(model, ["aion"], example, exclude=err.exclude)
    assert sum(isinstance(m, AionResidual) for m in model.modules()) == 2
    assert not any(isinstance(m, AionResidual) for m in model.transformer.h[1].modules())


def test_a_pass_that_breaks_its_promise_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """AION promises the output within 1e-5: a rewrite that moves it more (here a residual
    scaled by 1.01) is refused in one line naming the pass and what it rewrote, and the model
    is left as it was — never handed back computing something else."""
    zc = CASES["nanogpt"]
    model, example = zc.build(), zc.example()
    before = fingerprint(model, example)
    real = AionResidual.forward

    def off(self: AionResidual, x: torch.Tensor, y: torch.Tensor, *rest: Any) -> torch.Tensor:
        return real(self, x, 1.01 * y, *rest)

    monkeypatch.setattr(AionResidual, "forward", off)
    with pytest.raises(PromiseError) as info:
        apply(model, ["aion"], example)
    msg = str(info.value)
    assert "\n" not in msg and "'aion'" in msg and "transformer.h.0" in msg
    assert "the model is unchanged" in msg and "moved it by" in msg
    assert_same(before, fingerprint(model, example))
    monkeypatch.setattr(AionResidual, "forward", real)
    apply(model, ["aion"], example)  # the honest pass keeps its promise
    assert model.surgeon_drift[-1].step <= 1e-5


def test_second_pass_tracing_blames_first_pass_not_example(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The model a pass rewrote fails when the next pass traces it: the error names the
    rewritten module and the pass, not 'the example input'."""
    zc = CASES["hf_gpt2"]
    model, example = zc.build(), zc.example()
    before = fingerprint(model, example)
    real = AionResidual.forward
    calls = [0]

    def broken(self: AionResidual, *args: Any) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 4:  # the first pass's own runs pass; the next trace fails
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (16x32 and 64x32)")
        return real(self, *args)

    monkeypatch.setattr(AionResidual, "forward", broken)
    with pytest.raises(ModuleError) as info:
        apply(model, ["aion", "adyt"], example)
    msg = str(info.value)
    assert "example input" not in msg and info.value.pass_name == "aion"
    assert info.value.module == "transformer.h.0" and "mat1 and mat2" in msg
    assert_same(before, fingerprint(model, example))


def test_exclude_option_skips_modules() -> None:
    zc = CASES["hf_llama"]
    model, example = zc.build(), zc.example()
    surgeon.apply(model, ["aion", "adyt"], example, exclude=["model.layers.0*"])
    names = [n for n, m in model.named_modules() if isinstance(m, AionResidual)]
    assert names and all(n.startswith("model.layers.1.") for n in names)
    assert all(not n.startswith("model.layers.0") for n, m in model.named_modules()
               if type(m).__name__ == "ADyT")
    assert all("model.layers.0*" in p["_data"]["exclude"] for p in model._surgeon_passes)


def test_traced_module_keeps_class_and_attributes() -> None:
    """A rewritten module is still an instance of its class, and keeps every plain attribute
    and child of the original, also those its graph never touches (class 2)."""
    zc = CASES["nanogpt"]
    model, example = zc.build(), zc.example()
    block = model.transformer.h[0]
    block.tag, block.spare = "global", torch.nn.Linear(2, 2)  # read by nobody in the graph
    apply(model, ["aion"], example)
    new = model.transformer.h[0]
    assert isinstance(new, tracing.TracedModule) and isinstance(new, type(block))
    assert new.tag == "global" and new.spare is block.spare
    assert "transformer.h.0.spare.weight" in model.state_dict()
    copied = __import__("copy").deepcopy(model)
    assert copied.transformer.h[0].tag == "global"
    assert isinstance(copied.transformer.h[0].spare, torch.nn.Linear)


def test_cli_exclude(tmp_path: Any) -> None:
    """`surgeon convert --exclude PATTERN` keeps every pass off those modules, and the
    checkpoint reloads with them excluded."""
    import json
    from pathlib import Path

    from cli_runner import run

    src = Path(__file__).resolve().parent.parent / "examples" / "tiny-llama"
    out = tmp_path / "out"
    result = run("convert", str(src), str(out), "-p", "aion", "--exclude", "model.layers.0",
                 "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["passes"][0]["modules"] == 2  # of 4 residual adds, those of layer 1
    loaded = surgeon.load(out)
    names = [n for n, m in loaded.named_modules() if isinstance(m, AionResidual)]
    assert len(names) == 2 and all(n.startswith("model.layers.1.") for n in names)
