"""How inspection time grows with depth: nanoGPT-style models of 10, 100 and 1000 blocks.

Goal (issue 2): a 1000-block model inspected in ≤ 5 s on the 2-core CI machine. Graphs are traced
once per (class, call signature) and shared, so the per-block cost is recording, verifying and
analysing, not tracing. Prints a table and writes examples/benchmarks/results/trace_scaling.json.

    python examples/benchmarks/trace_scaling.py
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from zoo import NanoGPT, tokens  # noqa: E402

import surgeon  # noqa: E402
from surgeon.graph.tracing import trace_model  # noqa: E402


def measure(blocks: int, repeats: int = 3) -> dict:
    model = NanoGPT(n_layer=blocks, d=32, n_head=2, block_size=16)
    example = (tokens(64, batch=1, seq=16),)
    times, report = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        report = surgeon.inspect(model, example)
        times.append(time.perf_counter() - start)
    assert report is not None and len(report.residuals) == 2 * blocks
    trace = surgeon.trace(model, example)
    unshared = None
    if blocks <= 100:  # the same work with every module traced afresh, side by side
        start = time.perf_counter()
        trace_model(model, example, share_graphs=False)
        unshared = time.perf_counter() - start
    return {"blocks": blocks, "seconds": min(times), "seconds_per_block": min(times) / blocks,
            "trace_seconds_unshared": unshared,
            "graphs_traced": trace.graphs_traced, "modules_traced": len(trace.traces),
            "residuals": len(report.residuals), "norms": len(report.norms)}


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rows = [measure(n) for n in (10, 100, 1000)]
    print(f"{'blocks':>7} {'seconds':>9} {'ms/block':>9} {'graphs':>7} {'modules':>8} "
          f"{'residuals':>10} {'unshared trace s':>17}")
    for r in rows:
        unshared = r["trace_seconds_unshared"]
        print(f"{r['blocks']:>7} {r['seconds']:>9.3f} {1000 * r['seconds_per_block']:>9.3f} "
              f"{r['graphs_traced']:>7} {r['modules_traced']:>8} {r['residuals']:>10} "
              f"{'-' if unshared is None else f'{unshared:.3f}':>17}")
    goal = rows[-1]["seconds"] <= 5.0
    print(f"1000 blocks in {rows[-1]['seconds']:.2f} s: goal ≤ 5 s {'met' if goal else 'MISSED'}")
    out = {
        "benchmark": "trace_scaling", "date": datetime.date.today().isoformat(),
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__},
        "goal_seconds_1000_blocks": 5.0, "goal_met": goal, "rows": rows,
    }
    path = ROOT / "examples" / "benchmarks" / "results" / "trace_scaling.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
