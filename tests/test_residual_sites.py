"""Residual sites (issue 14): Identity and one-call projection shortcuts, branch sums that are no
residual (RepVGG, a MoE's shared expert), a block called N times, parallel blocks as one site
with two branches; AION exact at init on each."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo import (
    LoopedShared,
    TinyMoE,
    TinyRepVGG,
    hf_cohere,
    hf_gpt_neox_parallel,
    hf_resnet,
    tokens,
)

import surgeon
from surgeon.applying import plain_output
from surgeon.graph.example_inputs import default_example
from surgeon.graph.tracing import flatten, run_example
from surgeon.nn import AionResidual


def _out(model: torch.nn.Module, example) -> torch.Tensor:
    with torch.no_grad():
        return flatten(plain_output(run_example(model, example)))[0][0]


def _aion_delta(model: torch.nn.Module, example) -> tuple[float, int]:
    """max |Δ| of the first output after `aion` (eval), and how many AionResiduals it added."""
    model.eval()
    before = _out(model, example)
    model = surgeon.apply(model, "aion", example=example) or model
    model.eval()
    n = sum(isinstance(m, AionResidual) for m in model.modules())
    return (_out(model, example) - before).abs().max().item(), n


def _train_step(model: torch.nn.Module, example) -> None:
    model.train()
    out = flatten(plain_output(run_example(model, example)))[0][0]
    out.float().pow(2).mean().backward()
    grads = [p.grad for m in model.modules() if isinstance(m, AionResidual)
             for p in m.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_identity_and_one_call_projection_shortcuts() -> None:
    model, example = hf_resnet(), {"pixel_values": torch.randn(2, 3, 32, 32)}
    report = surgeon.inspect(model, example)
    assert len(report.residuals) == 4  # was 3: the one-call projection (conv+bn) was missed
    assert {r.skip_node for r in report.residuals} == {"shortcut"}  # Identity or projection
    delta, n = _aion_delta(model, example)
    assert (delta, n) == (0.0, 4)


def test_resnet_without_image_size_gets_224() -> None:
    model = hf_resnet()
    assert getattr(model.config, "image_size", None) is None
    assert default_example(model)["pixel_values"].shape == (2, 3, 224, 224)
    assert len(surgeon.inspect(model).residuals) == 4


def test_branch_sums_are_not_residuals() -> None:
    report = surgeon.inspect(TinyRepVGG(), (torch.randn(2, 3, 8, 8),))
    assert [r.module for r in report.residuals] == ["blocks.2"]  # the true x + f(x) only
    model, example = TinyMoE(), (torch.randn(2, 5, 16),)
    report = surgeon.inspect(model, example)
    assert not any(r.module.endswith(".moe") for r in report.residuals)  # routed + shared
    assert len(report.residuals) == 4
    delta, n = _aion_delta(model, example)
    assert (delta, n) == (0.0, 4)
    _train_step(model, example)


class _SplitSum(torch.nn.Module):
    """Res2Net-style: a part of a split added to another part's branch output."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = torch.nn.Conv2d(4, 4, 3, 1, 1), torch.nn.Conv2d(4, 4, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 8, h, w)
        a, b = x.chunk(2, dim=1)  # (b, 4, h, w) each
        y1 = self.f(a)
        return torch.cat([y1, self.g(b + y1)], 1)


class _OptionA(torch.nn.Module):
    """CIFAR ResNet's parameter-free shortcut: subsample and zero-pad the channels."""

    def __init__(self) -> None:
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, 2, 1), torch.nn.ReLU(),
                                     torch.nn.Conv2d(8, 8, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 4, h, w) -> (b, 8, h/2, w/2)
        return torch.relu(self.f(x) + F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))


def test_split_parts_are_no_skip_but_a_padded_shortcut_is() -> None:
    example = (torch.randn(2, 8, 6, 6),)
    assert surgeon.inspect(torch.nn.Sequential(_SplitSum()), example).residuals == []
    report = surgeon.inspect(torch.nn.Sequential(_OptionA()), (torch.randn(2, 4, 6, 6),))
    assert [(r.module, r.kind, r.skip_node) for r in report.residuals] == [("0", "plain", "pad")]


def test_shared_block_called_three_times() -> None:
    model, example = LoopedShared(times=3), (torch.randn(2, 5, 16),)
    report = surgeon.inspect(model, example)
    assert [(r.module, r.calls) for r in report.residuals] == [("block", 3)]
    assert report.counts()["residual_calls"] == 3
    delta, n = _aion_delta(model, example)
    assert (delta, n) == (0.0, 1)  # rewritten once, still shared by the three calls
    seen = []
    model.block.register_forward_hook(lambda *a: seen.append(1))
    _train_step(model, example)
    assert len(seen) == 3


@pytest.mark.parametrize("build, tol", [(hf_gpt_neox_parallel, 0.0), (hf_cohere, 1e-6)],
                         ids=["gpt_neox", "cohere"])
def test_parallel_block_is_one_site_with_two_branches(build, tol) -> None:
    model, example = build(), {"input_ids": tokens(128)}
    report = surgeon.inspect(model, example)
    assert len(report.residuals) == 2  # one site per layer, not an add per branch
    for r in report.residuals:
        assert len(r.branches) == 2 and r.skip_node and r.kind == "pre_norm"
    delta, n = _aion_delta(model, example)
    # Cohere adds (x + attn) + mlp; AION computes x + α·(attn + mlp): exact up to rounding
    assert n == 2 and delta <= tol
    _train_step(model, example)


def test_zero_growth_finds_both_branches_of_a_parallel_block() -> None:
    from surgeon.growth.branches import branch_outputs

    model, example = hf_gpt_neox_parallel(), {"input_ids": tokens(128)}
    trace, report = surgeon.trace(model, example), surgeon.inspect(model, example)
    assert branch_outputs(trace, report.residuals, "gpt_neox.layers.0") == [
        "gpt_neox.layers.0.attention.dense", "gpt_neox.layers.0.mlp.dense_4h_to_h"]


def test_cli_table_shows_calls_and_branches() -> None:
    from surgeon.cli import format_inspection

    looped = surgeon.inspect(LoopedShared(times=3), (torch.randn(2, 5, 16),))
    assert "block (x3 calls)" in format_inspection(looped, "looped")
    neox = surgeon.inspect(hf_gpt_neox_parallel(), {"input_ids": tokens(128)})
    assert format_inspection(neox, "neox").count("pre_norm, 2 parallel branches") == 2
