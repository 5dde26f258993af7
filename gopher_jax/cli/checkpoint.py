"""`checkpoint info`: a workdir's checkpoints, one line each."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_workdir(p, default=None)


def run(args: argparse.Namespace) -> int:
    from gopher_jax import checkpoint

    common.existing_workdir(args.workdir)
    console.out(checkpoint.format_info(args.workdir))
    return 0
