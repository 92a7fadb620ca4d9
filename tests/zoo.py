"""A zoo of tiny real models (hidden ≤ 64, 2 layers) with what inspection must find in each.

Each `ZooCase` builds a model and an example, and states the exact residual adds (by kind), norms
(by kind) and trunk lengths expected. A new model joins the shared tables by adding a case here.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

# ---------------------------------------------------------------------------------------------
# nanoGPT, as Karpathy writes it: its own LayerNorm class, F.scaled_dot_product_attention with a
# training-dependent dropout, and a hand-written tanh-GELU helper.
# ---------------------------------------------------------------------------------------------


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (nanoGPT's own class)."""

    def __init__(self, ndim: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


def new_gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, d, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()  # (b, t, d)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (b, h, t, d/h)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(new_gelu(self.c_fc(x)))  # the GELU's x + 0.044715·x³ is no residual


class Block(nn.Module):
    def __init__(self, d: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(d, bias=True)
        self.attn = CausalSelfAttention(d, n_head, dropout)
        self.ln_2 = LayerNorm(d, bias=False)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class NanoGPT(nn.Module):
    def __init__(self, vocab: int = 64, block_size: int = 32, d: int = 32, n_layer: int = 2,
                 n_head: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, d), wpe=nn.Embedding(block_size, d), drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(d, n_head, dropout) for _ in range(n_layer)]),
            ln_f=LayerNorm(d, bias=True)))
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b, t = idx.size()
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


# ---------------------------------------------------------------------------------------------
# A ResNet-style CNN: BatchNorm, `out += identity` then relu, `relu(x + f(x))`, and a downsample
# (projection) shortcut.
# ---------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return F.relu(out)


class PlainBlock(nn.Module):
    """`relu(x + f(x))` written in one line."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(),
                               nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.f(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(8, 8), PlainBlock(8))
        self.layer2 = nn.Sequential(BasicBlock(8, 16, stride=2), BasicBlock(16, 16))
        self.fc = nn.Linear(16, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


# ---------------------------------------------------------------------------------------------
# MLP-Mixer: token-mixing and channel-mixing MLPs, each pre-norm with a residual.
# ---------------------------------------------------------------------------------------------


class MlpBlock(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class MixerBlock(nn.Module):
    def __init__(self, tokens: int, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.token_mixing = MlpBlock(tokens, 2 * tokens)
        self.channel_mixing = MlpBlock(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, tokens, d)
        x = x + self.token_mixing(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mixing(self.norm2(x))


class TinyMixer(nn.Module):
    def __init__(self, image: int = 16, patch: int = 4, d: int = 32, depth: int = 2,
                 classes: int = 10) -> None:
        super().__init__()
        tokens = (image // patch) ** 2
        self.stem = nn.Conv2d(3, d, patch, patch)
        self.blocks = nn.Sequential(*[MixerBlock(tokens, d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)  # (b, tokens, d)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


class EncoderStack(nn.Module):
    """Two `nn.TransformerEncoderLayer`s (torch's own), pre- or post-norm."""

    def __init__(self, norm_first: bool, d: int = 32) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 64, dropout=0.1, batch_first=True,
                                           norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


# ---------------------------------------------------------------------------------------------
# Hugging Face models, built from tiny configs (random weights, nothing downloaded).
# ---------------------------------------------------------------------------------------------


def hf_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128,
                                      n_positions=64, bos_token_id=0, eos_token_id=0))


def hf_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=128, max_position_embeddings=64))


def hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, vocab_size=128,
                                max_position_embeddings=64))


def hf_t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2,
                                               d_kv=16, vocab_size=128))


def encoder_norm_first() -> nn.Module:
    return EncoderStack(True)


def encoder_post_norm() -> nn.Module:
    return EncoderStack(False)


def tokens(vocab: int = 64, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


# --- apply ---
# ModernBERT (transformers): its encoder reads `layer.attention_type` of every layer (class 2).
# A LayerDrop net: blocks whose graph differs by mode (`F.dropout(training=self.training)`)
# under a parent that skips layers at random in train mode (class 9). A Swin-style block that
# pads its tokens to a multiple of the window behind `if` on shapes (class 17).


def hf_modernbert() -> nn.Module:
    from transformers import ModernBertConfig, ModernBertModel

    return ModernBertModel(ModernBertConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        vocab_size=128, max_position_embeddings=64, global_attn_every_n_layers=2,
        local_attention=8, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2,
        sep_token_id=1))


class DropBlock(nn.Module):
    """Pre-norm MLP block whose dropout is functional: its graph differs in train mode."""

    def __init__(self, d: int, p: float = 0.1) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2, self.p = nn.LayerNorm(d), nn.Linear(d, 2 * d), \
            nn.Linear(2 * d, d), p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        h = self.fc2(F.gelu(self.fc1(self.norm(x))))
        return x + F.dropout(h, p=self.p, training=self.training)


class LayerDropNet(nn.Module):
    """Blocks skipped at random in train mode, as transformers' `layerdrop` does."""

    def __init__(self, d: int = 32, layers: int = 2, layerdrop: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList([DropBlock(d) for _ in range(layers)])
        self.norm, self.layerdrop = nn.LayerNorm(d), layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (b, t, d)
        for layer in self.layers:
            if self.training and torch.rand([]) < self.layerdrop:
                continue
            h = layer(h)
        return self.norm(h)


class WindowBlock(nn.Module):
    """Swin-style: tokens padded to a multiple of the window (`if t % window`), mixed within
    windows, cropped back; and a shape check that picks a branch (`if x.shape[1] > window`)."""

    def __init__(self, d: int, window: int = 4) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix = nn.Linear(window, window)
        self.mlp = MlpBlock(d, 2 * d)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        b, t, d = x.shape[0], x.shape[1], x.shape[2]
        h = self.norm1(x)
        if t % self.window != 0:
            h = F.pad(h, (0, 0, 0, self.window - t % self.window))
        w = h.reshape(b, -1, self.window, d).transpose(2, 3)  # (b, t/w, d, w)
        h = self.mix(w).transpose(2, 3).reshape(b, -1, d)[:, :t]
        x = x + h
        if x.shape[1] > self.window:
            x = x + self.mlp(self.norm2(x))
        return x


class WindowNet(nn.Module):
    def __init__(self, d: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.blocks = nn.Sequential(*[WindowBlock(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))


@dataclass
class ZooCase:
    """A tiny model, an example, and what inspection must find in it."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[], tuple | dict]
    residuals: dict[str, int]  # kind -> count
    norms: dict[str, int]  # kind -> count
    trunks: list[int]  # trunk lengths, in order
    residual_owners: set[str] = field(default_factory=set)  # modules whose graph holds an add


ZOO = [
    ZooCase("nanogpt", NanoGPT, lambda: (tokens(64),), {"pre_norm": 4}, {"layer_norm": 5}, [2],
            {"transformer.h.0", "transformer.h.1"}),
    ZooCase("encoder_norm_first", encoder_norm_first, lambda: (torch.randn(2, 8, 32),),
            {"pre_norm": 4}, {"layer_norm": 4}, [2],
            {"encoder.layers.0", "encoder.layers.1"}),
    ZooCase("encoder_post_norm", encoder_post_norm, lambda: (torch.randn(2, 8, 32),),
            {"post_norm": 4}, {"layer_norm": 4}, [2],
            {"encoder.layers.0", "encoder.layers.1"}),
    ZooCase("hf_gpt2", hf_gpt2, lambda: {"input_ids": tokens(128)}, {"pre_norm": 4},
            {"layer_norm": 5}, [2], {"transformer.h.0", "transformer.h.1"}),
    ZooCase("hf_llama", hf_llama, lambda: {"input_ids": tokens(128)}, {"pre_norm": 4},
            {"rms_norm": 5}, [2], {"model.layers.0", "model.layers.1"}),
    ZooCase("hf_bert", hf_bert, lambda: {"input_ids": tokens(128)}, {"post_norm": 4},
            {"layer_norm": 5}, [2],
            {"encoder.layer.0.attention.output", "encoder.layer.0.output",
             "encoder.layer.1.attention.output", "encoder.layer.1.output"}),
    # T5: RMSNorm by behaviour behind a `self.weight.dtype` branch; encoder and decoder trunks.
    ZooCase("hf_t5", hf_t5, lambda: {"input_ids": tokens(128), "decoder_input_ids": tokens(128)},
            {"pre_norm": 10}, {"rms_norm": 12}, [2, 2]),
    ZooCase("resnet", TinyResNet, lambda: (torch.randn(2, 3, 16, 16),), {"plain": 4}, {}, [2, 1],
            {"layer1.0", "layer1.1", "layer2.0", "layer2.1"}),
    ZooCase("mixer", TinyMixer, lambda: (torch.randn(2, 3, 16, 16),), {"pre_norm": 4},
            {"layer_norm": 5}, [2], {"blocks.0", "blocks.1"}),
    # --- apply ---
    ZooCase("hf_modernbert", hf_modernbert, lambda: {"input_ids": tokens(128)},
            {"pre_norm": 3, "post_norm": 1}, {"layer_norm": 5}, [2], {"layers.0", "layers.1"}),
    ZooCase("layerdrop", LayerDropNet, lambda: (torch.randn(2, 8, 8),), {"pre_norm": 2},
            {"layer_norm": 3}, [2], {"layers.0", "layers.1"}),
    ZooCase("window_pad", WindowNet, lambda: (torch.randn(2, 10, 8),), {"pre_norm": 4},
            {"layer_norm": 5}, [2], {"blocks.0", "blocks.1"}),
]
