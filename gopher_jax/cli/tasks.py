"""`tasks`: score a trained workdir on downstream tasks (task files, suites by name) and on
language-modelling corpora. The task flags and their resolution are shared with
`scaling tasks`."""

from __future__ import annotations

import argparse

import ml_collections

from gopher_jax import storage
from gopher_jax.cli import common, console
from gopher_jax.errors import UsageError


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """The flags that choose and score tasks."""
    from gopher_jax.tasks import iambic, suites

    p.add_argument("--tasks", default="", metavar="A.json,B.json",
                   help="task files, comma-separated (format: gopher_jax/tasks/spec.py)")
    p.add_argument("--suite", default="", metavar="NAME[,NAME]",
                   help=f"suites by name ({', '.join(suites.NAMES)}; the default when neither "
                        "--tasks nor --corpora is given: iambic); their task files are "
                        "written under <data_dir>/tasks/ (gopher_jax/tasks/suites.py)")
    p.add_argument("--suite_dir", default="", metavar="DIR",
                   help="where a suite's files are (DIR or DIR/<suite>; layouts: "
                        "gopher_jax/tasks/suites.py); without it, a suite with a TFDS builder "
                        "is read from the data dir when prepared there")
    p.add_argument("--corpora", default="", metavar="NAME=SOURCE,...",
                   help="bits per byte on corpora, group language_modelling; SOURCE is a glob "
                        "of .txt/.jsonl files, tfds:<name>:<split>, split:<split> (the training "
                        "corpus), iambic:<split> or python_docs:all (gopher_jax/tasks/corpora.py)")
    p.add_argument("--examples", type=int, default=iambic.EXAMPLES,
                   help="examples per task of the built-in iambic suite (>= 1)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="rows per forward pass (>= 1), rounded up to a multiple of the devices "
                        "the batch is split over (mesh data x fsdp); results do not depend on it")
    p.add_argument("--limit", type=int, default=0,
                   help="score only the first N examples of each task (0 = all)")
    p.add_argument("--max_new_tokens", type=int, default=32,
                   help="greedy tokens at most per cloze or generation answer (>= 1)")


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p, default=None)
    common.add_workdir(p)
    common.add_int8(p)
    add_task_arguments(p)


def given_tasks(args: argparse.Namespace) -> tuple[list, list[str]]:
    """(the tasks from files and corpora, the suite names to load): the flags checked, the
    task files read and the corpora parsed, everything that can be refused before a config
    or checkpoint is read."""
    from gopher_jax.tasks import corpora, spec, suites

    if args.tasks and args.suite:
        raise UsageError("--tasks and --suite both given", "pass one of them")
    for flag, least in (("batch_size", 1), ("max_new_tokens", 1), ("limit", 0),
                        ("examples", 1)):
        if getattr(args, flag) < least:
            raise UsageError(f"--{flag}={getattr(args, flag)} must be >= {least}",
                             f"pass {least} or more")
    names = suites.parse_names(args.suite)
    if not (args.tasks or args.corpora or names):
        names = ["iambic"]
    if args.suite_dir and names == ["iambic"]:
        raise UsageError("--suite_dir given for the built-in iambic suite",
                         "name a suite that reads files, e.g. --suite lambada")
    tasks = [spec.load(p) for p in args.tasks.split(",") if p.strip()]
    return tasks + corpora.from_flag(args.corpora), names


def resolve_tasks(args: argparse.Namespace, c: ml_collections.ConfigDict,
                  given: tuple[list, list[str]]) -> list:
    """`given_tasks`' tasks plus its suites' tasks for config `c`, names checked unique,
    corpora checked, suite files written under <data_dir>/tasks/, each cut to --limit
    examples."""
    from gopher_jax.tasks import corpora, spec, suites

    given_list, suite_names = given
    from_suites = [t for name in suite_names
                   for t in suites.load(name, args.suite_dir, c.data.data_dir, args.examples)]
    tasks = given_list + from_suites
    taken = [t.name for t in tasks]
    if len(set(taken)) != len(taken):
        twice = sorted({n for n in taken if taken.count(n) > 1})
        raise UsageError(f"two tasks are named {twice[0]!r}", "give each task its own name")
    for t in tasks:
        if t.kind == spec.LANGUAGE_MODELLING:
            corpora.check(c, t)
    if from_suites:
        directory = storage.path(c.data.data_dir) / "tasks"
        for t in from_suites:  # a copy to read; a read-only data dir that has it is fine
            if not _written(t, directory / f"{t.name}.json"):
                common.writable_dir(c.data.data_dir, "data dir (data.data_dir), for the "
                                    f"suite's task {t.name}.json")
                spec.write(t, directory)
    return [t.limited(args.limit) for t in tasks]


def run(args: argparse.Namespace) -> int:
    given = given_tasks(args)  # a malformed task file is refused before any checkpoint is read
    c = common.trained_config(args)
    common.writable_dir(args.workdir)  # tasks.json goes there
    tasks = resolve_tasks(args, c, given)
    from gopher_jax.tasks import run as run_lib

    results = run_lib.run(c, args.workdir, tasks, args.batch_size, args.max_new_tokens,
                             int8=args.int8)
    console.out(run_lib.markdown(results).rstrip())
    return 0


def _written(task, path) -> bool:
    """Whether `path` already holds this task (then nothing needs writing)."""
    from gopher_jax.tasks import spec

    try:
        return path.is_file() and spec.load(path) == task
    except Exception:  # noqa: BLE001 - unreadable or another task: write it again
        return False

