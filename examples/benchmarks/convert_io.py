"""Time and memory of `surgeon convert` on a checkpoint of ~1 GB, against `cp` in the same run.

A random-weight Llama (hidden 1024, 16 layers, vocab 32000, fp32, untied: 1.07 GB in one
`model.safetensors`) is built on the spot and saved with `save_pretrained` (kept in --workdir
for later runs). Each round then runs, in a shuffled order, every tool as its own process:

- `cp`: `cp -r` of the checkpoint directory;
- `surgeon convert` (CLI): the whole command, interpreter and imports included;
- `convert()` (in process): a Python process that imports everything first and then times only
  the `surgeon.convert(...)` call (and its phases: open, passes, write); its peak RSS is also
  reported above the RSS it had after the imports (the high-water mark of the process minus the
  one before the call);
- `load_file + save_file`: `safetensors.torch.load_file` then `save_file` of the same weights
  (what a naive converter does), timed the same way.

All with passes aion, hyper:streams=4, adyt. The source is read from the page cache in every
run (a warm-up `cp` reads it first), and `sync` runs before each tool, so none pays for writing
back the last one's output. Goals: `convert()` ≤ 1.1× `cp`; its peak RSS above the
imports ≤ largest tensor + new parameters + 150 MB. Prints a table and writes
examples/benchmarks/results/convert_io.{json,md} with the machine and date.

    python examples/benchmarks/convert_io.py                  # ~1 GB, 3 rounds
    python examples/benchmarks/convert_io.py --quick          # 40 MB, 1 round, no files
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "examples" / "benchmarks" / "results"
PASSES = ["aion", "hyper:streams=4", "adyt"]

# A child that imports everything, then times one job and reports time and RSS as JSON.
CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch, transformers, safetensors.torch
import surgeon.converting
from transformers import LlamaForCausalLM  # the model module, imported before the baseline
job, src, dst = sys.argv[1:4]
torch.set_num_threads({threads})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
phases = {{}}
if job == "convert":
    phases = surgeon.converting.convert(src, dst, {passes!r}).phases
else:
    import os
    os.makedirs(dst)
    tensors = safetensors.torch.load_file(src + "/model.safetensors")
    safetensors.torch.save_file(tensors, dst + "/model.safetensors", metadata={{"format": "pt"}})
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "rss_before_mb": before / 1024,
                  "rss_peak_mb": after / 1024, "phases": phases}}))
"""


def build_checkpoint(path: Path, hidden: int, layers: int, vocab: int) -> dict[str, Any]:
    """Save a random-weight Llama at `path` (reused when it is already there). Runs in a child
    process, so this one stays small: a forked child's peak RSS starts from its parent's."""
    if "--child" not in sys.argv:
        out = subprocess.run([sys.executable, __file__, "--child", str(path), str(hidden),
                              str(layers), str(vocab)], check=True, capture_output=True, text=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    import torch
    import transformers

    if not (path / "config.json").is_file():
        config = transformers.LlamaConfig(
            hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
            num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 128),
            vocab_size=vocab, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        tmp = path.with_name(path.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        os.replace(tmp, path)
        del model
    from surgeon.files.weights import Checkpoint

    ck = Checkpoint.open(path)
    return {"bytes": ck.nbytes, "tensors": len(ck),
            "largest_tensor_bytes": max(s.nbytes for s in ck.values()),
            "files": sorted(p.name for p in path.iterdir())}


def _child() -> None:
    path, hidden, layers, vocab = sys.argv[2], *map(int, sys.argv[3:6])
    sys.path.insert(0, str(ROOT))
    print(json.dumps(build_checkpoint(Path(path), hidden, layers, vocab)))


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run `cmd`: (wall seconds, the child's peak RSS in MiB from wait4, its stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = proc.stdout.read()
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed: {err.decode()[-2000:]}")
    return wall, usage.ru_maxrss / 1024, out.decode(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/surgeon-convert-io"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="40 MB checkpoint, 1 round")
    args = parser.parse_args()
    hidden, layers, vocab = (256, 4, 8000) if args.quick else (1024, 16, 32000)
    rounds = 1 if args.quick else args.rounds
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = work / f"llama-h{hidden}-l{layers}-v{vocab}"
    print(f"building {src} ...", flush=True)
    info = build_checkpoint(src, hidden, layers, vocab)
    print(f"checkpoint: {info['bytes'] / 1e9:.2f} GB in {info['tensors']} tensors, largest "
          f"{info['largest_tensor_bytes'] / 1e6:.0f} MB", flush=True)

    child = CHILD.format(root=str(ROOT), passes=PASSES, threads=args.threads)
    surgeon_cli = [sys.executable, "-m", "surgeon", "convert", str(src)]
    tools = {
        "cp -r": lambda dst: [["cp", "-r", str(src), dst], None],
        "surgeon convert (CLI)": lambda dst: [surgeon_cli + [dst, "--quiet"]
                                              + [a for p in PASSES for a in ("-p", p)], None],
        "convert() in process": lambda dst: [[sys.executable, "-c", child, "convert", str(src),
                                              dst], "json"],
        "load_file + save_file": lambda dst: [[sys.executable, "-c", child, "safetensors",
                                               str(src), dst], "json"],
    }
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    subprocess.run(["cp", "-r", str(src), str(work / "warmup")], check=True)
    shutil.rmtree(work / "warmup")
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in tools}
    for r in range(rounds):
        order = list(tools)
        random.Random(r).shuffle(order)
        for name in order:
            dst = str(work / f"out-{r}")
            shutil.rmtree(dst, ignore_errors=True)
            cmd, kind = tools[name](dst)
            os.sync()  # start each tool with no dirty pages of the last one to write back
            wall, rss, out = run_measured(cmd)
            sample = {"wall_s": wall, "rss_mb": rss}
            if kind == "json":
                inner = json.loads(out.strip().splitlines()[-1])
                sample.update(seconds=inner["seconds"], rss_before_mb=inner["rss_before_mb"],
                              rss_above_imports_mb=inner["rss_peak_mb"] - inner["rss_before_mb"],
                              **{f"{k}_s": v for k, v in inner["phases"].items()})
            samples[name].append(sample)
            shutil.rmtree(dst, ignore_errors=True)
            print(f"round {r + 1}/{rounds} {name}: {wall:.2f} s wall, {rss:.0f} MB peak RSS",
                  flush=True)
    report(info, samples, args, quick=args.quick)


def _median(samples: list[dict[str, float]], key: str) -> float | None:
    values = [s[key] for s in samples if key in s]
    return statistics.median(values) if values else None


def report(info: dict[str, Any], samples: dict[str, list[dict[str, float]]],
           args: argparse.Namespace, quick: bool) -> None:
    cp = _median(samples["cp -r"], "wall_s")
    rows = []
    for name, runs in samples.items():
        timed = _median(runs, "seconds") or _median(runs, "wall_s")
        rows.append({"tool": name, "wall_s": _median(runs, "wall_s"),
                     "timed_s": timed, "x_cp": timed / cp,
                     "peak_rss_mb": _median(runs, "rss_mb"),
                     "rss_above_imports_mb": _median(runs, "rss_above_imports_mb")})
    new_params_mb = 1.0  # aion + hyper + adyt on this model: ~0.2M fp32 parameters
    rss_goal = info["largest_tensor_bytes"] / 2**20 + new_params_mb + 150
    header = ("| tool | wall s | timed s | × cp | peak RSS MB | RSS above imports MB |\n"
              "|---|---|---|---|---|---|")
    lines = [header]
    for row in rows:
        above = row["rss_above_imports_mb"]
        lines.append(f"| {row['tool']} | {row['wall_s']:.2f} | {row['timed_s']:.2f} | "
                     f"{row['x_cp']:.2f} | {row['peak_rss_mb']:.0f} | "
                     f"{'-' if above is None else f'{above:.0f}'} |")
    table = "\n".join(lines)
    machine = (f"{platform.node()}: {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
               f"Python {platform.python_version()}")
    date = datetime.date.today().isoformat()
    conv = next(r for r in rows if r["tool"] == "convert() in process")
    runs = samples["convert() in process"]
    phases = ", ".join(f"{k} {_median(runs, f'{k}_s'):.2f} s" for k in ("open", "passes", "write"))
    summary = (f"checkpoint {info['bytes'] / 1e9:.2f} GB ({info['tensors']} tensors, largest "
               f"{info['largest_tensor_bytes'] / 2**20:.0f} MiB); passes {' '.join(PASSES)}; "
               f"median of {len(samples['cp -r'])} rounds; torch threads {args.threads}.\n\n"
               f"Goals: convert() ≤ 1.1× cp: {conv['x_cp']:.2f}× "
               f"({'met' if conv['x_cp'] <= 1.1 else 'missed'}); RSS above imports ≤ "
               f"{rss_goal:.0f} MiB: {conv['rss_above_imports_mb']:.0f} MiB "
               f"({'met' if conv['rss_above_imports_mb'] <= rss_goal else 'missed'}).\n\n"
               f"convert() phases (median): {phases}.")
    print()
    print(table)
    print()
    print(summary)
    if quick:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "convert_io.json").write_text(json.dumps(
        {"date": date, "machine": machine, "checkpoint": info, "passes": PASSES,
         "rounds": len(samples["cp -r"]), "threads": args.threads, "rows": rows,
         "samples": samples, "rss_goal_mb": rss_goal}, indent=2) + "\n")
    (RESULTS / "convert_io.md").write_text(
        f"# convert_io ({date})\n\n{machine}\n\n{summary}\n\n{table}\n")


if __name__ == "__main__":
    _child() if sys.argv[1:2] == ["--child"] else main()
