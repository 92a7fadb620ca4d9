"""`surgeon grow --init zero` keeps the logits on parallel-residual decoders (issue 14, class 12).

Their block adds attn(x) + mlp(x) to the stream in one add: each term is a branch of its own,
so both output projections are zeroed (before, the sum was not followed and grow refused).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as T
from cli_runner import run

COMMON = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64)
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("config, zeroed", [
    (lambda: T.GPTNeoXConfig(**COMMON, use_parallel_residual=True),
     ["attention.dense", "mlp.dense_4h_to_h"]),
    (lambda: T.PhiConfig(**COMMON), ["self_attn.dense", "mlp.fc2"]),
    (lambda: T.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                          rotary_dim=4), ["attn.out_proj", "mlp.fc_out"]),
], ids=["gpt-neox-parallel", "phi", "gpt-j"])
def test_zero_growth_of_parallel_blocks_keeps_logits(config, zeroed: list[str],
                                                     tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config()).eval()
    model.save_pretrained(tmp_path / "src")
    result = run("grow", str(tmp_path / "src"), str(tmp_path / "grown"), "--init", "zero",
                 "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["config_changes"]) == 1
    grown = T.AutoModelForCausalLM.from_pretrained(tmp_path / "grown").eval()
    assert grown.config.num_hidden_layers == 3
    with torch.no_grad():
        delta = (grown(input_ids=IDS).logits - model(input_ids=IDS).logits).abs().max().item()
    assert delta <= 1e-5
    rows = json.loads((tmp_path / "grown" / "growth.json").read_text())["tensors"]
    assert sorted({r["key"].rsplit(".", 1)[0] for r in rows if r["init"] == "zero"}) == \
        sorted(zeroed)  # both branches' projections, nothing else


# --- MoE decoders, post-norm gains, hybrids (issue 14, class 12) -------------------------------

SMALL = dict(COMMON, num_key_value_heads=2)
MAMBA2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
              mamba_chunk_size=16, mamba_expand=2)
FAMILIES = [  # (id, config, --source or None, the members zero growth zeroes)
    # fused experts (transformers 5: `experts.gate_up_proj` / `experts.down_proj`, 3-D) in the
    # model, stored one by one in the checkpoint; the router `gate` is not what writes the stream
    ("mixtral", lambda: T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2),
     None, ["block_sparse_moe.experts.0.w2", "block_sparse_moe.experts.1.w2",
            "block_sparse_moe.experts.2.w2", "block_sparse_moe.experts.3.w2",
            "self_attn.o_proj"]),
    # routed experts + sigmoid(gate(x)) * shared_expert(x): the shared expert's down_proj too
    ("qwen2-moe", lambda: T.Qwen2MoeConfig(**SMALL, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32,
                                           shared_expert_intermediate_size=32),
     None, [*(f"mlp.experts.{i}.down_proj" for i in range(4)), "mlp.shared_expert.down_proj",
            "self_attn.o_proj"]),
    # post_attention_layernorm / post_feedforward_layernorm applied to each branch: their gains
    # (x̂ * (1 + w): w = -1), not the projections before them
    ("gemma2", lambda: T.Gemma2Config(**SMALL, head_dim=8),
     None, ["post_attention_layernorm", "post_feedforward_layernorm"]),
    # parallel attention: `mlp_output += attention_output` (an in-place sum)
    ("falcon", lambda: T.FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=4, alibi=False),
     None, ["mlp.dense_4h_to_h", "self_attention.dense"]),
    # hybrid: a Mamba-2 mixer block after an attention block (attn_layer_indices renumbered)
    ("bamba", lambda: T.BambaConfig(**SMALL, attn_layer_indices=[1], **MAMBA2),
     None, ["feed_forward.down_proj", "self_attn.o_proj"]),
    # hybrid: attention and a Mamba-2 mixer side by side in every block, scaled by multipliers
    ("falcon-h1", lambda: T.FalconH1Config(**SMALL, mamba_d_ssm=64, head_dim=8, **MAMBA2),
     None, ["feed_forward.down_proj", "mamba.out_proj", "self_attn.o_proj"]),
    # hybrid whose block kinds follow attn_layer_period / offset: block 2 is a Mamba block with a
    # dense MLP, so it is grown from block 0
    ("jamba", lambda: T.JambaConfig(**SMALL, attn_layer_period=2, attn_layer_offset=1,
                                    expert_layer_period=2, expert_layer_offset=1, num_experts=4,
                                    num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
                                    mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False),
     0, ["feed_forward.down_proj", "mamba.out_proj"]),
    # block kinds cycled from `block_types` (recurrent, attention): written out at the new depth,
    # so block 2 is an attention block like block 1 and block 0 stays recurrent
    ("recurrent-gemma", lambda: T.RecurrentGemmaConfig(**SMALL, lru_width=32,
                                                       block_types=["recurrent", "attention"],
                                                       attention_window_size=16),
     None, ["mlp_block.down_proj", "temporal_block.o_proj"]),
    # hybrid blocks that all run block 0's shared transformer (tied, stored once): its output
    # is added to the mamba mixer's input, so only the mixer's out_proj writes the stream
    ("zamba", lambda: T.ZambaConfig(**SMALL, attention_hidden_size=64, attention_head_dim=16,
                                    mamba_dt_rank=4, mamba_d_state=8, use_mamba_kernels=False,
                                    layers_block_type=["hybrid", "hybrid"]),
     None, ["mamba_decoder.mamba.out_proj"]),
    # an MoE block whose forward does not trace (its router returns a tuple): run on its
    # recorded call, the routed experts' 3-D down_proj and the shared experts' are its writers
    ("deepseek-v3", lambda: T.DeepseekV3Config(**dict(SMALL, num_key_value_heads=4),
                                               n_routed_experts=4, num_experts_per_tok=2,
                                               moe_intermediate_size=32, n_group=1, topk_group=1,
                                               first_k_dense_replace=1, kv_lora_rank=16,
                                               q_lora_rank=16, qk_nope_head_dim=8,
                                               qk_rope_head_dim=8, v_head_dim=8),
     None, [*(f"mlp.experts.{i}.down_proj" for i in range(4)), "mlp.shared_experts.down_proj",
            "self_attn.o_proj"]),
]


def _saved(config, tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config()).eval()
    model.save_pretrained(tmp_path / "src")
    return model, tmp_path / "src"


def _loaded(path: Path) -> torch.nn.Module:
    """The grown checkpoint, loaded with every key matching the model's parameters."""
    grown, info = T.AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    assert grown.config.num_hidden_layers == 3
    return grown.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("name, config, source, zeroed", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_zero_growth_across_families_keeps_logits(name: str, config, source: int | None,
                                                  zeroed: list[str], tmp_path: Path) -> None:
    import surgeon

    model, src = _saved(config, tmp_path)
    surgeon.grow(src, tmp_path / "zero", init="zero", source=source)
    grown = _loaded(tmp_path / "zero")
    assert (_logits(grown) - _logits(model)).abs().max().item() <= 1e-5
    rows = json.loads((tmp_path / "zero" / "growth.json").read_text())["tensors"]
    assert sorted({r["key"].rsplit(".", 1)[0] for r in rows if r["init"] == "zero"}) == \
        sorted(zeroed)


@pytest.mark.parametrize("name, config, source, zeroed", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_random_and_copy_growth_across_families_load_and_train(
        name: str, config, source: int | None, zeroed: list[str], tmp_path: Path) -> None:
    import surgeon

    model, src = _saved(config, tmp_path)
    for init in ("random", "copy"):
        surgeon.grow(src, tmp_path / init, init=init, source=source)
        grown = _loaded(tmp_path / init)
        assert torch.isfinite(_logits(grown)).all()
    # a parameter block 2 shares with block 0 (Zamba's shared transformer) is not fresh
    fresh = [k for k, _ in grown.named_parameters() if ".layers.2." in k or ".h.2." in k]
    state = _loaded(tmp_path / "random").state_dict()
    new = {k: state[k] for k in fresh if state[k].dim() >= 2 and k.endswith(".weight")}
    old = model.state_dict()
    twin = {k: old[k.replace(".2.", f".{1 if source is None else source}.")] for k in new}
    assert new and all(not torch.equal(new[k], twin[k]) for k in new)  # freshly drawn
    assert all(0 < new[k].float().std() < 1 for k in new)  # the model's own init, not garbage
    grown = _loaded(tmp_path / "random").train()
    loss = grown(input_ids=IDS, labels=IDS).loss
    loss.backward()
    torch.optim.SGD(grown.parameters(), lr=1e-2).step()
    assert torch.isfinite(loss)


def test_grow_refuses_a_new_block_of_another_kind(tmp_path: Path) -> None:
    import surgeon
    from surgeon.growth.insert import InsertionError

    jamba = next(f[1] for f in FAMILIES if f[0] == "jamba")
    _, src = _saved(jamba, tmp_path)
    with pytest.raises(InsertionError, match=r"attn_layer_period / attn_layer_offset \(2, 1\)"
                       r".*--source 0 \(fits: \[0\]\) or --after 0 \(fits: \[-1, 0\]\)"):
        surgeon.grow(src, tmp_path / "grown", init="copy")
    assert not (tmp_path / "grown").exists()


@pytest.mark.parametrize("after", [-1, 0])
def test_jamba_growth_rewrites_its_period_and_offset(after: int, tmp_path: Path) -> None:
    """Blocks (mamba, attention+MoE) grown to (mamba, mamba, attention+MoE) by a block before or
    after block 0: attention and experts every 3rd block from offset 2, so each keeps its kind."""
    import surgeon

    jamba = next(f[1] for f in FAMILIES if f[0] == "jamba")
    model, src = _saved(jamba, tmp_path)
    result = surgeon.grow(src, tmp_path / "zero", init="zero", after=after)
    assert "attn_layer_period" in result.config_changes
    grown = _loaded(tmp_path / "zero")
    assert (grown.config.attn_layer_period, grown.config.attn_layer_offset) == (3, 2)
    assert (grown.config.expert_layer_period, grown.config.expert_layer_offset) == (3, 2)
    assert grown.config.layers_block_type == ["mamba", "mamba", "attention"]
    assert grown.config.layers_num_experts == [1, 1, 4]
    assert (_logits(grown) - _logits(model)).abs().max().item() <= 1e-5


def test_recurrent_gemma_growth_writes_its_cycled_block_types_in_full(tmp_path: Path) -> None:
    import surgeon

    rg = next(f[1] for f in FAMILIES if f[0] == "recurrent-gemma")
    _, src = _saved(rg, tmp_path)
    result = surgeon.grow(src, tmp_path / "copy", init="copy", after=0)
    assert result.config_changes == ["block_types", "num_hidden_layers"]
    grown = _loaded(tmp_path / "copy")
    assert grown.config.block_types == ["recurrent", "recurrent", "attention"]


def test_gpt_neo_growth_widens_its_run_length_attention_types(tmp_path: Path) -> None:
    import surgeon

    config = lambda: T.GPTNeoConfig(vocab_size=128, hidden_size=32, num_layers=2,  # noqa: E731
                                    num_heads=4, max_position_embeddings=64,
                                    attention_types=[[["global", "local"], 1]])
    model, src = _saved(config, tmp_path)
    surgeon.grow(src, tmp_path / "zero", init="zero")
    grown = _loaded(tmp_path / "zero")
    assert grown.config.attention_layers == ["global", "local", "local"]
    assert (_logits(grown) - _logits(model)).abs().max().item() <= 1e-5


def test_a_wrong_writer_is_refused_by_running_the_block() -> None:
    from surgeon.graph.example_inputs import default_example
    from surgeon.growth.branches import BranchError
    from surgeon.growth.grow import check_identity

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.LlamaConfig(**SMALL)).eval()
    example = default_example(model)
    at = "model.layers.1."
    both = {at + "self_attn.o_proj.weight": 0.0, at + "mlp.down_proj.weight": 0.0}
    with torch.no_grad():
        check_identity(model, "model.layers.1", both, example)  # the block is an identity
        with pytest.raises(BranchError, match="model.layers.1.*use another --init"):
            check_identity(model, "model.layers.1", {  # the MLP's input side: not its last write
                at + "self_attn.o_proj.weight": 0.0, at + "mlp.up_proj.weight": 1.0}, example)


def test_zero_growth_refuses_when_the_graph_walk_misses_a_branch(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """The identity check runs on the model read lazily from disk too (its weights on meta)."""
    import surgeon
    from surgeon.growth import branches
    from surgeon.growth.branches import BranchError

    _, src = _saved(lambda: T.LlamaConfig(**SMALL), tmp_path)
    found = branches.branch_zeros

    def missing_one(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return {k: v for k, v in found(*args, **kwargs).items() if "down_proj" not in k}

    monkeypatch.setattr(branches, "branch_zeros", missing_one)
    with pytest.raises(BranchError, match="leaves its output different from its input"):
        surgeon.grow(src, tmp_path / "grown", init="zero")
    assert not (tmp_path / "grown").exists()
