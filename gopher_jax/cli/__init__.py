"""The command line: `python -m gopher_jax COMMAND ...` (see app.py)."""

from gopher_jax.cli.app import main, run

__all__ = ["main", "run"]
