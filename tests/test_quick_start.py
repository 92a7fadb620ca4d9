"""README.md's Quick start and `.ci/run`: CI runs the README's own commands (taken from the
file), with the one CPU-torch line swapped for the local index's CPU build, and refuses a Quick
start that does not begin with PyTorch's CPU-only install line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def ci_commands(root: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(root / ".ci" / "run"), "--print-commands"],
                          capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", **env})


def quick_start(readme: str) -> list[str]:
    section = readme.split("\n## Quick start\n", 1)[1]
    return section.split("```bash\n", 1)[1].split("\n```\n", 1)[0].splitlines()


def test_ci_runs_the_readme_commands() -> None:
    readme = quick_start((ROOT / "README.md").read_text())
    assert readme[0].startswith(CPU_TORCH + "  # CPU-only machine")
    assert len(readme) == 3  # the torch step, then the two commands a newcomer copies
    assert readme[1].startswith('pip install ".[hf]" && surgeon convert examples/tiny-llama ')
    assert " && surgeon verify " in readme[1]
    assert readme[2] == 'pip install ".[test]" && pytest -q'
    done = ci_commands()
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["pip install torch==2.13.0", *readme[1:]]
    other = ci_commands(CI_TORCH="pip install torch==2.4.0")
    assert other.stdout.splitlines()[0] == "pip install torch==2.4.0"


@pytest.mark.parametrize(("edit", "message"), [
    (lambda text: text.replace(CPU_TORCH, "pip install torch"), "must begin with"),
    (lambda text: text.replace('pip install ".[test]" && pytest -q\n', ""), "fewer commands"),
])
def test_ci_refuses_a_quick_start_without_its_steps(tmp_path: Path, edit, message: str) -> None:
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "README.md").write_text(edit((ROOT / "README.md").read_text()))
    done = ci_commands(tmp_path)
    assert done.returncode == 1 and message in done.stderr and done.stdout == ""
