"""Convert a tiny Llama with surgeon and train it side by side with the unconverted model.

Two identical character-level Llama language models are built from one config and one seed. One
stays plain; the other goes through `surgeon.apply` (by default AION residual scaling,
hyper-connections and ADyT in place of RMSNorm). Both are trained with AdamW on the same batches of
`examples/data/toy_corpus.txt` (a synthetic text made by `examples/data/make_text.py`, regenerated
here if it is missing), and the training loss of both is printed side by side. At the end: the
held-out validation loss of both, the drift report of the conversion, the parameters the passes
added, and a `surgeon.save` / `surgeon.load` round trip that must give the same validation loss.

    python examples/convert_and_train.py                 # 300 steps, ~45 s on 2 idle cores
    python examples/convert_and_train.py --steps 20      # a quick check
    python examples/convert_and_train.py --passes "aion,hyper:streams=2,adyt:adaptive=false"
    python examples/convert_and_train.py --out /tmp/converted   # keep the saved model

`--passes` takes surgeon pass specs separated by commas; a `key=value` item after a pass belongs
to that pass, so "hyper:streams=2,mhc=true,adyt" is two passes. Nothing is downloaded.

What to expect (seed 0, 300 steps, measured 2026-12-03): AION and hyper-connections leave the
function unchanged at conversion (drift 0) and train like the plain model. ADyT is not
function-preserving (cosine 0.90 on the example), but on an untrained model `adyt` applies DyT's
training recipe (`recipe=auto`: per-role alpha0, gains matched to the untrained norms' output
scale), so the converted model trains as well: validation loss plain 0.72, all three passes
0.58. With `adyt:recipe=none` (the norms swapped, nothing else) a fresh Llama's stream of rms
~0.02 leaves tanh(alpha*x) at ~alpha*x and the model starts from near-uniform predictions; see
examples/benchmarks/adyt_training.py for the side-by-side over seeds.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import surgeon
from surgeon.nn import ADyT, AionResidual, HyperConnections, InputScale, ManifoldHyperConnections
from surgeon.recipe import split_passes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "benchmarks"))
from char_lm import (  # noqa: E402
    CharData,
    count,
    lm_loss,
    lr_factor,
    make_optimizer,
    read_text,
    val_loss,
)

SEQ_LEN = 64
BATCH = 16


# --- model and training (data, losses and the optimizer: benchmarks/char_lm.py) -------------

def build_model(vocab_size: int, seed: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    loss = lm_loss(model, batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


# --- reporting --------------------------------------------------------------------------------

SURGEON_MODULES = (AionResidual, HyperConnections, ManifoldHyperConnections, ADyT, InputScale)


def new_parameters(plain: nn.Module, converted: nn.Module) -> str:
    kinds: dict[str, list[int]] = {}
    for module in converted.modules():
        if isinstance(module, SURGEON_MODULES):
            entry = kinds.setdefault(type(module).__name__, [0, 0])
            entry[0] += 1
            entry[1] += count(module)
    parts = ", ".join(f"{n} {name} ({p:,} params)" for name, (n, p) in kinds.items())
    added = count(converted) - count(plain)
    return (f"plain {count(plain):,}, converted {count(converted):,}: {added:+,} "
            f"({100 * added / count(plain):.2f}%); surgeon modules: {parts or 'none'}")


@torch.no_grad()
def adaptive_state(model: nn.Module) -> str:
    """The range of the α that AION and ADyT use now (moved by training and `attach`)."""
    parts = []
    for cls, stat in ((AionResidual, "ratio_ema"), (ADyT, "grad_norm_ema")):
        found = [m for m in model.modules() if isinstance(m, cls)]
        if found:
            alphas = [float(m.alpha()) for m in found]
            stats = [float(getattr(m, stat)) for m in found]
            parts.append(f"{cls.__name__} alpha {min(alphas):.3f}..{max(alphas):.3f} "
                         f"({stat} {min(stats):.2e}..{max(stats):.2e})")
    return "; ".join(parts) or "no AION or ADyT modules"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--passes", default="aion,hyper,adyt",
                        help="surgeon passes, comma-separated (default aion,hyper,adyt)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the weights and batches")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory to keep the converted model in (default: a temp dir)")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--log-every", type=int, default=None,
                        help="print a row every N steps (default: about 12 rows)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    passes = split_passes(args.passes)
    t_start = time.perf_counter()
    log_every = args.log_every or max(1, args.steps // 12)

    data = CharData(read_text(), seq_len=SEQ_LEN, batch=BATCH)
    val = data.val_windows()
    print(f"corpus: {len(data.train):,} training + {len(data.val):,} validation characters, "
          f"vocabulary {data.vocab_size}; batch {BATCH} x {SEQ_LEN}, {args.steps} steps, "
          f"{torch.get_num_threads()} threads")

    plain = build_model(data.vocab_size, args.seed)
    converted = build_model(data.vocab_size, args.seed)
    same = all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 converted.state_dict().values()))
    assert same, "the two models should start identical"

    # The example the passes trace and measure drift on: two validation windows.
    example = {"input_ids": val[:2, :-1].clone()}
    t0 = time.perf_counter()
    surgeon.apply(converted, passes, example)
    convert_s = time.perf_counter() - t0
    print(f"converted with {passes} in {convert_s:.1f}s")
    start_plain, start_conv = val_loss(plain, val), val_loss(converted, val)
    print(f"validation loss at init: plain {start_plain:.4f}, converted {start_conv:.4f} "
          f"(ln V = {math.log(data.vocab_size):.4f})\n")

    opt_plain = make_optimizer(plain, args.lr)
    opt_conv = make_optimizer(converted, args.lr)
    surgeon.attach(converted, opt_conv)  # AION / ADyT statistics move at each optimizer step
    warmup = max(1, min(30, args.steps // 10))
    schedules = [torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, args.steps, warmup)) for opt in (opt_plain, opt_conv)]

    plain.train()
    converted.train()
    gen = torch.Generator().manual_seed(args.seed)
    times = [0.0, 0.0]
    sums, since = [0.0, 0.0], 0
    print(f"{'step':>6} {'plain loss':>11} {'converted':>11} {'diff':>8}   (mean since last row)")
    for step in range(1, args.steps + 1):
        batch = data.batch(gen)
        for i, (model, opt) in enumerate(((plain, opt_plain), (converted, opt_conv))):
            t = time.perf_counter()
            sums[i] += train_step(model, opt, batch)
            times[i] += time.perf_counter() - t
        for schedule in schedules:
            schedule.step()
        since += 1
        if step % log_every == 0 or step == args.steps or step == 1:
            a, b = sums[0] / since, sums[1] / since
            print(f"{step:>6} {a:>11.4f} {b:>11.4f} {b - a:>+8.4f}")
            sums, since = [0.0, 0.0], 0

    final_plain, final_conv = val_loss(plain, val), val_loss(converted, val)
    print("\nsummary")
    print(f"  validation loss ({len(val)} windows of {SEQ_LEN}): plain {final_plain:.4f}, "
          f"converted {final_conv:.4f} ({final_conv - final_plain:+.4f})")
    print(f"  time per step: plain {1000 * times[0] / args.steps:.0f} ms, converted "
          f"{1000 * times[1] / args.steps:.0f} ms; conversion {convert_s:.1f}s")
    print("  drift at conversion (output on the example vs the original, cumulative):")
    for d in converted.surgeon_drift:
        print(f"    {d.pass_name:<6} {d.modules:>3} modules  max|d| {d.max_abs:.3e}  "
              f"cosine {d.cosine:.6f}")
    print(f"  parameters: {new_parameters(plain, converted)}")
    print(f"  adaptive state after training: {adaptive_state(converted)}")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.out if args.out is not None else Path(tmp) / "converted"
        t = time.perf_counter()
        surgeon.save(converted, path)
        reloaded = surgeon.load(path)
        roundtrip_s = time.perf_counter() - t
        again = val_loss(reloaded, val)
        converted.eval()
        with torch.no_grad():
            gap = float((converted(input_ids=val[:8, :-1]).logits
                         - reloaded(input_ids=val[:8, :-1]).logits).abs().max())
        kept = f"kept in {path}" if args.out is not None else "in a temp dir"
        print(f"  save + load: {roundtrip_s:.1f}s ({kept}); reloaded validation loss "
              f"{again:.4f} (max |logit diff| {gap:.1e})")
        print(f"total time {time.perf_counter() - t_start:.0f}s")
        if again != final_conv:
            raise SystemExit(f"the reloaded model's validation loss {again} differs from "
                             f"{final_conv}")


if __name__ == "__main__":
    main()
