"""`data prepare`, `data filter` and `tokenizer train`."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console
from gopher_jax.errors import UsageError


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_config(p)
    if name in ("data prepare", "data filter"):
        p.add_argument("--processes", type=int, default=1, metavar="N",
                       help="local processes working on shards (results never depend on N)")
        p.add_argument("--executor", default=None, metavar="local|ray|slurm",
                       help="run the stages on datatrove's local, Ray (RAY_ADDRESS or a "
                            "running cluster) or SLURM executor (BUILD.md); same files")
        p.add_argument("--tasks", type=int, default=1, metavar="N",
                       help="with --executor: tasks per stage (results never depend on N)")
        p.add_argument("--workers", type=int, default=1, metavar="N",
                       help="with --executor: tasks running at once (-1: all)")
        p.add_argument("--task_memory", type=int, default=None, metavar="MB",
                       help="with --executor: the memory a task may hold beyond its "
                            "libraries (default 1024); spills, partitions and each task's "
                            "request follow from it (BUILD.md)")
        p.add_argument("--slurm_partition", default="", metavar="NAME",
                       help="with --executor slurm: the partition")
        p.add_argument("--slurm_time", default="24:00:00", metavar="HH:MM:SS",
                       help="with --executor slurm: the time limit per task")
    if name == "data filter":
        p.add_argument("--out", default="", metavar="DIR",
                       help="output folder (default <data_dir>/filtered/<corpus>)")


def _engine(args: argparse.Namespace):
    """The data.engine.Engine the flags ask for (None: local processes); checked now."""
    executor = getattr(args, "executor", None)
    if executor is None:
        for flag, default in (("tasks", 1), ("workers", 1), ("task_memory", None)):
            if getattr(args, flag, default) != default:
                raise UsageError(f"--{flag} without --executor",
                                 "add --executor local|ray|slurm, or use --processes")
        return None
    from gopher_jax.data.engine import Engine

    slurm = (("partition", args.slurm_partition), ("time", args.slurm_time)) \
        if executor == "slurm" else ()
    memory = {} if args.task_memory is None else {"task_memory_mb": args.task_memory}
    eng = Engine(executor, tasks=args.tasks, workers=args.workers, slurm=slurm, **memory)
    eng.check()
    return eng


def run(args: argparse.Namespace) -> int:
    processes = getattr(args, "processes", 1)
    if processes < 1:
        raise UsageError(f"--processes {processes}", "give 1 or more")
    engine = _engine(args)
    c = common.load_config(args)
    common.writable_dir(c.data.data_dir, "data dir (data.data_dir)")
    if engine is not None:
        from gopher_jax.data import engine as engine_lib

        engine_lib.check_plan(engine, c, args.name == "data filter" or c.data.filter,
                              args.name == "data prepare")
    if args.name == "tokenizer train":
        return _tokenizer(c)
    if args.name == "data filter":
        return _filter(c, args.out or None, processes, engine)
    from gopher_jax import data

    info = data.prepare(c, log=console.out, processes=processes, engine=engine)
    console.out(f"[data] {info.dataset}: tokenizer {info.tokenizer}")
    for split, s in info.splits.items():
        console.out(f"[data]   {split:>10}: {s.num_chunks:>8,} chunks  {s.num_tokens:>12,} "
                    f"tokens  {s.num_bytes:>13,} bytes  {s.tokens_per_byte:.3f} tokens/byte"
                    f"{'  (reused)' if s.reused else ''}")
    for name, si in info.sources.items():
        console.out(f"[data] source {name} ({info.shares[name]:.1%} of the rows):")
        for split, s in si.splits.items():
            console.out(f"[data]   {split:>10}: {s.num_chunks:>8,} chunks  "
                        f"{s.num_tokens:>12,} tokens  {s.num_bytes:>13,} bytes")
    console.out(f"[data] chunks in {info.chunks_dir}")
    return 0


def _filter(c, out: str | None, processes: int, engine) -> int:
    from gopher_jax import data
    from gopher_jax.data import artefacts, corpus_filter, mixture

    if out:
        common.writable_dir(out, "--out")
    if data.is_mixture(c):
        if out:
            raise UsageError("--out with a mixture", "drop it: each source is filtered into "
                             "<data_dir>/filtered/<its corpus>")
        for name, m in mixture.filter_sources(c, processes, log=console.out,
                                              engine=engine).items():
            _filter_report(m, f"<data_dir>/filtered/ for source {name}",
                           "training on the mixture reads them", tag=f"filter:{name}")
        return 0
    m = corpus_filter.filter_corpus(c, out, processes, log=console.out, engine=engine)
    _filter_report(m, str(out or artefacts.filter_dir(c)),
                   "train on them: --config.data.filter=True")
    return 0


def _filter_report(m, where: str, next_step: str, tag: str = "filter") -> None:
    """`m`: a data.records.FilterManifest."""
    console.out(f"[{tag}] {m.split}: {m.docs_in:,} documents, {m.bytes_in:,} bytes in")
    for stage, s in m.stages.items():
        console.out(f"[{tag}]   {stage:>12}: -{s['docs_removed']:>7,} documents  "
                    f"-{s['bytes_removed']:>12,} bytes")
    if m.pii:
        kinds = ", ".join(f"{k} {n:,}" for k, n in m.pii["counts"].items())
        console.out(f"[{tag}]   {'pii':>12}: {m.pii['docs_redacted']:,} documents redacted "
                    f"({kinds})")
    console.out(f"[{tag}] {m.docs_out:,} documents, {m.bytes_out:,} bytes kept in "
                f"{where} ({next_step})")


def _tokenizer(c) -> int:
    from gopher_jax.data import pipeline

    out = pipeline.train_and_measure(c)
    tok = out["tokenizer"]
    console.out(f"[tokenizer] trained {tok.vocab_size}-piece BPE on {c.data.dataset}:"
                f"{c.data.train_split} in {out['seconds']:.1f}s -> {tok.path}")
    s = out["held_out"]
    if s is not None:
        console.out(f"[tokenizer] {c.data.eval_split}: {s['bytes']:,} bytes -> {s['tokens']:,} "
                    f"tokens ({s['tokens_per_byte']:.3f} tokens/byte), "
                    f"round trip exact: {s['roundtrip_exact']}")
    return 0
