"""The tracer: names survive, graphs are shared and verified, shapes stay dynamic, guards fire."""

import pytest
import torch
from torch import nn
from zoo import NanoGPT, hf_bert, hf_gpt2, hf_llama, tokens

import surgeon
from surgeon.errors import SpecializationError
from surgeon.graph.tracing import TracedModule, trace_model

HF = [("gpt2", hf_gpt2, "transformer.h.0"), ("llama", hf_llama, "model.layers.0"),
      ("bert", hf_bert, "encoder.layer.0")]


@pytest.mark.parametrize("name,build,block", HF, ids=[h[0] for h in HF])
def test_block_traces_with_original_names_and_dynamic_shapes(name, build, block) -> None:
    model = build().eval()
    trace = trace_model(model, {"input_ids": tokens(128)})
    mt = trace.traces[block]
    traced = mt.to_module()
    assert isinstance(traced, TracedModule)
    original = dict(model.get_submodule(block).named_parameters())
    assert set(dict(traced.named_parameters())) == set(original)
    for key, p in traced.named_parameters():
        assert p is original[key]  # the same tensors, under the same names
    # A different batch size and sequence length: replay the block's call on new hidden states.
    call = trace.calls[block]
    eager = model.get_submodule(block)
    args, kwargs = _resize_call(call.args, call.kwargs, batch=3, seq=5, model=model, block=block)
    with torch.no_grad():
        torch.testing.assert_close(traced(*args, **kwargs), eager(*args, **kwargs))


def _resize_call(args, kwargs, batch, seq, model, block):
    """Capture the eager block's call on a new input size."""
    seen = {}

    def hook(mod, a, kw):
        seen.setdefault("call", (a, kw))

    h = model.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(input_ids=tokens(128, batch=batch, seq=seq))
    h.remove()
    a, kw = seen["call"]
    assert a[0].shape[:2] == (batch, seq) if a else kw["hidden_states"].shape[:2] == (batch, seq)
    return a, kw


def test_graph_shared_across_blocks() -> None:
    model = NanoGPT(n_layer=4)
    trace = trace_model(model, (tokens(64),))
    shared = {id(trace.traces[f"transformer.h.{i}"].shared) for i in range(4)}
    assert len(shared) == 1
    # One graph per distinct class/call: Block, attention, MLP, LayerNorm (two biases), model.
    assert trace.graphs_traced <= 7


def test_training_dependent_graph_is_flagged() -> None:
    trace = trace_model(NanoGPT(), (tokens(64),))
    assert trace.traces["transformer.h.0.attn"].shared.mode_dependent
    assert not trace.traces["transformer.h.0"].shared.mode_dependent


def test_none_specialised_argument_guard() -> None:
    model = hf_gpt2().eval()
    trace = trace_model(model, {"input_ids": tokens(128)})
    traced = trace.traces["transformer.h.0"].to_module()
    call = trace.calls["transformer.h.0"]
    x = torch.randn(2, 8, 32)
    traced(x, **call.kwargs)  # the call as traced works
    with pytest.raises(SpecializationError, match="encoder_hidden_states=None"):
        traced(x, **{**call.kwargs, "encoder_hidden_states": torch.randn(2, 8, 32)})
    with pytest.raises(SpecializationError, match="kwargs=\\(position_ids\\)"):
        traced(x)  # the recorded call passed position_ids through **kwargs


def test_flag_specialised_argument_guard() -> None:
    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, scale: bool = True):
            return self.fc(x) * 2 if scale else self.fc(x)

    trace = trace_model(Gate(), (torch.randn(2, 4),))
    traced = trace.traces[""].to_module()
    torch.testing.assert_close(traced(torch.randn(2, 4) * 0 + 1), Gate.forward(
        trace.model, torch.ones(2, 4)))
    with pytest.raises(SpecializationError, match="scale=True"):
        traced(torch.ones(2, 4), scale=False)


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask=None, keep: bool = True):
        y = self.fc(x)
        return y if mask is None else y * mask


class HandsOn(nn.Module):
    """Hands `mask` and `flag` on to a child under other names; branches on `bias` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x, attention_mask=None, flag: bool = True, bias=None):
        y = self.inner(x, mask=attention_mask, keep=flag)
        return y if bias is None else y + bias


def test_arguments_only_handed_on_become_graph_inputs() -> None:
    model = HandsOn()
    trace = trace_model(model, (torch.randn(2, 4),))
    spec = trace.traces[""].shared.spec
    kinds = dict(zip(spec.arg_names, spec.kinds))
    assert kinds == {"x": "tensor", "attention_mask": "passed", "flag": "passed", "bias": "const"}
    traced = trace.traces[""].to_module()
    x, mask = torch.randn(2, 4), torch.rand(2, 4)
    torch.testing.assert_close(traced(x, attention_mask=mask, flag=False),
                               model(x, attention_mask=mask, flag=False))
    with pytest.raises(SpecializationError, match="bias=None"):
        traced(x, bias=torch.ones(4))


def test_unverifiable_module_is_untraced_and_children_still_traced() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # control flow on a value: cannot be traced
                return self.inner(x)
            return x

    trace = trace_model(DataDependent(), (torch.ones(2, 4),))
    assert "" in trace.failures and "control flow" in trace.failures[""]
    assert "inner" in trace.traces


def test_recording_restores_modes() -> None:
    model = NanoGPT().train()
    surgeon.inspect(model, (tokens(64),))
    assert all(m.training for m in model.modules())


def test_model_that_cannot_be_traced_at_all() -> None:
    from surgeon.errors import TracingError

    class Opaque(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x

    with pytest.raises(TracingError, match="no module of Opaque could be traced"):
        trace_model(Opaque(), (torch.ones(2),))


class FreshActivation(nn.Module):
    """Builds its activation module during the call (transformers' `ACT2FN["silu"]` does)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.SiLU()(self.proj(x)) + x


class StatefulFresh(FreshActivation):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear(8, 8)(x)  # a module with parameters of its own: no graph can hold it


def test_module_made_during_the_call_is_traced_through() -> None:
    x = torch.randn(2, 8)
    trace = trace_model(FreshActivation(), (x,))
    assert "" in trace.traces
    assert any(n.target is torch.nn.functional.silu for n in trace.traces[""].graph.nodes)
    stateful = trace_model(nn.Sequential(StatefulFresh()), (x,))
    assert "0" in stateful.failures and "0" not in stateful.traces
