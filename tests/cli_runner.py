"""Run the `surgeon` command line in-process, for the CLI tests."""

from __future__ import annotations

from click.testing import CliRunner, Result

from surgeon.cli import main


def run(*args: str, input: str | None = None) -> Result:
    """Invoke the CLI with stdout and stderr kept apart (click 8.1 and 8.2+); `input` is what
    stdin holds."""
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always keeps them apart
        runner = CliRunner()
    return runner.invoke(main, list(args), input=input)
