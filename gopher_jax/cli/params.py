"""`params`: parameter counts and training FLOPs of a config, nothing allocated."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p)


def run(args: argparse.Namespace) -> int:
    from gopher_jax.model import sizes

    console.out(sizes.params_report(common.load_config(args)))
    return 0
