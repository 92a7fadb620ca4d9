"""surgeon.graph.example_inputs.default_example: the input built from a transformers config when
`surgeon.inspect(model)` is given none, and the error for models it cannot build one for."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgeon.errors import ExampleError
from surgeon.graph.example_inputs import default_example

transformers = pytest.importorskip("transformers")


def tiny_llama() -> nn.Module:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100, max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(config)


def test_text_model_gets_seeded_input_ids():
    model = tiny_llama()
    example = default_example(model)
    assert list(example) == ["input_ids"]
    ids = example["input_ids"]
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 100
    assert torch.equal(ids, default_example(model)["input_ids"])  # deterministic
    assert model(**example).logits.shape == (2, 8, 100)


def test_encoder_decoder_gets_decoder_input_ids():
    config = transformers.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=50
    )
    example = default_example(transformers.T5ForConditionalGeneration(config))
    assert set(example) == {"input_ids", "decoder_input_ids"}
    assert example["decoder_input_ids"].shape == (2, 8)
    assert int(example["decoder_input_ids"].max()) < 50


def test_vision_model_gets_pixel_values():
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=8, num_channels=3,
    )
    model = transformers.ViTModel(config).to(torch.float64)
    example = default_example(model)
    assert list(example) == ["pixel_values"]
    assert example["pixel_values"].shape == (2, 3, 16, 16)
    assert example["pixel_values"].dtype == torch.float64
    assert model(**example).last_hidden_state.shape[0] == 2


def test_short_position_table_shortens_the_sequence():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=4)
    assert default_example(transformers.GPT2LMHeadModel(config))["input_ids"].shape == (2, 4)


def test_plain_module_asks_for_an_example():
    with pytest.raises(ExampleError) as info:
        default_example(nn.Linear(4, 4))
    message = str(info.value)
    assert message.startswith("no example input for Linear")
    assert "example=" in message and "\n" not in message


def test_other_main_input_asks_for_an_example():
    model = tiny_llama()
    model.main_input_name = "input_features"
    with pytest.raises(ExampleError, match="takes 'input_features'.*example="):
        default_example(model)


def test_whisper_style_speech_model_gets_input_features():
    config = transformers.WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, max_target_positions=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2)
    model = transformers.WhisperForConditionalGeneration(config)
    example = default_example(model)
    assert set(example) == {"input_features", "decoder_input_ids"}
    assert example["input_features"].shape == (2, 8, 32)  # 2 × max_source_positions frames
    assert int(example["decoder_input_ids"].max()) < 64
    assert model(**example).logits.shape == (2, 8, 64)
