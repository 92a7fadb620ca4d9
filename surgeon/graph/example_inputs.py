"""The example input a trace records: the caller's, checked, or one built from a transformers
config.

Tracing records one real call of the model, so `surgeon.inspect(model)` needs an input when the
caller gives none. For a Hugging Face model the config says what it takes (token ids below
`vocab_size`, images of `image_size`); for any other module there is no way to know, so the caller
must pass one.
transformers is never imported here: a model whose config is a transformers config has already
imported it.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import torch

from surgeon.errors import ExampleError

if TYPE_CHECKING:
    from torch import nn

BATCH = 2
SEQ = 8
SEED = 0
# The side of a vision model's input when its config names none (ResNet, ConvNeXt, RegNet): the
# 224 × 224 crop their image processors produce for ImageNet-style checkpoints.
IMAGE_SIZE = 224

_ASK = "pass example= (a tuple of positional args or a dict of keyword args for forward)"


def example_for(model: nn.Module, example: tuple | list | dict | None) -> tuple | dict:
    """`example` as one forward call's input (a tuple of positional args or a dict of keyword
    args); `None` builds one from a transformers model's config (`default_example`)."""
    if example is None:
        return default_example(model)
    if not isinstance(example, (tuple, list, dict)):
        raise ExampleError(
            f"example must be a tuple of positional args or a dict of keyword args, "
            f"not {type(example).__name__}")
    return tuple(example) if isinstance(example, list) else example


def default_example(model: nn.Module) -> dict[str, torch.Tensor]:
    """Build a deterministic keyword input (batch 2, sequence 8) for a transformers `model`.

    Text models get `input_ids`, Whisper-style speech models `input_features` (b, num_mel_bins,
    2·max_source_positions), both plus `decoder_input_ids` for encoder-decoders; vision models get
    `pixel_values` of shape (2, num_channels, image_size, image_size), 224 where the config
    names no image_size. The tensors are drawn from a
    seeded generator, so two calls give the same example, and live on the model's device.
    Raises `ExampleError` for a model that is not a transformers model or takes another input.
    """
    config = _hf_config(model)
    name = type(model).__name__
    main = getattr(model, "main_input_name", None)
    vocab = getattr(_sub_config(config, "text"), "vocab_size", None)
    vision = _sub_config(config, "vision")
    image_size = getattr(vision, "image_size", None)
    if main is None:
        main = "pixel_values" if vocab is None and (
            image_size is not None or getattr(vision, "num_channels", None)) else "input_ids"

    device, dtype = _placement(model)
    gen = torch.Generator().manual_seed(SEED)
    seq = _seq_len(config)
    example: dict[str, torch.Tensor] = {}
    if main == "input_ids":
        if not isinstance(vocab, int) or vocab <= 0:
            raise ExampleError(f"{name}: its config has no vocab_size for input_ids; {_ASK}")
        example["input_ids"] = torch.randint(0, vocab, (BATCH, seq), generator=gen)
    elif main == "input_features" and isinstance(getattr(config, "num_mel_bins", None), int) \
            and isinstance(getattr(config, "max_source_positions", None), int):
        # Whisper-style log-mel frames (b, mels, frames): two convolutions (the second strided)
        # take the frames to max_source_positions, and the encoder accepts exactly that length
        frames = 2 * config.max_source_positions
        example["input_features"] = torch.randn(BATCH, config.num_mel_bins, frames,
                                                generator=gen).to(dtype=dtype)
    if example:
        if getattr(config, "is_encoder_decoder", False):
            dec_vocab = getattr(_sub_config(config, "decoder"), "vocab_size", None) or vocab
            if not isinstance(dec_vocab, int) or dec_vocab <= 0:
                raise ExampleError(f"{name}: its config has no vocab_size for "
                                   f"decoder_input_ids; {_ASK}")
            example["decoder_input_ids"] = torch.randint(0, dec_vocab, (BATCH, seq), generator=gen)
        return {k: v.to(device) for k, v in example.items()}
    if main == "pixel_values":
        if image_size is None:
            image_size = IMAGE_SIZE
        h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)[:2]
        channels = getattr(vision, "num_channels", None) or 3
        pixels = torch.randn(BATCH, channels, h, w, generator=gen)  # (b, c, h, w)
        return {"pixel_values": pixels.to(device=device, dtype=dtype)}
    strides, kernels = getattr(config, "conv_stride", None), getattr(config, "conv_kernel", None)
    if main == "input_values" and isinstance(strides, (list, tuple)) and \
            isinstance(kernels, (list, tuple)) and len(strides) == len(kernels) and strides:
        # a raw waveform (wav2vec2-style conv feature encoder): as many samples as give
        # 32 frames (train-mode SpecAugment masks spans of 10), the receptive field plus 31
        # of its total strides
        field, total = 1, 1
        for k, st in zip(reversed(kernels), reversed(strides)):
            field = (field - 1) * st + k
        for st in strides:
            total *= st
        wave = torch.randn(BATCH, field + 31 * total, generator=gen)  # (b, samples)
        return {"input_values": wave.to(device=device, dtype=dtype)}
    raise ExampleError(f"{name} takes {main!r}, which surgeon cannot make up; {_ASK}")


def _hf_config(model: Any) -> Any:
    """The model's transformers config, or `ExampleError` when it has none."""
    config = getattr(model, "config", None)
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PretrainedConfig", None) if transformers is not None else None
    if base is None or not isinstance(config, base):
        raise ExampleError(
            f"no example input for {type(model).__name__}: surgeon builds one only for "
            f"transformers models; {_ASK}"
        )
    return config


def _sub_config(config: Any, which: str) -> Any:
    """The text, decoder or vision part of a composite config (CLIP, encoder-decoder), or itself."""
    if which == "vision":
        return getattr(config, "vision_config", None) or config
    get = getattr(config, "get_text_config", None)  # transformers >= 4.45
    return get(decoder=which == "decoder") if get is not None else config


def _seq_len(config: Any) -> int:
    """SEQ, or less where the model's position table is shorter."""
    text = _sub_config(config, "text")
    for attr in ("max_position_embeddings", "n_positions"):
        limit = getattr(text, attr, None)
        if isinstance(limit, int) and 0 < limit < SEQ:
            return limit
    return SEQ


def _placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and float dtype of the model's first floating parameter (CPU float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            device = p.device if p.device.type != "meta" else torch.device("cpu")
            return device, p.dtype
    return torch.device("cpu"), torch.float32
