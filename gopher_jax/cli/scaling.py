"""`scaling run` and `scaling fit`: a ladder of model sizes on the same tokens, and its law."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "scaling run":
        common.add_config(p, default="experiments/scaling_ladder.py")
        common.add_workdir(p, default=None)
        p.add_argument("--member", default="",
                       help="only this member (index, smallest first, or name)")
    else:
        common.add_workdir(p, default=None)


def run(args: argparse.Namespace) -> int:
    from gopher_jax import scaling

    if args.name == "scaling fit":
        common.existing_workdir(args.workdir)
        scaling.fit(args.workdir, log=console.out)
        return 0
    ladder = common.load_config(args)
    common.writable_dir(args.workdir)
    common.writable_dir(ladder.data.data_dir, "data dir (data.data_dir)")
    out = scaling.run(ladder, args.workdir, args.member or None, log=console.out)
    return 1 if out["failed"] else 0
