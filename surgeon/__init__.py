"""surgeon: trace PyTorch models into torch.fx graphs, find their residual adds and norms, and
rewrite them. Nothing heavy is imported until a public function is used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from surgeon.version import __version__

__all__ = ["apply", "attach", "convert", "grow", "inspect", "load", "save", "trace", "verify",
           "NoEffectWarning", "SurgeonError", "SurgeonWarning", "__version__"]

if TYPE_CHECKING:
    from surgeon.applying import apply, inspect, trace
    from surgeon.checkpoint import load, save
    from surgeon.converting import convert
    from surgeon.errors import NoEffectWarning, SurgeonError, SurgeonWarning
    from surgeon.growth.grow import grow
    from surgeon.nn.stats import attach
    from surgeon.verifying import verify


def __getattr__(name: str) -> Any:
    if name in ("apply", "inspect", "trace"):
        from surgeon import applying

        return getattr(applying, name)
    if name == "convert":
        from surgeon.converting import convert

        return convert
    if name == "grow":
        from surgeon.growth.grow import grow

        return grow
    if name == "verify":
        from surgeon.verifying import verify

        return verify
    if name in ("save", "load"):
        from surgeon import checkpoint

        return getattr(checkpoint, name)
    if name == "attach":
        from surgeon.nn.stats import attach

        return attach
    if name in ("NoEffectWarning", "SurgeonError", "SurgeonWarning"):
        from surgeon import errors

        return getattr(errors, name)
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
