"""The Python face on a model: `surgeon.inspect`, `surgeon.trace` and `surgeon.apply`.

`inspect` and `trace` only read the model. `apply(model, passes, example)` runs passes over it,
in place, and reports drift.

Each pass sees the model as the previous one left it (traced again), rewrites the graphs of the
modules in its scope, and the edited modules go back in their places; the model keeps its class,
call signature and every original parameter. A pass already applied with the same config is
skipped, so applying the same passes again changes nothing. After each pass the output on the
example is compared with the original's: `model.surgeon_drift` lists max |Δ| and cosine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from surgeon.errors import ExampleError, ModuleError, NoEffectWarning, PromiseError, SurgeonError
from surgeon.graph.blame import culprit, error_line
from surgeon.graph.example_inputs import example_for
from surgeon.graph.find import inspect_trace
from surgeon.graph.report import Inspection
from surgeon.graph.rewrite import Surgery
from surgeon.graph.tracing import ModelTrace, flatten, trace_model
from surgeon.graph.undo import snapshot
from surgeon.recipe import PassConfig, PassError, parse_pass


def trace(model: nn.Module, example: tuple | dict | None = None) -> ModelTrace:
    """Record `example` on `model` and capture a verified torch.fx graph for every module that
    can be traced (see `surgeon.graph.tracing`). `example=None` builds one for transformers
    models."""
    return trace_model(model, example_for(model, example))


def inspect(model: nn.Module, example: tuple | dict | None = None) -> Inspection:
    """Find the residual adds, LayerNorm/RMSNorm layers and residual trunks of `model`.

    `example` is a tuple of positional args or a dict of keyword args for one forward call; for
    transformers models `None` builds a small input from the config. Analysis only: the model is
    not changed (its train/eval mode is restored).
    """
    if not isinstance(model, nn.Module):
        raise ExampleError(f"surgeon.inspect expects an nn.Module, got {type(model).__name__}")
    return inspect_trace(trace(model, example))


@dataclass(frozen=True)
class Drift:
    """How far the output on the example moved after a pass (cumulative from the original)."""

    pass_name: str
    max_abs: float
    cosine: float
    modules: int  # modules the pass created or replaced
    step: float = 0.0  # max |Δ| from the output before this pass, relative to its max |value|
    promise: float | None = None  # the pass's `preserves()`: the largest `step` it allows
    # a pass that calibrated (`calibrate=true`): the output on its calibration inputs measured
    # against the original's after it ran: {"inputs": "calibration" | "example", "batches",
    # "cosine", "max_abs"}. No promise: a measurement `surgeon verify` reports and re-measures
    calibrated: dict[str, Any] | None = None

    @property
    def broken(self) -> bool:
        """The pass promised to preserve the output and moved it more than it allows."""
        return self.promise is not None and not self.step <= self.promise


def output_vector(output: Any) -> torch.Tensor:
    tensors = [t.detach().double().flatten() for t in flatten(plain_output(output))[0]
               if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if not tensors:
        raise ExampleError("the model's output on the example holds no floating-point tensor")
    return torch.cat(tensors)


def plain_output(output: Any) -> Any:
    """ModelOutput and other mappings → dict, so the pytree can read them."""
    if isinstance(output, dict) or hasattr(output, "to_tuple"):
        return {k: output[k] for k in output.keys()}
    return output


def drift(before: torch.Tensor, after: torch.Tensor, pass_name: str, modules: int,
          previous: torch.Tensor | None = None, promise: float | None = None) -> Drift:
    """Drift of `after` from the original output `before` (and from `previous`, the output
    just before this pass; the original where omitted)."""
    if before.shape != after.shape:
        raise PassError(f"{pass_name}: the output's shape changed ({tuple(before.shape)} → "
                        f"{tuple(after.shape)})")
    previous = before if previous is None else previous
    if bool(torch.isnan(before).any() or torch.isnan(previous).any()):
        raise PassError(f"{pass_name}: the model's output on the example already held NaN "
                        "before this pass ran; check the base model and the example")
    # ±inf the model itself outputs (masked scores) must stay where they are; nothing else may
    # become NaN or infinite
    finite = torch.isfinite(before) & torch.isfinite(previous)
    kept = torch.where(finite, torch.isfinite(after), after == previous)
    if not bool(kept.all()):
        bad = int((~kept).sum())
        raise PassError(f"{pass_name}: the output on the example holds NaN or Inf after this "
                        f"pass ({bad} of {after.numel()} values); check its options")
    if not bool(finite.all()):
        before, previous, after = before[finite], previous[finite], after[finite]
    if before.numel() == 0:
        return Drift(pass_name, 0.0, 1.0, modules, 0.0, promise)
    cos = torch.nn.functional.cosine_similarity(before, after, dim=0, eps=1e-30)
    step = float((previous - after).abs().max() / previous.abs().max().clamp_min(1e-30))
    if not (math.isfinite(step) and math.isfinite(float(cos))):
        raise PassError(f"{pass_name}: the drift on the example is not finite (step {step}, "
                        f"cosine {float(cos)}); check its options")
    return Drift(pass_name, float((before - after).abs().max()), float(cos), modules, step,
                 promise)


def _recorded_output(surgery: Surgery) -> Any:
    """The model's output on the example as tracing recorded it (eval, no gradients)."""
    call = surgery.trace.calls.get("")
    return call.output if call is not None and call.out_ids else surgery.run_example()


def no_effect(config: PassConfig, surgery: Surgery) -> str:
    """Why `config` changed nothing on `surgery`'s model, in one line that says what to fix."""
    model = type(surgery.model).__name__
    patterns = [f"{key}={'|'.join(getattr(config, key))}" for key in ("include", "exclude")
                if getattr(config, key)]
    scope = " ".join(patterns)
    names = [n for n, _ in surgery.model.named_modules() if n]
    if scope and not any(config.selects(n) for n in names):
        return (f"pass {config.name!r} changed nothing: {scope} selects no module of {model} "
                f"(its modules are named like {', '.join(names[:3]) or 'nothing'}); "
                "fix the patterns")
    where = f"the modules of {model} that {scope} selects" if scope else model
    untraced = [u for u in surgery.inspection.untraced if config.selects(u.module)]
    hint = (f"; {len(untraced)} module{'s' * (len(untraced) != 1)} in scope could not be traced "
            "(`surgeon inspect` says why)" if untraced else "")
    return f"pass {config.name!r} changed nothing: found no {config.rewrites} in {where}{hint}"


def applied_passes(model: nn.Module) -> list[dict[str, Any]]:
    """The JSON configs of the passes applied to `model`, in order."""
    return list(getattr(model, "_surgeon_passes", []))


def _check_order(done: list[dict[str, Any]], configs: list[PassConfig]) -> None:
    """Refuse a pass placed after one it must precede (already-applied configs are skipped)."""
    seen = [d["_type"] for d in done]
    for config in configs:
        if config.to_json() in done:
            continue
        late = [name for name in seen if name in config.runs_before]
        if late:
            raise PassError(f"apply {config.name} before {late[0]}: "
                            f"{config.runs_before_reason}")
        seen.append(config.name)


def apply(model: nn.Module, passes: list[str | PassConfig] | str | PassConfig,
          example: tuple | dict | None = None, *, calibrate: bool = False,
          exclude: Sequence[str] = (), calibration: Sequence[Any] | None = None) -> nn.Module:
    """Rewrite `model` in place with `passes` (configs, names like `"aion"`, or
    `"name:key=value,..."`) and return it; see the module docstring. `calibrate=True` turns on
    the passes' calibration (ADyT fits each ADyT to the norm it replaces). `calibration` is a
    list of batches, each like `example` (a dict or tuple of forward inputs, or a tensor of
    token ids) that calibration runs on instead of the example; a calibrating pass's drift
    report records the cosine it reached on them (`Drift.calibrated`).
    `exclude` holds fnmatch patterns of module names that no pass touches (added to each
    pass's own `exclude`).

    All or nothing: on any error (also KeyboardInterrupt) the model is put back exactly as it
    was (the same module and parameter objects, buffers, attributes) before the error rises;
    an error in a module names it, its class and the `exclude=` that would skip it."""
    if not isinstance(model, nn.Module):
        raise PassError(f"surgeon.apply expects an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = (exclude,)
    if isinstance(passes, (str, PassConfig)):
        passes = [passes]
    configs = [parse_pass(p) for p in passes]
    if calibrate:
        configs = [dataclasses.replace(c, calibrate=True) if hasattr(c, "calibrate") else c
                   for c in configs]
    if exclude:
        configs = [dataclasses.replace(c, exclude=tuple(c.exclude) + tuple(
            p for p in exclude if p not in c.exclude)) for c in configs]
    batches = calibration_batches(calibration, configs)
    saved = snapshot(model)
    try:
        return _apply(model, configs, example, batches)
    except BaseException:
        saved.restore()
        raise


def calibration_batches(calibration: Sequence[Any] | None, configs: list[PassConfig]
                        ) -> list[tuple | dict] | None:
    """`calibration` as forward inputs (a tensor of token ids becomes `(ids,)`), checked: a
    non-empty list, and at least one pass in `configs` that calibrates."""
    if calibration is None:
        return None
    if isinstance(calibration, (torch.Tensor, dict)) or not isinstance(calibration, Sequence) \
            or not calibration:
        raise ExampleError("calibration must be a non-empty list of batches, each a dict or "
                           "tuple of forward inputs or a tensor of token ids")
    require_calibrating_pass(configs)
    batches: list[tuple | dict] = []
    for i, batch in enumerate(calibration):
        if isinstance(batch, torch.Tensor):
            batch = (batch,)
        if isinstance(batch, list):
            batch = tuple(batch)
        if not isinstance(batch, (tuple, dict)):
            raise ExampleError(f"calibration batch {i} is a {type(batch).__name__}: give a dict "
                               "or tuple of forward inputs, or a tensor of token ids")
        batches.append(batch)
    return batches


def require_calibrating_pass(configs: list[PassConfig]) -> None:
    """Refuse calibration inputs that no pass would use (a forgotten `calibrate=true`)."""
    if not any(getattr(c, "calibrate", False) for c in configs):
        raise PassError("calibration inputs were given but no pass calibrates; turn it on with "
                        "calibrate=true (e.g. -p adyt:calibrate=true)")


def _calibration_output(surgery: Surgery) -> torch.Tensor:
    """The model's outputs on `surgery`'s calibration batches, as one vector."""
    return torch.cat([output_vector(out) for out in surgery.run_calibration()])


def _apply(model: nn.Module, configs: list[PassConfig], example: tuple | dict | None,
           calibration: list[tuple | dict] | None = None) -> nn.Module:
    if not hasattr(model, "_surgeon_example"):
        model._surgeon_example = example  # what surgeon.save records (None: the default one)
    if calibration is not None:  # ... and the batches calibration fitted on
        model._surgeon_calibration = calibration
    example = example_for(model, example)
    done = applied_passes(model)
    _check_order(done, configs)
    reference: torch.Tensor | None = None  # the output before any pass ran
    reports: list[Drift] = list(getattr(model, "surgeon_drift", []))
    pending: tuple[PassConfig, list[str], torch.Tensor] | None = None
    current: torch.Tensor | None = None
    surgery: Surgery | None = None
    rewrote: dict[str, list[str]] = {}  # pass name → the modules it created or replaced
    calibrated: dict[str, dict[str, Any]] = {}  # pass name → `Drift.calibrated`
    calibration_reference: torch.Tensor | None = None  # the original's calibration outputs
    for config in configs:
        if config.to_json() in done:
            continue
        with _blaming(model, surgery, pending[0].name if pending else "",
                      "fails on the example after this pass", ExampleError):
            surgery = Surgery(model, example, calibration=calibration)
        with _blaming(model, surgery, config.name, "rewriting it failed"):
            config = config.resolved(surgery)
        if config.to_json() in done:  # what `recipe=auto` and the like decide: already applied
            continue
        # Tracing ran the model once: its output is the one before this pass and after the last.
        current = output_vector(_recorded_output(surgery))
        if reference is None:
            reference = current
            if any(getattr(c, "calibrate", False) for c in configs):  # the original's outputs
                with _blaming(model, surgery, "", "fails on the calibration inputs"):
                    calibration_reference = _calibration_output(surgery)
        if pending is not None:
            reports.append(drift(reference, current, pending[0].name, len(pending[1]),
                                 pending[2], pending[0].preserves()))
        calibrates = bool(getattr(config, "calibrate", False))
        with _blaming(model, surgery, config.name, "rewriting it failed", touched=True):
            new = config.run(surgery)
            if not new:
                warnings.warn(no_effect(config, surgery), NoEffectWarning, stacklevel=3)
            surgery.commit()
        with _blaming(model, surgery, config.name, "fails on the example after this pass"):
            config.after_commit(surgery, new)
        if calibrates and calibration_reference is not None:
            with _blaming(model, surgery, config.name, "fails on the calibration inputs"):
                measured = drift(calibration_reference, _calibration_output(surgery),
                                 config.name, len(new))
            calibrated[config.name] = {
                "inputs": "example" if calibration is None else "calibration",
                "batches": len(calibration or [example]), "cosine": measured.cosine,
                "max_abs": measured.max_abs}
        done.append(config.to_json())
        pending = (config, new, current)
        rewrote[config.name] = new
        model._surgeon_manifest = getattr(model, "_surgeon_manifest", []) + new
    if pending is not None and surgery is not None:
        with _blaming(model, surgery, pending[0].name, "fails on the example after this pass"):
            current = output_vector(surgery.run_example())
        reports.append(drift(reference, current, pending[0].name, len(pending[1]), pending[2],
                             pending[0].preserves()))
    old = len(getattr(model, "surgeon_drift", []))
    reports[old:] = [dataclasses.replace(r, calibrated=calibrated[r.pass_name])
                     if r.pass_name in calibrated else r for r in reports[old:]]
    for report in reports[old:]:
        _keep_promise(report, model, rewrote.get(report.pass_name, []))
    model._surgeon_passes = done
    model.surgeon_drift = reports
    if current is not None:
        model._surgeon_output = current  # what surgeon.json records for `surgeon verify`
    return model


def _keep_promise(report: Drift, model: nn.Module, rewrote: list[str]) -> None:
    """Refuse a pass that moved the output more than it promises: in half precision the bound
    is at least 32 ulps of the output's dtype (rewrites reorder roundings)."""
    if report.promise is None:
        return
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    bound = max(report.promise, 32 * torch.finfo(dtype).eps) if dtype.itemsize < 4 else (
        report.promise)
    if report.step <= bound:
        return
    shown = ", ".join(rewrote[:3]) + (f" and {len(rewrote) - 3} more" if len(rewrote) > 3 else "")
    raise PromiseError(
        f"pass {report.pass_name!r} promises to keep the output within {bound:.0e} (max |Δ| / "
        f"max |y| on the example) but moved it by {report.step:.3g}; the model is unchanged. "
        f"This is a surgeon defect on this architecture: please report it; to convert around it, "
        f"exclude= the modules it rewrote ({shown or 'none'}) one at a time")


@contextlib.contextmanager
def _blaming(model: nn.Module, surgery: Surgery | None, pass_name: str, what: str,
             also: type[Exception] | None = None, touched: bool = False) -> Iterator[None]:
    """Turn an error that is not a surgeon error (or is an `also` one, raised by running a
    model a pass rewrote) into a `ModuleError` naming the module it came from: the module the
    pass was working on (`touched`), else the innermost running module that `surgery`
    changed."""
    try:
        yield
    except ModuleError as e:
        if e.pass_name or not pass_name:
            raise
        raise ModuleError(e.module, e.module_class, e.reason, e.exclude, pass_name) from e
    except SurgeonError as e:
        if also is None or not isinstance(e, also) or surgery is None or not pass_name:
            raise
        raise _module_error(model, surgery, e.__cause__ or e, pass_name, what, touched) from e
    except Exception as e:
        if surgery is None:
            raise
        raise _module_error(model, surgery, e, pass_name, what, touched) from e


def _module_error(model: nn.Module, surgery: Surgery, e: BaseException, pass_name: str,
                  what: str, touched: bool) -> ModuleError:
    if touched and surgery.touching is not None:
        name, patterns = surgery.touching, (surgery.touching,)
    else:
        name, patterns = culprit(e, model, surgery.changed)
    try:
        cls = type(model.get_submodule(name)).__name__
    except AttributeError:
        cls = "?"
    return ModuleError(name, cls, f"{what}: {error_line(e)}", patterns, pass_name)
