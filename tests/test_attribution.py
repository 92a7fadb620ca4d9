"""Source attribution (`Residual.source`, `Norm.source`): the innermost frame of the model's own
code, found by where the surgeon and torch packages really lie, not by directory names, so a
model under some `.../surgeon/...` or `.../torch/...` directory is still attributed to its file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.graph.find import source_line

SURGEON = Path(surgeon.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
MODEL = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.fc(self.norm(x))
'''


def frames(*files: tuple[str | Path, int]) -> str:
    """A stack trace as torch.fx records it, outermost frame first."""
    return "".join(f'  File "{f}", line {n}, in forward\n    code\n' for f, n in files)


@pytest.mark.parametrize(("trace", "expected"), [
    (frames(("/home/u/surgeon/model.py", 12)), "model.py:12"),  # the reported defect
    (frames(("/srv/torch/net.py", 3), (TORCH / "nn" / "modules" / "module.py", 1775)), "net.py:3"),
    (frames(("/a/train.py", 5), ("/a/model.py", 40), (SURGEON / "graph" / "tracing.py", 480),
            ("<surgeon stand-in for Block>", 2), (TORCH / "fx" / "proxy.py", 9)), "model.py:40"),
    (frames((SURGEON / "nn" / "aion.py", 7), ("<surgeon stand-in for X>", 2)), ""),
    ("", ""),
])
def test_source_line(trace: str, expected: str) -> None:
    assert source_line(trace) == expected


@pytest.mark.parametrize("parent", ["x/surgeon/repo", "torch"])
def test_model_under_a_directory_named_like_a_library(tmp_path: Path, parent: str) -> None:
    file = tmp_path / parent / "mymodel.py"
    file.parent.mkdir(parents=True)
    file.write_text(MODEL)
    spec = importlib.util.spec_from_file_location("mymodel", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = surgeon.inspect(module.Block(), (torch.randn(2, 3, 8),))
    line = MODEL.splitlines().index("        return x + self.fc(self.norm(x))") + 1
    assert [r.source for r in report.residuals] == [f"mymodel.py:{line}"]
