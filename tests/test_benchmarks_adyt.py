"""examples/benchmarks/adyt_training.py --quick, run as a user would (a few seconds): every arm
converts, attaches and trains to a finite validation loss, and --quick writes no files."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "benchmarks" / "adyt_training.py"


def test_quick_run_trains_every_arm(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--archs", "llama",
                           "--out", str(tmp_path / "results")], env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = re.finditer(r"^\| llama \| ([^|]+?) \| (\d+\.\d+ ± .+)$", proc.stdout, re.M)
    rows = {m[1]: m[2] for m in table}  # arm → its cells in the loss table
    assert set(rows) >= {"plain", "DyT", "ADyT", "AION+ADyT", "ADyT (no recipe)"}, proc.stdout
    for arm, cells in rows.items():
        final = float(cells.split(" | ")[2].split(" ± ")[0])  # the third mark: the last step
        assert math.isfinite(final) and final < 5.0, (arm, cells)
    assert "Goal: DyT and ADyT" in proc.stdout
    assert not (tmp_path / "results").exists()  # --quick writes nothing
