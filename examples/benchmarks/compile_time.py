"""Cold `torch.compile` time of a converted model against the plain one.

Each variant (a tiny random-weight Llama from transformers, plain or converted with surgeon's
passes) runs in a fresh process with inductor's and dynamo's caches disabled, so every number
is a cold compile: the first compiled training step (forward + backward), minus the same step in
eager mode. Also recorded: dynamo's graph count and graph breaks, and the steady-state compiled
step time. The variants run one after another, interleaved over `--rounds` (the machine may be
shared), and a variant's compile time is the median over rounds. Goal: a converted model
(aion + hyper + adyt) compiles in ≤ 1.3× the plain model's time. Prints a table and writes
examples/benchmarks/results/compile_time.{json,md}.

    python examples/benchmarks/compile_time.py                  # CPU, 2 rounds
    python examples/benchmarks/compile_time.py --quick          # one round, 2 variants, no files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "benchmarks" / "results"

VARIANTS = {
    "plain": [],
    "aion": ["aion"],
    "hyper": ["hyper"],
    "adyt": ["adyt"],
    "aion+hyper+adyt": ["aion", "hyper", "adyt"],
}
GOAL = ("aion+hyper+adyt", "plain", 1.3)


def child(passes: list[str], args: argparse.Namespace) -> dict:
    """Runs in the fresh process: build, convert, time eager step, cold compiled step, steady."""
    os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"] = "1"
    import torch
    from torch._dynamo.utils import counters
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT))
    import surgeon

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.d, intermediate_size=4 * args.d,
                         num_hidden_layers=args.layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=512, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 512, (2, args.seq))
    if passes:
        model = surgeon.apply(model, passes, {"input_ids": ids})
    model.train()

    def step(fn) -> float:
        start = time.perf_counter()
        fn(input_ids=ids, labels=ids).loss.backward()
        return time.perf_counter() - start

    step(model)
    eager = min(step(model) for _ in range(3))
    compiled = torch.compile(model)
    cold = step(compiled)
    steady = min(step(compiled) for _ in range(3))
    return {"cold_s": cold, "eager_step_s": eager, "compiled_step_s": steady,
            "compile_s": cold - eager, "graphs": counters["stats"]["unique_graphs"],
            "graph_breaks": sum(counters["graph_break"].values())}


def run_child(name: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--d", str(args.d), "--layers",
           str(args.layers), "--seq", str(args.seq), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--quick", action="store_true", help="1 round, plain and all passes, no files")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(child(VARIANTS[args.child], args)))
        return
    names = args.variants.split(",")
    if args.quick:
        args.rounds, names = 1, ["plain", "aion+hyper+adyt"]
    load_start = os.getloadavg()
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for name in names:
            samples[name].append(run_child(name, args))
    rows = {}
    for name, runs in samples.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            rows[name] = {"error": runs[0]["error"]}
            continue
        rows[name] = {key: statistics.median(r[key] for r in ok) for key in ok[0]}
    base = rows.get("plain", {}).get("compile_s")
    lines = ["| variant | compile s | × plain | cold first step s | eager step ms | "
             "compiled step ms | graphs | graph breaks |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | | |")
            continue
        ratio = r["compile_s"] / base if base else float("nan")
        r["ratio"] = ratio
        lines.append(f"| {name} | {r['compile_s']:.1f} | {ratio:.2f} | {r['cold_s']:.1f} | "
                     f"{1000 * r['eager_step_s']:.1f} | {1000 * r['compiled_step_s']:.1f} | "
                     f"{int(r['graphs'])} | {int(r['graph_breaks'])} |")
    goal_name, ref, limit = GOAL
    got = rows.get(goal_name, {}).get("ratio")
    verdict = "-" if got is None else (
        f"{got:.2f}× {goal_name}/{ref}, limit {limit}: {'met' if got <= limit else 'MISSED'}")
    import torch

    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "torch": torch.__version__,
               "threads": args.threads}
    date = datetime.date.today().isoformat()
    head = (f"# compile_time ({date})\n\nCold torch.compile of a tiny Llama (d={args.d}, "
            f"layers={args.layers}, seq={args.seq}, batch 2) training step, inductor and dynamo "
            f"caches disabled, a fresh process per sample, median of {args.rounds} rounds; "
            f"compile s = first compiled step − eager step. {machine['platform']}, "
            f"{machine['cpus']} CPUs, torch {machine['torch']}, {args.threads} thread(s). "
            f"Load average {'/'.join(f'{x:.1f}' for x in load_start)} at the start, "
            f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} at the end.\n")
    text = head + "\n" + "\n".join(lines) + f"\n\nGoal: converted ≤ {limit}× plain: {verdict}\n"
    print(text)
    if not args.quick:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "compile_time.md").write_text(text)
        (RESULTS / "compile_time.json").write_text(json.dumps(
            {"date": date, "machine": machine, "args": vars(args), "rows": rows,
             "goal": verdict}, indent=2) + "\n")


if __name__ == "__main__":
    main()
