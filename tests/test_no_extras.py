"""surgeon with torch and its own dependencies only (`pip install .`, no extras): numpy and
transformers are not installed there, so nothing on the Python API's path may need them.

The smoke script `examples/smoke_no_extras.py` (which CI also runs in a virtualenv without
extras) runs here in a subprocess whose `import numpy` and `import transformers` fail as they do
where the packages are missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from surgeon.files.weights import byte_view, read_header, read_tensor, write_file

ROOT = Path(__file__).resolve().parents[1]
MISSING = 'raise ModuleNotFoundError("No module named {0!r} (hidden by the test)", name={0!r})\n'


def hide(directory: Path, *packages: str) -> Path:
    """A directory that, first on PYTHONPATH, makes `import <package>` fail as if absent."""
    for name in packages:
        (directory / name).mkdir(parents=True)
        (directory / name / "__init__.py").write_text(MISSING.format(name))
    return directory


def test_smoke_without_numpy_or_transformers(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(hide(tmp_path / "hidden", "numpy", "transformers")), str(ROOT)]),
        "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", "import numpy"], env=env, capture_output=True,
                          text=True)
    assert "hidden by the test" in done.stderr  # the shim works
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "smoke_no_extras.py")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "apply, save, load: ok (3 passes)"
    assert lines[1] == "convert, verify: result: ok"
    assert lines[2].startswith("grow --check: ")
    assert lines[-1] == "smoke test without extras: ok"
    assert "note:" not in done.stdout and "Numpy is not available" not in done.stderr


def test_write_file_round_trip_without_numpy_views(tmp_path: Path) -> None:
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
               "b": torch.tensor([1, 2, 3], dtype=torch.bfloat16),
               "empty": torch.zeros(0, 4), "scalar": torch.tensor(7, dtype=torch.int64),
               "t": torch.arange(6.0).reshape(3, 2).t()}  # not contiguous
    path = write_file(tmp_path / "x.safetensors", tensors, metadata={"step": "3"})
    entries, metadata = read_header(path)
    assert metadata == {"format": "pt", "step": "3"}
    for key, value in tensors.items():
        got = read_tensor(entries[key])
        assert got.dtype == value.dtype and torch.equal(got, value), key
    view = byte_view(tensors["w"])
    assert view.nbytes == 24 and not view.readonly
    view[:4] = bytes(4)  # shares memory: writing the view writes the tensor
    assert tensors["w"][0, 0].item() == 0.0 and len(byte_view(tensors["empty"])) == 0
