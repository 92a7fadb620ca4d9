"""The package's layout is its architecture: wings import downward only, and no module imports
another module's `_private` names. Read with `ast`, so nothing here is imported or run."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# What each lower wing may import of surgeon (besides itself): DESIGN.md's "import downward".
# `errors` and `version` are leaves at the top that import nothing of surgeon.
LEAVES = {"surgeon.errors", "surgeon.version"}
WINGS: dict[str, set[str]] = {
    "surgeon.nn": set(),
    "surgeon.files": LEAVES,
    "surgeon.graph": LEAVES | {"surgeon.files", "surgeon.nn"},
    "surgeon.growth": LEAVES | {"surgeon.files", "surgeon.nn", "surgeon.graph"},
}
FACES = {"applying", "converting", "verifying", "checkpoint", "recipe", "errors", "cli",
         "__main__", "version"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, e.g. surgeon.graph.rewrite
    target: str  # the module imported from, e.g. surgeon.graph.tracing
    names: tuple[str, ...]  # names taken from it (empty for `import x`)
    line: int

    def __str__(self) -> str:
        what = f"from {self.target} import {', '.join(self.names)}" if self.names else (
            f"import {self.target}")
        return f"{self.module}:{self.line}: {what}"


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> list[Import]:
    """Every import statement in the file, at any depth (functions, TYPE_CHECKING blocks)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(name, a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            found.append(Import(name, target, tuple(a.name for a in node.names), node.lineno))
    return found


def sources() -> list[Path]:
    return sorted(p for d in ("surgeon", "passes") for p in (ROOT / d).rglob("*.py"))


ALL = [i for p in sources() for i in imports_of(p)]
OURS = {module_name(p) for p in sources()}


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def wing_of(module: str) -> str | None:
    return next((w for w in WINGS if within(module, w)), None)


def test_the_sources_are_found() -> None:
    assert "surgeon.graph.tracing" in OURS and "surgeon.files.weights" in OURS
    assert len(ALL) > 100


def test_the_top_of_the_package_holds_only_faces() -> None:
    top = {p.stem for p in (ROOT / "surgeon").glob("*.py")} - {"__init__"}
    assert top <= FACES, f"modules at the top that are not faces: {sorted(top - FACES)}"


@pytest.mark.parametrize("wing", sorted(WINGS))
def test_a_lower_wing_imports_only_downward(wing: str) -> None:
    bad = []
    for imp in ALL:
        if not within(imp.module, wing):
            continue
        if imp.target == "surgeon":  # the package root is a face
            bad.append(imp)
            continue
        if within(imp.target, "passes"):
            bad.append(imp)
            continue
        if not within(imp.target, "surgeon") or within(imp.target, wing):
            continue
        if not any(within(imp.target, allowed) for allowed in WINGS[wing]):
            bad.append(imp)
    assert not bad, f"{wing} imports above itself:\n" + "\n".join(map(str, bad))


def test_the_core_never_imports_the_passes() -> None:
    bad = [i for i in ALL if within(i.module, "surgeon") and within(i.target, "passes")]
    assert not bad, "\n".join(map(str, bad))


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_imports_another_modules_private_names() -> None:
    bad = [i for i in ALL
           if i.target in OURS | {"surgeon", "passes"} and i.target != i.module
           and (any(map(private, i.names)) or any(map(private, i.target.split("."))))]
    assert not bad, "private names imported across modules:\n" + "\n".join(map(str, bad))


@pytest.mark.parametrize("source, expect", [
    ("import surgeon\n", [("surgeon", ())]),
    ("from surgeon import x\n", [("surgeon", ("x",))]),
    ("def f():\n    from .tracing import _y\n", [("surgeon.graph.tracing", ("_y",))]),
    ("from .. import errors\n", [("surgeon", ("errors",))]),
])
def test_the_reader_sees_every_import(tmp_path: Path, source: str, expect: list) -> None:
    """The checks above are only as good as this reader: nested and relative imports count."""
    (tmp_path / "surgeon" / "graph").mkdir(parents=True)
    path = tmp_path / "surgeon" / "graph" / "find.py"
    path.write_text(source)
    assert [(i.target, i.names) for i in imports_of(path, tmp_path)] == expect


def test_the_public_import_paths_keep_working() -> None:
    """What users import: every name in `surgeon.__all__`, the runtime modules, growth and the
    integrations (transformers is a test dependency, so those import too)."""
    import importlib

    import surgeon

    for name in surgeon.__all__:
        assert getattr(surgeon, name) is not None, name
    assert issubclass(surgeon.NoEffectWarning, surgeon.SurgeonWarning)
    for module, names in [
        ("surgeon.nn", ["ADyT", "AionResidual", "HyperConnections", "ManifoldHyperConnections",
                        "expand_streams", "reduce_streams", "attach"]),
        ("surgeon.growth", ["GrowthConfig", "extrapolate", "stagnating"]),
        ("surgeon.growth.snapshots", ["SnapshotRecorder", "open_snapshots"]),
        ("surgeon.growth.grow", ["grow", "check"]),
        ("surgeon.integrations.transformers", ["SurgeonCallback"]),
        ("surgeon.integrations.snapshots", ["SnapshotCallback"]),
    ]:
        loaded = importlib.import_module(module)
        missing = [n for n in names if not hasattr(loaded, n)]
        assert not missing, f"{module} lacks {missing}"
