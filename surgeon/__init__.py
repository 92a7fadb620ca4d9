"""surgeon: trace PyTorch models into torch.fx graphs, find their residual adds and norms, and
rewrite them. Nothing heavy is imported until a public function is used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["apply", "attach", "convert", "grow", "inspect", "load", "save", "trace", "verify",
           "SurgeonError", "__version__"]

if TYPE_CHECKING:
    from surgeon.api import inspect, trace
    from surgeon.errors import SurgeonError
    from surgeon.applying import apply
    from surgeon.checkpoint import load, save
    from surgeon.converting import convert
    from surgeon.growth.grow import grow
    from surgeon.nn.stats import attach
    from surgeon.verifying import verify


def __getattr__(name: str) -> Any:
    if name in ("inspect", "trace"):
        from surgeon import api

        return getattr(api, name)
    if name == "apply":
        from surgeon.applying import apply

        return apply
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
    if name == "SurgeonError":
        from surgeon.errors import SurgeonError

        return SurgeonError
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
