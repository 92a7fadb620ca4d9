"""Training from scratch with DyT / ADyT in place of the norms, against the plain model.

A tiny Llama and a tiny GPT-2 (`char_lm.build`: random weights, nothing downloaded) learn the
shipped character corpus in four arms: plain; DyT (`adyt` with its training recipe, α fixed);
ADyT (the recipe, α(t) adapting); AION+ADyT (`aion`, then ADyT with the recipe). Two reference
arms run on the first seed only: "ADyT (no recipe)" (`adyt:recipe=none`, the norms swapped with
α0 0.5 and nothing else), which shows what the recipe fixes, and "DyT + trunk scale" (the
recipe plus DyT's learnable scale after the embedding, `input_scale=rms`), which shows why that
part of DyT's recipe is off by default.
Each converted arm goes through `surgeon.apply(model, passes, example)` on the freshly built
model, then its optimizer is built and `surgeon.attach`ed (so ADyT's α(t) and AION's statistics
move at each step). For one seed every arm starts from the same random weights and sees the same
batches in the same order; validation loss on the held-out tail is taken at 25 %, 50 % and
100 % of the budget, over 3 seeds. Goal: DyT and ADyT end within 5 % of the plain model's final
validation loss. Prints a table (mean ± std over seeds, ratio to plain, PASS/MISS) and writes
examples/benchmarks/results/adyt_training.{json,md}, with each converted run's α after training
(per norm role) and the parameters the passes added outside the norms (the recipe's trunk scale).

    python examples/benchmarks/adyt_training.py                  # 1000 steps, 3 seeds: ~20 min
                                                                 # on 2 idle cores, 40 under load 6
    python examples/benchmarks/adyt_training.py --sweep-lr 1e-3  # also one seed at a second lr
    python examples/benchmarks/adyt_training.py --quick          # a few steps, 1 seed, no files
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import char_lm  # noqa: E402

import surgeon  # noqa: E402
from surgeon.nn import ADyT, AionResidual  # noqa: E402

RECIPE = "recipe=dyt"  # the recipe arms' adyt options; `--recipe` swaps them
ARMS = {  # name → pass specs; "{recipe}" is filled with `--recipe`
    "plain": [],
    "DyT": ["adyt:{recipe},adaptive=false"],
    "ADyT": ["adyt:{recipe}"],
    "AION+ADyT": ["aion", "adyt:{recipe}"],
    "ADyT (no recipe)": ["adyt:recipe=none"],
    "DyT + trunk scale": ["adyt:{recipe},adaptive=false,input_scale=rms"],
}
REFERENCE_ARMS = ("ADyT (no recipe)", "DyT + trunk scale")  # first seed only
GOAL_ARMS, GOAL_RATIO = ("DyT", "ADyT"), 1.05
ARCHS = ("llama", "gpt2")
FRACTIONS = (0.25, 0.5, 1.0)


def passes_for(arm: str, recipe: str) -> list[str]:
    return [spec.format(recipe=recipe) for spec in ARMS[arm]]


def example_batch(data: char_lm.CharData) -> dict[str, torch.Tensor]:
    """Token ids for tracing, from their own generator (the training order is untouched)."""
    return {"input_ids": data.batch(torch.Generator().manual_seed(12345))[:2, :-1]}


def role_key(name: str) -> str:
    """A module name with its layer indices starred, so one role's norms group together."""
    return re.sub(r"\.\d+\.", ".*.", name)


def diagnostics(model: nn.Module, plain_names: set[str]) -> dict:
    """After training: α of each ADyT role (mean over layers, with min/max), AION's α range,
    and the parameters the passes added outside ADyT and AION modules (name → mean |value|)."""
    roles: dict[str, list[float]] = {}
    aion: list[float] = []
    owned: set[str] = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, ADyT):
                roles.setdefault(role_key(name), []).append(float(module.alpha()))
            elif isinstance(module, AionResidual):
                aion.append(float(module.alpha()))
            else:
                continue
            owned |= {f"{name}.{p}" for p, _ in module.named_parameters()}
        added = {name: float(p.detach().abs().mean()) for name, p in model.named_parameters()
                 if name not in plain_names and name not in owned}
    out: dict = {"alpha": {k: {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}
                           for k, v in roles.items()}, "added": added}
    if aion:
        out["aion_alpha"] = {"min": min(aion), "max": max(aion)}
    return out


def run_one(arch: str, arm: str, seed: int, lr: float, args: argparse.Namespace,
            data: char_lm.CharData) -> dict:
    model = char_lm.build(arch, data.vocab_size, seed)
    plain_names = {name for name, _ in model.named_parameters()}
    passes = passes_for(arm, args.recipe)
    if passes:
        model = surgeon.apply(model, passes, example_batch(data))
    optimizer = char_lm.make_optimizer(model, lr)
    if passes:
        surgeon.attach(model, optimizer)
    eval_at = tuple(sorted({max(1, round(f * args.steps)) for f in FRACTIONS}))
    start = time.perf_counter()
    run = char_lm.train(model, data, args.steps, seed, lr=lr, eval_at=eval_at,
                        optimizer=optimizer)
    params = char_lm.count(model)
    out = {"arch": arch, "arm": arm, "seed": seed, "lr": lr, "passes": passes,
           "val": {str(k): v for k, v in run.val.items()}, "diverged": run.diverged,
           "params": params, "tokens": run.tokens, "tokens_per_param": run.tokens / params,
           "wall_s": time.perf_counter() - start}
    if passes:
        out["diagnostics"] = diagnostics(model, plain_names)
    return out


def final(run: dict, steps: int) -> float:
    return run["val"].get(str(steps), math.nan)


def summarise(runs: list[dict], steps: int) -> dict:
    """{arch: {arm: per-step mean/std of the validation loss, final ratio to plain, verdict}}."""
    table: dict = {}
    for arch in dict.fromkeys(r["arch"] for r in runs):
        rows = table.setdefault(arch, {})
        for arm in dict.fromkeys(r["arm"] for r in runs if r["arch"] == arch):
            mine = [r for r in runs if r["arch"] == arch and r["arm"] == arm]
            marks = sorted({int(k) for r in mine for k in r["val"]})
            val = {}
            for step in marks:
                xs = [r["val"].get(str(step), math.nan) for r in mine]
                val[str(step)] = {"mean": statistics.fmean(xs),
                                  "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
            rows[arm] = {"val": val, "seeds": len(mine),
                         "diverged": sum(r["diverged"] for r in mine),
                         "params": mine[0]["params"],
                         "tokens_per_param": mine[0]["tokens_per_param"]}
        base = rows.get("plain", {}).get("val", {}).get(str(steps), {}).get("mean")
        for arm, row in rows.items():
            got = row["val"].get(str(steps), {}).get("mean", math.nan)
            row["ratio"] = got / base if base else math.nan
            row["verdict"] = ("-" if arm == "plain" else
                              "PASS" if row["ratio"] <= GOAL_RATIO else "MISS")
    return table


def markdown(table: dict, steps: int) -> list[str]:
    marks = sorted({int(k) for rows in table.values() for row in rows.values()
                    for k in row["val"]})
    head = " | ".join(f"val @ {m}" for m in marks)
    lines = [f"| arch | arm | {head} | × plain (final) | goal | params | tokens/param |",
             "|" + "---|" * (6 + len(marks))]
    for arch, rows in table.items():
        for arm, row in rows.items():
            cells = " | ".join(
                f"{row['val'][str(m)]['mean']:.3f} ± {row['val'][str(m)]['std']:.3f}"
                if str(m) in row["val"] else "-" for m in marks)
            note = f" ({row['diverged']} diverged)" if row["diverged"] else ""
            note += " (1 seed)" if row["seeds"] == 1 and len(rows) > 1 and any(
                r["seeds"] > 1 for r in rows.values()) else ""
            lines.append(f"| {arch} | {arm}{note} | {cells} | {row['ratio']:.3f} | "
                         f"{row['verdict']} | {row['params']:,} | {row['tokens_per_param']:.3g} |")
    return lines


def alpha_lines(runs: list[dict]) -> list[str]:
    """α after training (seed 0 of each converted arm, headline lr), per norm role."""
    lines = ["| arch | arm | α after training (mean [min, max] over layers) | added params "
             "(mean abs) |", "|---|---|---|---|"]
    for r in runs:
        if "diagnostics" not in r or r["seed"] != runs[0]["seed"]:
            continue
        d = r["diagnostics"]
        alphas = "; ".join(f"{k}: {v['mean']:.3f} [{v['min']:.3f}, {v['max']:.3f}]"
                           for k, v in d["alpha"].items())
        if "aion_alpha" in d:
            alphas += f"; AION α [{d['aion_alpha']['min']:.3f}, {d['aion_alpha']['max']:.3f}]"
        added = "; ".join(f"{k}: {v:.3f}" for k, v in d["added"].items()) or "-"
        lines.append(f"| {r['arch']} | {r['arm']} | {alphas} | {added} |")
    return lines


def verdict(table: dict, steps: int) -> str:
    parts = [f"{arch} {arm} {table[arch][arm]['ratio']:.3f}× ({table[arch][arm]['verdict']})"
             for arch in table for arm in GOAL_ARMS if arm in table[arch]]
    met = all(table[a][arm]["verdict"] == "PASS" for a in table for arm in GOAL_ARMS
              if arm in table[a])
    return f"{'met' if met else 'MISSED'}: " + ", ".join(parts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-3, help="the headline lr, shared by all arms")
    p.add_argument("--sweep-lr", type=float, default=None,
                   help="also run every arm but the reference row at this lr, first seed only")
    p.add_argument("--recipe", default=RECIPE, help="the adyt options of the recipe arms")
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS, help="where the results files go")
    p.add_argument("--quick", action="store_true", help="a few steps, 1 seed, no files")
    args = p.parse_args()
    if args.quick:
        args.steps, args.seeds = 8, 1
    torch.set_num_threads(args.threads)
    archs, arms = args.archs.split(","), args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS] + [a for a in archs if a not in ARCHS]
    if unknown:
        p.error(f"unknown arm or arch {unknown[0]!r}: choose from {list(ARMS)} / {list(ARCHS)}")
    data = char_lm.CharData()
    load_start = os.getloadavg()
    jobs = [(arch, arm, seed, args.lr) for seed in range(args.seeds) for arch in archs
            for arm in arms if seed == 0 or arm not in REFERENCE_ARMS]
    if args.sweep_lr is not None:
        jobs += [(arch, arm, 0, args.sweep_lr) for arch in archs for arm in arms
                 if arm not in REFERENCE_ARMS]
    runs = []
    for i, (arch, arm, seed, lr) in enumerate(jobs, 1):
        r = run_one(arch, arm, seed, lr, args, data)
        runs.append(r)
        print(f"[{i}/{len(jobs)}] {arch:5} {arm:16} seed {seed} lr {lr:g}: val "
              + " ".join(f"{k}:{v:.3f}" for k, v in r["val"].items())
              + f" ({r['wall_s']:.0f} s)", flush=True)
    headline = [r for r in runs if r["lr"] == args.lr]
    table = summarise(headline, args.steps)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__,
               "threads": args.threads}
    date = datetime.date.today().isoformat()
    tokens = args.steps * data.batch_size * data.seq_len
    head = (f"# adyt_training ({date})\n\nTiny Llama and GPT-2 (d=64, 4 layers, char vocab "
            f"{data.vocab_size}) trained from scratch on examples/data/toy_corpus.txt: "
            f"{args.steps} AdamW steps of {data.batch_size}×{data.seq_len} characters "
            f"({tokens:,} tokens), lr {args.lr:g} for every arm (warm-up, cosine to a tenth), "
            f"{args.seeds} seed(s) with the same weights and data order per seed in every arm; "
            f"validation loss (mean ± std over seeds) on the held-out tail. Recipe arms: "
            f"`adyt:{args.recipe}`. {machine['platform']}, {machine['cpus']} CPUs, torch "
            f"{machine['torch']}, {args.threads} thread(s). Load average "
            f"{'/'.join(f'{x:.1f}' for x in load_start)} at the start, "
            f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end.\n")
    text = (head + "\n" + "\n".join(markdown(table, args.steps))
            + f"\n\nGoal: DyT and ADyT ≤ {GOAL_RATIO}× plain's final validation loss: "
            + verdict(table, args.steps) + "\n\n" + "\n".join(alpha_lines(headline)) + "\n")
    sweep = [r for r in runs if r["lr"] != args.lr]
    if sweep:
        sweep_table = summarise(sweep, args.steps)
        text += (f"\nSecond lr {args.sweep_lr:g}, seed 0 only (± is 0 with one seed):\n\n"
                 + "\n".join(markdown(sweep_table, args.steps)) + "\n")
    print(text)
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "adyt_training.md").write_text(text)
        (args.out / "adyt_training.json").write_text(json.dumps(
            {"date": date, "machine": machine, "args": {**vars(args), "out": str(args.out)},
             "table": table,
             "goal": verdict(table, args.steps), "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
