"""Time and memory of `surgeon grow --init extrapolate` on a ~1 GB checkpoint with 10 snapshots.

The checkpoint is convert_io's random Llama (hidden 1024, 16 layers, vocab 32000, fp32: 1.02 GB,
built on the spot if missing). The snapshot directory holds 10 files `step-<n>.safetensors`
with the last block only (the source block: 50 MB each), drawn as a noisy drift of it. Each
round then runs, in a shuffled order, each tool as its own process:

- `cp + read`: `cp -r` of the checkpoint plus one read of the 10 snapshot files (`cat` to
  /dev/null): the I/O any grower has to do;
- `grow()` in process: imports first, then times only `surgeon.growth.grow.grow(...)` (one block
  inserted after the last, extrapolated from the snapshots); its peak RSS is also reported above
  the RSS it had after the imports.

Goals: ≤ 1.2× `cp + read`; RSS above imports ≤ snapshots × largest block tensor + 150 MB.
Prints a table and writes examples/benchmarks/results/grow_io.{json,md}.

    python examples/benchmarks/grow_io.py              # 3 rounds
    python examples/benchmarks/grow_io.py --quick      # the 40 MB model, 1 round, no files
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

from convert_io import RESULTS, ROOT, build_checkpoint, run_measured

SNAPSHOTS = 10

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
import torch
import surgeon.growth.grow as g
snapdir, ckpt, dst = sys.argv[1:4]
torch.set_num_threads({threads})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = g.grow(snapdir, dst, checkpoint=ckpt)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"seconds": seconds, "rss_before_mb": before / 1024,
                  "rss_peak_mb": after / 1024, "new_tensors": result.new_tensors}}))
"""

MAKE_SNAPSHOTS = r"""
import sys, torch
sys.path.insert(0, {root!r})
from pathlib import Path
from safetensors.torch import save_file
from surgeon.files.weights import Checkpoint
ckpt, out, layers, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
ck = Checkpoint.open(ckpt)
prefix = f"model.layers.{{layers - 1}}."
block = {{k: ck.read(k).clone() for k in ck if k.startswith(prefix)}}
gen = torch.Generator().manual_seed(0)
drift = {{k: torch.randn(v.shape, generator=gen) * 1e-3 for k, v in block.items()}}
out.mkdir(parents=True, exist_ok=True)
for i in range(count):
    step = {{k: v - (count - 1 - i) * drift[k] + torch.randn(v.shape, generator=gen) * 3e-4
            for k, v in block.items()}}
    save_file(step, str(out / f"step-{{(i + 1) * 100}}.safetensors"))
print(max(v.numel() * v.element_size() for v in block.values()))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/surgeon-convert-io"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    hidden, layers, vocab = (256, 4, 8000) if args.quick else (1024, 16, 32000)
    rounds = 1 if args.quick else args.rounds
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / f"llama-h{hidden}-l{layers}-v{vocab}"
    info = build_checkpoint(ckpt, hidden, layers, vocab)
    snapdir = work / f"snapshots-l{layers}-h{hidden}"
    if not snapdir.is_dir():
        tmp = snapdir.with_name(snapdir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        subprocess.run([sys.executable, "-c", MAKE_SNAPSHOTS.format(root=str(ROOT)), str(ckpt),
                        str(tmp), str(layers), str(SNAPSHOTS)], check=True)
        os.replace(tmp, snapdir)
    snap_files = sorted(str(p) for p in snapdir.iterdir())
    snap_bytes = sum(os.path.getsize(f) for f in snap_files)
    largest = _largest_block_tensor(ckpt, layers)
    print(f"checkpoint {info['bytes'] / 1e9:.2f} GB, {SNAPSHOTS} snapshots of the last block "
          f"({snap_bytes / 1e6:.0f} MB), largest block tensor {largest / 2**20:.1f} MiB",
          flush=True)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    child = CHILD.format(root=str(ROOT), threads=args.threads)
    subprocess.run(["cat", *snap_files, str(ckpt / "model.safetensors")], check=True,
                   stdout=subprocess.DEVNULL)  # warm the page cache
    samples: dict[str, list[dict[str, float]]] = {"cp + read": [], "grow() in process": []}
    for r in range(rounds):
        order = list(samples)
        random.Random(r).shuffle(order)
        for name in order:
            dst = work / f"grown-{r}"
            shutil.rmtree(dst, ignore_errors=True)
            os.sync()
            if name == "cp + read":
                wall_cp, _, _ = run_measured(["cp", "-r", str(ckpt), str(dst)])
                start = time.perf_counter()  # to /dev/null: this process must stay small,
                subprocess.run(["cat", *snap_files], check=True,  # as a forked child's peak
                               stdout=subprocess.DEVNULL)  # RSS starts from its parent's
                wall_read = time.perf_counter() - start
                sample = {"wall_s": wall_cp + wall_read, "seconds": wall_cp + wall_read,
                          "rss_mb": 0.0}
            else:
                wall, rss, out = run_measured([sys.executable, "-c", child, str(snapdir),
                                               str(ckpt), str(dst)])
                inner = json.loads(out.strip().splitlines()[-1])
                sample = {"wall_s": wall, "seconds": inner["seconds"], "rss_mb": rss,
                          "rss_above_imports_mb": inner["rss_peak_mb"] - inner["rss_before_mb"]}
            samples[name].append(sample)
            shutil.rmtree(dst, ignore_errors=True)
            print(f"round {r + 1}/{rounds} {name}: {sample['seconds']:.2f} s", flush=True)
    report(info, samples, largest, snap_bytes, args)


def _largest_block_tensor(ckpt: Path, layers: int) -> int:
    sys.path.insert(0, str(ROOT))
    from surgeon.files.weights import Checkpoint

    ck = Checkpoint.open(ckpt)
    prefix = f"model.layers.{layers - 1}."
    return max(s.nbytes for k, s in ck.items() if k.startswith(prefix))


def report(info: dict, samples: dict[str, list[dict[str, float]]], largest: int,
           snap_bytes: int, args: argparse.Namespace) -> None:
    base = statistics.median(s["seconds"] for s in samples["cp + read"])
    grown = samples["grow() in process"]
    timed = statistics.median(s["seconds"] for s in grown)
    above = statistics.median(s["rss_above_imports_mb"] for s in grown)
    peak = statistics.median(s["rss_mb"] for s in grown)
    goal = SNAPSHOTS * largest / 2**20 + 150
    table = ("| tool | timed s | × (cp + read) | peak RSS MB | RSS above imports MB |\n"
             "|---|---|---|---|---|\n"
             f"| cp -r + read snapshots | {base:.2f} | 1.00 | - | - |\n"
             f"| grow() in process | {timed:.2f} | {timed / base:.2f} | {peak:.0f} | "
             f"{above:.0f} |")
    summary = (f"checkpoint {info['bytes'] / 1e9:.2f} GB; {SNAPSHOTS} snapshots of the last "
               f"block ({snap_bytes / 1e6:.0f} MB); one block inserted after the last, "
               f"extrapolated; median of {len(grown)} rounds; torch threads {args.threads}.\n\n"
               f"Goals: ≤ 1.2× cp + read: {timed / base:.2f}× "
               f"({'met' if timed / base <= 1.2 else 'missed'}); RSS above imports ≤ "
               f"{goal:.0f} MiB: {above:.0f} MiB ({'met' if above <= goal else 'missed'}).")
    print()
    print(table)
    print()
    print(summary)
    if args.quick:
        return
    machine = (f"{platform.node()}: {platform.processor() or platform.machine()}, "
               f"{os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
               f"Python {platform.python_version()}")
    date = datetime.date.today().isoformat()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "grow_io.json").write_text(json.dumps(
        {"date": date, "machine": machine, "checkpoint": info, "snapshots": SNAPSHOTS,
         "snapshot_bytes": snap_bytes, "largest_block_tensor_bytes": largest,
         "samples": samples, "rss_goal_mb": goal}, indent=2) + "\n")
    (RESULTS / "grow_io.md").write_text(f"# grow_io ({date})\n\n{machine}\n\n{summary}\n\n"
                                        f"{table}\n")


if __name__ == "__main__":
    main()
