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
