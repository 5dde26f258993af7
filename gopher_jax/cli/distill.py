"""`distill`: train a student (--config) against a trained teacher workdir (--teacher) on
(1 - lambda) CE + lambda T^2 KL(teacher_T || student_T), resuming from --workdir's newest
checkpoint like `train`; lambda, T and the teacher's step are the config's distill.* keys.
With --teacher_logits DIR the KL is against the teacher's top-k that `teacher logits` stored.

`teacher logits`: stores a teacher's top-k next-token log-probs for every chunk of the
student's training split (train/teacher_logits.py).
"""

from __future__ import annotations

import argparse
import os

import ml_collections

from gopher_jax.cli import common, console
from gopher_jax.errors import UsageError


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p)
    common.add_multiprocess(p)
    p.add_argument("--teacher", default="", metavar="DIR",
                   help="the teacher's workdir (a trained run with the student's tokenizer); "
                        "sets distill.teacher")
    if name == "teacher logits":
        p.add_argument("--topk", type=int, default=32, metavar="K",
                       help="ids stored per position")
        p.add_argument("--out", default="", metavar="DIR",
                       help="default: beside the training split's chunks in the data dir")
        return
    common.add_workdir(p)
    p.add_argument("--teacher_logits", default="", metavar="DIR",
                   help="train against stored top-k (`teacher logits`) instead of --teacher")
    p.add_argument("--accept_new_data", action="store_true",
                   help="resume even though the tokenizer or training data changed since the "
                        "checkpoint (recorded in metrics.jsonl)")


def _config(args: argparse.Namespace) -> ml_collections.ConfigDict:
    """--config with --teacher in distill.teacher; a teacher named one way or the other."""
    c = common.load_config(args)
    if args.teacher:
        c.distill.teacher = args.teacher
    if not c.distill.teacher and not getattr(args, "teacher_logits", ""):
        raise UsageError(f"{args.name} needs a teacher", "pass --teacher DIR, the --workdir "
                                                         "of a trained `train` run")
    common.data_dir(c)
    return c


def run(args: argparse.Namespace) -> int:
    c = _config(args)
    from gopher_jax import data as data_lib
    from gopher_jax.parallel import distributed
    from gopher_jax.train import distill

    if args.name == "teacher logits":
        if args.topk < 1 or args.topk > c.model.vocab_size:
            raise UsageError(f"--topk {args.topk} must lie in [1, {c.model.vocab_size}]",
                             "pass a smaller --topk")
        if data_lib.is_mixture(c):
            raise UsageError("teacher logits for a mixture (data.sources)",
                             "distill from the teacher online (`distill --teacher`)")
        from gopher_jax import storage
        from gopher_jax.train import teacher_logits

        common.apply_multiprocess(args)
        distributed.initialize_from_env()  # before the teacher's checkpoint touches a device
        teacher = distill.open_teacher(c, c.distill.teacher)
        out = (storage.path(args.out) if args.out
               else teacher_logits.default_dir(c, teacher, args.topk))
        m = teacher_logits.write(c, teacher, out, args.topk, log=console.err)
        console.out(f"top-{m['topk']} of teacher {m['teacher']} for {m['num_chunks']:,} chunks "
                    f"in {out}")
        return 0
    common.writable_dir(args.workdir)
    if args.teacher_logits and args.teacher:
        raise UsageError("both --teacher and --teacher_logits", "pass one of them")
    if not args.teacher_logits and (os.path.realpath(c.distill.teacher)
                                    == os.path.realpath(args.workdir)):
        raise UsageError(f"--teacher and --workdir are both {args.workdir}",
                         "give the student its own --workdir")
    common.apply_multiprocess(args)
    distributed.initialize_from_env()  # before the teacher's checkpoint touches a device
    if args.teacher_logits:
        from gopher_jax.train import teacher_logits

        objective = teacher_logits.StoredDistillation(
            c, teacher_logits.StoredTeacher(args.teacher_logits))
    else:
        objective = distill.Distillation(c, distill.open_teacher(c, c.distill.teacher))
    from gopher_jax.train import loop

    summary = loop.train(c, args.workdir, console.ConsoleReporter(),
                         accept_new_data=args.accept_new_data, objective=objective)
    return 0 if summary["step"] >= c.train.steps or summary.get("preempted") else 1
