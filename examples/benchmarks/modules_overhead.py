"""Training-step overhead of the surgeon.nn modules in a small pre-norm transformer LM.

One step is forward + loss + backward + AdamW step (fused AdamW by default: the CPU foreach
AdamW is a per-tensor loop that takes a quarter of the step and dilutes every ratio). Variants,
all timed side by side:

- residual: plain `x + y`; surgeon `AionResidual`; aion-torch `AionResidual` (`aion(x, y, x_norm)`)
- n = 4 residual streams: surgeon `HyperConnections`, surgeon `ManifoldHyperConnections` (mHC),
  lucidrains `hyper_connections.HyperConnections`, one module per branch (two per block)
- norms: `nn.LayerNorm` (the plain model), surgeon `ADyT`, surgeon DyT (`ADyT(adaptive=False)`)

Each in eager mode and under `torch.compile` (inductor; compilation is excluded by warm-up steps,
and a variant that fails to compile records its error). The machine may be shared, so the
variants are interleaved: each round runs a few steps of every (variant, mode) in a shuffled
order, and a variant's time is the median of all its steps. surgeon AION and ADyT call
`surgeon.nn.attach(model, optimizer)` so their statistics move at each optimizer step (its cost
counts). Goals: AION ≤ 1.03× plain; HC n=4 ≤ 1.25× plain under compile on CPU (≤ 1.10× on a
GPU, at d ≥ 1024) and no slower than lucidrains; ADyT ≤ 1.05× LayerNorm under compile. Prints a
table and writes examples/benchmarks/results/modules_overhead.{json,md}.

On CPU it runs one torch thread by default (`--threads`): on the shared 2-core machine two
threads spin at every parallel region while another process holds the other core, and steps
then take 10-30× longer. The default run takes about 10 minutes there, most of it compiling
(inductor's on-disk cache makes later runs faster); `--quick` takes ~5 minutes the first time
(compiling the 8 variants) and ~30 s after, or a few seconds with `--modes eager`.

    python examples/benchmarks/modules_overhead.py             # CPU fp32, defaults below
    python examples/benchmarks/modules_overhead.py --quick     # smoke run, tiny sizes, no files
    python examples/benchmarks/modules_overhead.py --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import types
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import surgeon.nn as snn  # noqa: E402

NUM_STREAMS = 4
RESIDUALS = ("plain", "surgeon_aion", "aion_torch")
STREAMS = ("surgeon_hc", "surgeon_mhc", "lucidrains_hc")
NORMS = ("layernorm", "surgeon_adyt", "surgeon_dyt")

# variant → (residual kind, norm kind, baseline variant)
VARIANTS: dict[str, tuple[str, str, str | None]] = {
    "plain": ("plain", "layernorm", None),
    "surgeon_aion": ("surgeon_aion", "layernorm", "plain"),
    "aion_torch": ("aion_torch", "layernorm", "plain"),
    "surgeon_hc": ("surgeon_hc", "layernorm", "plain"),
    "surgeon_mhc": ("surgeon_mhc", "layernorm", "plain"),
    "lucidrains_hc": ("lucidrains_hc", "layernorm", "plain"),
    "surgeon_adyt": ("plain", "surgeon_adyt", "plain"),
    "surgeon_dyt": ("plain", "surgeon_dyt", "plain"),
}
ATTACHED = ("surgeon_aion", "surgeon_adyt")  # variants that call surgeon.nn.attach

# (label, variant, reference variant, modes the goal applies to, max ratio)
GOALS = (
    ("AION ≤ 1.03× plain", "surgeon_aion", "plain", ("eager", "compile"), 1.03),
    ("HC n=4 ≤ 1.25× plain (compiled, CPU)", "surgeon_hc", "plain", ("compile",), 1.25),
    ("HC n=4 ≤ 1.10× plain (compiled, GPU)", "surgeon_hc", "plain", ("compile",), 1.10),
    ("HC n=4 no slower than lucidrains", "surgeon_hc", "lucidrains_hc", ("eager", "compile"), 1.0),
    ("ADyT ≤ 1.05× LayerNorm (compiled)", "surgeon_adyt", "plain", ("compile",), 1.05),
)


# ----------------------------------------------------------------------------- the model


def make_norm(kind: str, d: int) -> nn.Module:
    if kind == "layernorm":
        return nn.LayerNorm(d)
    if kind == "surgeon_adyt":
        return snn.ADyT(d)
    if kind == "surgeon_dyt":
        return snn.ADyT(d, adaptive=False)
    raise ValueError(kind)


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (b, heads, t, d/heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.fc(x)))


class Block(nn.Module):
    """`x = x + attn(norm1(x)); x = x + mlp(norm2(x))` with the residual of `residual`."""

    def __init__(self, d: int, heads: int, index: int, residual: str, norm: str,
                 variant: str) -> None:
        super().__init__()
        self.residual = residual
        self.norm1, self.norm2 = make_norm(norm, d), make_norm(norm, d)
        self.attn = own_code(Attention, variant)(d, heads)
        self.mlp = own_code(MLP, variant)(d)
        first, second = 2 * index, 2 * index + 1  # one module per branch
        if residual == "surgeon_aion":
            self.res1, self.res2 = snn.AionResidual(), snn.AionResidual()
        elif residual == "aion_torch":
            import aion_torch

            self.res1, self.res2 = aion_torch.AionResidual(), aion_torch.AionResidual()
        elif residual == "surgeon_hc":
            self.res1 = snn.HyperConnections(NUM_STREAMS, d, layer_index=first)
            self.res2 = snn.HyperConnections(NUM_STREAMS, d, layer_index=second)
        elif residual == "surgeon_mhc":
            self.res1 = snn.ManifoldHyperConnections(NUM_STREAMS, d, layer_index=first)
            self.res2 = snn.ManifoldHyperConnections(NUM_STREAMS, d, layer_index=second)
        elif residual == "lucidrains_hc":
            import hyper_connections

            self.res1 = hyper_connections.HyperConnections(NUM_STREAMS, dim=d, layer_index=first)
            self.res2 = hyper_connections.HyperConnections(NUM_STREAMS, dim=d, layer_index=second)
        elif residual != "plain":
            raise ValueError(residual)

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.residual
        if kind == "plain":
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        if kind in ("surgeon_aion", "aion_torch"):
            h = self.norm1(x)
            x = self.res1(x, self.attn(h), h)
            h = self.norm2(x)
            return self.res2(x, self.mlp(h), h)
        if kind in ("surgeon_hc", "surgeon_mhc"):  # x is the stream tensor H (b·n, t, d)
            for hc, branch in ((self.res1, self.attn_branch), (self.res2, self.mlp_branch)):
                branch_input, residuals, beta = hc.width_connection(x)
                x = hc.depth_connection(branch(branch_input), residuals, beta)
            return x
        # lucidrains_hc
        for hc, branch in ((self.res1, self.attn_branch), (self.res2, self.mlp_branch)):
            branch_input, add_residual = hc(x)
            x = add_residual(branch(branch_input))
        return x


class LM(nn.Module):
    """Token + position embedding, `layers` blocks, final norm, LM head; returns the loss."""

    def __init__(self, variant: str, *, vocab: int, d: int, heads: int, layers: int,
                 seq: int) -> None:
        super().__init__()
        residual, norm, _ = VARIANTS[variant]
        self.residual, self.vocab = residual, vocab
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        block = own_code(Block, variant)
        self.blocks = nn.ModuleList(
            block(d, heads, i, residual, norm, variant) for i in range(layers))
        self.norm = make_norm(norm, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if residual == "lucidrains_hc":
            import hyper_connections

            _, self.expand, self.reduce = (
                hyper_connections.get_init_and_expand_reduce_stream_functions(NUM_STREAMS))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]  # (b, t, d)
        if self.residual in ("surgeon_hc", "surgeon_mhc"):
            x = snn.expand_streams(x, NUM_STREAMS)  # (b·n, t, d)
        elif self.residual == "lucidrains_hc":
            x = self.expand(x)  # (b·n, t, d)
        for block in self.blocks:
            x = block(x)
        if self.residual in ("surgeon_hc", "surgeon_mhc"):
            x = snn.reduce_streams(x, NUM_STREAMS)  # (b, t, d)
        elif self.residual == "lucidrains_hc":
            x = self.reduce(x)  # (b, t, d)
        logits = self.head(self.norm(x))  # (b, t, vocab)
        return F.cross_entropy(logits.float().view(-1, self.vocab), targets.view(-1))


@lru_cache(maxsize=None)
def own_code(cls: type, variant: str) -> type:
    """A subclass of `cls` whose methods run on copies of its code objects, one per variant.

    torch.compile keeps its caches per code object: its recompile limit, and the mark that
    makes it run a frame eagerly from then on (what aion-torch's graph break inside the block
    loop causes). With the same `LM.forward` code for every variant, one variant's compile
    would change how the others run.
    """
    methods = {}
    for name, fn in vars(cls).items():
        if isinstance(fn, types.FunctionType) and name != "__init__":
            code = fn.__code__.replace(co_name=f"{fn.__name__}__{variant}")
            methods[name] = types.FunctionType(code, fn.__globals__, fn.__name__,
                                               fn.__defaults__, fn.__closure__)
    return type(f"{cls.__name__}__{variant}", (cls,), methods)


# ----------------------------------------------------------------------------- timing


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor(),
                            "cpus": os.cpu_count(), "python": platform.python_version(),
                            "torch": torch.__version__, "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    for package in ("aion_torch", "hyper_connections"):
        try:
            from importlib.metadata import version

            info[package] = version(package.replace("_", "-"))
        except Exception:  # noqa: BLE001 - informational only
            info[package] = None
    return info


def dynamo_counts() -> tuple[int, int]:
    """(graph breaks, unique graphs) so far, from dynamo's counters."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values()), counters["stats"]["unique_graphs"]


class Runner:
    """One (variant, mode): model, optimizer, the step, and its step times (seconds)."""

    def __init__(self, variant: str, mode: str, args: argparse.Namespace,
                 batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> None:
        self.variant, self.mode, self.device = variant, mode, device
        self.times: list[float] = []
        self.round_means: list[float] = []
        self.error: str | None = None
        self.compile_seconds: float | None = None
        self.graph_breaks: int | None = None
        self.graphs: int | None = None
        self.graphs_while_timed = 0  # compiled graphs made during the timed steps
        torch.manual_seed(0)
        self.model = own_code(LM, variant)(variant, vocab=args.vocab, d=args.d, heads=args.heads,
                        layers=args.layers, seq=args.seq).to(device)
        impl = {"fused": True} if args.optimizer == "fused" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, **impl)
        self.attachment = snn.attach(self.model, self.optimizer) if variant in ATTACHED else None
        self.forward = torch.compile(self.model) if mode == "compile" else self.model
        self.idx, self.targets = batch
        self.autocast = (
            (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
            if args.dtype == "bf16" else contextlib.nullcontext)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.forward(self.idx, self.targets)
        loss.backward()
        self.optimizer.step()

    def warm_up(self, steps: int) -> None:
        breaks, graphs = dynamo_counts()
        try:
            start = time.perf_counter()
            self.step()  # compiles under torch.compile
            self.sync()
            if self.mode == "compile":
                self.compile_seconds = time.perf_counter() - start
            for _ in range(steps):
                self.step()
            self.sync()
        except Exception as exc:  # noqa: BLE001 - recorded, the other variants go on
            self.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
            self.model = self.optimizer = self.forward = None  # type: ignore[assignment]
        if self.mode == "compile":
            new_breaks, new_graphs = dynamo_counts()
            self.graph_breaks, self.graphs = new_breaks - breaks, new_graphs - graphs

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def run(self, steps: int) -> None:
        """One untimed step (the caches are the previous variant's), then `steps` timed."""
        if self.error is not None:
            return
        gc.disable()
        graphs = dynamo_counts()[1]
        try:
            self.step()
            if self.device.type == "cuda":
                events = [(torch.cuda.Event(enable_timing=True),
                           torch.cuda.Event(enable_timing=True)) for _ in range(steps)]
                self.sync()
                for start, end in events:
                    start.record()
                    self.step()
                    end.record()
                self.sync()
                times = [start.elapsed_time(end) / 1000 for start, end in events]
            else:
                times = []
                for _ in range(steps):
                    start = time.perf_counter()
                    self.step()
                    times.append(time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            self.error = f"{type(exc).__name__}: {exc}".strip()[:2000]
            return
        finally:
            gc.enable()
        self.graphs_while_timed += dynamo_counts()[1] - graphs
        self.times.extend(times)
        self.round_means.append(sum(times) / len(times))

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"variant": self.variant, "mode": self.mode, "error": self.error,
                               "compile_seconds": self.compile_seconds,
                               "graph_breaks": self.graph_breaks, "graphs": self.graphs,
                               "graphs_compiled_while_timed": self.graphs_while_timed}
        if self.times:
            ts = sorted(self.times)
            out.update(median_ms=1000 * statistics.median(ts), min_ms=1000 * ts[0],
                       q25_ms=1000 * ts[len(ts) // 4], q75_ms=1000 * ts[(3 * len(ts)) // 4],
                       steps=len(ts))
        return out


# ----------------------------------------------------------------------------- report


def ratio(rows: dict[tuple[str, str], dict[str, Any]], variant: str, ref: str,
          mode: str) -> float | None:
    a, b = rows.get((variant, mode), {}), rows.get((ref, mode), {})
    if "median_ms" not in a or "median_ms" not in b:
        return None
    return a["median_ms"] / b["median_ms"]


def paired_ratio(runners: dict[tuple[str, str], Runner], variant: str, ref: str,
                 mode: str) -> list[float] | None:
    """Per-round ratios of the round means (adjacent in time): [q25, median, q75]."""
    a, b = runners.get((variant, mode)), runners.get((ref, mode))
    if a is None or b is None or not a.round_means or len(a.round_means) != len(b.round_means):
        return None
    rs = sorted(x / y for x, y in zip(a.round_means, b.round_means))
    return [rs[len(rs) // 4], statistics.median(rs), rs[(3 * len(rs)) // 4]]


def fmt_load(load: tuple[float, ...] | None) -> str:
    return "-" if load is None else "/".join(f"{x:.1f}" for x in load)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else format(value, spec)


def table_lines(rows: dict[tuple[str, str], dict[str, Any]], modes: list[str],
                markdown: bool) -> list[str]:
    head = ["variant", "vs"]
    for mode in modes:
        head += [f"{mode} ms", f"{mode} ×"]
    head += ["compile s", "graph breaks"]
    body = []
    for variant, (_, _, ref) in VARIANTS.items():
        if not any((variant, m) in rows for m in modes):
            continue
        line = [variant, ref or "-"]
        for mode in modes:
            row = rows.get((variant, mode), {})
            if row.get("error"):
                line += ["error", "-"]
                continue
            line.append(fmt(row.get("median_ms"), ".2f"))
            line.append(fmt(ratio(rows, variant, ref, mode), ".3f") if ref else "1")
        crow = rows.get((variant, "compile"), {})
        line += [fmt(crow.get("compile_seconds"), ".1f"), fmt(crow.get("graph_breaks"), "d")]
        body.append(line)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return out + ["| " + " | ".join(line) + " |" for line in body]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    return [" ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in [head, *body]]


def evaluate_goals(rows: dict[tuple[str, str], dict[str, Any]],
                   runners: dict[tuple[str, str], Runner], device: str) -> list[dict[str, Any]]:
    goals = []
    for label, variant, ref, modes, limit in GOALS:
        if ("CPU" in label and device != "cpu") or ("GPU" in label and device == "cpu"):
            continue
        for mode in modes:
            r = ratio(rows, variant, ref, mode)
            if r is None and (variant, mode) not in rows:
                continue
            goals.append({"goal": label, "variant": variant, "reference": ref, "mode": mode,
                          "max_ratio": limit, "ratio": r,
                          "paired_round_ratio_q25_median_q75":
                              paired_ratio(runners, variant, ref, mode),
                          "met": None if r is None else r <= limit})
    return goals


def goal_lines(goals: list[dict[str, Any]], markdown: bool) -> list[str]:
    lines = []
    for g in goals:
        status = "no data" if g["met"] is None else ("met" if g["met"] else "MISSED")
        paired = g["paired_round_ratio_q25_median_q75"]
        spread = "" if paired is None else \
            f" (per-round {paired[0]:.3f}–{paired[2]:.3f})"
        text = (f"{g['goal']} [{g['mode']}]: {fmt(g['ratio'], '.3f')}× "
                f"{g['variant']}/{g['reference']}, limit {g['max_ratio']:.2f}{spread}: {status}")
        lines.append(f"- {text}" if markdown else text)
    return lines


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast (default fp32)")
    p.add_argument("--d", type=int, default=256, help="model width (default 256)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--rounds", type=int, default=30, help="round-robin rounds (default 30)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per variant per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--optimizer", choices=("fused", "foreach"), default="fused",
                   help="AdamW implementation (default fused; foreach on CPU is a per-tensor "
                        "loop that takes ~25%% of the step here and dilutes the ratios)")
    p.add_argument("--modes", default="eager,compile", help="comma list of eager, compile")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma list out of {','.join(VARIANTS)}")
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads on CPU; 0 keeps torch's default (default 1: on a "
                        "shared 2-core machine, 2 threads spin at every parallel region whenever "
                        "another process holds the other core, and steps take 10-30× longer)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny sizes, 2 rounds of 2 steps; writes no files")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default examples/benchmarks/results/modules_overhead.json,"
                        " none for --quick); a .md table is written next to it")
    args = p.parse_args(argv)
    if args.quick:
        args.d, args.heads, args.layers, args.seq, args.batch, args.vocab = 32, 2, 2, 16, 2, 64
        args.rounds, args.steps, args.warmup = 2, 2, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads and device.type == "cpu":
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; choose from {', '.join(VARIANTS)}")
    # the baselines are always measured
    needed = set(variants) | {"plain"} | ({"lucidrains_hc"} if "surgeon_hc" in variants else set())
    variants = [v for v in VARIANTS if v in needed]
    # one cache entry per compiled variant on the shared forward code objects
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    torch._dynamo.config.accumulated_cache_size_limit = 512

    g = torch.Generator().manual_seed(0)
    idx = torch.randint(args.vocab, (args.batch, args.seq), generator=g)
    targets = torch.randint(args.vocab, (args.batch, args.seq), generator=g)
    batch = (idx.to(device), targets.to(device))

    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None
    started = time.perf_counter()
    runners: dict[tuple[str, str], Runner] = {}
    for mode in modes:
        for variant in variants:
            t0 = time.perf_counter()
            try:
                runner = Runner(variant, mode, args, batch, device)
            except Exception as exc:  # noqa: BLE001
                print(f"{variant} [{mode}] failed to build: {exc}")
                continue
            runner.warm_up(args.warmup)
            runners[(variant, mode)] = runner
            state = f"error: {runner.error.splitlines()[0]}" if runner.error else "ok"
            print(f"warmed up {variant:>14} [{mode}] in {time.perf_counter() - t0:6.1f} s: "
                  f"{state}", flush=True)

    rng = random.Random(0)
    order = list(runners)
    for r in range(args.rounds):
        rng.shuffle(order)
        for key in order:
            runners[key].run(args.steps)
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    total = time.perf_counter() - started
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else None

    rows = {key: runner.summary() for key, runner in runners.items()}
    goals = evaluate_goals(rows, runners, device.type)
    print()
    print(f"median training-step time, {args.device} {args.dtype}, d={args.d} heads={args.heads}"
          f" layers={args.layers} seq={args.seq} batch={args.batch} vocab={args.vocab}, "
          f"{args.rounds}×{args.steps} steps each; × = ratio to the 'vs' variant, same mode")
    print("\n".join(table_lines(rows, modes, markdown=False)))
    extra = [("surgeon_hc", "lucidrains_hc"), ("surgeon_mhc", "surgeon_hc"),
             ("surgeon_dyt", "surgeon_adyt"), ("aion_torch", "surgeon_aion")]
    comparisons = []
    for a, b in extra:
        for mode in modes:
            r = ratio(rows, a, b, mode)
            if r is not None:
                comparisons.append({"variant": a, "reference": b, "mode": mode, "ratio": r})
                print(f"{a} / {b} [{mode}]: {r:.3f}×")
    print("goals:")
    print("\n".join(goal_lines(goals, markdown=False)))
    for (variant, mode), row in rows.items():
        if row["error"]:
            print(f"ERROR {variant} [{mode}]: {row['error']}")
        if row["graphs_compiled_while_timed"]:
            print(f"WARNING {variant} [{mode}]: {row['graphs_compiled_while_timed']} graphs "
                  "compiled during the timed steps (raise --warmup)")
    print(f"total {total:.0f} s; load average at start {fmt_load(load_start)}, "
          f"at end {fmt_load(load_end)} (other processes on the machine stretch every time)")

    out = args.out
    if out is None and not args.quick:
        out = ROOT / "examples" / "benchmarks" / "results" / "modules_overhead.json"
    if out is None:
        print("quick run: no result files written (pass --out to write them)")
        return
    config = {k: getattr(args, k) for k in ("device", "dtype", "d", "heads", "layers", "seq",
                                            "batch", "vocab", "rounds", "steps", "warmup",
                                            "threads", "optimizer")}
    config.update(modes=modes, variants=variants, num_streams=NUM_STREAMS,
                  optimizer_detail=f"AdamW({args.optimizer}=True, lr=1e-4)",
                  compile_backend="inductor",
                  statistic="median over all timed steps (ms); ratio = median / median")
    result = {
        "benchmark": "modules_overhead", "date": datetime.date.today().isoformat(),
        "machine": {**machine_info(device), "loadavg_start": load_start,
                    "loadavg_end": load_end}, "config": config, "total_seconds": total,
        "goals": goals, "comparisons": comparisons, "rows": list(rows.values()),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    md = [f"# modules_overhead ({result['date']})", "",
          f"Training-step time (forward + backward + AdamW {args.optimizer}), {args.device} "
          f"{args.dtype}, {result['machine']['cpus']} CPUs (torch threads: "
          f"{torch.get_num_threads()}), torch {torch.__version__}; d={args.d}, "
          f"heads={args.heads}, layers={args.layers}, seq={args.seq}, batch={args.batch}, "
          f"vocab={args.vocab}, n={NUM_STREAMS} streams. Median of {args.rounds}×{args.steps} "
          "interleaved steps; × is the ratio to the `vs` variant in the same mode; compile s "
          "is the first compiled step, inductor's on-disk caches as they were. Load average "
          f"(1/5/15 min) {fmt_load(load_start)} at the start, {fmt_load(load_end)} at the end.",
          "",
          *table_lines(rows, modes, markdown=True), "",
          *[f"- {c['variant']} / {c['reference']} [{c['mode']}]: {c['ratio']:.3f}×"
            for c in comparisons], "", "Goals:", "", *goal_lines(goals, markdown=True)]
    errors = [f"- {v} [{m}]: `{row['error'].splitlines()[0]}`"
              for (v, m), row in rows.items() if row["error"]]
    if errors:
        md += ["", "Errors:", "", *errors]
    md_path = out.with_suffix(".md")
    md_path.write_text("\n".join(md) + "\n")
    try:
        shown = out.relative_to(ROOT), md_path.relative_to(ROOT)
    except ValueError:
        shown = out, md_path
    print(f"wrote {shown[0]} and {shown[1]}")


if __name__ == "__main__":
    main()
