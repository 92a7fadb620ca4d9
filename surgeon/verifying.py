"""`surgeon.verify(path, against=None)`: does a converted checkpoint load and keep its promises?

It reloads the checkpoint strictly (`surgeon.load`, in the dtypes it was converted in), checks
the sha256 of every stored tensor (weights and example) against the digests `surgeon.json`
recorded when they were written, runs the recorded example and compares the output with the
signature recorded at conversion: bit for bit where its digest matches, else within a tolerance
that fits the dtype the model computes in. The drift table is the one
recorded at conversion, or, `against` a source model, measured afresh by replaying the passes
on it; then the reloaded output must also match that conversion of the source. A pass that
promises to preserve the model's function (`PassConfig.preserves`) and drifts more fails it.

A calibrated pass (`adyt:calibrate=true`) promises nothing; its row shows the cosine it reached
on its calibration inputs at conversion (`Drift.calibrated`). `against` a source, the replay
calibrates on the same batches (stored in `calibration.safetensors`) and must reach the same.
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
    load,
    output_signature,
    read_calibration_batches,
    read_example,
    resolve_dtype,
)
from surgeon.errors import CheckpointError, NoEffectWarning
from surgeon.files.digests import output_digest, tensor_digests
from surgeon.files.recipe_file import CALIBRATION, EXAMPLE, RECIPE, read_recipe
from surgeon.graph.example_inputs import example_for
from surgeon.graph.tracing import run_example

MATCH = 1e-4  # relative max difference under which two float32 outputs count as the same
# ... and for a model that computes in another dtype (a few units of its rounding error,
# accumulated over the layers; the weights themselves are proven by their digests)
TOLERANCES = {"float64": MATCH, "float32": MATCH, "float16": 5e-3, "bfloat16": 2e-2}


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
    dtype: str | None = None  # the dtype the checkpoint was converted in (None: not recorded)
    tolerance: float = MATCH  # relative difference the output comparisons allow
    digests: int | None = None  # tensors whose sha256 was checked (None: none recorded)
    identical: bool | None = None  # the output has the recorded sha256 (None: none recorded)

    @property
    def ok(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify(path: str | os.PathLike, against: str | None = None, *,
           revision: str | None = None, allow_pickle: bool = False,
           dtype: torch.dtype | str | None = None,
           trust_remote_code: bool = False) -> Verification:
    """Check the converted checkpoint at `path` (see the module docstring). `dtype` loads and
    runs it in another dtype (e.g. "float32"); the tolerance is then the looser of the two.
    `allow_pickle` lets `against` be read from .bin/.pt weights. A checkpoint whose base is a
    `package.module:factory`, or an `against` directory with code of its own (`auto_map`), runs
    that code only with `trust_remote_code=True`."""
    root = Path(path)
    wanted = resolve_dtype(dtype)
    recipe = read_recipe(root)
    model = load(root, dtype=wanted, trust_remote_code=trust_remote_code)
    recorded_dtype = recipe.get("dtype") if isinstance(recipe.get("dtype"), str) else None
    tolerance = max(TOLERANCES.get(recorded_dtype or "float32", 2e-2),
                    TOLERANCES.get(str(wanted).removeprefix("torch.") if wanted else "", MATCH))
    failures, digests = check_digests(root, recipe.get("digests"))
    if digests is None and isinstance(recipe.get("format"), int) and recipe["format"] >= 2:
        failures.append(f"{RECIPE} records no digests, which every checkpoint of its format "
                        "has: it was edited; convert the model again")
    example = read_example(recipe.get("example", {"default": True}), root)
    output = _output(model, example)
    reload_difference = identical = None
    check = recipe.get("check")
    if not check and against is None:  # nothing to compare with: never "ok" unchecked
        failures.append(f"{root / RECIPE} records no output to compare the reloaded model "
                        "with; verify it --against its source")
    if check:
        identical = output_digest(output) == check["sha256"] if "sha256" in check else None
        reload_difference = 0.0 if identical else _signature_difference(output, check)
        if not reload_difference <= tolerance:
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
                apply(base, recipe["passes"], example,
                      calibration=read_calibration_batches(recipe.get("calibration"), root))
        drifts = list(base.surgeon_drift)
        converted = _output(base, example)
        source_difference = _relative(output, converted)
        if not source_difference <= tolerance:
            failures.append(f"the checkpoint's output differs from {against} converted with "
                            f"its passes (relative {source_difference:.3g}); it was changed "
                            "after conversion, or converted from another model")
    recorded = {d["pass_name"]: d.get("calibrated") for d in recipe.get("drift", [])}
    rows = []
    for d in drifts:
        then = recorded.get(d.pass_name)
        moved = (d.calibrated is not None and then is not None
                 and not abs(d.calibrated["cosine"] - then["cosine"]) <= max(tolerance, 1e-6))
        rows.append({"name": d.pass_name, "modules": d.modules, "step": d.step,
                     "promise": d.promise, "max_abs": d.max_abs, "cosine": d.cosine,
                     "calibrated": d.calibrated, "ok": not d.broken and not moved})
        if d.broken:
            failures.append(f"pass {d.pass_name} promises to preserve the output within "
                            f"{d.promise:g} but moved it by {d.step:.3g}")
        if moved:
            failures.append(f"pass {d.pass_name} reached cosine {then['cosine']:.6f} on its "
                            f"calibration inputs at conversion, {d.calibrated['cosine']:.6f} "
                            f"replayed on {against}")
    return Verification(str(root), type(model).__name__, against, rows, reload_difference,
                        source_difference, failures, recorded_dtype, tolerance, digests, identical)


def check_digests(root: Path, record: Any) -> tuple[list[str], int | None]:
    """Compare the sha256 of every tensor in `root`'s weights and example with `record` (the
    `digests` of surgeon.json): (one failure per changed, missing or added tensor, naming it;
    the number of tensors checked, None where nothing was recorded, as in older checkpoints)."""
    if record is None:
        return [], None
    from surgeon.files.weights import Checkpoint

    if not isinstance(record, dict) or record.get("algorithm") != "sha256":
        raise CheckpointError(f"{root / RECIPE}: 'digests' is not a sha256 record")
    failures, checked = [], 0
    for part, opened in (("weights", lambda: Checkpoint.open(root)),
                         ("example", lambda: Checkpoint.open(root / EXAMPLE)),
                         ("calibration", lambda: Checkpoint.open(root / CALIBRATION))):
        wanted = record.get(part)
        if wanted is None:
            continue
        if not isinstance(wanted, dict):
            raise CheckpointError(f"{root / RECIPE}: digests.{part} is not an object")
        file = {"example": EXAMPLE, "calibration": CALIBRATION}.get(part)
        if file is not None and not (root / file).is_file():
            failures.append(f"{file} is missing (surgeon wrote it)")
            continue
        stored = opened()
        found = tensor_digests(stored)
        for key in sorted(set(wanted) | set(found)):
            where = stored[key].file.name if key in stored else part
            if key not in found:
                failures.append(f"tensor {key} is missing from the {part} (surgeon wrote it)")
            elif key not in wanted:
                failures.append(f"tensor {key} in {where} was not written by surgeon")
            elif found[key] != wanted[key]:
                failures.append(f"tensor {key} in {where} differs from what surgeon wrote (its "
                                "sha256, dtype or shape changed)")
        checked += len(found)
    return failures, checked


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
