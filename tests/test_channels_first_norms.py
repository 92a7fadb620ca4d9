"""ADyT on channels-first norms (a `LayerNorm2d`: permute, norm, permute back; a norm over dim
1; transformers ConvNeXt's `data_format="channels_first"`): converted over the channel axis."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import TinyConvNext, hf_convnext

from surgeon import apply
from surgeon.nn.adyt import ADyT
from surgeon.recipe import PassError


def _out(o: object) -> torch.Tensor:
    return o if isinstance(o, torch.Tensor) else o.last_hidden_state


@pytest.mark.parametrize("build, channels_first", [
    (TinyConvNext, {"stem.1", "down.0"}),
    (hf_convnext, {"embeddings.layernorm", "encoder.stages.1.downsampling_layer.0"})])
def test_channels_first_norms_convert(build, channels_first: set[str]) -> None:
    model = build().eval()
    with torch.no_grad():  # gains and biases that are not 1 and 0, to see them carried over
        for m in model.modules():
            if hasattr(m, "weight") and isinstance(getattr(m, "bias", None), torch.Tensor) \
                    and m.weight.dim() == 1 and not isinstance(m, nn.Linear):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    norms = {n: copy.deepcopy(m) for n, m in model.named_modules()
             if n in channels_first}
    example = torch.randn(2, 3, 32, 32)
    converted = apply(model, ["adyt"], (example,))
    adyts = {n: m for n, m in converted.named_modules() if isinstance(m, ADyT)}
    assert len(adyts) == 7
    assert {n for n, m in adyts.items() if m.channels_first} == channels_first
    x = torch.randn(2, 16, 8, 8)
    for name in channels_first:
        adyt = adyts[name]
        assert torch.equal(adyt.weight, norms[name].weight)
        assert torch.equal(adyt.bias, norms[name].bias)
        # the same as DyT over the last axis of the channels-last view
        last = torch.tanh(adyt.alpha() * x.permute(0, 2, 3, 1)) * adyt.weight + adyt.bias
        assert (adyt(x) - last.permute(0, 3, 1, 2)).abs().max() < 1e-6
    converted.train()
    out = _out(converted(example))
    out.square().mean().backward()
    for name in channels_first:
        assert adyts[name].weight.grad is not None and adyts[name].alpha0.grad is not None


class AxisLayerNorm(nn.LayerNorm):
    """A norm over dim 2 of a 4-D tensor: neither the last axis nor the channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(2, -1)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).movedim(
            -1, 2)


class Odd(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(7, 7) for _ in range(2))
        self.norm = AxisLayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 5, 16, 7)
        for b in self.blocks:
            x = x + b(x)
        return self.norm(x)


def test_norm_on_another_axis_is_refused() -> None:
    model = Odd().eval()
    example = torch.randn(2, 5, 16, 7)
    before = model(example)
    with pytest.raises(PassError, match=r"adyt: cannot tell which axis norm .*exclude='norm'"):
        apply(model, ["adyt"], (example,))
    assert torch.equal(model(example), before)
    assert not any(isinstance(m, ADyT) for m in model.modules())
