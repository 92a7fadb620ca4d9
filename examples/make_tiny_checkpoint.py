"""Write examples/tiny-llama: a seeded, randomly initialised 2-layer Llama (about 560 KB).

It is the default model of the README's quick start and of the CLI tests, so they run on a fresh
machine with no download. Re-running this script rewrites the same weights.

    python examples/make_tiny_checkpoint.py [OUT_DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 0


def build() -> LlamaForCausalLM:
    """The tiny Llama: hidden 64, MLP 128, 2 layers, 4 heads over 2 KV heads, vocabulary 512."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(SEED)
    return LlamaForCausalLM(config).eval()


def main(out: Path) -> None:
    model = build()
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {out} ({n} parameters)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path,
                        default=Path(__file__).resolve().parent / "tiny-llama",
                        help="directory to write (default: examples/tiny-llama)")
    main(parser.parse_args().out)
