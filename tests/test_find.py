"""Detection on the zoo: exact residual/norm counts and kinds, owners, trunks, and the traps."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from zoo import ZOO, NanoGPT, new_gelu, tokens

import surgeon


def _counts(items) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in items:
        out[x.kind] = out.get(x.kind, 0) + 1
    return out


@pytest.mark.parametrize("case", ZOO, ids=[c.name for c in ZOO])
def test_zoo_counts(case) -> None:
    report = surgeon.inspect(case.build(), case.example())
    assert _counts(report.residuals) == case.residuals
    assert _counts(report.norms) == case.norms
    assert [len(t.blocks) for t in report.trunks] == case.trunks
    if case.residual_owners:
        assert {r.module for r in report.residuals} == case.residual_owners
    data = json.loads(json.dumps(report.to_dict()))
    assert {"residuals", "norms", "trunks", "untraced"} <= set(data)
    assert data["residuals"][0].keys() >= {"module", "kind", "node", "source"}
    assert len(data["residuals"]) == sum(case.residuals.values())


def test_gelu_is_not_a_residual() -> None:
    import operator

    class GeluMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return new_gelu(self.fc(x))  # holds x + 0.044715·x³ after a parameterised op

    model, example = GeluMLP(), (torch.randn(2, 16),)
    graph = surgeon.trace(model, example).traces[""].graph
    adds = [n for n in graph.nodes if n.target is operator.add]
    assert len(adds) == 2  # x + 0.044715·x³ and 1 + tanh(...): both there, neither a residual
    assert surgeon.inspect(model, example).residuals == []


class _AddForms(nn.Module):
    """`+=`, torch.add and an add inside a helper function, each around a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y += x
        y = torch.add(y, self.b(y))
        return dropout_add(self.c(y), y, 0.1, self.training)


def dropout_add(x: torch.Tensor, residual: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return residual + F.dropout(x, p=p, training=training)


def test_add_forms() -> None:
    report = surgeon.inspect(_AddForms(), (torch.randn(2, 8),))
    assert _counts(report.residuals) == {"plain": 3}


class _ManualNorms(nn.Module):
    """Norms written by hand inside one module: T5-style RMSNorm and a LayerNorm from moments."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(16))
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        h = self.w * (x * torch.rsqrt(variance + 1e-6))
        u = h.mean(-1, keepdim=True)
        s = (h - u).pow(2).mean(-1, keepdim=True)
        h = (h - u) / torch.sqrt(s + 1e-5)
        return F.layer_norm(self.fc(h), (16,), eps=1e-3)


def test_norms_by_behaviour_inside_a_graph() -> None:
    report = surgeon.inspect(_ManualNorms(), (torch.randn(2, 4, 16),))
    assert [(n.kind, n.eps) for n in report.norms] == [
        ("rms_norm", 1e-6), ("layer_norm", 1e-5), ("layer_norm", 1e-3)]
    assert all(n.module == "" and n.node for n in report.norms)


def test_norm_classes_found_by_behaviour() -> None:
    report = surgeon.inspect(NanoGPT(), (tokens(64),))
    ln1 = next(n for n in report.norms if n.module == "transformer.h.0.ln_1")
    ln2 = next(n for n in report.norms if n.module == "transformer.h.0.ln_2")
    assert (ln1.kind, ln1.shape, ln1.eps, ln1.affine, ln1.node) == (
        "layer_norm", (32,), 1e-5, True, None)
    assert ln2.shape == (32,)  # bias=False: still affine through its weight
    assert ln1.source.startswith("zoo.py:")


def test_untraced_modules_have_reasons() -> None:
    from zoo import hf_gpt2

    report = surgeon.inspect(hf_gpt2(), {"input_ids": tokens(128)})
    reasons = {u.module: u.reason for u in report.untraced}
    assert "transformer.h.0.attn" in reasons and reasons["transformer.h.0.attn"]
    assert "transformer.h.0" in report.traced


def test_model_without_example_needs_one() -> None:
    with pytest.raises(surgeon.SurgeonError, match="example"):
        surgeon.inspect(NanoGPT())


def test_hf_model_without_example() -> None:
    from zoo import hf_llama

    report = surgeon.inspect(hf_llama())
    assert _counts(report.residuals) == {"pre_norm": 4}


class _DirectBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.f = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(self.ln(x))


class _DirectNet(nn.Module):
    """Calls its blocks as `block.forward(x)`, which runs no module hooks."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([_DirectBlock(d), _DirectBlock(d)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b.forward(x)
        return x


def test_blocks_called_by_forward_are_found() -> None:
    model = _DirectNet().eval()
    x = torch.randn(2, 5, 16)
    report = surgeon.inspect(model, (x,))
    assert {r.module for r in report.residuals} == {"blocks.0", "blocks.1"}
    assert [len(t.blocks) for t in report.trunks] == [2]
    assert all("forward" not in m.__dict__ for m in model.modules())  # recording left no trace
    ref = model(x)
    surgeon.apply(model, "aion", (x,))
    assert torch.allclose(model(x), ref, atol=1e-6)


def test_audio_model_without_example_gets_a_waveform() -> None:
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    model = Wav2Vec2Model(Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=[8, 8], conv_stride=[5, 2], conv_kernel=[10, 3], num_conv_pos_embeddings=4,
        num_conv_pos_embedding_groups=2)).eval()
    from surgeon.graph.example_inputs import default_example

    wave = default_example(model)["input_values"]
    assert wave.shape == (2, 20 + 31 * 10)  # 32 frames: a 20-sample field, 31 strides of 10
    report = surgeon.inspect(model)
    assert len(report.residuals) == 4
