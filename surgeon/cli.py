"""The `surgeon` command line: `surgeon inspect SRC` and, later, convert, grow and verify.

Commands load models through `surgeon.source` and report through `surgeon.report`. A user's
mistake (every `SurgeonError`) is printed as one line `error: <message>` on stderr with exit code 1,
never as a traceback; heavy imports (torch, transformers) wait until a command runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from surgeon import __version__
from surgeon.errors import SurgeonError

if TYPE_CHECKING:
    from surgeon.report import Inspection

REASON_WIDTH = 100  # untraced reasons are cut to this many characters in the table


class UserError(click.ClickException):
    """A SurgeonError on its way out of the CLI: one stderr line, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class SurgeonGroup(click.Group):
    """A click group that turns every SurgeonError raised by a command into a UserError."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SurgeonError as e:
            raise UserError(" ".join(str(e).split()) or type(e).__name__) from e


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="surgeon")
def main() -> None:
    """Find and rewrite the residual adds and norm layers of PyTorch models."""


@main.command("inspect")
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub model.")
def inspect_cmd(src: str, as_json: bool, revision: str | None) -> None:
    """Trace SRC and list its residual adds, norms, residual trunks and untraced modules.

    SRC is a local directory with config.json and model.safetensors, a hub id 'owner/name', or
    'package.module:factory' (a function returning an nn.Module).
    """
    import surgeon
    from surgeon.source import load_model

    loaded = load_model(src, revision=revision)
    inspection = surgeon.inspect(loaded.model)
    if as_json:
        click.echo(json.dumps(inspection.to_dict(), indent=2))
    else:
        click.echo(format_inspection(inspection, loaded.description))


def format_inspection(ins: Inspection, description: str) -> str:
    """The human report: one table per finding kind, then a counts line."""
    lines = [f"model: {description}", ""]
    lines += _section(
        "Residual adds",
        ("module", "kind", "source"),
        [(_name(r.module), r.kind, r.source) for r in ins.residuals],
    )
    lines += _section(
        "Norms",
        ("module", "kind", "shape", "eps", "affine", "source"),
        [
            (_name(n.module), n.kind, _shape(n.shape), _value(n.eps), _value(n.affine), n.source)
            for n in ins.norms
        ],
    )
    lines += _section(
        "Residual trunks",
        ("blocks", "first ... last"),
        [(str(len(t.blocks)), _span(t.blocks)) for t in ins.trunks],
    )
    lines += _section(
        "Untraced modules",
        ("module", "reason"),
        [(_name(u.module), _cut(u.reason)) for u in ins.untraced],
    )
    lines.append(_counts_line(ins))
    return "\n".join(lines)


def _section(title: str, header: Sequence[str], rows: list[tuple[str, ...]]) -> list[str]:
    """A titled, left-aligned table with its row count, or "(none)"; ends with a blank line."""
    out = [f"{title} ({len(rows)})"]
    if not rows:
        return out + ["  (none)", ""]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]

    def fmt(cells: Sequence[str]) -> str:
        return "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    out.append(fmt(header))
    out += [fmt(r) for r in rows]
    return out + [""]


def _counts_line(ins: Inspection) -> str:
    c = ins.counts()

    def kinds(d: dict[str, int]) -> str:
        return f" ({', '.join(f'{k} {v}' for k, v in sorted(d.items()))})" if d else ""

    return (
        f"counts: {_n(c['residuals'], 'residual add')}{kinds(c['residual_kinds'])}, "
        f"{_n(c['norms'], 'norm')}{kinds(c['norm_kinds'])}, {_n(c['trunks'], 'trunk')}, "
        f"{_n(c['traced_modules'], 'traced module')}, {c['untraced_modules']} untraced"
    )


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _name(module: str) -> str:
    return module or "(root)"


def _shape(shape: Sequence[int] | None) -> str:
    return "-" if shape is None else str(tuple(shape))


def _value(v: Any) -> str:
    return "-" if v is None else str(v)


def _span(blocks: Sequence[str]) -> str:
    if not blocks:
        return "-"
    return blocks[0] if len(blocks) == 1 else f"{blocks[0]} ... {blocks[-1]}"


def _cut(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= REASON_WIDTH else text[: REASON_WIDTH - 3] + "..."
