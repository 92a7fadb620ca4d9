"""Support matrix: run surgeon on a corpus of tiny, randomly initialised architectures and write
`docs/support.md` (a table a user can read) and `docs/support.json` (everything).

One command: `PYTHONPATH=. python examples/compat/support_matrix.py` (`--quick` for 6 rows,
`--out DIR` to write elsewhere). Each architecture runs in its own subprocess with a timeout, every
cell catches its own error, and a red cell carries the first line of that error.
Exactness: a pass that promises to preserve the output must move it by at most TOL (max |Δ| over
max |output|, eval mode, on the default example); `adyt` promises no exactness, so it is green when
it converts and its output stays finite.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TOL = 1e-4
ROW_TIMEOUT = 300  # cvt takes ~100-150 s alone on a loaded 2-core machine
CELLS = ["build", "inspect", "aion", "hyper", "adyt", "all", "train", "save_load", "generate",
         "convert_verify", "grow_copy", "grow_zero", "grow_random"]
LM_TASKS = {"causal"}
SEQ2SEQ_TASKS = {"seq2seq", "speech2seq"}
TINY = dict(hidden_size=32, d_model=32, n_embd=32, intermediate_size=64, d_ff=64, n_inner=64,
            ffn_dim=64, encoder_ffn_dim=64, decoder_ffn_dim=64, num_hidden_layers=2, n_layer=2,
            num_layers=2, encoder_layers=2, decoder_layers=2, num_decoder_layers=2,
            num_attention_heads=4, n_head=4, num_heads=4, encoder_attention_heads=4,
            decoder_attention_heads=4, num_key_value_heads=2, vocab_size=128,
            max_position_embeddings=64, n_positions=64, head_dim=8, d_kv=8, image_size=32,
            patch_size=8, num_channels=3, num_labels=4, embedding_size=32, rotary_dim=8,
            decoder_vocab_size=128, max_source_positions=32, max_target_positions=64)

# (name, family, model_type, task, extra config kwargs)
CORPUS: list[tuple[str, str, str, str, dict]] = [
    ("gpt_neo", "decoder", "gpt_neo", "causal", {"attention_types": [[["global", "local"], 1]],
                                              "attention_layers": ["global", "local"]}),
    *[(m, "decoder", m, "causal", {}) for m in [
        "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3",
        "gpt2", "gpt_neox", "gptj", "falcon", "bloom", "opt", "mpt", "stablelm",
        "starcoder2", "olmo", "olmo2", "cohere", "granite", "glm", "helium", "smollm3",
        "exaone4", "ministral", "codegen", "biogpt", "xglm", "persimmon", "nemotron", "arcee"]],
    *[(m, "moe", m, "causal", {"num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4,
                               "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                               "shared_expert_intermediate_size": 32}) for m in [
        "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "phimoe", "jetmoe"]],
    ("dbrx", "moe", "dbrx", "causal",  # its default attn_config lacks rope_theta and clip_qkv
     {"attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
      "ffn_config": {"hidden_size": 32, "ffn_hidden_size": 64, "moe_num_experts": 4,
                     "moe_top_k": 2},
      "__init__": {"d_model": 32}, "n_heads": 4, "n_layers": 2, "max_seq_len": 64}),
    ("deepseek_v3", "moe", "deepseek_v3", "causal",  # MLA: one k/v head per query head
     {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
      "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16,
      "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
      "qk_head_dim": 16, "num_key_value_heads": 4}),
    # SSMs: 4 heads of 16 over the inner width expand·hidden = 64; derived fields set explicitly
    *[(m, "ssm", m, "causal", {"state_size": 8, "expand": 2, "num_heads": 4, "head_dim": 16,
                               "n_groups": 1, "conv_kernel": 4, "time_step_rank": 4,
                               "chunk_size": 16}) for m in [
        "mamba", "mamba2", "falcon_mamba"]],
    # hybrids: a mamba layer and an attention layer each; mamba heads 4 × 16 = 2·hidden
    ("jamba", "hybrid", "jamba", "causal",
     {"mamba_d_state": 8, "mamba_dt_rank": 4, "num_experts": 4, "attn_layer_period": 2,
      "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1}),
    ("bamba", "hybrid", "bamba", "causal",
     {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1,
      "mamba_chunk_size": 16, "attn_layer_indices": [1]}),
    ("falcon_h1", "hybrid", "falcon_h1", "causal",
     {"mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8,
      "mamba_n_groups": 1, "mamba_chunk_size": 16}),
    ("zamba", "hybrid", "zamba", "causal",
     {"attention_hidden_size": 64, "attention_head_dim": 16, "mamba_dt_rank": 4,
      "mamba_d_state": 8, "layers_block_type": ["hybrid", "hybrid"]}),
    ("recurrent_gemma", "hybrid", "recurrent_gemma", "causal",
     {"lru_width": 32, "block_types": ["recurrent", "attention"], "attention_window_size": 16}),
    ("granitemoehybrid", "hybrid", "granitemoehybrid", "causal",
     {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 8, "mamba_n_groups": 1,
      "mamba_chunk_size": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
      "shared_intermediate_size": 32, "layer_types": ["linear_attention", "full_attention"]}),
    *[(m, "encoder", m, "masked", {}) for m in [
        "bert", "roberta", "albert", "distilbert", "electra", "deberta-v2", "deberta",
        "modernbert", "xlm-roberta", "camembert", "mpnet", "squeezebert", "ernie",
        "megatron-bert", "roformer", "nystromformer", "data2vec-text"]],
    ("funnel", "encoder", "funnel", "masked", {"block_sizes": [1, 1], "block_repeats": [1, 1],
                                           "d_head": 8, "d_inner": 64}),
    *[(m, "enc-dec", m, "seq2seq", {}) for m in [
        "t5", "bart", "mbart", "marian", "pegasus", "mt5", "blenderbot", "led", "plbart",
        "m2m_100", "umt5", "longt5"]],
    *[(m, "vision", m, "image", {}) for m in [
        "vit", "deit", "convnext", "resnet", "regnet", "beit", "dinov2",
        "segformer", "convnextv2", "efficientnet", "mobilenet_v2", "cvt"]],
    ("bit", "vision", "bit", "image", {"num_groups": 2}),  # GroupNorm over 4-channel stages
    # per-stage lists that must agree with the two-stage depths
    ("levit", "vision", "levit", "image",
     {"depths": [1, 1], "hidden_sizes": [16, 32], "num_attention_heads": [1, 2],
      "key_dim": [8, 8], "mlp_ratio": [2, 2], "attention_ratio": [2, 2],
      "down_ops": [["Subsample", 8, 1, 4, 2, 2]], "patch_size": 16}),
    ("poolformer", "vision", "poolformer", "image",
     {"num_encoder_blocks": 2, "patch_sizes": [7, 3], "strides": [4, 2], "padding": [2, 1]}),
    # a window no larger than the last stage's 2×2 tokens (32 px, 8 px patches, one merge)
    ("swin", "vision", "swin", "image", {"window_size": 2, "embed_dim": 16}),
    ("mobilevit", "vision", "mobilevit", "image",
     {"neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 64]}),
    # their default LayerDrop on: hyper-connections carry the streams past a skipped layer
    *[(m, "audio", m, "audio", {}) for m in [
        "wav2vec2", "hubert", "wavlm", "data2vec-audio", "unispeech", "sew"]],
    ("whisper", "audio", "whisper", "speech2seq", {}),
    *[(m, "torchvision", m, "tv", {}) for m in [
        "resnet18", "mobilenet_v3_small", "convnext_tiny", "vit_b_16", "efficientnet_b0",
        "regnet_y_400mf"]],
    *[(m, "timm", m, "timm", {}) for m in [
        "resnet18", "vit_tiny_patch16_224", "convnext_atto", "efficientnet_b0"]],
]
# `surgeon.grow` arguments a user passes for a row: Jamba's attn/expert_layer_period give block
# 1's kind (attention + MoE) to no third block while block 0 keeps its own, so grow refuses
# the default and names --source 0 (a mamba block, as the period makes block 2).
GROW_ARGS = {"jamba": {"source": 0}}
QUICK = ["llama", "gpt2", "bert", "mixtral", "t5", "vit"]


def first_line(e: BaseException | str) -> str:
    text = str(e).strip() or type(e).__name__
    line = text.splitlines()[0].strip()
    name = type(e).__name__ if isinstance(e, BaseException) else ""
    line = f"{name}: {line}" if name and not line.startswith(name) else line
    return line[:160]


def tiny_config(model_type: str, extra: dict):
    from transformers import AutoConfig

    # nested sub-configs (dicts) go to the constructor: some defaults cannot build a model; so do
    # the fields in "__init__", which the constructor copies into a sub-config
    nested = {k: v for k, v in extra.items() if isinstance(v, dict) and k != "__init__"}
    cfg = AutoConfig.for_model(model_type, **nested, **extra.get("__init__", {}))
    subs = [cfg] + [getattr(cfg, k) for k in ("text_config", "vision_config", "audio_config")
                    if getattr(cfg, k, None) is not None and getattr(cfg, k) is not cfg]
    for c in subs:
        for k, v in {**TINY, **extra}.items():
            if isinstance(v, dict):
                continue  # a sub-config: it went to the constructor above
            if hasattr(c, k) and not isinstance(getattr(c, k), (list, tuple, dict)):
                try:
                    setattr(c, k, v)
                except (AttributeError, TypeError, ValueError, NotImplementedError):
                    pass  # a derived property (e.g. head_dim, Funnel's num_hidden_layers)
        for k, v in extra.items():
            if isinstance(v, list) and hasattr(c, k):
                setattr(c, k, v)
        # per-stage lists: as many stages as the shrunk `depths` where the config has it (else
        # as many as it had: MobileViT indexes hidden_sizes[2]); a list the row gives is kept
        depths = getattr(c, "depths", None)
        stages = min(len(depths), 2) if isinstance(depths, (list, tuple)) and depths else None
        for k in ("depths", "hidden_sizes", "embed_dim", "num_heads", "layer_types",
                  "block_types", "num_attention_heads"):
            v = getattr(c, k, None)
            if k not in extra and isinstance(v, (list, tuple)) and v:
                n = stages or len(v)
                if k == "depths":
                    setattr(c, k, [1] * n)
                elif k == "hidden_sizes":
                    setattr(c, k, [16 * (i + 1) for i in range(n)])
                elif k == "num_heads" or k == "num_attention_heads":
                    setattr(c, k, [1] * n)
        if getattr(c, "layer_types", None):
            try:
                c.layer_types = list(c.layer_types)[:2]
            except AttributeError:
                pass  # derived from other fields (SSMs, hybrids): it follows num_hidden_layers
    if hasattr(cfg, "stage_names"):
        # a backbone config derives stage_names / out_features / out_indices from depths (or
        # num_hidden_layers) in its constructor: build it again from the shrunk fields, so that
        # the config saved with the model rebuilds it
        d = {k: v for k, v in cfg.to_dict().items()
             if k not in ("stage_names", "out_features", "out_indices", "_out_features",
                          "_out_indices")}
        cfg = type(cfg).from_dict(d)
    for k in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        if getattr(cfg, k, None) is not None and isinstance(getattr(cfg, k), int):
            setattr(cfg, k, min(getattr(cfg, k), 1))
    if hasattr(cfg, "use_cache"):
        cfg.use_cache = False
    return cfg


def build(model_type: str, task: str, extra: dict):
    """(model, example or None, is_hf)."""
    import torch

    if task == "tv":
        import torchvision.models as tvm

        return getattr(tvm, model_type)(num_classes=4), (torch.randn(1, 3, 64, 64),), False
    if task == "timm":
        import timm

        m = timm.create_model(model_type, pretrained=False, num_classes=4)
        size = 224 if "vit" in model_type else 64
        return m, (torch.randn(1, 3, size, size),), False
    import transformers as tf

    cfg = tiny_config(model_type, extra)
    auto = {"causal": tf.AutoModelForCausalLM, "masked": tf.AutoModelForMaskedLM,
            "seq2seq": tf.AutoModelForSeq2SeqLM, "speech2seq": tf.AutoModelForSpeechSeq2Seq,
            "image": tf.AutoModelForImageClassification,
            "audio": tf.AutoModel}[task]
    torch.manual_seed(0)
    if getattr(cfg, "architectures", ()) is None:
        cfg.architectures = []  # transformers' auto classes iterate it (DeiT's default is None)
    try:
        model = auto.from_config(cfg)
    except ValueError:
        model = tf.AutoModel.from_config(cfg)
    return model, None, True


def first_tensor(out) -> torch.Tensor:
    """The output's main tensor with its graph (logits, last hidden state, or the first one)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    for k in ("logits", "last_hidden_state"):
        if getattr(out, k, None) is not None:
            return getattr(out, k)
    items = out.values() if isinstance(out, dict) else out
    for v in items:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v
        if isinstance(v, (tuple, list, dict)):
            return first_tensor(v)
    raise RuntimeError(f"no tensor in the output ({type(out).__name__})")


def vec(out) -> torch.Tensor:
    from surgeon.applying import output_vector

    return output_vector(out).detach().float()


def run_row(name: str, family: str, model_type: str, task: str, extra: dict) -> dict:
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import surgeon
    from surgeon.applying import plain_output

    cells: dict[str, dict] = {}

    def cell(key: str, fn):
        t = time.time()
        try:
            r = fn()
            cells[key] = {"ok": True, **(r or {})}
        except Exception as e:  # noqa: BLE001 - every cell catches its own error
            cells[key] = {"ok": False, "reason": first_line(e)}
        cells[key]["s"] = round(time.time() - t, 2)
        return cells[key]["ok"]

    state: dict = {}

    def do_build():
        model, example, is_hf = build(model_type, task, extra)
        state.update(model=model, example=example, hf=is_hf)
        return {"params": sum(p.numel() for p in model.parameters())}

    if not cell("build", do_build):
        return cells
    model, example, is_hf = state["model"], state["example"], state["hf"]
    from surgeon.applying import example_for as _ex

    def fresh():
        torch.manual_seed(0)
        m = build(model_type, task, extra)[0]
        m.load_state_dict(model.state_dict())
        return m.eval()

    def forward(m, ex):
        with torch.no_grad():
            ex = _ex(m, ex)
            out = m(*ex) if isinstance(ex, tuple) else m(**ex)
        return vec(plain_output(out))

    def do_inspect():
        ins = surgeon.inspect(model.eval(), example)
        if not ins.residuals:
            raise RuntimeError("no residual adds found")
        return {"residuals": len(ins.residuals), "norms": len(ins.norms),
                "trunks": len(ins.trunks), "counts": ins.counts()}

    cell("inspect", do_inspect)

    def do_pass(passes, exact):
        def f():
            m = fresh()
            ref = forward(m, example)
            surgeon.apply(m, passes, example)
            m.eval()
            out = forward(m, example)
            if not torch.isfinite(out).all():
                raise RuntimeError("output not finite after the pass")
            d = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()
            if exact and d > TOL:
                raise RuntimeError(f"not exact at init: max |Δ| / max |y| = {d:.3g} > {TOL}")
            state.setdefault("converted", m)
            return {"rel_delta": d, "modules": len(getattr(m, "_surgeon_manifest", []))}
        return f

    cell("aion", do_pass(["aion"], True))
    cell("hyper", do_pass(["hyper"], True))
    cell("adyt", do_pass(["adyt"], False))
    state.pop("converted", None)
    all_ok = cell("all", do_pass(["aion", "hyper", "adyt"], False))
    conv = state.get("converted") if all_ok else None

    def do_train():
        m = conv if conv is not None else fresh()
        if conv is None:
            surgeon.apply(m, ["aion", "hyper", "adyt"], example)
        m.train()
        ex = _ex(m, example)
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)
        out = m(*ex) if isinstance(ex, tuple) else m(**ex)
        loss = first_tensor(out).float().pow(2).mean()
        loss.backward()
        opt.step()
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss not finite: {loss.item()}")
        m.eval()
        return {"loss": loss.item()}

    tmp = Path(tempfile.mkdtemp(prefix=f"sm-{name}-"))
    na = {"ok": None, "reason": "not applicable"}
    if conv is None:
        for k in ("train", "save_load", "generate"):
            cells[k] = {"ok": False, "reason": "needs all passes: " + cells["all"]["reason"]}
    else:
        cell("train", do_train)

        def do_save_load():
            if not is_hf:
                raise RuntimeError("not a transformers model: surgeon.save needs base=")
            ref = forward(conv, example)
            surgeon.save(conv, tmp / "saved")
            m2 = surgeon.load(tmp / "saved").eval()
            d = (forward(m2, example) - ref).abs().max().item()
            if d != 0.0:
                raise RuntimeError(f"reloaded output differs: max |Δ| = {d:.3g}")
            return {"max_abs": d}

        cell("save_load", do_save_load)
        if task in LM_TASKS or task in SEQ2SEQ_TASKS:
            def do_generate():
                ids = torch.randint(2, 100, (1, 4))
                extra_ids = {}
                if task in SEQ2SEQ_TASKS:  # the encoder's input of the example, with a cache
                    ids = _ex(conv, example)[conv.main_input_name][:1]
                    extra_ids = {"decoder_start_token_id": 0, "use_cache": True}
                if task == "speech2seq":  # Whisper strips pad/eos ids and fails on nothing left
                    extra_ids["suppress_tokens"] = [0, 1]
                out = conv.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0,
                                    **extra_ids)
                if out.shape[-1] < (2 if task in SEQ2SEQ_TASKS else 4):
                    raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
                return {"shape": list(out.shape)}
            cell("generate", do_generate)
        else:
            cells["generate"] = dict(na)

    src = tmp / "hf"
    if is_hf:
        def do_convert():
            fresh().save_pretrained(src)
            surgeon.convert(str(src), tmp / "conv", ["aion", "hyper", "adyt"])
            v = surgeon.verify(tmp / "conv")
            if not v.ok:
                raise RuntimeError("verify: " + "; ".join(v.failures))
            return {"reload_difference": v.reload_difference}
        cell("convert_verify", do_convert)
    else:
        cells["convert_verify"] = dict(na, reason="not a saved transformers checkpoint")

    if task in LM_TASKS and is_hf:
        if not src.exists():
            fresh().save_pretrained(src)
        ref = forward(fresh(), example)
        import transformers as tf

        for init in ("copy", "zero", "random"):
            def do_grow(init=init):
                surgeon.grow(src, tmp / f"grow-{init}", init=init, overwrite=True,
                             **GROW_ARGS.get(name, {}))
                g = tf.AutoModelForCausalLM.from_pretrained(tmp / f"grow-{init}").eval()
                out = forward(g, example)
                if not torch.isfinite(out).all():
                    raise RuntimeError("grown output not finite")
                d = ((out - ref).abs().max() / ref.abs().max()).item()
                if init == "zero" and d > TOL:
                    raise RuntimeError(f"zero init not function-preserving: rel max |Δ| {d:.3g}")
                return {"rel_delta": d}
            cell(f"grow_{init}", do_grow)
    else:
        for init in ("copy", "zero", "random"):
            cells[f"grow_{init}"] = dict(na)
    shutil.rmtree(tmp, ignore_errors=True)
    return cells


def probe(task: str) -> str | None:
    """None if the package for `task` imports in a clean subprocess, else the reason."""
    pkg = {"tv": "torchvision", "timm": "timm"}.get(task)
    if pkg is None:
        return None
    code = "import torchvision, torchvision.ops; torchvision.ops.nms" if pkg == "torchvision" \
        else "import timm"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode == 0:
        return None
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return f"{pkg} unavailable: {(lines[-1] if lines else 'import failed')[:140]}"


def render(rows: list[dict], meta: dict) -> str:
    mark = {True: "✓", False: "✗", None: "–"}
    head = "| architecture | family | " + " | ".join(CELLS) + " |"
    lines = ["# Support matrix", "",
             f"Generated by `PYTHONPATH=. python examples/compat/support_matrix.py` on "
             f"{meta['date']} ({meta['machine']}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, surgeon {meta['surgeon']}; {meta['seconds']} s wall). "
             "Every model is built from a "
             "tiny config with random weights.", "",
             f"✓ works, ✗ fails (reason below the table), – not applicable. Exact passes (aion, "
             f"hyper) must move the output by at most {TOL} (max |Δ| / max |y|, eval mode); "
             "`all` is aion+hyper+adyt; `train` is one AdamW step in train mode on the converted "
             "model; `save_load` a surgeon.save/surgeon.load round trip with identical output; "
             "`convert_verify` `surgeon.convert` + `surgeon.verify` on a saved HF checkpoint "
             "directory; `grow_*` `surgeon.grow --init *` on decoders (zero must be "
             "function-preserving).", "", "## Summary", "",
             "| family | rows | fully green | cells green |", "|---|---|---|---|"]
    fams = sorted({r["family"] for r in rows}, key=lambda f: [r["family"] for r in rows].index(f))
    for f in fams + ["overall"]:
        rs = [r for r in rows if f in ("overall", r["family"])]
        s = summary(rs)
        lines.append(f"| {f} | {s['rows']} | {s['green_rows']} ({s['green_rate']:.0%}) | "
                     f"{s['green_cells']}/{s['cells']} ({s['cell_rate']:.0%}) |")
    lines += ["", "Rows skipped (package unavailable) count in `rows` but not in the rates.", "",
              "## Table", "", head, "|" + "---|" * (len(CELLS) + 2)]
    for r in rows:
        cs = [mark[r["cells"].get(c, {"ok": None})["ok"]] for c in CELLS]
        lines.append(f"| {r['name']} | {r['family']} | " + " | ".join(cs) + " |")
    lines += ["", "## Reasons for red cells", ""]
    for r in rows:
        for c in CELLS:
            cl = r["cells"].get(c)
            if cl and cl["ok"] is False:
                reason = cl["reason"].replace("|", "\\|")
                lines.append(f"- **{r['name']}** `{c}`: {reason}")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> dict:
    run = [r for r in rows if not r.get("skipped")]
    cells = [c for r in run for c in r["cells"].values() if c["ok"] is not None]
    green = [r for r in run if all(c["ok"] is not False for c in r["cells"].values())]
    return {"rows": len(rows), "run": len(run), "green_rows": len(green),
            "green_rate": len(green) / max(len(run), 1), "cells": len(cells),
            "green_cells": sum(bool(c["ok"]) for c in cells),
            "cell_rate": sum(bool(c["ok"]) for c in cells) / max(len(cells), 1)}


def write(rows: list[dict], out: Path, quick: bool, t0: float, partial: bool) -> dict:
    """Write support.json and support.md (after every row, so an interrupted run leaves some)."""
    import torch
    import transformers

    import surgeon

    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
                       f"python {platform.python_version()}",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "surgeon": surgeon.__version__, "tolerance": TOL, "seconds": round(time.time() - t0),
            "quick": quick, "partial": partial}
    out.mkdir(parents=True, exist_ok=True)
    fams = {r["family"] for r in rows}
    data = {"meta": meta, "cells": CELLS, "rows": rows,
            "summary": {f: summary([r for r in rows if r["family"] == f]) for f in fams}
            | {"overall": summary(rows)}}
    (out / "support.json").write_text(json.dumps(data, indent=1, default=str))
    (out / "support.md").write_text(render(rows, meta))
    return data


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "docs"))
    p.add_argument("--only", nargs="*", help="architecture names to run")
    p.add_argument("--timeout", type=int, default=ROW_TIMEOUT, help="seconds per architecture")
    p.add_argument("--inline", action="store_true",
                   help="run rows in this process (faster, no per-row timeout; --quick's default)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="rows run at once, each in its own single-threaded process")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--row-family", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.row:
        row = next(c for c in CORPUS if c[0] == a.row and c[1] == a.row_family)
        print("ROW-JSON " + json.dumps(run_row(*row), default=str))
        return 0
    corpus = CORPUS
    if a.quick:
        corpus = [c for c in CORPUS if c[0] in QUICK and c[1] != "timm" and c[1] != "torchvision"]
    if a.only:
        corpus = [c for c in CORPUS if c[0] in a.only]
    probes = {task: probe(task) for task in dict.fromkeys(c[3] for c in corpus)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    rows: list[dict] = [{"name": n, "family": f, "model_type": mt, "task": task}
                        for n, f, mt, task, _ in corpus]

    def run(i: int) -> None:
        name, family, mt, task, extra = corpus[i]
        row = rows[i]
        if probes[task]:
            row.update(skipped=True, cells={"build": {"ok": False, "reason": probes[task]}})
            return
        t = time.time()
        if a.inline or a.quick:
            row["cells"] = run_row(name, family, mt, task, extra)
        else:
            row["cells"] = run_isolated(name, family, a.timeout, env)
        row["s"] = round(time.time() - t, 1)
        with lock:
            write([r for r in rows if "cells" in r], Path(a.out), a.quick, t0, partial=True)
            bad = [c for c, v in row["cells"].items() if v["ok"] is False]
            print(f"{name:22s} {family:10s} {row['s']:6.1f}s  red: {', '.join(bad) or '-'}",
                  flush=True)

    lock = threading.Lock()
    jobs = 1 if a.inline or a.quick else max(1, a.jobs)
    with ThreadPoolExecutor(jobs) as pool:  # rows in subprocesses, `jobs` at a time
        list(pool.map(run, range(len(corpus))))
    data = write(rows, Path(a.out), a.quick, t0, partial=False)
    s = data["summary"]["overall"]
    print(f"{s['green_rows']}/{s['run']} rows fully green ({s['green_rate']:.0%}), "
          f"{s['green_cells']}/{s['cells']} cells ({s['cell_rate']:.0%}); wrote {a.out}")
    return 0



def run_isolated(name: str, family: str, timeout: int, env: dict) -> dict:
    """One row in a subprocess, so that a crash or a hang costs only that row."""
    try:
        r = subprocess.run([sys.executable, __file__, "--row", name, "--row-family", family],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"build": {"ok": False, "reason": f"timed out after {timeout} s"}}
    got = [ln for ln in r.stdout.splitlines() if ln.startswith("ROW-JSON ")]
    if got:
        return json.loads(got[-1][9:])
    err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return {"build": {"ok": False, "reason": "crashed: " + (
        err[-1][:140] if err else f"exit {r.returncode}")}}

if __name__ == "__main__":
    sys.exit(main())
