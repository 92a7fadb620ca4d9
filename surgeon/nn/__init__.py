"""The modules that rewritten graphs call, usable on their own as well.

`AionResidual` (adaptive residual scale), `HyperConnections` / `ManifoldHyperConnections`
(n residual streams; mHC), `ADyT` (adaptive dynamic tanh, DyT with adaptation off),
`InputScale` (DyT's learnable scale on the trunk input), and
`attach(model, optimizer)`, which moves their statistics to the optimizer step (and warns with
`ParametersNotOptimizedWarning` about trainable parameters the optimizer does not hold).
"""

from surgeon.nn.adyt import ADyT, dyt_llama_alpha0
from surgeon.nn.aion import AionResidual
from surgeon.nn.hyper import (
    ExpandStreams,
    HyperConnections,
    ReduceStreams,
    expand_streams,
    reduce_streams,
)
from surgeon.nn.input_scale import InputScale
from surgeon.nn.mhc import ManifoldHyperConnections, hyper_connections, sinkhorn
from surgeon.nn.stats import (
    Attachment,
    ParametersNotOptimizedWarning,
    attach,
    unoptimized_parameters,
)

__all__ = [
    "ADyT",
    "AionResidual",
    "Attachment",
    "ExpandStreams",
    "HyperConnections",
    "InputScale",
    "ManifoldHyperConnections",
    "ParametersNotOptimizedWarning",
    "ReduceStreams",
    "attach",
    "dyt_llama_alpha0",
    "expand_streams",
    "hyper_connections",
    "reduce_streams",
    "sinkhorn",
    "unoptimized_parameters",
]
