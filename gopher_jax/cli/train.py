"""`train`: train to train.steps, resuming from the newest checkpoint in --workdir."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p)
    common.add_workdir(p)
    common.add_multiprocess(p)
    p.add_argument("--accept_new_data", action="store_true",
                   help="resume even though the tokenizer or training data changed since the "
                        "checkpoint (recorded in metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    c = common.load_config(args)
    common.writable_dir(args.workdir)
    common.data_dir(c)
    common.apply_multiprocess(args)
    from gopher_jax.train import loop

    summary = loop.train(c, args.workdir, console.ConsoleReporter(),
                         accept_new_data=args.accept_new_data)
    return 0 if summary["step"] >= c.train.steps or summary.get("preempted") else 1
