"""The short model card (README.md) written beside a converted checkpoint.

It says what was converted, with which passes and options, what that added, and how to load
the result, so a checkpoint shared on the hub explains itself. Nothing in it changes between
two runs of the same conversion (no dates, no paths of temporary files), and the source is
named as the caller gives it: a hub id, a factory or a directory's name, never a local path.
A base built by a factory is loaded with `trust_remote_code=True`, which the card shows.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from surgeon.version import __version__

_WHAT = {
    "aion": "residual adds became AION adaptive residuals, x + α·y with α = α0/(1 + β·ratio)",
    "hyper": "residual trunks carry parallel hyper-connection streams",
    "adyt": "LayerNorm/RMSNorm layers became ADyT, w·tanh(α(t)·x) + b",
}


def write_card(out: Path, model: nn.Module, source: str, new_parameters: int) -> None:
    """Write `out/README.md` for `model`, converted from `source` (a name, not a local path)."""
    base = getattr(model, "_surgeon_base", None) or {}
    factory = base.get("factory") if base.get("kind") == "factory" else None
    lines = ["---", "library_name: surgeon", "tags:", "- surgeon"]
    lines += [f"- {p['_type']}" for p in model._surgeon_passes]
    lines += ["---", "", f"# {type(model).__name__} converted by surgeon", "",
              f"Converted from `{source}` by surgeon {__version__}:", ""]
    drift = {d.pass_name: d for d in getattr(model, "surgeon_drift", [])}
    for spec in model._surgeon_passes:
        name = spec["_type"]
        options = ", ".join(f"{k}={v}" for k, v in spec["_data"].items() if v not in ((), []))
        d = drift.get(name)
        modules = f"; {d.modules} modules" if d is not None else ""
        lines.append(f"- **{name}** ({options}){modules}: {_WHAT.get(name, 'a third-party pass')}")
    lines += [
        "",
        f"The passes added {new_parameters:,} parameters; the original parameters keep their "
        "names.",
        "",
        "Load it with surgeon (it rebuilds the base model, replays the passes recorded in "
        "`surgeon.json`, and loads the weights strictly):",
        "",
        "```python",
        "import surgeon",
        "",
        'model = surgeon.load("path/to/this/directory")' if factory is None else
        f'model = surgeon.load("path/to/this/directory", trust_remote_code=True)  # runs {factory}',
        "```",
        "",
        "Check it with `surgeon verify path/to/this/directory" +
        ("`." if factory is None else " --trust-remote-code`."),
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))
