"""surgeon.growth.insert: the block list of real checkpoints, renumbered keys and the widened
config for an insertion, and clear errors for insertions that cannot be made."""

from __future__ import annotations

import pytest
import transformers

from surgeon.growth.insert import InsertionError, find_blocks, renumber, widen_config

LAYERS = 3
MODELS = {  # name: (model, block prefix)
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=LAYERS, n_head=2, vocab_size=64, n_positions=16)), "transformer.h."),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64)), "model.layers."),
    "bert": (lambda: transformers.BertModel(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
        vocab_size=64)), "encoder.layer."),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=8,
        layer_types=["full_attention", "sliding_attention", "full_attention"])),
        "model.layers."),
}


def sizes_of(model: transformers.PreTrainedModel) -> dict[str, int]:
    return {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_finds_the_block_list(name: str) -> None:
    build, prefix = MODELS[name]
    model = build()
    blocks = find_blocks(sizes_of(model))
    assert blocks.prefix == prefix and blocks.indices == tuple(range(LAYERS))
    own = sorted(k[len(prefix) + 2:] for k in model.state_dict() if k.startswith(prefix + "0."))
    assert list(blocks.members[0]) == own
    assert blocks.key(2, own[0]) == f"{prefix}2.{own[0]}"


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("after, count", [(-1, 1), (0, 2), (LAYERS - 1, 1)])
def test_renumber_shifts_later_blocks(name: str, after: int, count: int) -> None:
    build, prefix = MODELS[name]
    keys = list(build().state_dict())
    blocks = find_blocks(dict.fromkeys(keys, 1), prefix)
    moved = renumber(keys, blocks, after, count)
    assert len(set(moved.values())) == len(keys)  # no two keys collide
    for old, new in moved.items():
        if old.startswith(prefix):
            index = int(old[len(prefix):].split(".")[0])
            shift = count if index > after else 0
            assert new == old.replace(f"{prefix}{index}.", f"{prefix}{index + shift}.", 1)
        else:
            assert new == old
    taken = {int(k[len(prefix):].split(".")[0]) for k in moved.values() if k.startswith(prefix)}
    assert taken == set(range(LAYERS + count)) - set(range(after + 1, after + 1 + count))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_widen_config_grows_depth_and_per_layer_lists(name: str) -> None:
    build, _ = MODELS[name]
    model = build()
    config = model.config.to_dict()
    blocks = find_blocks(sizes_of(model))
    widened, changed = widen_config(config, blocks, after=0, count=2, source=1)
    depth = next(k for k in ("n_layer", "num_hidden_layers") if k in config)
    assert widened[depth] == LAYERS + 2 and config[depth] == LAYERS
    assert depth in changed
    if name == "qwen3":
        assert widened["layer_types"] == ["full_attention", "sliding_attention",
                                          "sliding_attention", "sliding_attention",
                                          "full_attention"]
        assert "layer_types" in changed
    rebuilt = type(model)(type(model.config).from_dict(widened))
    grown = find_blocks(sizes_of(rebuilt))
    assert grown.indices == tuple(range(LAYERS + 2))
    assert set(renumber(list(model.state_dict()), blocks, 0, 2).values()) < set(
        rebuilt.state_dict())


def test_nested_block_lists_pick_the_outer_one() -> None:
    sizes = {f"model.layers.{i}.mlp.experts.{e}.w": 10 for i in range(2) for e in range(4)}
    sizes["model.embed.weight"] = 30
    assert find_blocks(sizes).prefix == "model.layers."
    assert find_blocks(sizes, "model.layers.0.mlp.experts").indices == (0, 1, 2, 3)


@pytest.mark.parametrize("sizes, prefix, message", [
    ({"a.weight": 1}, None, "no integer-indexed block list"),
    ({"h.0.w": 1, "h.2.w": 1}, None, r"numbered \[0, 2\]"),
    ({"h.0.w": 1}, "blocks", "no integer-indexed blocks under 'blocks'.*h\\."),
])
def test_bad_block_lists(sizes: dict[str, int], prefix: str | None, message: str) -> None:
    with pytest.raises(InsertionError, match=message):
        find_blocks(sizes, prefix)


@pytest.mark.parametrize("after, count, message", [
    (3, 1, "--after 3 is not a block: the checkpoint has blocks 0..2"),
    (-2, 1, "--after -2 is not a block"),
    (0, 0, "--count must be at least 1"),
])
def test_bad_insertions(after: int, count: int, message: str) -> None:
    blocks = find_blocks({f"h.{i}.w": 1 for i in range(3)})
    with pytest.raises(InsertionError, match=message):
        renumber(["h.0.w"], blocks, after, count)


def test_config_without_a_matching_depth_is_refused() -> None:
    blocks = find_blocks({f"h.{i}.w": 1 for i in range(3)})
    with pytest.raises(InsertionError, match="no depth entry equal to the 3 blocks"):
        widen_config({"num_hidden_layers": 4}, blocks, 0, 1, 0)


JAMBA_32 = {"num_hidden_layers": 32, "attn_layer_period": 8, "attn_layer_offset": 4,
            "expert_layer_period": 2, "expert_layer_offset": 1}


def _kinds(config: dict, depth: int) -> list[tuple[bool, bool]]:
    return [(i % config["attn_layer_period"] == config["attn_layer_offset"],
             i % config["expert_layer_period"] == config["expert_layer_offset"])
            for i in range(depth)]


def test_period_and_offset_keep_every_block_kind_or_refuse() -> None:
    """Jamba-v0.1's layout: a mamba block without experts appended after block 31 fits the
    periods as they are; block 10 (mamba + experts) appended there fits no period and offset."""
    blocks = find_blocks({f"model.layers.{i}.w": 1 for i in range(32)})
    widened, changed = widen_config(JAMBA_32, blocks, 31, 1, 0)
    assert changed == ["num_hidden_layers"]
    assert _kinds(widened, 33) == _kinds(JAMBA_32, 32) + [_kinds(JAMBA_32, 32)[0]]
    with pytest.raises(InsertionError, match=r"expert_layer_period / expert_layer_offset \(2, 1\)"
                       r".* pass --source 0 \(fits: \[0, 2, 6,"):
        widen_config(JAMBA_32, blocks, 31, 1, 31)
    small = {**JAMBA_32, "num_hidden_layers": 2, "attn_layer_period": 2, "attn_layer_offset": 1}
    two = find_blocks({f"model.layers.{i}.w": 1 for i in range(2)})
    widened, changed = widen_config(small, two, -1, 1, 0)  # (m, a) -> (m, m, a): every 3rd
    assert _kinds(widened, 3) == [_kinds(small, 2)[0], *_kinds(small, 2)]
    assert "attn_layer_offset" in changed and "expert_layer_period" in changed


def test_cycled_block_types_are_written_out_in_full() -> None:
    blocks = find_blocks({f"model.layers.{i}.w": 1 for i in range(4)})
    config = {"num_hidden_layers": 4, "block_types": ["recurrent", "recurrent", "attention"]}
    widened, changed = widen_config(config, blocks, 2, 1, 2)
    assert widened["block_types"] == ["recurrent", "recurrent", "attention", "attention",
                                      "recurrent"]
    assert changed == ["block_types", "num_hidden_layers"]
