"""Hyper-connections on the layouts issue 14 found broken: shapes read off the folded stream
(class 1), per-add layouts (15), staged networks (21), Mamba (8), parallel blocks (5), ConvNeXt
(3), one stream handed in as several inputs (Funnel), stages reshaping around their layers
(CvT). Each model: exact at init, every residual add carried, a training step moves every new
parameter."""

from __future__ import annotations

import pytest
import torch
import zoo
from torch import nn

import surgeon
from surgeon.applying import apply, plain_output
from surgeon.graph.tracing import flatten, run_example
from surgeon.nn.hyper import (
    HyperConnections,
    StreamMixer,
    expand_streams,
    stream_permute,
    stream_shape,
    stream_view,
)
from surgeon.recipe import PassError

CASES = {c.name: c for c in zoo.ZOO}
CASES["hf_convnext"] = zoo.ZooCase("hf_convnext", zoo.hf_convnext,
                                   lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
                                   {"plain": 4}, {}, [2])
NAMES = ["flat_moe", "swin_nhwc", "conv_tokens", "parallel", "resnet", "hf_mixtral",
         "hf_convnext", "hf_mamba", "hf_neox_parallel", "same_inputs", "cls_stages"]


def loss(model: nn.Module, example: tuple | dict) -> torch.Tensor:
    out = flatten(plain_output(run_example(model, example)))[0]
    gen = torch.Generator().manual_seed(0)
    return sum((t.float() * torch.randn(t.shape, generator=gen)).sum() for t in out
               if isinstance(t, torch.Tensor) and t.is_floating_point())


def mixers(model: nn.Module) -> list[StreamMixer]:
    return [m for m in model.modules() if isinstance(m, StreamMixer)]


@pytest.mark.parametrize("name", NAMES)
def test_exact_at_init_covers_every_add_and_trains(name: str) -> None:
    torch.manual_seed(0)
    case = CASES[name]
    model, example = case.build().eval(), case.example()
    adds = sum(case.residuals.values())
    apply(model, ["hyper"], example)
    drift = model.surgeon_drift[-1]
    assert drift.max_abs <= 1e-5, drift
    assert len(mixers(model)) == adds == drift.modules
    assert model.surgeon_hyper_coverage == (
        f"covers {adds} of {adds} residual adds in {len(case.trunks)} trunk")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "hyper_" in n}
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-30)
    for _ in range(2):  # the dynamic scales move once the dynamic weights are non-zero
        opt.zero_grad()
        loss(model, example).backward()
        opt.step()
    params = dict(model.named_parameters())
    assert [n for n, v in before.items() if torch.equal(params[n].detach(), v)] == []


def test_shape_reads_on_the_folded_stream_see_one_stream() -> None:
    """FlatMoE reads (b, t, d) off the folded stream in its second block, flattens to
    (b·t, d) and views back after the reduce: the shape read returns one stream's shape."""
    case = CASES["flat_moe"]
    model, example = case.build().eval(), case.example()
    apply(model, ["hyper"], example)
    code = model.layers[1].code
    assert "stream_shape" in code and "stream_view" in code
    assert stream_shape(torch.zeros(8, 3, 5), 4) == (2, 3, 5)


def test_feature_axis_is_decided_at_each_add() -> None:
    """(B, H, W, C) with H = W = C: mixed along C, not H; an NCHW block whose second add runs
    on tokens: channels for the conv add, last for the token add."""
    for name, axes in (("swin_nhwc", [-1] * 8), ("conv_tokens", [1, -1, 1, -1]),
                       ("resnet", [1] * 4)):
        case = CASES[name]
        model = case.build().eval()
        apply(model, ["hyper"], case.example())
        assert [m.feature_axis for m in mixers(model)] == axes, name


def test_staged_network_is_one_trunk_through_the_strided_block() -> None:
    case = CASES["resnet"]
    model = case.build().eval()
    report = surgeon.inspect(model, case.example())
    assert (report.in_trunks(), len(report.residuals), len(report.trunks)) == (4, 4, 1)
    assert report.counts()["residuals_in_trunks"] == 4
    apply(model, ["hyper"], case.example())
    assert isinstance(model.layer2[0].hyper_2, HyperConnections)  # the downsampling block
    assert model.layer2[0].hyper_2.dynamic_alpha_fn.shape == (8, 5)  # mixes at its input width


def test_depth_weights_per_sample_where_the_block_changes_positions() -> None:
    n, m = 2, HyperConnections(2, 4)
    m.feature_axis = 1
    with torch.no_grad():
        m.dynamic_beta_fn.normal_()
    h = expand_streams(torch.randn(3, 4, 8, 8), n)  # (n·b, c, h, w)
    _, residuals, beta = m.width_connection(h)
    assert beta.shape == (n, 3, 64)
    proj = residuals[:, :, ::2, ::2]  # a strided shortcut on every stream: (n·b, c, 4, 4)
    y = torch.randn(3, 4, 4, 4)
    out = m.depth_connection(y, proj, beta).unflatten(0, (n, 3))
    weight = beta.mean(-1)  # (n, b)
    torch.testing.assert_close(out, proj.unflatten(0, (n, 3)) + weight[..., None, None, None] * y)


def test_parallel_block_is_one_residual_with_two_branches() -> None:
    """x + attn(ln1(x)) + mlp(ln2(x)): both branches read the branch input at batch b (the
    attention's mask is (t, t) of batch b), the streams get both outputs."""
    case = CASES["parallel"]
    model, example = case.build().eval(), case.example()
    seen = []
    model.layers[1].mlp.register_forward_hook(lambda m, a, o: seen.append(a[0].shape[0]))
    apply(model, ["hyper"], example)
    seen.clear()
    model(*example)
    assert seen == [2]
    code = model.layers[0].code
    assert code.count(".depth_connection(") == 1 and "_item_2, mlp)" in code  # two outputs


class CatBlock(nn.Module):
    """Joins the stream with itself along the batch between its residual adds."""

    def __init__(self) -> None:
        super().__init__()
        self.f, self.g = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.f(x)
        x = torch.cat([x[:1], x[1:]], dim=0)
        return x + self.g(x)


def test_batch_mixing_code_is_refused_in_one_line_before_anything_changes() -> None:
    model = nn.Sequential(CatBlock(), CatBlock()).eval()
    x = torch.randn(2, 3, 8)
    want = model(x)
    with pytest.raises(PassError, match=r"^hyper: 0 splits, joins or indexes .*exclude=0$"):
        apply(model, ["hyper"], (x,))
    assert not any(isinstance(m, StreamMixer) for m in model.modules())
    assert torch.equal(model(x), want)


def test_reshapes_of_folded_streams_act_per_stream() -> None:
    n, x = 3, torch.randn(2, 4, 5)
    h = expand_streams(x, n) + torch.arange(n).repeat_interleave(2)[:, None, None]  # distinct
    per = h.unflatten(0, (n, -1))  # (n, b, t, d)
    flat = stream_view(h, n, "view", -1, 5)  # (n·b·t, d): rows of each stream stay together
    torch.testing.assert_close(stream_view(flat, n, "view", 2, 4, 5), h)
    moved = stream_permute(h, n, "transpose", 0, 1)  # (n·t, b, d)
    torch.testing.assert_close(moved.unflatten(0, (n, -1)), per.transpose(1, 2))
    torch.testing.assert_close(stream_permute(h, n, "permute", 2, 0, 1).unflatten(0, (n, -1)),
                               per.permute(0, 3, 1, 2))


@pytest.mark.parametrize("name", ["parallel", "hf_mixtral"])
def test_coverage_after_aion_counts_the_aion_calls(name: str) -> None:
    torch.manual_seed(0)
    case = CASES[name]
    model, example = case.build().eval(), case.example()
    adds = sum(case.residuals.values())
    apply(model, ["aion", "hyper"], example)
    assert model.surgeon_hyper_coverage == (
        f"covers {adds} of {adds} residual adds in {len(case.trunks)} trunk")
