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
                                               d_kv=16, vocab_size=128,
                                               decoder_start_token_id=0))


def hf_bart() -> nn.Module:
    """BART: post-norm, a cross-attention residual in every decoder layer (Marian, mBART and
    Pegasus share its layers)."""
    from transformers import BartConfig, BartForConditionalGeneration

    return BartForConditionalGeneration(BartConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
        max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2))


def hf_led() -> nn.Module:
    """LED: BART's post-norm layers over a Longformer encoder (windowed attention, inputs padded
    to the window); its decoder layers hand back the cache they are given."""
    from transformers import LEDConfig, LEDForConditionalGeneration

    return LEDForConditionalGeneration(LEDConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, attention_window=4,
        max_encoder_position_embeddings=64, max_decoder_position_embeddings=64, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=2))


def hf_whisper() -> nn.Module:
    """Whisper: pre-norm, a conv front end on log-mel frames, cross-attention in the decoder."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8,
        max_source_positions=16, max_target_positions=32, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, suppress_tokens=None,
        begin_suppress_tokens=None))


def seq2seq_tokens() -> dict:
    return {"input_ids": tokens(128), "decoder_input_ids": tokens(128, seq=6)}


def speech_frames() -> dict:
    frames = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0))  # (b, mels, t)
    return {"input_features": frames, "decoder_input_ids": tokens(128, seq=6)}


def encoder_norm_first() -> nn.Module:
    return EncoderStack(True)


def encoder_post_norm() -> nn.Module:
    return EncoderStack(False)


def tokens(vocab: int = 64, batch: int = 2, seq: int = 8) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))


# --- hyper ---
# Layouts the hyper-connection streams must carry: shapes read off the stream and reshaped by
# (class 1), (B, H, W, C) stages and NCHW blocks whose adds run on tokens (class 15), parallel
# blocks (class 5), and transformers models of those families (MoE, ConvNeXt, Mamba, NeoX).


class FlatMoELayer(nn.Module):
    """Reads (b, t, d) off the stream, flattens tokens to (b·t, d) for a routed MLP residual,
    views back by the shape read."""
    def __init__(self, d=32):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.router = nn.Linear(d, 2)
        self.experts = nn.ModuleList([nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(),
                                                    nn.Linear(2 * d, d)) for _ in range(2)])
    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        b, t, d = x.shape
        flat = x.view(-1, d)  # (b·t, d)
        g = self.ln2(flat)
        w = self.router(g).softmax(-1)
        y = w[:, :1] * self.experts[0](g) + w[:, 1:] * self.experts[1](g)
        flat = flat + y
        return flat.view(b, t, d)


class FlatMoE(nn.Module):
    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([FlatMoELayer(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab)
    def forward(self, idx):
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


class NHWCBlock(nn.Module):
    """Swin-style (B, H, W, C) stream: windowed attention on (B·windows, ws², C) + MLP."""
    def __init__(self, c=16, ws=4):
        super().__init__()
        self.ws = ws
        self.norm1, self.norm2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.qkv, self.proj = nn.Linear(c, 3*c), nn.Linear(c, c)
        self.mlp = nn.Sequential(nn.Linear(c, 2*c), nn.GELU(), nn.Linear(2*c, c))
    def forward(self, x):  # (B, H, W, C)
        B, H, W, C = x.shape
        ws = self.ws
        h = self.norm1(x).view(B, H // ws, ws, W // ws, ws, C)
        h = h.permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, C)  # (B·windows, ws², C)
        q, k, v = self.qkv(h).chunk(3, -1)
        a = F.scaled_dot_product_attention(q, k, v)
        a = self.proj(a).view(B, H//ws, W//ws, ws, ws, C).permute(0,1,3,2,4,5).reshape(B, H, W, C)
        x = x + a
        return x + self.mlp(self.norm2(x))


class PatchMerge(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm, self.red = nn.LayerNorm(4*c), nn.Linear(4*c, 2*c, bias=False)
    def forward(self, x):  # (B, H, W, C) -> (B, H/2, W/2, 2C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.red(self.norm(x))


class Stage(nn.Module):
    def __init__(self, c, down):
        super().__init__()
        self.blocks = nn.Sequential(NHWCBlock(c), NHWCBlock(c))
        self.down = PatchMerge(c) if down else nn.Identity()
    def forward(self, x):
        return self.down(self.blocks(x))


class TinySwinNHWC(nn.Module):
    """H = W = C = 16 at stage 0: a stream mixed along H would pass unnoticed by shapes."""
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, 2)
        self.stages = nn.Sequential(Stage(16, True), Stage(32, False))
        self.head = nn.Linear(32, classes)
    def forward(self, x):
        x = self.stem(x).permute(0, 2, 3, 1)  # (B, 16, 16, 16)
        return self.head(self.stages(x).mean((1, 2)))


class ConvTokenBlock(nn.Module):
    """NCHW input, reads B = x.shape[0] before anything, a conv residual on NCHW, then
    tokens (B, HW, C) with a pre-norm MLP residual, reshaped back with B."""
    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, groups=c), nn.BatchNorm2d(c))
        self.norm = nn.LayerNorm(c)
        self.mlp = nn.Sequential(nn.Linear(c, 2*c), nn.GELU(), nn.Linear(2*c, c))
    def forward(self, x):
        B, C, H, W = x.shape
        x = x + self.conv(x)
        t = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        t = t + self.mlp(self.norm(t))
        return t.transpose(1, 2).reshape(B, C, H, W)


class TinyConvTokens(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.blocks = nn.Sequential(ConvTokenBlock(16), ConvTokenBlock(16))
        self.fc = nn.Linear(16, classes)
    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class ParallelBlock(nn.Module):
    """x + attn(ln1(x)) + mlp(ln2(x)): attention and MLP both read the block's input."""
    def __init__(self, d=32):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2*d), nn.GELU(), nn.Linear(2*d, d))
    def forward(self, x, mask):
        h = self.ln1(x)
        return x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0] + self.mlp(self.ln2(x))


class TinyParallel(nn.Module):
    def __init__(self, vocab=64, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList([ParallelBlock(d) for _ in range(2)])
        self.head = nn.Linear(d, vocab)
    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), 1)
        x = self.emb(idx)
        for layer in self.layers:
            x = layer(x, mask)
        return self.head(x)


def hf_mixtral() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=64))


def hf_mamba() -> nn.Module:
    from transformers import MambaConfig, MambaForCausalLM

    return MambaForCausalLM(MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2,
                                        vocab_size=128, expand=2, conv_kernel=4))


def hf_bloom() -> nn.Module:
    """Bloom: attention and MLP add the residual themselves (`dropout_add(out, residual)` with the
    skip passed in by the block) and attention returns a tuple."""
    from transformers import BloomConfig, BloomForCausalLM

    return BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=128))


def hf_mamba2() -> nn.Module:
    """Mamba2: a gated RMSNorm inside each mixer, which a fused (kernel) branch of the mixer's
    training forward reads itself; `time_step_limit = (0, inf)` in its config.json."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    return Mamba2ForCausalLM(Mamba2Config(
        hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=128, expand=2,
        conv_kernel=4, num_heads=4, head_dim=16, n_groups=1, chunk_size=8, time_step_rank=4,
        use_cache=False))


def hf_neox_parallel() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64, use_parallel_residual=True))


# --- norms ---
# A Swin-ish hierarchical transformer: stages of width 16 and 32 joined by a patch merge, so the
# early stage's norms are narrower than the most common width without being q/k norms.


class WindowBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        b, t, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (b, h, t, d/h) each
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp(self.norm2(x))


class TokenPatchMerge(nn.Module):
    """(b, h·w, c) → (b, h·w/4, 2c): 2×2 neighbours concatenated, normalised, projected."""

    def __init__(self, c: int, side: int) -> None:
        super().__init__()
        self.norm, self.reduction, self.side = nn.LayerNorm(4 * c), nn.Linear(4 * c, 2 * c), side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        s = self.side
        x = x.view(b, s // 2, 2, s // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, 4 * c)
        return self.reduction(self.norm(x))


class TinySwin(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, 4)  # (b, 16, 4, 4) for a 16×16 image
        self.stage1 = nn.Sequential(WindowBlock(16, 2), WindowBlock(16, 2))
        self.merge = TokenPatchMerge(16, 4)
        self.stage2 = nn.Sequential(WindowBlock(32, 2), WindowBlock(32, 2))
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).flatten(2).transpose(1, 2)  # (b, 16, 16)
        return self.norm(self.stage2(self.merge(self.stage1(x))))


# A ConvNeXt-ish conv net whose norms run on (b, c, h, w): timm's LayerNorm2d (permute, norm,
# permute back) and the original ConvNeXt's channels-first LayerNorm (statistics over dim 1).


class LayerNorm2d(nn.LayerNorm):
    """timm's: `F.layer_norm` over the channels of an NCHW tensor, by a permute and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w)
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelsFirstLayerNorm(nn.Module):
    """ConvNeXt's original `data_format="channels_first"` LayerNorm: statistics over dim 1."""

    def __init__(self, c: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w)
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class ConvNextBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.pw1, self.pw2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w)
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))  # (b, h, w, c)
        y = self.gamma * self.pw2(F.gelu(self.pw1(y)))
        return x + y.permute(0, 3, 1, 2)


class TinyConvNext(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 4, 4), LayerNorm2d(16))
        self.stage1 = nn.Sequential(ConvNextBlock(16), ConvNextBlock(16))
        self.down = nn.Sequential(ChannelsFirstLayerNorm(16), nn.Conv2d(16, 32, 2, 2))
        self.stage2 = nn.Sequential(ConvNextBlock(32), ConvNextBlock(32))
        self.head_norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.down(self.stage1(self.stem(x))))
        return self.head_norm(x.mean((2, 3)))


def hf_convnext() -> nn.Module:
    from transformers import ConvNextConfig, ConvNextModel

    return ConvNextModel(ConvNextConfig(num_channels=3, hidden_sizes=[16, 32], depths=[2, 2],
                                        num_stages=2, patch_size=4, image_size=32))


# Norms written into a block's own forward: `F.layer_norm` with the block's own gain and bias,
# and an inline RMSNorm `x·rsqrt(mean(x²) + eps)·w` (no norm submodule to swap).


class FunctionalNormBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_w, self.ln_b = nn.Parameter(torch.ones(d)), nn.Parameter(torch.zeros(d))
        self.rms_w = nn.Parameter(torch.ones(d))
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        h = F.layer_norm(x, (x.shape[-1],), self.ln_w, self.ln_b, 1e-5)
        x = x + self.fc1(h)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return x + self.fc2(h.to(x.dtype) * self.rms_w)


class FunctionalNormNet(nn.Module):
    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, d)
        self.blocks = nn.ModuleList(FunctionalNormBlock(d) for _ in range(2))
        self.norm = nn.LayerNorm(d)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)
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


class PostNormDropBlock(DropBlock):
    """wav2vec2's post-norm layer: the norm after the add, inside the block."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        h = self.fc2(F.gelu(self.fc1(x)))
        return self.norm(x + F.dropout(h, p=self.p, training=self.training))


class LayerDropNet(nn.Module):
    """Blocks skipped at random in train mode, as transformers' `layerdrop` does."""

    def __init__(self, d: int = 32, layers: int = 2, layerdrop: float = 0.0,
                 block: type[DropBlock] = DropBlock) -> None:
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.layers = nn.ModuleList([block(d) for _ in range(layers)])
        self.norm, self.layerdrop = nn.LayerNorm(d), layerdrop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)  # (b, t, d)
        for layer in self.layers:
            if self.training and torch.rand([]) < self.layerdrop:
                continue
            h = layer(h)
        return self.norm(h)


class PaddedWindowBlock(nn.Module):
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
        self.blocks = nn.Sequential(*[PaddedWindowBlock(d) for _ in range(depth)])
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
    # encoder-decoders: self-attention, cross-attention and FFN residuals; a trunk per stack
    ZooCase("hf_bart", hf_bart, seq2seq_tokens, {"post_norm": 10}, {"layer_norm": 12}, [2, 2],
            {f"model.{s}.layers.{i}" for s in ("encoder", "decoder") for i in (0, 1)}),
    ZooCase("hf_led", hf_led, seq2seq_tokens, {"post_norm": 10}, {"layer_norm": 12}, [2, 2],
            {f"led.{s}.layers.{i}" for s in ("encoder", "decoder") for i in (0, 1)}),
    ZooCase("hf_whisper", hf_whisper, speech_frames, {"pre_norm": 10}, {"layer_norm": 12},
            [2, 2], {f"model.{s}.layers.{i}" for s in ("encoder", "decoder") for i in (0, 1)}),
    # one trunk over both stages: the strided block joins it (hyper covers all 4 adds)
    ZooCase("resnet", TinyResNet, lambda: (torch.randn(2, 3, 16, 16),), {"plain": 4}, {}, [2],
            {"layer1.0", "layer1.1", "layer2.0", "layer2.1"}),
    ZooCase("mixer", TinyMixer, lambda: (torch.randn(2, 3, 16, 16),), {"pre_norm": 4},
            {"layer_norm": 5}, [2], {"blocks.0", "blocks.1"}),
    # --- hyper ---
    ZooCase("flat_moe", FlatMoE, lambda: (tokens(64),), {"pre_norm": 4}, {"layer_norm": 4},
            [2], {"layers.0", "layers.1"}),
    ZooCase("swin_nhwc", TinySwinNHWC, lambda: (torch.randn(2, 3, 32, 32),), {"pre_norm": 8},
            {"layer_norm": 9}, [2], {"stages.0.blocks.0", "stages.0.blocks.1",
                                     "stages.1.blocks.0", "stages.1.blocks.1"}),
    ZooCase("conv_tokens", TinyConvTokens, lambda: (torch.randn(2, 3, 8, 8),),
            {"plain": 2, "pre_norm": 2}, {"layer_norm": 2}, [2], {"blocks.0", "blocks.1"}),
    ZooCase("parallel", TinyParallel, lambda: (tokens(64),), {"pre_norm": 2},
            {"layer_norm": 4}, [2], {"layers.0", "layers.1"}),
    ZooCase("hf_mixtral", hf_mixtral, lambda: {"input_ids": tokens(128)}, {"pre_norm": 4},
            {"rms_norm": 5}, [2], {"model.layers.0", "model.layers.1"}),
    ZooCase("hf_mamba", hf_mamba, lambda: {"input_ids": tokens(128)}, {"pre_norm": 2},
            {"rms_norm": 3}, [2], {"backbone.layers.0", "backbone.layers.1"}),
    ZooCase("hf_mamba2", hf_mamba2, lambda: {"input_ids": tokens(128)}, {"pre_norm": 2},
            {"rms_norm": 5}, [2], {"backbone.layers.0", "backbone.layers.1"}),
    ZooCase("hf_neox_parallel", hf_neox_parallel, lambda: {"input_ids": tokens(128)},
            {"pre_norm": 2}, {"layer_norm": 5}, [2], {"gpt_neox.layers.0", "gpt_neox.layers.1"}),
    # --- norms ---
    ZooCase("swin_ish", TinySwin, lambda: (torch.randn(2, 3, 16, 16),), {"pre_norm": 8},
            {"layer_norm": 10}, [2, 2],
            {"stage1.0", "stage1.1", "stage2.0", "stage2.1"}),
    ZooCase("convnext_ish", TinyConvNext, lambda: (torch.randn(2, 3, 32, 32),), {"plain": 4},
            {"layer_norm": 7}, [2, 2], {"stage1.0", "stage1.1", "stage2.0", "stage2.1"}),
    ZooCase("hf_convnext", hf_convnext, lambda: (torch.randn(2, 3, 32, 32),), {"plain": 4},
            {"layer_norm": 7}, [2],  # one trunk: the two stages, across the downsampling
            {f"encoder.stages.{i}.layers.{j}" for i in (0, 1) for j in (0, 1)}),
    ZooCase("functional_norms", FunctionalNormNet, lambda: (tokens(64),), {"pre_norm": 4},
            {"layer_norm": 3, "rms_norm": 2}, [2], {"blocks.0", "blocks.1"}),
    # --- apply ---
    ZooCase("hf_modernbert", hf_modernbert, lambda: {"input_ids": tokens(128)},
            {"pre_norm": 3, "post_norm": 1}, {"layer_norm": 5}, [2], {"layers.0", "layers.1"}),
    ZooCase("layerdrop", LayerDropNet, lambda: (torch.randn(2, 8, 8),), {"pre_norm": 2},
            {"layer_norm": 3}, [2], {"layers.0", "layers.1"}),
    ZooCase("window_pad", WindowNet, lambda: (torch.randn(2, 10, 8),), {"pre_norm": 4},
            {"layer_norm": 5}, [2], {"blocks.0", "blocks.1"}),
]

# --- detect ---
# Residual detection's traps: an Identity shortcut and one-call projection shortcuts (transformers
# ResNet), sums of branches that are no residual (RepVGG, a MoE's shared expert), a block called
# several times, and parallel blocks (x + attn(ln(x)) + mlp(ln(x))) that are one site.


class RepVGGBlock(nn.Module):
    """conv3x3(x) + conv1x1(x) + bn(x): three parameterised branches, no identity, no residual."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv3 = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))
        self.conv1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv3(x) + self.conv1(x) + self.bn(x))


class TinyRepVGG(nn.Module):
    """Two RepVGG blocks, then one true residual block (`relu(x + f(x))`)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 1, 1)
        self.blocks = nn.Sequential(RepVGGBlock(8), RepVGGBlock(8), PlainBlock(8))
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class SharedBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.f = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(self.ln(x))


class LoopedShared(nn.Module):
    """One block called `times` times per forward (ALBERT-style weight sharing)."""

    def __init__(self, d: int = 16, times: int = 3) -> None:
        super().__init__()
        self.inp, self.block, self.out = nn.Linear(d, d), SharedBlock(d), nn.Linear(d, 4)
        self.times = times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for _ in range(self.times):
            x = self.block(x)
        return self.out(x)


class SharedExpertMoE(nn.Module):
    """DeepSeek-style: routed experts (router + experts) plus an always-on shared expert, summed:
    an add of two branch outputs, not a residual."""

    def __init__(self, d: int, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList([MlpBlock(d, 2 * d) for _ in range(experts)])
        self.shared = MlpBlock(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        weights = torch.softmax(self.router(x), dim=-1)  # (b, t, e); dense routing, tiny
        routed = sum(weights[..., i:i + 1] * e(x) for i, e in enumerate(self.experts))
        return routed + self.shared(x)


class MoEBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mix, self.moe = nn.Linear(d, d), SharedExpertMoE(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.ln1(x))
        return x + self.moe(self.ln2(x))


class TinyMoE(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.Sequential(MoEBlock(d), MoEBlock(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    return ResNetForImageClassification(ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2], layer_type="basic", num_labels=4))


def hf_qwen2_moe() -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        max_position_embeddings=64))


def hf_gpt_neox_parallel() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        vocab_size=128, max_position_embeddings=64, use_parallel_residual=True))


def hf_cohere() -> nn.Module:
    from transformers import CohereConfig, CohereForCausalLM

    return CohereForCausalLM(CohereConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2))


class TokenBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln, self.f = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b·p², n, c)
        return x + self.f(self.ln(x))


class UnfoldStage(nn.Module):
    """MobileViT-style: an image's p×p patch positions unfolded into the batch, `(b·p², n, c)`,
    a transformer over the patches, folded back and fused with the input. Its adds run on a
    batch 4× the stage's: hyper's streams cannot pass through the stage folded into its batch,
    so each stage's transformer is a trunk of its own."""

    def __init__(self, c: int, p: int = 2, depth: int = 2) -> None:
        super().__init__()
        self.conv_in, self.conv_out = nn.Conv2d(c, c, 3, 1, 1), nn.Conv2d(2 * c, c, 1)
        self.layers = nn.ModuleList([TokenBlock(c) for _ in range(depth)])
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w)
        b, c, h, w = x.shape
        p = self.p
        y = self.conv_in(x).reshape(b, c, h // p, p, w // p, p)
        t = y.permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, (h // p) * (w // p), c)
        for layer in self.layers:
            t = layer(t)
        y = t.reshape(b, p, p, h // p, w // p, c).permute(0, 5, 3, 1, 4, 2).reshape(b, c, h, w)
        return self.conv_out(torch.cat([x, y], 1))


class TinyUnfoldNet(nn.Module):
    def __init__(self, c: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, 1, 1)
        self.stages = nn.Sequential(UnfoldStage(c), UnfoldStage(c))
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stages(self.stem(x)).mean((2, 3)))


def hf_squeezebert() -> nn.Module:
    """SqueezeBERT: its encoder calls each layer as `layer.forward(...)` (no hooks run), the
    stream is channels-first (b, d, t) through Conv1d, and each add sits in a child that takes
    the skip as an argument (`conv(h) + input_tensor`)."""
    from transformers import SqueezeBertConfig, SqueezeBertForMaskedLM

    return SqueezeBertForMaskedLM(SqueezeBertConfig(
        hidden_size=32, embedding_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, vocab_size=128, max_position_embeddings=64))


def hf_levit() -> nn.Module:
    """LeViT: its attention keeps an eval-mode cache of biases gathered from a parameter (cleared
    by `train()`): runs made while tracing must not leave one behind, or a reloaded model would
    keep the biases of the weights it had before loading."""
    from transformers import LevitConfig, LevitForImageClassification

    return LevitForImageClassification(LevitConfig(
        image_size=32, patch_size=16, hidden_sizes=[16, 32], num_attention_heads=[1, 2],
        depths=[1, 1], key_dim=[8, 8], mlp_ratio=[2, 2], attention_ratio=[2, 2],
        down_ops=[["Subsample", 8, 1, 4, 2, 2]], num_labels=4))


DETECT_ZOO = [
    ZooCase("hf_resnet", hf_resnet, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
            {"plain": 4}, {}, [2]),  # one trunk: the two stages, across the downsampling
    ZooCase("hf_levit", hf_levit, lambda: {"pixel_values": torch.randn(2, 3, 32, 32)},
            {"plain": 5}, {}, [2],  # one trunk over the two stages; the subsample has no add
            {f"levit.encoder.stages.{i}" for i in ("0.layers.0", "0.layers.1", "0.layers.3",
                                                   "1.layers.0", "1.layers.1")}),
    ZooCase("repvgg", TinyRepVGG, lambda: (torch.randn(2, 3, 8, 8),), {"plain": 1}, {}, [1],
            {"blocks.2"}),
    ZooCase("looped_shared", LoopedShared, lambda: (torch.randn(2, 5, 16),), {"pre_norm": 1},
            {"layer_norm": 1}, [1], {"block"}),
    ZooCase("moe_shared_expert", TinyMoE, lambda: (torch.randn(2, 5, 16),), {"pre_norm": 4},
            {"layer_norm": 4}, [2], {"blocks.0", "blocks.1"}),
    ZooCase("hf_squeezebert", hf_squeezebert, lambda: {"input_ids": tokens(128)},
            {"post_norm": 4}, {"layer_norm": 6}, [2],
            {f"transformer.encoder.layers.{i}.{m}" for i in (0, 1)
             for m in ("post_attention", "output")}),
    ZooCase("unfold_patches", TinyUnfoldNet, lambda: (torch.randn(2, 3, 8, 8),),
            {"pre_norm": 4}, {"layer_norm": 4}, [2, 2],
            {f"stages.{i}.layers.{j}" for i in (0, 1) for j in (0, 1)}),
    ZooCase("hf_qwen2_moe", hf_qwen2_moe, lambda: {"input_ids": tokens(128)}, {"pre_norm": 4},
            {"rms_norm": 5}, [2], {"model.layers.0", "model.layers.1"}),
    # (GPT-NeoX with parallel residuals is the hyper rows' `hf_neox_parallel`; its builder here
    # serves tests/test_residual_sites.py)
]
ZOO += DETECT_ZOO
# a residual added inside the branch's own module, with the skip handed in by the caller
ZOO.append(ZooCase("hf_bloom", hf_bloom, lambda: {"input_ids": tokens(128)}, {"pre_norm": 4},
                   {"layer_norm": 6}, [2],
                   {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("self_attention", "mlp")}))


class NormAttnNorm(nn.Module):
    """DBRX's `norm_attn_norm`: attention's residual inside, returning the stream and the FFN's
    normalised input as a tuple."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm_1, self.attn, self.norm_2 = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.norm_1(x))
        return x, self.norm_2(x)


class TupleForkBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm_attn_norm, self.ffn = NormAttnNorm(d), MlpBlock(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        resid, h = self.norm_attn_norm(x)
        return resid + self.ffn(h)


class TupleForkNet(nn.Module):
    def __init__(self, d: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[TupleForkBlock(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        return self.norm(self.blocks(x))


# the FFN's skip and its branch both start from a child's tuple output
# (the FFN's add is "plain": its norm sits in the child, out of the block's graph)
ZOO.append(ZooCase("tuple_fork", TupleForkNet, lambda: (torch.randn(2, 5, 16),),
                   {"pre_norm": 2, "plain": 2}, {"layer_norm": 5}, [2],
                   {"blocks.0", "blocks.1", "blocks.0.norm_attn_norm",
                    "blocks.1.norm_attn_norm"}))


class SameInputAttention(nn.Module):
    """Funnel's attention, called `attn(h, h, h)`: query, key and value are one tensor, the
    keys viewed by the batch size read off the query, and the residual taken on the query."""

    def __init__(self, d: int, heads: int = 2) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm, self.heads = nn.LayerNorm(d), heads

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                ) -> torch.Tensor:
        b, t, d = query.shape
        q = self.q(self.norm(query)).view(b, t, self.heads, -1).transpose(1, 2)
        k = self.k(self.norm(key)).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        v = self.v(self.norm(value)).view(b, t, self.heads, d // self.heads).transpose(1, 2)
        y = torch.softmax(q @ k.transpose(-1, -2), -1) @ v  # (b, h, t, d/h)
        return query + self.o(y.transpose(1, 2).reshape(b, t, d))


class SameInputNet(nn.Module):
    def __init__(self, d: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList([SameInputAttention(d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        for layer in self.layers:
            x = layer(x, x, x)
        return self.norm(x)


class ClsTokenBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.mix, self.norm2 = nn.LayerNorm(d), nn.Linear(d, d), nn.LayerNorm(d)
        self.mlp = MlpBlock(d, 2 * d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClsStage(nn.Module):
    """CvT's stage: a strided conv embedding, `b, c, h, w = x.shape` read before its layers,
    tokens (with a class token `cls.expand(b, -1, -1)` joined in front in the last stage) through
    its layers, then split and viewed back to an image by the batch size read before."""

    def __init__(self, c_in: int, d: int, cls: bool) -> None:
        super().__init__()
        self.embed = nn.Conv2d(c_in, d, 3, stride=2, padding=1)
        self.cls = nn.Parameter(torch.randn(1, 1, d)) if cls else None
        self.layers = nn.ModuleList([ClsTokenBlock(d)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = self.embed(x)
        b, c, h, w = x.shape
        x = x.view(b, c, h * w).permute(0, 2, 1)  # (b, hw, c)
        cls = None
        if self.cls is not None:
            x = torch.cat((self.cls.expand(b, -1, -1), x), dim=1)
        for layer in self.layers:
            x = layer(x)
        if self.cls is not None:
            cls, x = torch.split(x, [1, h * w], 1)
        return x.permute(0, 2, 1).view(b, c, h, w), cls


class ClsStagedNet(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.stages = nn.ModuleList([ClsStage(3, d, False), ClsStage(d, d, True)])
        self.norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, 3, h, w)
        cls = None
        for stage in self.stages:
            x, cls = stage(x)
        return self.norm(x.mean((2, 3)) + cls[:, 0])  # (tokens mix only in the pooling)


# a block handed one stream through several inputs (issue 14: Funnel's layer(h, h, h))
ZOO.append(ZooCase("same_inputs", SameInputNet, lambda: (torch.randn(2, 5, 16),),
                   {"pre_norm": 2}, {"layer_norm": 3}, [2], {"layers.0", "layers.1"}))
# stages whose own code reads and reshapes the stream around their layers (issue 14: CvT)
ZOO.append(ZooCase("cls_stages", ClsStagedNet, lambda: (torch.randn(2, 3, 8, 8),),
                   {"pre_norm": 4}, {"layer_norm": 5}, [2],
                   {"stages.0.layers.0", "stages.1.layers.0"}))
