"""`scaling run`, `scaling fit` and `scaling tasks`: a ladder of model sizes on the same tokens,
its law, and which tasks gain from scale."""

from __future__ import annotations

import argparse

import ml_collections

from gopher_jax import config as config_lib
from gopher_jax import workdir as workdir_lib
from gopher_jax.cli import common, console
from gopher_jax.errors import UserError


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    if name == "scaling run":
        common.add_config(p, default="experiments/scaling_ladder.py")
        common.add_workdir(p, default=None)
        p.add_argument("--member", default="",
                       help="only this member (index, smallest first, or name)")
    elif name == "scaling tasks":
        from gopher_jax.cli.tasks import add_task_arguments

        common.add_config(p, default=None)
        common.add_workdir(p, default=None)
        add_task_arguments(p)
    else:
        common.add_workdir(p, default=None)


def _ladder(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """--config if given, else the ladder.json that `scaling run` left in the workdir."""
    workdir = common.existing_workdir(args.workdir)
    if args.config is not None:
        return common.load_config(args)
    path = workdir / workdir_lib.LADDER_JSON
    if not path.is_file():
        raise UserError(f"{workdir} has no {workdir_lib.LADDER_JSON} (not a `scaling run` "
                        "workdir?)",
                        "pass the --workdir of `scaling run`, or --config LADDER_FILE")
    return config_lib.from_json(path.read_text())


def _run_tasks(args: argparse.Namespace) -> int:
    from gopher_jax.cli.tasks import given_tasks, resolve_tasks
    from gopher_jax.scaling import task_scaling
    from gopher_jax.scaling.ladder import member_config, member_names
    from gopher_jax.tasks import run as run_lib

    given = given_tasks(args)  # a malformed task file is refused before any model loads
    ladder = _ladder(args)
    common.writable_dir(args.workdir)
    # Every member shares the data and tokenizer, so the first member's config resolves them.
    tasks = resolve_tasks(args, member_config(ladder, member_names(ladder)[0]), given)

    def score(c: ml_collections.ConfigDict, mdir, member_tasks) -> dict:
        # The batch size changes nothing in the results (the runner guarantees it), so it
        # stays out of the fingerprint.
        return run_lib.run(c, mdir, member_tasks, args.batch_size, args.max_new_tokens)

    out = task_scaling.run(ladder, args.workdir, tasks, score,
                           {"max_new_tokens": args.max_new_tokens}, log=console.out)
    console.out(task_scaling.markdown(out["results"]).rstrip())
    console.out(f"[scaling tasks] wrote {args.workdir}/{task_scaling.OUT}.{{json,md,png}}")
    return 0


def run(args: argparse.Namespace) -> int:
    from gopher_jax import scaling

    if args.name == "scaling fit":
        common.existing_workdir(args.workdir)
        scaling.fit(args.workdir, log=console.out)
        return 0
    if args.name == "scaling tasks":
        return _run_tasks(args)
    ladder = common.load_config(args)
    common.writable_dir(args.workdir)
    common.writable_dir(ladder.data.data_dir, "data dir (data.data_dir)")
    out = scaling.run(ladder, args.workdir, args.member or None, log=console.out)
    return 1 if out["failed"] else 0
