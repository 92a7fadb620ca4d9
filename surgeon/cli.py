"""The `surgeon` command line: `surgeon inspect SRC`, `surgeon convert SRC DST -p PASS`,
`surgeon verify DST`, `surgeon grow SNAPDIR DST`.

Commands load models through `surgeon.files.source` and report through `surgeon.graph.report`. A
user's mistake (every `SurgeonError`) is printed as one line `error: <message>` on stderr with
exit code 1, never as a traceback; Ctrl-C prints `interrupted` and exits 130 (what is written
is written atomically, so nothing is left half-written). Heavy imports (torch, transformers) wait
until a command runs."""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import click

from surgeon.errors import SurgeonError, SurgeonWarning
from surgeon.version import __version__

if TYPE_CHECKING:
    from surgeon.converting import Conversion
    from surgeon.graph.report import Inspection
    from surgeon.growth.grow import BlockTrend, Growth
    from surgeon.verifying import Verification

REASON_WIDTH = 100  # untraced reasons are cut to this many characters in the table
INTERRUPTED = 130  # the exit code of a command stopped by Ctrl-C (128 + SIGINT), as shells use

# torch warns on import when numpy is missing; surgeon does not need numpy, so say nothing.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

# --trust-remote-code, on every command that reads a checkpoint someone else may have written.
trust_option = click.option(
    "--trust-remote-code", "trust_remote_code", is_flag=True,
    help="Let the checkpoint run code of its own: a 'package.module:factory' base named in "
         "surgeon.json, a config's auto_map. Only for checkpoints you trust.")


class UserError(click.ClickException):
    """A SurgeonError on its way out of the CLI: one stderr line, exit code 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class Interrupted(click.ClickException):
    """Ctrl-C: one stderr line `interrupted`, exit code 130."""

    exit_code = INTERRUPTED

    def __init__(self) -> None:
        super().__init__("interrupted")

    def show(self, file: Any = None) -> None:
        click.echo("interrupted", err=True)


class SurgeonGroup(click.Group):
    """A click group that turns every SurgeonError raised by a command into a UserError, Ctrl-C
    into `interrupted` with exit code 130, and prints every SurgeonWarning as one stderr line
    `warning: <message>`."""

    def invoke(self, ctx: click.Context) -> Any:
        with warnings.catch_warnings():  # restores showwarning afterwards
            warnings.showwarning = _one_line_warning(warnings.showwarning)
            try:
                return super().invoke(ctx)
            except SurgeonError as e:
                raise UserError(" ".join(str(e).split()) or type(e).__name__) from e
            except KeyboardInterrupt:
                raise Interrupted() from None


def examples(*lines: str) -> str:
    """A help epilog listing example command lines (click keeps a `\\b` paragraph as it is)."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


def quiet_unless(verbose: bool) -> contextlib.AbstractContextManager[None]:
    """transformers' progress bars and warnings hidden, unless -v/--verbose."""
    from surgeon.files.source import quiet_transformers

    return contextlib.nullcontext() if verbose else quiet_transformers()


def _one_line_warning(fallback: Any) -> Any:
    """A `warnings.showwarning` that prints surgeon's own warnings as one line, others as usual."""
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(category, SurgeonWarning):
            click.echo(f"warning: {' '.join(str(message).split())}", err=True)
        else:
            fallback(message, category, *args, **kwargs)
    return show


@click.group(cls=SurgeonGroup, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=examples(
                 "surgeon inspect examples/tiny-llama",
                 "surgeon convert examples/tiny-llama /tmp/tiny-llama-surgeon -p aion "
                 "-p hyper:streams=4 -p adyt",
                 "surgeon verify /tmp/tiny-llama-surgeon --against examples/tiny-llama",
                 "surgeon list-passes",
                 "surgeon COMMAND --help"))
@click.version_option(__version__, "--version", "-V", prog_name="surgeon")
def main() -> None:
    """Find and rewrite the residual adds and norm layers of PyTorch models."""


@main.command("inspect", epilog=examples(
    "surgeon inspect examples/tiny-llama",
    "surgeon inspect gpt2 --revision main --json > gpt2.json",
    "surgeon inspect mypkg.models:build --example mypkg.models:example"))
@click.argument("src")
@click.option("--json", "as_json", is_flag=True, help="Print the inspection as JSON.")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub model.")
@click.option("--example", default=None, metavar="package.module:function",
              help="A function returning the example input (a 'package.module:factory' SRC "
                   "needs one; transformers models do not).")
@click.option("--allow-pickle", is_flag=True,
              help="Read .bin/.pt weights (with torch.load(weights_only=True)).")
@click.option("--verbose", "-v", is_flag=True,
              help="Show transformers' own progress bars and warnings.")
@trust_option
def inspect_cmd(src: str, as_json: bool, revision: str | None, example: str | None,
                allow_pickle: bool, verbose: bool, trust_remote_code: bool) -> None:
    """Trace SRC and list its residual adds, norms, residual trunks and untraced modules.

    SRC is a local directory with config.json and model.safetensors, a hub id 'owner/name', or
    'package.module:factory' (a function returning an nn.Module, with --example).
    """
    import surgeon
    from surgeon.files.source import load_example, load_model

    with quiet_unless(verbose):
        loaded = load_model(src, revision=revision, allow_pickle=allow_pickle,
                            trust_remote_code=trust_remote_code)
        if example is None and loaded.config is None:
            raise UserError(f"no example input for {type(loaded.model).__name__}: pass --example "
                            "package.module:function (returning a tuple of positional args or a "
                            "dict of keyword args for its forward)")
        inspection = surgeon.inspect(loaded.model,
                                     load_example(example) if example is not None else None)
    if as_json:
        click.echo(json.dumps(inspection.to_dict(), indent=2))
    else:
        click.echo(format_inspection(inspection, loaded.description))


@main.command("convert", epilog=examples(
    "surgeon convert examples/tiny-llama /tmp/tiny-llama-surgeon -p aion -p hyper:streams=4 "
    "-p adyt",
    "surgeon convert meta-llama/Llama-3.2-1B out/ -p aion -p adyt:calibrate=true "
    "--calibration corpus.txt --max-shard-size 5GB",
    "surgeon convert mypkg.models:build out/ -p aion --weights model.safetensors "
    "--example mypkg.models:example",
    "surgeon list-passes              # the passes and their options"))
@click.argument("src")
@click.argument("dst")
@click.option("-p", "--pass", "passes", multiple=True, required=True,
              metavar="NAME[:key=value,...]",
              help="A pass to apply, in order (repeatable): aion, hyper:streams=4, adyt, ...")
@click.option("--exclude", "exclude", multiple=True, metavar="PATTERN",
              help="Module names no pass touches (fnmatch, repeatable): 'encoder.layer.3', "
                   "'*.attn'. A refusal names the one to give.")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub model.")
@click.option("--weights", default=None, metavar="FILE.safetensors",
              help="The weights of a 'package.module:factory' SRC.")
@click.option("--example", default=None, metavar="package.module:function",
              help="A function returning the example input (transformers models need none).")
@click.option("--calibration", default=None, metavar="FILE",
              help="Inputs a calibrating pass (adyt:calibrate=true) fits on instead of the "
                   "example: token ids (.safetensors with input_ids (N, T), .json list of "
                   "lists) or text (.txt, tokenised with SRC's own tokenizer).")
@click.option("--calibration-length", default=256, show_default=True, metavar="TOKENS",
              help="Window length a .txt --calibration file is cut into (at most the model's "
                   "max_position_embeddings).")
@click.option("--max-shard-size", default="50GB", show_default=True,
              help="Largest weights file; bigger checkpoints are sharded with an index.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (a surgeon checkpoint).")
@click.option("--allow-pickle", is_flag=True,
              help="Read .bin/.pt weights (with torch.load(weights_only=True)).")
@click.option("--push-to-hub", "push", default=None, metavar="REPO",
              help="Upload DST to this hub model repo when done.")
@click.option("--private", is_flag=True, help="Create the --push-to-hub repo as private.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@trust_option
def convert_cmd(src: str, dst: str, passes: tuple[str, ...], exclude: tuple[str, ...],
                revision: str | None,
                weights: str | None, example: str | None, calibration: str | None,
                calibration_length: int, max_shard_size: str, overwrite: bool,
                allow_pickle: bool, push: str | None, private: bool, quiet: bool,
                as_json: bool, trust_remote_code: bool) -> None:
    """Convert the model SRC with the passes and write the checkpoint directory DST.

    SRC is a local directory with config.json and safetensors weights, a hub id 'owner/name', or
    'package.module:factory' (with --weights). DST is written beside itself and renamed into
    place when complete; `surgeon.load(DST)` reloads it.
    """
    from surgeon.converting import convert

    progress = not (quiet or as_json) and sys.stderr.isatty()
    result = convert(src, dst, list(passes), revision=revision, weights=weights,
                     example=example, max_shard_size=max_shard_size, overwrite=overwrite,
                     allow_pickle=allow_pickle, progress=progress,
                     trust_remote_code=trust_remote_code, exclude=exclude,
                     calibration=calibration, calibration_length=calibration_length)
    if push:
        from surgeon.files.hub import push_to_hub
        from surgeon.files.source import public_name  # the commit is public: no local path

        result.pushed_to = push_to_hub(result.destination, push, private=private,
                                       message=f"surgeon convert {public_name(src)} with "
                                               f"{', '.join(passes)}")
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(format_conversion(result))


@main.command("verify", epilog=examples(
    "surgeon verify /tmp/tiny-llama-surgeon",
    "surgeon verify /tmp/tiny-llama-surgeon --against examples/tiny-llama --json"))
@click.argument("path")
@click.option("--against", default=None, metavar="SRC",
              help="The source model: replay the passes on it and compare.")
@click.option("--revision", default=None, help="Branch, tag or commit of a hub SRC.")
@click.option("--allow-pickle", is_flag=True,
              help="Read the --against SRC's .bin/.pt weights (with "
                   "torch.load(weights_only=True)).")
@click.option("--dtype", default="auto", show_default=True, metavar="DTYPE",
              help="Load and run in this dtype (float32, bfloat16, float16); auto: the dtypes "
                   "it was converted in.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--verbose", "-v", is_flag=True,
              help="Show transformers' own progress bars and warnings.")
@trust_option
def verify_cmd(path: str, against: str | None, revision: str | None, allow_pickle: bool,
               dtype: str, as_json: bool, verbose: bool, trust_remote_code: bool) -> None:
    """Reload the converted checkpoint PATH strictly, check the sha256 of every tensor, run its
    example and print the drift of each pass; exit 1 if a tensor changed, the output moved or
    a pass that promises to preserve the output moved it."""
    from surgeon.verifying import verify

    with quiet_unless(verbose):
        result = verify(path, against, revision=revision, allow_pickle=allow_pickle,
                        dtype=dtype, trust_remote_code=trust_remote_code)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else format_verification(result))
    if not result.ok:
        raise UserError(f"{path} failed verification: {result.failures[0]}")


@main.command("grow", epilog=examples(
    "surgeon grow runs/llama --check",
    "surgeon grow runs/llama runs/llama-deeper --count 2",
    "surgeon grow snapshots grown --checkpoint final-model --init zero"))
@click.argument("snapdir")
@click.argument("dst", required=False)
@click.option("--after", type=int, default=None,
              help="Insert after this block (default: the last; -1: before the first).")
@click.option("--count", type=int, default=1, show_default=True, help="Blocks to insert.")
@click.option("--init", "init", default="extrapolate", show_default=True,
              type=click.Choice(["extrapolate", "copy", "zero", "random"]),
              help="How the new blocks start.")
@click.option("--source", type=int, default=None,
              help="The block whose trajectory (or weights) seeds the new ones (default: the "
                   "one they follow).")
@click.option("--blocks", default=None, metavar="PREFIX",
              help="The block list, e.g. model.layers (default: the one holding most bytes).")
@click.option("--checkpoint", default=None, metavar="DIR",
              help="The checkpoint to grow (default: the newest snapshot, or the model a Trainer "
                   "run saved last). Needed for a SnapshotRecorder directory, which holds only "
                   "weights.")
@click.option("--beta0", type=float, default=0.1, show_default=True,
              help="Step along the velocity subspace (divided by the stretch τ).")
@click.option("--gamma0", type=float, default=0.15, show_default=True,
              help="Step along the acceleration (divided by 1 + the curvature κ).")
@click.option("--eta0", type=float, default=0.03, show_default=True,
              help="Escape step, taken only where τ > τ_crit and κ > κ_crit.")
@click.option("--tau-crit", type=float, default=2.0, show_default=True,
              help="Stretch τ above which a trajectory stagnates (path length / distance).")
@click.option("--kappa-crit", type=float, default=0.5, show_default=True,
              help="Curvature κ above which a trajectory stagnates (sideways / forward motion).")
@click.option("--k-subspace", type=int, default=10, show_default=True,
              help="Rank of the velocity subspace the step is projected on.")
@click.option("--ell-orth", type=int, default=5, show_default=True,
              help="Singular vectors past the subspace that the escape direction sums.")
@click.option("--max-shard-size", default="50GB", show_default=True,
              help="Largest safetensors shard DST gets, e.g. 5GB or 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists (a surgeon output).")
@click.option("--check", is_flag=True,
              help="Write nothing: print τ, κ and stagnation per block.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bars and no summary.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@trust_option
def grow_cmd(snapdir: str, dst: str | None, after: int | None, count: int, init: str,
             source: int | None, blocks: str | None, checkpoint: str | None, beta0: float,
             gamma0: float, eta0: float, tau_crit: float, kappa_crit: float, k_subspace: int,
             ell_orth: int, max_shard_size: str, overwrite: bool, check: bool, quiet: bool,
             as_json: bool, trust_remote_code: bool) -> None:
    """Insert new blocks into the newest checkpoint of SNAPDIR and write the grown checkpoint DST.

    SNAPDIR is a Trainer output directory of checkpoint-<step>/, a directory of
    <name>-<step>.safetensors files, or one written by surgeon's SnapshotRecorder. The new
    blocks start from the source block's weights moved along their trajectory over the
    snapshots (--init extrapolate), or as a copy, with their residual outputs at zero (exactly
    the original function), or freshly initialised. With --check, print per block whether its
    trajectory stagnates (τ ≥ τ_crit and κ ≥ κ_crit), and write nothing.

    A Trainer output directory whose snapshots/ a SnapshotCallback wrote grows the model the
    run saved last (trainer.save_model(), else the newest checkpoint-<step>/); a
    SnapshotRecorder directory holds only weights, so give --checkpoint.
    """
    from surgeon.growth.geometry import GrowthConfig
    from surgeon.growth.grow import check as check_blocks
    from surgeon.growth.grow import grow

    try:
        settings = GrowthConfig(beta0=beta0, gamma0=gamma0, eta0=eta0, tau_crit=tau_crit,
                                kappa_crit=kappa_crit, k_subspace=k_subspace, ell_orth=ell_orth)
    except ValueError as e:
        raise UserError(str(e)) from e
    if check:
        trends = check_blocks(snapdir, blocks=blocks, settings=settings)
        click.echo(json.dumps([t.__dict__ for t in trends], indent=2) if as_json
                   else format_trends(trends, settings))
        return
    if dst is None:
        raise UserError("give DST, the directory to write the grown checkpoint to (or --check)")
    progress = not (quiet or as_json) and sys.stderr.isatty()
    result = grow(snapdir, dst, after=after, count=count, init=init, source=source,
                  blocks=blocks, checkpoint=checkpoint, settings=settings,
                  max_shard_size=max_shard_size, overwrite=overwrite, progress=progress,
                  trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    elif not quiet:
        click.echo(format_growth(result))


@main.command("list-passes", epilog=examples(
    "surgeon list-passes",
    "surgeon list-passes --json",
    "surgeon convert SRC DST -p aion:preset=preln -p hyper:streams=2,mhc=true -p adyt"))
@click.option("--json", "as_json", is_flag=True, help="Print the passes as JSON.")
def list_passes_cmd(as_json: bool) -> None:
    """List the passes that -p takes: what each rewrites, its options with their defaults, and
    what it promises about the model's output at those defaults.

    Options are given as NAME:key=value,... (patterns in include/exclude are |-separated).
    """
    from surgeon.recipe import registered

    rows = [describe_pass(cls) for _, cls in sorted(registered().items())]
    click.echo(json.dumps(rows, indent=2) if as_json else format_passes(rows))


def describe_pass(cls: Any) -> dict[str, Any]:
    """A pass config class as `list-passes` shows it: name, summary, what it rewrites, its
    promise at the defaults, the passes it must precede, and its options (type and default)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    options = [{"name": f.name, "type": _type_name(hints.get(f.name, Any)),
                "default": _plain_default(f)} for f in dataclasses.fields(cls)]
    try:
        promise = cls().preserves()
    except Exception:  # a plug-in whose options have no defaults
        promise = None
    return {"name": cls.name, "summary": (cls.__doc__ or "").strip().split("\n")[0],
            "rewrites": cls.rewrites, "promise": promise,
            "runs_before": list(cls.runs_before), "options": options}


def format_passes(rows: list[dict[str, Any]]) -> str:
    """The listing `surgeon list-passes` prints: one block per pass."""
    lines: list[str] = []
    for row in rows:
        lines.append(f"{row['name']}: {row['summary']}")
        lines.append(f"  rewrites: {row['rewrites']}")
        lines.append("  promise (defaults): " + (
            f"keeps the output within {row['promise']:g} (relative)" if row["promise"] is not None
            else "none; it changes what the model computes"))
        if row["runs_before"]:
            lines.append(f"  must come before: {', '.join(row['runs_before'])}")
        own = [o for o in row["options"] if o["name"] not in ("include", "exclude")]
        table = [(o["name"], _show_default(o["default"]), o["type"])
                 for o in own + [o for o in row["options"] if o not in own]]
        widths = [max(len(cells[i]) for cells in [("option", "default", "type"), *table])
                  for i in range(3)]
        lines += ["    " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
                  for cells in [("option", "default", "type"), *table]]
        lines.append("")
    return "\n".join(lines).rstrip()


def _type_name(hint: Any) -> str:
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return " | ".join(map(str, args))
    if origin is tuple:
        return "patterns, |-separated"
    if origin is typing.Union or type(hint).__name__ == "UnionType":
        return " or ".join("none" if a is type(None) else _type_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _plain_default(f: Any) -> Any:
    import dataclasses

    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return None
    return list(value) if isinstance(value, tuple) else value


def _show_default(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "|".join(map(str, value)) or "-"
    return "none" if value is None else str(value)


def format_growth(g: Growth) -> str:
    """The summary `surgeon grow` prints."""
    first = g.after + 1
    lines = [f"grew {g.checkpoint}: {g.depth[0]} → {g.depth[1]} blocks under {g.blocks!r}, "
             f"{g.count} new at {first}..{first + g.count - 1} ({g.init} from block {g.source})"]
    rows = [r for r in g.tensors if "tau" in r]
    if rows:
        lines += ["", *_section("Extrapolated tensors", ("tensor", "τ", "κ", "β", "γ", "η",
                                                          "‖ΔW‖/‖W‖"),
                                [(r["key"], f"{r['tau']:.3g}", f"{r['kappa']:.3g}",
                                  f"{r['beta']:.3g}", f"{r['gamma']:.3g}", f"{r['eta']:.3g}",
                                  f"{r['relative_update']:.3g}") for r in rows])]
    lines.append(f"config: {', '.join(g.config_changes) or 'none'} changed")
    lines.append(f"new parameters: {g.new_parameters:,} in {g.new_tensors} tensors; "
                 f"{_bytes(g.copied_bytes)} copied unchanged, {_bytes(g.written_bytes)} computed")
    lines.append(f"wrote {g.destination} in {g.seconds:.1f} s: {', '.join(g.files)}")
    return "\n".join(lines)


def format_trends(trends: list[BlockTrend], settings: Any) -> str:
    """The table `surgeon grow --check` prints."""
    lines = _section(f"Blocks (stagnating: τ ≥ {settings.tau_crit:g} and κ ≥ "
                     f"{settings.kappa_crit:g})", ("block", "τ", "κ", "stagnating"),
                     [(str(t.index), f"{t.tau:.3f}", f"{t.kappa:.3f}",
                       "yes" if t.stagnating else "no") for t in trends])
    stuck = [str(t.index) for t in trends if t.stagnating]
    lines.append(f"stagnating blocks: {', '.join(stuck)}" if stuck else "no block stagnates")
    return "\n".join(lines)


def format_conversion(c: Conversion) -> str:
    """The summary `surgeon convert` prints: passes, sizes, time."""
    how = "weights streamed from disk" if c.streamed else "weights loaded in memory"
    lines = [f"converted {c.model} from {c.source} ({how})", ""]
    lines += _section("Passes", ("pass", "modules", "drift", "promise", "max |Δ|"),
                      [(p["name"], str(p["modules"]), f"{p['step']:.3g}", _promise(p["promise"]),
                        f"{p['max_abs']:.3g}") for p in c.passes])
    lines += [calibrated_line(p["name"], p["calibrated"]) for p in c.passes
              if p.get("calibrated")]
    lines.append(f"new parameters: {c.new_parameters:,}")
    lines.append(f"tensors: {c.tensors} ({_bytes(c.copied_bytes)} copied unchanged, "
                 f"{_bytes(c.written_bytes)} computed)")
    lines.append(f"wrote {c.destination} in {c.seconds:.1f} s: {', '.join(c.files)}")
    lines.append(f"carried: {', '.join(c.carried) or 'nothing'} (from the source)")
    if c.pushed_to:
        lines.append(f"pushed to {c.pushed_to}")
    return "\n".join(lines)


def calibrated_line(name: str, calibrated: dict[str, Any]) -> str:
    """What a calibrating pass measured on its calibration inputs (it promises nothing)."""
    inputs = (f"{calibrated['batches']} calibration batch"
              f"{'es' if calibrated['batches'] != 1 else ''}"
              if calibrated["inputs"] == "calibration" else "the example")
    return (f"{name} calibrated on {inputs}: output cosine {calibrated['cosine']:.6f}, max |Δ| "
            f"{calibrated['max_abs']:.3g} (measured, not promised)")


def format_verification(v: Verification) -> str:
    """The table `surgeon verify` prints."""
    lines = [f"checkpoint: {v.path} ({v.model}), reloaded strictly"]
    lines.append(f"tensors: {v.digests} checked against their sha256" if v.digests is not None
                 else "tensors: no digests recorded (an older checkpoint), bytes not checked")
    if v.reload_difference is not None:
        lines.append(f"output on the example vs conversion: relative difference "
                     f"{v.reload_difference:.3g}")
    if v.source_difference is not None:
        lines.append(f"output vs {v.against} converted afresh: relative difference "
                     f"{v.source_difference:.3g}")
    lines.append("")
    title = f"Drift against {v.against}" if v.against else "Drift recorded at conversion"
    lines += _section(title, ("pass", "modules", "drift", "promise", "max |Δ|", "cosine",
                              "status"),
                      [(p["name"], str(p["modules"]), f"{p['step']:.3g}",
                        _promise(p["promise"]), f"{p['max_abs']:.3g}", f"{p['cosine']:.6f}",
                        "ok" if p["ok"] else "DRIFTED") for p in v.passes])
    lines += [calibrated_line(p["name"], p["calibrated"]) for p in v.passes
              if p.get("calibrated")]
    lines.append("result: ok" if v.ok else f"result: FAILED ({len(v.failures)} problem"
                 f"{'' if len(v.failures) == 1 else 's'})")
    return "\n".join(lines)


def _promise(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _bytes(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def format_inspection(ins: Inspection, description: str) -> str:
    """The human report: one table per finding kind, then a counts line."""
    lines = [f"model: {description}", ""]
    lines += _section(
        "Residual adds",
        ("module", "kind", "source"),
        [(_name(r.module) + (f" (x{r.calls} calls)" if r.calls > 1 else ""),
          r.kind + (f", {len(r.branches)} parallel branches" if r.branches else ""), r.source)
         for r in ins.residuals],
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
        f"{_n(c['norms'], 'norm')}{kinds(c['norm_kinds'])}, {_n(c['trunks'], 'trunk')} "
        f"(carrying {c['residuals_in_trunks']} of the adds), "
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
