"""The Python face: `surgeon.inspect(model, example)` and `surgeon.trace(model, example)`."""

from __future__ import annotations

from torch import nn

from surgeon.errors import ExampleError
from surgeon.find import inspect_trace
from surgeon.report import Inspection
from surgeon.tracing import ModelTrace, trace_model


def _example_for(model: nn.Module, example: tuple | dict | None) -> tuple | dict:
    if example is not None:
        if not isinstance(example, (tuple, list, dict)):
            raise ExampleError(
                f"example must be a tuple of positional args or a dict of keyword args, "
                f"not {type(example).__name__}")
        return tuple(example) if isinstance(example, list) else example
    from surgeon.example_inputs import default_example

    return default_example(model)


def trace(model: nn.Module, example: tuple | dict | None = None) -> ModelTrace:
    """Record `example` on `model` and capture a verified torch.fx graph for every module that
    can be traced (see `surgeon.tracing`). `example=None` builds one for transformers models."""
    return trace_model(model, _example_for(model, example))


def inspect(model: nn.Module, example: tuple | dict | None = None) -> Inspection:
    """Find the residual adds, LayerNorm/RMSNorm layers and residual trunks of `model`.

    `example` is a tuple of positional args or a dict of keyword args for one forward call; for
    transformers models `None` builds a small input from the config. Analysis only: the model is
    not changed (its train/eval mode is restored).
    """
    if not isinstance(model, nn.Module):
        raise ExampleError(f"surgeon.inspect expects an nn.Module, got {type(model).__name__}")
    return inspect_trace(trace(model, example))
