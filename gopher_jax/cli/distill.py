"""`distill`: train a student (--config) against a trained teacher workdir (--teacher) on
(1 - lambda) CE + lambda T^2 KL(teacher_T || student_T), resuming from --workdir's newest
checkpoint like `train`; lambda, T and the teacher's step are the config's distill.* keys."""

from __future__ import annotations

import argparse
import os

from gopher_jax.cli import common, console
from gopher_jax.errors import UsageError


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p)
    common.add_workdir(p)
    common.add_multiprocess(p)
    p.add_argument("--teacher", default="", metavar="DIR",
                   help="the teacher's workdir (a trained run with the student's tokenizer); "
                        "sets distill.teacher")
    p.add_argument("--accept_new_data", action="store_true",
                   help="resume even though the tokenizer or training data changed since the "
                        "checkpoint (recorded in metrics.jsonl)")


def run(args: argparse.Namespace) -> int:
    c = common.load_config(args)
    if args.teacher:
        c.distill.teacher = args.teacher
    if not c.distill.teacher:
        raise UsageError("distill needs a teacher", "pass --teacher DIR, the --workdir of a "
                                                    "trained `train` run")
    common.writable_dir(args.workdir)
    common.data_dir(c)
    if os.path.realpath(c.distill.teacher) == os.path.realpath(args.workdir):
        raise UsageError(f"--teacher and --workdir are both {args.workdir}",
                         "give the student its own --workdir")
    from gopher_jax.train import distill, loop

    teacher = distill.open_teacher(c, c.distill.teacher)
    common.apply_multiprocess(args)
    summary = loop.train(c, args.workdir, console.ConsoleReporter(),
                         accept_new_data=args.accept_new_data,
                         objective=distill.Distillation(c, teacher))
    return 0 if summary["step"] >= c.train.steps or summary.get("preempted") else 1
