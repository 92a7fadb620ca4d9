"""`python -m surgeon ...` runs the same command line as the `surgeon` script."""

from surgeon.cli import main

main(prog_name="surgeon")
