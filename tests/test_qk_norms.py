"""q/k norms are told by where they sit (their output feeds attention's queries or keys through
parameter-free ops), not by width: a hierarchical model's narrow early-stage norms convert."""

from __future__ import annotations

import pytest
import torch
from test_apply import qwen3
from zoo import TinySwin

from surgeon import apply
from surgeon.nn.adyt import ADyT


def _adyt_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, ADyT)}


def test_narrow_stage_norms_are_converted() -> None:
    """TinySwin: 4 norms of width 16, 1 of 64, 5 of 32 — all converted (the width rule left the
    4 narrow ones out)."""
    model = apply(TinySwin().eval(), ["adyt"], (torch.randn(2, 3, 16, 16),))
    names = _adyt_names(model)
    assert len(names) == 10
    assert {n for n in names if n.startswith("stage1.")} == {
        f"stage1.{i}.norm{j}" for i in (0, 1) for j in (1, 2)}


def olmo2() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "Olmo2Config"):
        pytest.skip("this transformers has no OLMo2")
    config = transformers.Olmo2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    return transformers.Olmo2ForCausalLM(config).eval()


def qwen3_eager() -> torch.nn.Module:
    """Attention as `q @ kᵀ` (two matmuls) rather than scaled_dot_product_attention."""
    model = qwen3()
    model.set_attn_implementation("eager")
    return model


@pytest.mark.parametrize("build", [qwen3, qwen3_eager, olmo2])
def test_qk_norms_still_recognised(build) -> None:
    """Qwen3 normalises q and k per head (width 8), OLMo2 over the whole projection (width 32,
    the stream's): both are q/k norms, left alone unless qk_norms=true."""
    plain = _adyt_names(apply(build(), ["adyt"]))
    assert plain and not any(n.endswith(("q_norm", "k_norm")) for n in plain)
    with_qk = _adyt_names(apply(build(), ["adyt:qk_norms=true"]))
    assert {n for n in with_qk - plain} == {
        f"model.layers.{i}.self_attn.{q}" for i in (0, 1) for q in ("q_norm", "k_norm")}
