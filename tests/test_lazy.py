"""surgeon.files.lazy: a model built with its parameters on meta runs with each module's weights
read from the safetensors file only while it is called, gives the in-memory model's outputs, and
never holds more than one unit of weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

from surgeon.files.lazy import (
    LazyWeights,
    MismatchError,
    MissingTensorError,
    keep_in_memory,
    materialized,
    parameters_on_meta,
)
from surgeon.files.weights import Checkpoint

MODELS = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64)),
    "bert": lambda: transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        vocab_size=64)),
}


def saved(name: str, tmp_path: Path) -> tuple[nn.Module, nn.Module, Checkpoint]:
    """(the model in memory, the same built on meta, its checkpoint)."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    model.save_pretrained(tmp_path)
    with parameters_on_meta():
        skeleton = type(model)(model.config).eval()
    return model, skeleton, Checkpoint.open(tmp_path)


def test_parameters_on_meta_keeps_buffers() -> None:
    with parameters_on_meta():
        model = MODELS["llama"]()
    assert all(p.is_meta for p in model.parameters())
    inv_freq = model.model.rotary_emb.inv_freq
    assert not inv_freq.is_meta and torch.isfinite(inv_freq).all() and inv_freq[0] == 1.0
    assert nn.Linear(2, 3).weight.device.type == "cpu"  # the patch is gone afterwards


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lazy_forward_equals_in_memory(name: str, tmp_path: Path) -> None:
    model, skeleton, checkpoint = saved(name, tmp_path)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), LazyWeights(skeleton, checkpoint, label=str(tmp_path)) as lazy:
        got = skeleton(input_ids=ids)[0]
        assert lazy.live == 0  # everything read was dropped again
    with torch.no_grad():
        want = model(input_ids=ids)[0]
    assert torch.equal(got, want)
    assert all(p.is_meta for p in skeleton.parameters())


def test_only_one_unit_is_held_at_a_time(tmp_path: Path) -> None:
    _, skeleton, checkpoint = saved("llama", tmp_path)
    block = sum(p.numel() * 4 for p in skeleton.model.layers[0].parameters())
    lazy = LazyWeights(skeleton, checkpoint, label="llama", unit_bytes=block)
    peak = []

    def watch(module: nn.Module, args: tuple, output: object) -> None:
        peak.append(sum(checkpoint[lazy.keys[i]].nbytes for i, n in lazy.count.items() if n))

    handles = [m.register_forward_hook(watch) for m in skeleton.modules()]
    with torch.no_grad(), lazy:
        skeleton(input_ids=torch.randint(0, 64, (1, 4)))
    for h in handles:
        h.remove()
    total = checkpoint.nbytes
    largest = max(s.nbytes for s in checkpoint.values())
    assert 0 < max(peak) <= max(block, largest) < total / 2


def test_materialized_reads_outside_a_call(tmp_path: Path) -> None:
    model, skeleton, checkpoint = saved("gpt2", tmp_path)
    with LazyWeights(skeleton, checkpoint, label="gpt2"):
        norm = skeleton.transformer.ln_f
        assert norm.weight.is_meta
        with materialized(norm):
            assert torch.equal(norm.weight, model.transformer.ln_f.weight)
        assert norm.weight.is_meta
    with materialized(model.transformer.ln_f) as same:  # no LazyWeights: nothing to do
        assert same is model.transformer.ln_f


def test_tied_parameters_bind_to_the_stored_key(tmp_path: Path) -> None:
    _, skeleton, checkpoint = saved("gpt2", tmp_path)
    lazy = LazyWeights(skeleton, checkpoint, label="gpt2")
    assert skeleton.lm_head.weight is skeleton.transformer.wte.weight
    assert lazy.key_of(skeleton.lm_head.weight) == "transformer.wte.weight"
    assert lazy.key_of(torch.zeros(1)) is None


@pytest.mark.parametrize("edit, error, message", [
    ("drop", MissingTensorError, "has no tensor 'model.norm.weight'"),
    ("shape", MismatchError, "'model.norm.weight' has shape \\[5\\]"),
    ("extra", MismatchError, "holds 'stray.weight'"),
])
def test_checkpoint_that_does_not_fit_is_refused(edit: str, error: type, message: str,
                                                 tmp_path: Path) -> None:
    _, skeleton, checkpoint = saved("llama", tmp_path)
    entries = dict(checkpoint.entries)
    stored = entries.pop("model.norm.weight")
    if edit == "shape":
        entries["model.norm.weight"] = type(stored)(stored.key, stored.file, stored.dtype, (5,),
                                                    stored.start, stored.nbytes)
    if edit == "extra":
        entries["model.norm.weight"] = stored
        entries["stray.weight"] = stored
    with pytest.raises(error, match=message):
        LazyWeights(skeleton, Checkpoint(entries, checkpoint.files), label="llama")


def test_a_parameter_whose_view_outlives_its_call_stays_loaded_until_exit(
        tmp_path: Path) -> None:
    """A view of a weight kept past its module's call (a recorded call's argument: DBRX's experts
    pass `w1[i]` to a child) blocks the swap back to meta: the weight stays loaded, with the
    file's values, and is released when the view is gone."""
    model, skeleton, checkpoint = saved("gpt2", tmp_path)
    kept: list[torch.Tensor] = []
    mlp = skeleton.transformer.h[0].mlp
    hook = mlp.c_fc.register_forward_hook(lambda m, a, o: kept.append(m.weight[0]))
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad(), LazyWeights(skeleton, checkpoint, label="gpt2") as lazy:
        got = skeleton(input_ids=ids)[0]
        assert lazy.held and not mlp.c_fc.weight.is_meta
        assert torch.equal(kept[0], model.transformer.h[0].mlp.c_fc.weight[0])
        again = skeleton(input_ids=ids)[0]  # the held weight is used as it is
        kept.clear()
    hook.remove()
    with torch.no_grad():
        want = model(input_ids=ids)[0]
    assert torch.equal(got, want) and torch.equal(again, want)
    assert all(p.is_meta for p in skeleton.parameters())


@pytest.mark.parametrize("when", ["inside its module's call", "between calls"])
def test_kept_in_memory_keeps_what_a_pass_changed(when: str, tmp_path: Path) -> None:
    """A pass that changes a parameter read from disk in place (adyt's recipe rescaling a
    functional norm's own gain) keeps it in memory: the change outlives the call and the run,
    and the parameter is no longer one to copy from the file."""
    model, skeleton, checkpoint = saved("gpt2", tmp_path)
    ids = torch.randint(0, 64, (2, 8))
    norm = skeleton.transformer.ln_f
    weight = norm.weight

    def rescale(module: nn.Module, args: tuple) -> None:
        keep_in_memory(module.weight)
        module.weight.mul_(2.0)

    with torch.no_grad(), LazyWeights(skeleton, checkpoint, label=str(tmp_path)) as lazy:
        if when == "between calls":
            keep_in_memory(weight)
            weight.mul_(2.0)
        else:
            handle = norm.register_forward_pre_hook(rescale)
            skeleton(input_ids=ids)
            handle.remove()
        assert lazy.key_of(weight) is None and lazy.live == 0
        skeleton(input_ids=ids)  # runs on, the others still read from disk
    assert norm.weight is weight and not weight.is_meta
    assert torch.equal(weight, 2.0 * model.transformer.ln_f.weight)
    keep_in_memory(nn.Parameter(torch.ones(2)))  # outside a lazy run: nothing to do
