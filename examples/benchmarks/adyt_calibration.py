"""How closely a trained model converted to ADyT / DyT follows the original, with and without
calibration, measured on held-out text.

A tiny Llama (RMSNorm) and a tiny GPT-2 (LayerNorm) are trained on the shipped corpus
(`char_lm.py`), so their norms see real statistics, then converted with `adyt`:
uncalibrated (`adyt`), and calibrated (`adyt:calibrate=true`) on batches drawn from the
TRAINING split (`--calibration-batches` of 16 × 64 characters; also swept). Everything is
measured on the held-out validation windows, which calibration never sees: the logits' cosine
with the original's, max |Δ logits|, validation loss before and after; for adaptive ADyT and
plain DyT (`adaptive=false`). No fine-tuning. Goal: cosine ≥ 0.99 and validation loss within
2 % of the original's.

Also measured, to say where the error left comes from: the cosine when only one norm is
converted (calibrated), and each norm's local fit error against the same fit on mean-subtracted
inputs (what LayerNorm's per-token mean subtraction, which no elementwise tanh can express,
costs). Prints tables and writes examples/benchmarks/results/adyt_calibration.{json,md}.

    python examples/benchmarks/adyt_calibration.py            # ~ a few minutes on 2 cores
    python examples/benchmarks/adyt_calibration.py --quick    # 150 steps, no files
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from char_lm import CharData, build, train, val_loss  # noqa: E402

import surgeon  # noqa: E402
from passes.adyt_calibration import as_rows, fit_slope  # noqa: E402
from surgeon.nn.adyt import ADyT  # noqa: E402

RESULTS = ROOT / "examples" / "benchmarks" / "results"
GOAL_COSINE, GOAL_LOSS = 0.99, 0.02


def calibration_batches(data: CharData, count: int, seed: int = 1) -> list[torch.Tensor]:
    """`count` training batches `(16, 64)` of token ids (inputs only), from their own seed."""
    gen = torch.Generator().manual_seed(seed)
    return [data.batch(gen)[:, :-1] for _ in range(count)]


@torch.no_grad()
def logits(model: nn.Module, windows: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(input_ids=w[:, :-1]).logits.double() for w in windows.split(64)])


def compare(base: torch.Tensor, out: torch.Tensor) -> dict[str, float]:
    return {"cosine": float(F.cosine_similarity(base.flatten(), out.flatten(), dim=0)),
            "max_abs": float((base - out).abs().max())}


def convert(model: nn.Module, spec: str, example: dict, batches: list[torch.Tensor] | None
            ) -> nn.Module:
    converted = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        surgeon.apply(converted, [spec], example, calibration=batches)
    return converted


def norm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, nn.LayerNorm) or type(m).__name__.endswith("RMSNorm")]


@torch.no_grad()
def local_fits(model: nn.Module, batches: list[torch.Tensor]) -> list[dict]:
    """Each norm's local fit: relative squared error of the best `w·tanh(k·x) + b` on its
    recorded inputs, and of the same fit on the per-token mean-subtracted input."""
    names = norm_names(model)
    seen: dict[str, list] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, a, o, n=n: seen[n].append((a[0].detach(), o.detach()))) for n in names]
    model.eval()
    for b in batches:
        model(input_ids=b)
    for h in hooks:
        h.remove()
    rows = []
    for name in names:
        x = torch.cat([as_rows(a, False) for a, _ in seen[name]])
        y = torch.cat([as_rows(o, False) for _, o in seen[name]])
        bias = getattr(model.get_submodule(name), "bias", None) is not None
        spread = float((y - y.mean()).pow(2).sum())
        slope, _, _, err = fit_slope(x, y, bias)
        _, _, _, centred = fit_slope(x - x.mean(-1, keepdim=True), y, bias)
        rows.append({"norm": name, "input_rms": float(x.pow(2).mean().sqrt()),
                     "token_rms_spread": float(x.pow(2).mean(-1).sqrt().std()
                                               / x.pow(2).mean(-1).sqrt().mean()),
                     "slope": slope, "relative_error": err / spread,
                     "relative_error_mean_removed": centred / spread})
    return rows


def run_arch(arch: str, data: CharData, args: argparse.Namespace) -> dict:
    start = time.perf_counter()
    model = build(arch, data.vocab_size, seed=0)
    run = train(model, data, steps=args.steps, seed=0)
    model.eval()
    trained = time.perf_counter() - start
    windows = data.val_windows()
    base, base_loss = logits(model, windows), val_loss(model, windows)
    batches = calibration_batches(data, args.calibration_batches)
    example = {"input_ids": batches[0][:2]}  # what `surgeon convert` uses without a file: 2 × 64
    rows = []
    for adaptive in (True, False):
        kind = "ADyT" if adaptive else "DyT"
        spec = "adyt" if adaptive else "adyt:adaptive=false"
        cal = spec + (":" if adaptive else ",") + "calibrate=true"
        counts = sorted({1, 4, args.calibration_batches}) if adaptive else [
            args.calibration_batches]  # DyT's fit is ADyT's: only α(t) differs, s absorbs it
        variants = [("uncalibrated", spec, None)]
        variants += [("calibrated on the example (2 × 64 tokens)", cal, None)] if adaptive else []
        variants += [(f"calibrated on {n} training batches ({n * 16 * 64} tokens)", cal,
                      batches[:n]) for n in counts]
        for label, s, b in variants:
            converted = convert(model, s, example, b)
            out = logits(converted, windows)
            adyts = [m for m in converted.modules() if isinstance(m, ADyT)]
            slopes = [float(m.alpha().detach() * m.input_scale) for m in adyts]
            rows.append({"arch": arch, "kind": kind, "variant": label, **compare(base, out),
                         "val_loss": base_loss, "val_loss_after": val_loss(converted, windows),
                         "alpha_t": sorted({round(float(m.alpha().detach()), 4) for m in adyts}),
                         "slope_range": [min(slopes), max(slopes)]})
            r = rows[-1]
            r["loss_change"] = r["val_loss_after"] / base_loss - 1
            print(f"  {arch} {kind:4} {label:44} cos {r['cosine']:.4f}  max|Δ| "
                  f"{r['max_abs']:.3g}  val {base_loss:.4f} → {r['val_loss_after']:.4f}",
                  flush=True)
    # where the calibrated ADyT's error comes from: one norm converted at a time, and all but
    # the final norm
    cal = "adyt:calibrate=true"
    names = norm_names(model)
    single = []
    for name in names:
        out = logits(convert(model, f"{cal},include={name}", example, batches), windows)
        single.append({"norm": name, **compare(base, out)})
    final = names[-1]
    out = logits(convert(model, f"{cal},exclude={final}", example, batches), windows)
    without_final = {"excluded": final, **compare(base, out)}
    return {"arch": arch, "steps": args.steps, "train_seconds": trained,
            "train_val_loss": run.val, "rows": rows, "one_norm_at_a_time": single,
            "all_but_final": without_final, "local_fits": local_fits(model, batches)}


def markdown(results: list[dict], machine: dict, date: str, args: argparse.Namespace) -> str:
    lines = [f"# adyt_calibration ({date})", "",
             f"Tiny Llama (RMSNorm) and GPT-2 (LayerNorm), d=64, 4 layers, trained {args.steps} "
             "steps on the shipped corpus, converted with `adyt` without fine-tuning; "
             "calibration batches (16 × 64 characters) from the training split, everything "
             f"measured on {results[0]['val_windows']} held-out validation windows of 64. "
             f"{machine['platform']}, {machine['cpus']} CPUs, torch {machine['torch']}, "
             f"{machine['seconds']:.0f} s in all.", "",
             "| model | norm → | variant | logits cosine | max \\|Δ\\| | val loss | after | "
             "change |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {r['arch']} | {r['kind']} | {r['variant']} | {r['cosine']:.4f} | "
                         f"{r['max_abs']:.3g} | {r['val_loss']:.4f} | {r['val_loss_after']:.4f}"
                         f" | {100 * r['loss_change']:+.2f} % |")
    lines += ["", f"Goal: cosine ≥ {GOAL_COSINE} and val loss within {100 * GOAL_LOSS:.0f} % "
              "(calibrated on the most batches):", ""]
    for res in results:
        for r in res["rows"]:
            if r["variant"].startswith(f"calibrated on {args.calibration_batches} "):
                ok = r["cosine"] >= GOAL_COSINE and abs(r["loss_change"]) <= GOAL_LOSS
                lines.append(f"- {r['arch']} {r['kind']}: cosine {r['cosine']:.4f}, loss "
                             f"{100 * r['loss_change']:+.2f} %: {'met' if ok else 'MISSED'}")
    for res in results:
        lines += ["", f"## {res['arch']}: where the calibrated ADyT's error comes from", "",
                  "| norm | input rms | token rms spread | fitted slope | local rel. error | "
                  "same, mean removed | logits cosine, only this norm converted |",
                  "|---|---|---|---|---|---|---|"]
        single = {s["norm"]: s for s in res["one_norm_at_a_time"]}
        for f in res["local_fits"]:
            lines.append(f"| {f['norm']} | {f['input_rms']:.3g} | {f['token_rms_spread']:.3f} | "
                         f"{f['slope']:.3g} | {f['relative_error']:.2e} | "
                         f"{f['relative_error_mean_removed']:.2e} | "
                         f"{single[f['norm']]['cosine']:.5f} |")
        w = res["all_but_final"]
        lines += ["", f"All norms but the final `{w['excluded']}` converted (calibrated): logits "
                  f"cosine {w['cosine']:.4f}, max |Δ| {w['max_abs']:.3g}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--calibration-batches", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="150 steps, 4 batches, no files")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.calibration_batches = 150, 4
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = CharData(seq_len=64, batch=16)
    results = []
    for arch in ("llama", "gpt2"):
        print(f"{arch}: training {args.steps} steps", flush=True)
        results.append(run_arch(arch, data, args))
        results[-1]["val_windows"] = len(data.val_windows())
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "torch": torch.__version__, "threads": args.threads,
               "seconds": time.perf_counter() - start}
    date = datetime.date.today().isoformat()
    text = markdown(results, machine, date, args)
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "adyt_calibration.md").write_text(text)
        (RESULTS / "adyt_calibration.json").write_text(json.dumps(
            {"date": date, "machine": machine, "args": vars(args), "results": results},
            indent=2) + "\n")


if __name__ == "__main__":
    main()
