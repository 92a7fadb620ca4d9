"""The support matrix's `--quick` subset runs, writes a row per architecture with a reason in
every red cell, and keeps the zoo-like rows (Llama, GPT-2, BERT) fully green."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "compat" / "support_matrix.py"


def test_quick_support_matrix(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import support_matrix
    finally:
        sys.path.pop(0)
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr[-2000:]
    data = json.loads((tmp_path / "support.json").read_text())
    md = (tmp_path / "support.md").read_text()
    names = [row["name"] for row in data["rows"]]
    assert names == [c[0] for c in support_matrix.CORPUS if c[0] in support_matrix.QUICK
                     and c[1] not in ("timm", "torchvision")]
    assert len(set(row["family"] for row in data["rows"])) >= 4
    for row in data["rows"]:
        assert f"| {row['name']} | {row['family']} |" in md
        for key, cell in row["cells"].items():
            if cell["ok"] is False:
                assert cell["reason"].strip(), (row["name"], key)
                assert f"**{row['name']}** `{key}`:" in md
    by_name = {row["name"]: row for row in data["rows"]}
    for good in ("llama", "gpt2", "bert"):
        cells = by_name[good]["cells"]
        assert set(support_matrix.CELLS) <= set(cells), good
        red = {k: c.get("reason") for k, c in cells.items() if c["ok"] is False}
        assert not red, (good, red)
    assert by_name["llama"]["cells"]["generate"]["ok"] is True
    assert by_name["llama"]["cells"]["grow_zero"]["ok"] is True
    assert by_name["bert"]["cells"]["generate"]["ok"] is None  # not applicable
    assert data["summary"]["overall"]["run"] == len(names)
    assert "## Summary" in md and "overall" in md
