"""Which module an error came from, and the `exclude=` patterns that would skip it.

A torch error raised deep in a forward says what went wrong but not where in the model. The
traceback knows: every frame of a module's forward (and of `Module.__call__`) holds the module
as `self`, so the innermost frame whose `self` is a module of the model names it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn


def modules_on_stack(exc: BaseException, model: nn.Module) -> list[str]:
    """Qualified names of the modules of `model` whose code was running when `exc` was raised,
    outermost first (each once). Follows `__cause__` / `__context__` to the first error."""
    names = {id(m): n for n, m in model.named_modules()}
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    tb, out = exc.__traceback__, []
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        name = names.get(id(owner)) if isinstance(owner, nn.Module) else None
        if name is not None and name not in out:
            out.append(name)
        tb = tb.tb_next
    return out


def culprit(exc: BaseException, model: nn.Module, changed: Iterable[str]
            ) -> tuple[str, tuple[str, ...]]:
    """The module to blame for `exc` and the exclude patterns that would avoid it.

    The innermost running module that is one of `changed` (the modules a pass created or
    replaced) or inside one is blamed and excluded. When the error rose in a module above the
    changed ones (code that reads an attribute of a rewritten child), that module is named and
    the changed modules under it are excluded, numbered paths folded (`layers.*`)."""
    changed = list(changed)
    stack = modules_on_stack(exc, model)
    for name in reversed(stack):
        owner = _owner(name, changed)
        if owner is not None:
            return owner, (owner,)
    where = stack[-1] if stack else ""
    below = [c for c in changed if not where or c.startswith(where + ".")]
    return where, fold(below) if below else (where,)


def fold(names: Iterable[str]) -> tuple[str, ...]:
    """Module names with numbered path parts folded into `*`, each pattern once."""
    out: list[str] = []
    for n in names:
        p = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", n)
        if p not in out:
            out.append(p)
    return tuple(out)


def _owner(name: str, changed: list[str]) -> str | None:
    """The longest of `changed` that is `name` or holds it."""
    best = None
    for c in changed:
        if (name == c or not c or name.startswith(c + ".")) and (best is None
                                                                 or len(c) > len(best)):
            best = c
    return best


def error_line(exc: BaseException, limit: int = 200) -> str:
    """`RuntimeError: <the first line of its message>`, cut to `limit` characters."""
    lines = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return line if len(line) <= limit else line[: limit - 1] + "…"
