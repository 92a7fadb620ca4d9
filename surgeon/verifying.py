"""`surgeon.verify(path, against=None)`: does a converted checkpoint load and keep its promises?

It reloads the checkpoint strictly (`surgeon.load`), runs the recorded example and compares the
output with the signature `surgeon.json` recorded at conversion. The drift table is the one
recorded at conversion, or, `against` a source model, measured afresh by replaying the passes
on it; then the reloaded output must also match that conversion of the source. A pass that
promises to preserve the model's function (`PassConfig.preserves`) and drifts more fails it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from surgeon.applying import Drift, apply, output_vector
from surgeon.checkpoint import (
    RECIPE,
    CheckpointError,
    load,
    output_signature,
    read_example,
    read_recipe,
)
from surgeon.errors import NoEffectWarning
from surgeon.graph.example_inputs import example_for
from surgeon.graph.tracing import run_example

MATCH = 1e-4  # relative max difference under which two outputs count as the same


@dataclass
class Verification:
    """The result of `verify`; `ok` is False when any check failed (listed in `failures`)."""

    path: str
    model: str
    against: str | None
    passes: list[dict[str, Any]]  # name, modules, step, promise, max_abs, cosine, ok
    reload_difference: float | None  # vs the output recorded at conversion (None: no record)
    source_difference: float | None = None  # vs `against` converted afresh
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify(path: str | os.PathLike, against: str | None = None, *,
           revision: str | None = None, allow_pickle: bool = False,
           trust_remote_code: bool = False) -> Verification:
    """Check the converted checkpoint at `path` (see the module docstring); `allow_pickle`
    lets `against` be read from .bin/.pt weights. A checkpoint whose base is a
    `package.module:factory`, or an `against` directory with code of its own (`auto_map`), runs
    that code only with `trust_remote_code=True`."""
    root = Path(path)
    recipe = read_recipe(root)
    model = load(root, trust_remote_code=trust_remote_code)
    example = read_example(recipe.get("example", {"default": True}), root)
    output = _output(model, example)
    failures: list[str] = []
    reload_difference = None
    check = recipe.get("check")
    if not check and against is None:  # nothing to compare with: never "ok" unchecked
        failures.append(f"{root / RECIPE} records no output to compare the reloaded model "
                        "with; verify it --against its source")
    if check:
        reload_difference = _signature_difference(output, check)
        if not reload_difference <= MATCH:
            failures.append(f"the reloaded model's output differs from the one recorded at "
                            f"conversion (relative {reload_difference:.3g})")
    if against is None:
        drifts = [Drift(**d) for d in recipe.get("drift", [])]
        source_difference = None
    else:
        from surgeon.files.source import load_model, quiet_transformers

        with quiet_transformers():  # no progress bars around the one-line result
            base = load_model(against, revision=revision, allow_pickle=allow_pickle,
                              trust_remote_code=trust_remote_code).model.eval()  # as `load`
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            with warnings.catch_warnings():  # said at conversion already
                warnings.simplefilter("ignore", NoEffectWarning)
                apply(base, recipe["passes"], example)
        drifts = list(base.surgeon_drift)
        converted = _output(base, example)
        source_difference = _relative(output, converted)
        if not source_difference <= MATCH:
            failures.append(f"the checkpoint's output differs from {against} converted with "
                            f"its passes (relative {source_difference:.3g}); it was changed "
                            "after conversion, or converted from another model")
    rows = []
    for d in drifts:
        rows.append({"name": d.pass_name, "modules": d.modules, "step": d.step,
                     "promise": d.promise, "max_abs": d.max_abs, "cosine": d.cosine,
                     "ok": not d.broken})
        if d.broken:
            failures.append(f"pass {d.pass_name} promises to preserve the output within "
                            f"{d.promise:g} but moved it by {d.step:.3g}")
    return Verification(str(root), type(model).__name__, against, rows, reload_difference,
                        source_difference, failures)


def _output(model: torch.nn.Module, example: Any) -> torch.Tensor:
    with torch.no_grad():
        return output_vector(run_example(model, example_for(model, example)))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _signature_difference(output: torch.Tensor, check: dict[str, Any]) -> float:
    """Relative difference between `output` and a recorded `output_signature`."""
    mine = output_signature(output, len(check.get("sample", [])))
    if mine is None or mine["numel"] != check.get("numel"):
        raise CheckpointError(f"the recorded output has {check.get('numel')} values, the "
                              f"reloaded model gives {output.numel()}")
    a = torch.tensor(mine["sample"] + [mine["norm"]], dtype=torch.float64)
    b = torch.tensor(check["sample"] + [check["norm"]], dtype=torch.float64)
    return _relative(a, b)
