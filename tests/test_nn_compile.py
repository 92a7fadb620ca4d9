"""Every runtime module: no graph break (so no `.item()`, `.tolist()` or branch on a tensor
value) in forward, whole-graph compile of forward and backward equal to eager, and no host sync
on CUDA. A new module joins by adding a row to CASES."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

from surgeon.nn import (
    ADyT,
    AionResidual,
    HyperConnections,
    ManifoldHyperConnections,
    attach,
    expand_streams,
    reduce_streams,
)

D = 16


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    attached: bool = False


def ffn() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))


class StreamBlock(nn.Module):
    """expand → one mixer around a branch → reduce: the whole stream protocol in one graph."""

    def __init__(self, mixer: nn.Module, n: int) -> None:
        super().__init__()
        self.mixer, self.n = mixer, n

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_streams(self.mixer(expand_streams(x, self.n)), self.n)


def three() -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(2, 5, D) for _ in range(3))


CASES = [
    Case("aion", AionResidual, three),
    Case("aion-attached", AionResidual, three, attached=True),
    Case("aion-rezero", lambda: AionResidual.from_preset("rezero"), three),
    Case("hc", lambda: StreamBlock(HyperConnections(4, D, layer_index=1, branch=ffn()), 4),
         lambda: (torch.randn(2, 5, D),)),
    Case("mhc", lambda: StreamBlock(ManifoldHyperConnections(4, D, layer_index=1, branch=ffn()),
                                    4), lambda: (torch.randn(2, 5, D),)),
    Case("adyt", lambda: ADyT(D), lambda: (torch.randn(2, 5, D),)),
    Case("dyt", lambda: ADyT(D, adaptive=False), lambda: (torch.randn(2, 5, D),)),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> None:
    dynamo.reset()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("training", [True, False])
def test_no_graph_breaks(case: Case, training: bool) -> None:
    module = case.build().train(training)
    if case.attached:
        attach(module)
    explanation = dynamo.explain(module)(*case.inputs())
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_fullgraph_compile_forward_backward_matches_eager(case: Case) -> None:
    eager = case.build()
    compiled = copy.deepcopy(eager)
    handles = [attach(m) for m in (eager, compiled)] if case.attached else []
    inputs = [t.requires_grad_() for t in case.inputs()]
    inputs_c = [t.detach().clone().requires_grad_() for t in inputs]
    out = eager(*inputs)
    out_c = torch.compile(compiled, fullgraph=True, backend="aot_eager")(*inputs_c)
    torch.testing.assert_close(out_c, out)
    out.square().sum().backward()
    out_c.square().sum().backward()
    for a, b in zip(inputs, inputs_c):
        torch.testing.assert_close(b.grad, a.grad)
    for (name, p), p_c in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(p_c.grad, p.grad, msg=name)
    for (name, b), b_c in zip(eager.named_buffers(), compiled.buffers()):
        torch.testing.assert_close(b_c, b, msg=name)  # the in-forward EMA moved the same way
    for h, h_c in zip(handles[:1], handles[1:]):
        torch.testing.assert_close(h_c.pending, h.pending)
        assert h.pending[0, 1].item() == 10  # 2 × 5 tokens recorded, under compile too


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_no_host_sync_on_cuda(case: Case) -> None:
    module = case.build().cuda()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3)
    attach(module, opt)
    inputs = [t.cuda() for t in case.inputs()]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(*inputs).square().sum().backward()
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_attached_blocks_compiled_one_by_one_share_their_graphs() -> None:
    """Each AION writes its statistics through a tensor view, not a row number the compiled
    code would specialise on (which recompiled once per layer, up to dynamo's limit)."""
    from torch._dynamo.utils import counters

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.aion = nn.Linear(D, D), AionResidual()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.aion(x, self.lin(x), x)

    blocks = nn.Sequential(*[Block() for _ in range(12)])
    handle = attach(blocks)
    counters.clear()
    x = torch.randn(2, 3, D)
    for block in blocks:
        x = torch.compile(block, backend="eager")(x)
    assert counters["stats"]["unique_graphs"] <= 2
    assert handle.pending[:, 1].tolist() == [6.0] * 12
