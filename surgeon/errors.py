"""Every failure a user can cause ends in a `SurgeonError` with a one-line message.

The message names the file, module, key or option at fault and says what to do. The CLI prints
`error: <message>` and exits non-zero; Python callers can catch `SurgeonError` (or a subclass).
What is allowed but probably not meant (a pass that changes nothing) is a `SurgeonWarning`, which
the CLI prints as one line `warning: <message>`.
"""

from __future__ import annotations


class SurgeonError(Exception):
    """Base class of all errors surgeon raises for a user's mistake."""


class SourceError(SurgeonError):
    """A model source (directory, hub id, `pkg.mod:factory`, weights file) cannot be used."""


class UntrustedCodeError(SourceError):
    """A checkpoint names code to import or run (a `pkg.mod:factory` base in `surgeon.json`, a
    config's `auto_map`) and the user did not opt in with `trust_remote_code=True` /
    `--trust-remote-code`; nothing of it was imported."""


# How a user allows a checkpoint's code, for the end of an `UntrustedCodeError`'s message.
TRUST_HINT = ("surgeon runs a checkpoint's code only if you trust it: pass --trust-remote-code "
              "(trust_remote_code=True in Python)")


class CheckpointError(SurgeonError):
    """A converted checkpoint (a directory `surgeon.save` or `surgeon convert` wrote) cannot be
    written or read back."""


class ExampleError(SurgeonError):
    """No example input was given and none can be built for this model, or the example fails."""


class TracingError(SurgeonError):
    """The model cannot be traced at all (no module of it produced a verified graph)."""


class SpecializationError(SurgeonError):
    """A traced module was called with an argument its graph was specialised away from.

    Tracing records one real call; non-tensor arguments (None, flags, ints) are baked into the
    graph.
    A later call that passes something else would silently take the wrong branch, so it raises this.
    """


class PromiseError(SurgeonError):
    """A pass that promises to preserve the output (`preserves()`) moved it by more on the
    example: a defect of that pass on this architecture, refused rather than handed back as a
    model that silently computes something else. `surgeon.apply` leaves the model unchanged."""


class SurgeonWarning(UserWarning):
    """Base class of the warnings surgeon gives; filter or escalate them by this class."""


class NoEffectWarning(SurgeonWarning):
    """A pass changed nothing: its `include=` / `exclude=` select no module of the model, or
    nothing in its scope is what it rewrites (as Composer's algorithms warn)."""


class ModuleError(SurgeonError):
    """A module could not be traced, verified or rewritten, or a rewritten module fails on the
    example. Names the module, its class, the reason (the first line of the torch error, where
    there was one) and the `exclude=` patterns that would skip it; `surgeon.apply` raises it
    with the model left exactly as it was."""

    def __init__(self, module: str, module_class: str, reason: str,
                 exclude: tuple[str, ...] = (), pass_name: str = "") -> None:
        self.module, self.module_class, self.reason = module, module_class, reason
        self.exclude, self.pass_name = exclude or (module,), pass_name
        patterns = ", ".join(repr(p) for p in self.exclude)
        flags = " ".join(f"--exclude {p!r}" for p in self.exclude)
        where = f"pass {pass_name!r}: " if pass_name else ""
        super().__init__(f"{where}{module or '<root>'} ({module_class}): {reason}; the model is "
                         f"unchanged; to skip it pass exclude=[{patterns}] (CLI: {flags})")
