"""Smoke test of surgeon without extras: what `pip install .` (torch and surgeon's own
dependencies only: no transformers, no numpy) must be enough for.

A plain `nn.Module` (a small pre-norm transformer-like stack) is converted with `surgeon.apply`,
saved, loaded and compared; the command line converts it from its factory and verifies the result;
`SnapshotRecorder` records snapshots of it in a plain loop and `surgeon grow --check`
reads them. CI runs it in a virtualenv made with `pip install torch && pip install .`:

    python examples/smoke_no_extras.py
"""

from __future__ import annotations

import importlib
import inspect
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import surgeon

HERE = Path(__file__).resolve().parent
D = 16


class Block(nn.Module):
    """x + mlp(norm(x)): one pre-norm residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, t, d)
        return x + self.mlp(self.norm(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h))


def build() -> nn.Module:
    """The factory `surgeon.load` and `surgeon convert smoke_no_extras:build` rebuild from."""
    torch.manual_seed(0)
    return Net()


def example() -> tuple[torch.Tensor]:
    """The forward's input: (batch 2, 5 tokens, 4 features)."""
    return (torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1)),)


def opted_in(func: object) -> dict[str, bool]:
    """trust_remote_code=True where surgeon asks for it (a factory base runs this file's code)."""
    return ({"trust_remote_code": True}
            if "trust_remote_code" in inspect.signature(func).parameters else {})


def cli(*args: str) -> str:
    """Run `surgeon ARGS` in this directory (so that `smoke_no_extras:build` imports); stdout."""
    done = subprocess.run([sys.executable, "-m", "surgeon", *args],
                          cwd=HERE, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"surgeon {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout


def main() -> None:
    from surgeon.cli import main as group
    from surgeon.files.weights import write_file
    from surgeon.growth.snapshots import SnapshotRecorder

    for extra in ("numpy", "transformers"):
        try:
            importlib.import_module(extra)
            print(f"note: {extra} is installed; this smoke test is meant for a venv without it")
        except ImportError:
            pass
    trust = (["--trust-remote-code"] if any(p.name == "trust_remote_code"
                                            for p in group.commands["convert"].params) else [])
    sys.path.insert(0, str(HERE))  # the factory `smoke_no_extras:build`, for surgeon.load
    out = Path(tempfile.mkdtemp(prefix="surgeon-smoke-"))

    model, x = build().eval(), example()
    surgeon.apply(model, ["aion", "hyper:streams=2", "adyt"], x)
    surgeon.save(model, out / "api", base="smoke_no_extras:build")
    again = surgeon.load(out / "api", **opted_in(surgeon.load))
    with torch.no_grad():
        assert torch.equal(again(*x), model(*x)), "surgeon.load gives another output"
    print(f"apply, save, load: ok ({len(model.surgeon_drift)} passes)")

    write_file(out / "weights.safetensors", build().state_dict())  # streamed from disk
    cli("convert", "smoke_no_extras:build", str(out / "cli"), "-p", "aion", "-p",
        "hyper:streams=2", "--weights", str(out / "weights.safetensors"), "--example",
        "smoke_no_extras:example", "--quiet", *trust)
    print(f"convert, verify: {cli('verify', str(out / 'cli'), *trust).splitlines()[-1]}")

    net = build()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    recorder = SnapshotRecorder(net, out / "snapshots", every=1)
    for step in range(1, 5):
        optimizer.zero_grad()
        net(*example()).square().mean().backward()
        optimizer.step()
        recorder(step)
    trend = cli("grow", str(out / "snapshots"), "--check", "--blocks", "layers")
    print(f"grow --check: {trend.splitlines()[-1]}")
    shutil.rmtree(out)
    print("smoke test without extras: ok")


if __name__ == "__main__":
    main()
