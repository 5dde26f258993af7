"""The preparation pipeline as steps of datatrove's executors: the same steps on one machine
(LocalPipelineExecutor), a SLURM cluster (SlurmPipelineExecutor) or a Ray cluster
(RayPipelineExecutor), with the same bytes out whatever the executor, the number of tasks or
of workers.

    eng = Engine(executor="local", tasks=8, workers=2)
    info = data.prepare(cfg, log=print, engine=eng)          # = `data prepare`'s result

Stages, each one executor run of `tasks` tasks (a stage starts when the previous one has
finished; datatrove's completion markers make a rerun do only the unfinished tasks):

    read, for a text_files dataset (read_text_files):
      read       each raw file's documents (task r: files r, r + N, ...), split by the hash
                 of their keys (builders.hash_split), serialized as TFDS stores them and
                 sorted by TFDS's shuffle key: runs of at most Engine.run_bytes per file
                 and split
      sort       (a task per hash bucket; buckets = N, or more where the raw files' size
                 asks for it under the task budget) a bucket's examples from every run,
                 in key order: one shard of the split
      info       (1 task) the shards named as TFDS's in bucket order, then features.json
                 and dataset_info.json, last: TFDS's one-process build's records in its
                 order (it writes a split sorted by the same keys; only the shard count
                 differs). A corpus where a split would be empty (assign_splits' donor
                 rule) is built by TFDS in one process instead, as without the engine.
    filter (data.filter):
      rules      quality and repetition per shard (corpus_filter's stage 1, as `data filter`)
                 and the task's hash and band records (dedup_sharded.Emitter)
      partition  exact duplicates and LSH candidates per hash partition (a task each;
                 P = N, or more where the documents' band records ask for it)
      confirm    candidate pairs checked on exact 13-gram Jaccard >= 0.8
      cluster    (1 task) near-duplicate clusters from the confirmed pairs
      docs       each shard's surviving documents and its audit counts
      report     (1 task) audits and manifest.json, as `data filter` writes them
    tokenize, per split:
      tokenize   each shard's documents encoded (shards.tokenize_shard)
      pack       each shard's chunks (pack_shard): chunk k of the split is tokens
                 [k*L, k*L + L + 1) of the split, so a shard's chunks follow from the token
                 counts of the shards before it; written as chunks-<shard>.array_record,
                 exactly the file the one-pass packer (shards.pack_shards) writes
      meta       (1 task) <split>.json, last

Shards are the data's `docs_per_shard` ranges (never the task count); task r of N takes
shards r, r + N, r + 2N...; the hash partitions and sort buckets follow from N and the task
budget (Engine.task_memory_mb; the constants below say what a task holds), and a shard the
budget cannot hold is refused before any work. Every output is a function of the
documents, whatever N, the partitions or the buckets: the chunk files, their order, the
manifest and the fingerprints equal `data prepare`'s byte for byte (tests/test_engine.py).

Why steps of our own on datatrove's executors rather than datatrove's reader, filter,
MinHash and tokenizer steps: the documents are the prepared dataset's, numbered by their
index in the split (what "the first of a duplicate cluster" and the shards are defined on);
the rules, the exact-Jaccard confirmation and the chunk format are gopher_jax's (filters.py,
dedup_sharded.py, tokenized.py say why for each). The executors are datatrove's: tasks,
workers, completion markers, SLURM job arrays, Ray placement and retries.

Each task records its wall time in `<work>/tasks/<stage>-<rank>.json`; with `trace_memory`
also its peak Python/numpy allocation (tracemalloc) and the process's peak resident set; a
rules task also the number of dedup record runs it spilled to local disk.

On Ray, tasks are placed by ray_placement.TaskManager: a node lost while a task is being
placed gets the placement made again, and one that cannot be made stops the stage with an
error, never a hang; a task lost while it runs is resubmitted by datatrove.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import pathlib
import resource
import shutil
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from gopher_jax import storage
from gopher_jax.data import artefacts, builders, dedup_sharded, readers, shards, tokenized
from gopher_jax.data.digests import digest
from gopher_jax.errors import DataError, UsageError

EXECUTORS = ("local", "ray", "slurm")
ENGINE_DIR = "engine"  # inside a filter dir and a chunks dir: the stages' work and logs

# A task's budget (--task_memory) is the memory it may hold beyond the interpreter and the
# libraries it imports: what tracemalloc sees (Python objects and numpy arrays; Step starts
# tracing after the stages' modules are imported). What the executors are asked for adds
# LIBRARY_MB: a worker's peak RSS with every library loaded is 85-130 MB
# (benchmarks/data_engine.py; the driver's ~370 MB is not a task), so 512 MB holds them
# about four times over, with room for the allocator's freed-but-kept pages, which
# tracemalloc does not count.
MIN_TASK_MEMORY_MB = 1
LIBRARY_MB = 512
# Of a budget B, what --tasks cannot shrink (one shard in a rules, docs, tokenize or pack
# task; four cached shards in a confirm task) may take half; the other half is for what
# the plan sizes from B: a rules task's two kinds of dedup records, B/8 each held (at most
# ~2.3x that while one kind is sorted: the concatenation, its int64 order and partition
# arrays, the sorted copy: <= 0.45 B), a read task's run (B/4 of examples, ~1.2x that as
# the bytes objects and keys a run holds).
SHARD_SHARE = 0.5
SPILL_SHARE = 1 / 8
RUN_SHARE = 1 / 4
# Task memory per byte of a shard's documents and per task, from tracemalloc peaks of
# tasks holding one shard each (trace_memory) on tests/test_engine.py's prose corpus
# (1,816-byte documents, 300 words; a 400-piece tokenizer, seq_len 32): docs_per_shard 16,
# 32, 64, 128 and 1,024 (the whole training split, 1.9 MB); the steepest slope between
# neighbouring sizes, rounded up (between 128 and 1,024: rules 7.1, docs 5.4, pack 29),
# and a per-task constant that puts every measured peak under the line (rules: its MinHash
# term below). A tokenize task's token lists are Python ints (~40 bytes a token) for a
# batch of 256 documents: 31 up to 256 documents a shard, ~10 at 1,024, so the 31 here
# overstates large shards.
SHARD_BYTES_PER_BYTE = {"rules": 7.5, "docs": 6.0, "tokenize": 31.0, "pack": 32.0}
SHARD_TASK_BYTES = {"rules": 0, "docs": 1_100_000, "tokenize": 20_000, "pack": 800_000}
# A rules task's MinHash of one document: [block, 100] uint64 hashes and a few temporaries
# per block of dedup.signature's SIGNATURE_BLOCK shingles, so at most 1.23 MB whatever the
# document's length (tracemalloc peak of signature() on a 20,000-shingle set; 9.8 MB at
# the 4,096-shingle block it had before). Counted in full for every rules task.
MINHASH_BYTES = 1_300_000
# A confirm task's cached shard: its stage-1 arrays (13-gram sets, signatures, ids,
# snippets) are 1.95 bytes per byte of its documents (np.load of a shard of the prose
# corpus), its list of sets ~0.1 more.
CONFIRM_BYTES_PER_BYTE = 2.1
# A partition task: 20 band records (58 bytes each) and a hash record per document of its
# partition, the six key arrays and order of their lexsort and the groups: 2.8-2.9 KB per
# document (1,200 documents on 10 and 20 partitions).
PARTITION_BYTES_PER_DOC = 3000
# A sort task: its bucket's examples as bytes objects with their keys, and the shard
# written from them: 1.9x its bytes (buckets of 27-217 KB).
SORT_BYTES_PER_BYTE = 2.0
# A raw file's bytes as examples: plain files ~1x (JSON escapes make them larger than
# their text); gzip, zstd and parquet files hold ~4x their size of text (web text
# compresses 3-5x): an estimate, the one number here not measured on this corpus.
COMPRESSED_TEXT_RATIO = 4
# The cluster task's union-find: 280 bytes per confirmed pair (a dict entry and two ints
# for each of two documents; cluster() on 20,000 and 80,000 random pairs).
CLUSTER_BYTES_PER_EDGE = 300


@dataclasses.dataclass(frozen=True)
class Engine:
    """Where and how wide the pipeline runs. `workers`: tasks at once (local: processes; 1
    runs them one after another in this process; Ray: concurrent tasks, -1 all). SLURM
    settings go to SlurmPipelineExecutor as they are (partition, time, ...; an explicit
    mem_per_cpu_gb wins). `task_memory_mb`: each task's budget (see LIBRARY_MB): the dedup
    records' spill threshold, the read runs, the hash partitions and sort buckets follow
    from it, and a shard it cannot hold is refused before any work (check_shard)."""

    executor: str = "local"
    tasks: int = 1
    workers: int = 1
    slurm: tuple[tuple[str, Any], ...] = ()
    trace_memory: bool = False
    task_memory_mb: int = 1024

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise UsageError(f"--executor {self.executor}", f"use one of {', '.join(EXECUTORS)}")
        if self.tasks < 1:
            raise UsageError(f"--tasks {self.tasks}", "give 1 or more")
        if self.workers < 1 and self.workers != -1:
            raise UsageError(f"--workers {self.workers}", "give 1 or more (or -1: all tasks)")
        if self.task_memory_mb < MIN_TASK_MEMORY_MB:
            raise UsageError(f"--task_memory {self.task_memory_mb}",
                             f"give at least {MIN_TASK_MEMORY_MB} (MB per task)")

    @property
    def task_bytes(self) -> int:
        return self.task_memory_mb << 20

    @property
    def request_mb(self) -> int:
        """What each task asks the executor for: its budget and the libraries."""
        return self.task_memory_mb + LIBRARY_MB

    @property
    def spill_bytes(self) -> int:
        """Dedup records of each kind a rules task keeps in memory."""
        return int(self.task_bytes * SPILL_SHARE)

    @property
    def run_bytes(self) -> int:
        """Examples a read task holds before it writes them as a run."""
        return int(self.task_bytes * RUN_SHARE)

    def partitions(self, docs: int) -> int:
        """Hash partitions of the dedup for `docs` documents (training and evaluation):
        --tasks, or more where a partition task's band records would not fit."""
        return max(self.tasks, math.ceil(docs * PARTITION_BYTES_PER_DOC /
                                         (self.task_bytes * SHARD_SHARE)))

    def buckets(self, example_bytes: int) -> int:
        """Sort buckets (hash ranges) of the read stage for about `example_bytes` of
        examples: --tasks, or more where a sort task's bucket would not fit."""
        return max(self.tasks, math.ceil(example_bytes * SORT_BYTES_PER_BYTE /
                                         (self.task_bytes * SHARD_SHARE)))

    def check_shard(self, stages: tuple[str, ...], docs_per_shard: int,
                    mean_doc_bytes: float) -> None:
        """Refuses (UsageError) a shard of `docs_per_shard` documents of `mean_doc_bytes`
        that a task of `stages` (rules, docs, confirm, tokenize, pack) could not hold in
        its half of the budget: no --tasks shrinks a shard."""
        share = self.task_bytes * SHARD_SHARE
        needs = {stage: _shard_need(stage, docs_per_shard, mean_doc_bytes) for stage in stages}
        over = [stage for stage, need in needs.items() if need > share]
        if not over:
            return
        fits = []
        for stage in stages:
            fixed = _shard_need(stage, 0, mean_doc_bytes)
            per_doc = (needs[stage] - fixed) / max(docs_per_shard, 1)
            fits.append(int((share - fixed) / per_doc) if share > fixed and per_doc else 0)
        stage, top = over[0], max(needs.values())
        raise_to = f"raise --task_memory to {math.ceil(top / SHARD_SHARE / 2**20):,}"
        raise UsageError(
            f"--task_memory {self.task_memory_mb}: a {stage} task holding one shard of "
            f"{docs_per_shard:,} documents (~{mean_doc_bytes:,.0f} bytes each) needs "
            f"~{needs[stage] / 2**20:,.1f} MB, over the {share / 2**20:,.1f} MB (half the "
            "budget) a shard may take",
            f"lower data.docs_per_shard to {min(fits):,}, or {raise_to}" if min(fits)
            else raise_to)

    def read_text_files(self, *args: Any) -> None:
        """`read_text_files` below on this engine (how builders._build hands it over)."""
        read_text_files(self, *args)

    def filter_corpus(self, *args: Any) -> Any:
        """`filter_corpus` below on this engine: how corpus_filter.filter_corpus hands its
        stages over (a corpus_filter.FilterEngine), importing nothing of this module."""
        return filter_corpus(self, *args)

    def check(self) -> None:
        """Refuses an executor this machine cannot reach, before any work."""
        import importlib.util
        import shutil

        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise UsageError("--executor ray: ray is not installed", "pip install ray==2.60.0")
        if self.executor == "ray":
            import ray

            if not ray.is_initialized():
                address = os.environ.get("RAY_ADDRESS", "auto")
                try:
                    ray.init(address=address, log_to_driver=False)
                except ConnectionError as e:
                    raise UsageError(f"--executor ray: no Ray cluster at {address}",
                                     "start one (`ray start --head`) or set RAY_ADDRESS"
                                     ) from e
        if self.executor == "slurm" and not dict(self.slurm).get("partition"):
            raise UsageError("--executor slurm without --slurm_partition",
                             "name the partition the tasks run in (`sinfo` lists them)")
        if self.executor == "slurm" and shutil.which("sbatch") is None:
            raise UsageError("--executor slurm: no sbatch on PATH",
                             "run on a SLURM login node, or use --executor local|ray")


def _shard_need(stage: str, docs: int, mean_doc_bytes: float) -> float:
    """Bytes a task of `stage` needs for one shard of `docs` documents (the constants
    above)."""
    text = docs * mean_doc_bytes
    if stage == "confirm":
        return dedup_sharded.CACHE_SHARDS * CONFIRM_BYTES_PER_BYTE * text
    need = SHARD_BYTES_PER_BYTE[stage] * text + SHARD_TASK_BYTES[stage]
    if stage == "rules":
        need += MINHASH_BYTES
    return need


# A test hook, not a setting: GOPHER_JAX_ENGINE_TASK_HOLD=<stage>:<dir> makes each task of
# <stage>, before it starts its work, write <dir>/<stage>-<rank>-<pid>.started and wait
# (HOLD_LIMIT_S at most) until <dir>/release exists: a test can then kill the node or the
# process running a task while it runs one (tests/test_engine.py). The driver reads it when
# a stage starts; its Steps carry it to the workers, whatever their environment.
TASK_HOLD_ENV = "GOPHER_JAX_ENGINE_TASK_HOLD"
HOLD_LIMIT_S = 600


def _hold_dir(stage: str) -> str:
    held, sep, folder = os.environ.get(TASK_HOLD_ENV, "").partition(":")
    return folder if sep and held == stage else ""


def _hold(folder: str, stage: str, rank: int) -> None:
    d = pathlib.Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{stage}-{rank:05d}-{os.getpid()}.started").write_text(str(os.getpid()))
    deadline = time.monotonic() + HOLD_LIMIT_S
    while not (d / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{TASK_HOLD_ENV}: no {d / 'release'} in {HOLD_LIMIT_S} s")
        time.sleep(0.05)


# Modules the stages import when they first run (not at this module's import): Step imports
# them before it starts tracing, so a worker's first task does not count them.
_TASK_MODULES = ("gopher_jax.data.corpus_filter", "gopher_jax.data.tokenizer")


class Step:
    """One stage as a datatrove pipeline step: fn(rank, world_size, *args) for the task's
    rank. A plain picklable callable (datatrove accepts any callable with (data, rank,
    world_size)); there are no documents flowing between our stages, only files. Each task
    records its wall time (and with `trace`, its peak memory), and the counts `fn` returns
    (a dict, or None), in <report_dir>."""

    def __init__(self, stage: str, fn: Callable, args: tuple, report_dir: str, trace: bool,
                 hold: str = ""):
        self.stage, self.fn, self.args = stage, fn, args
        self.report_dir, self.trace, self.hold = report_dir, trace, hold
        self.name = f"gopher_jax {stage}"

    def __repr__(self) -> str:
        return self.name

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        del data
        storage.configure()  # a gs:// data dir from a fresh worker process
        for module in _TASK_MODULES:  # libraries: outside the budget, so before tracing
            importlib.import_module(module)
        if self.hold:  # TASK_HOLD_ENV, tests only
            _hold(self.hold, self.stage, rank)
        t0 = time.perf_counter()
        if self.trace:
            tracemalloc.start()
        try:
            counts = self.fn(rank, world_size, *self.args)
            record = {"stage": self.stage, "rank": rank,
                      "seconds": time.perf_counter() - t0, **(counts or {})}
            if self.trace:
                record["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
                record["max_rss"] = _peak_rss()
        finally:
            if self.trace:
                tracemalloc.stop()
        _write_json(storage.data_path(self.report_dir) / f"{self.stage}-{rank:05d}.json",
                    record)
        return None


def _peak_rss() -> int:
    """This process's peak resident set in bytes: VmHWM, which starts afresh in a spawned
    worker (getrusage's ru_maxrss keeps the peak of the parent it was forked from)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_stage(eng: Engine, work: pathlib.Path, stage: str, fn: Callable, args: tuple,
              tasks: int | None = None) -> None:
    """Runs `fn` as `tasks` (default eng.tasks) datatrove tasks; logs and completion markers
    in <work>/logs/<stage>."""
    n = eng.tasks if tasks is None else tasks
    pipeline = [Step(stage, fn, args, str(work / "tasks"), eng.trace_memory,
                     _hold_dir(stage))]
    logs = str(work / "logs" / stage)
    if eng.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        workers = n if eng.workers == -1 else min(eng.workers, n)
        LocalPipelineExecutor(pipeline, tasks=n, workers=workers, logging_dir=logs,
                              start_method="spawn").run()
    elif eng.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        from gopher_jax.data import ray_placement

        eng.check()  # connects to the cluster once
        with ray_placement.task_manager():  # a lost node cannot hang a placement
            RayPipelineExecutor(pipeline, tasks=n, workers=eng.workers, logging_dir=logs,
                                cpus_per_task=1, mem_per_cpu_gb=eng.request_mb / 1024).run()
    else:
        from datatrove.executor import SlurmPipelineExecutor

        kwargs = dict(eng.slurm)
        kwargs.setdefault("time", "24:00:00")
        kwargs.setdefault("mem_per_cpu_gb", math.ceil(eng.request_mb / 1024))  # --mem-per-cpu=NG
        slurm = SlurmPipelineExecutor(pipeline, tasks=n, workers=eng.workers, logging_dir=logs,
                                      job_name=f"gopher_{stage}", **kwargs)
        slurm.run()  # submits a job array and returns: wait for it to leave the queue
        _wait_for_slurm(getattr(slurm, "job_id", None))
    _check_complete(logs, n, stage)


def _wait_for_slurm(job_id: str | None, poll_s: float = 30) -> None:
    import subprocess

    while job_id and subprocess.run(["squeue", "-h", "-j", str(job_id)], capture_output=True,
                                    text=True).stdout.strip():
        time.sleep(poll_s)


def _check_complete(logs: str, tasks: int, stage: str) -> None:
    done = storage.data_path(logs) / "completions"
    missing = [r for r in range(tasks) if not (done / f"{r:05d}").exists()]
    if missing:
        raise DataError(f"engine stage {stage}: task(s) {missing[:8]} did not complete "
                        f"(their logs are in {logs}/logs)",
                        "run the same command again: it redoes only those tasks")


def _write_json(path: pathlib.Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    storage.write_atomic(path, json.dumps(obj))


def _config(cfg_dict: dict) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(cfg_dict)


def _mine(items: list, rank: int, world: int) -> list:
    return [x for j, x in enumerate(items) if j % world == rank]


# ---------------------------------------------------------------------------------------
# Reading the raw files into the TFDS dataset (text_files)


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """What every read, sort and info task needs, picklable: the raw files in
    list_text_files' order, their document names, the dataset's fingerprint, the work
    folder, the number of hash buckets (the sort tasks' shards) and a run's bytes."""

    cfg: dict
    fp: str
    files: tuple
    names: tuple
    work: str
    buckets: int
    run_bytes: int

    def builder(self) -> builders.TextFiles:
        d = _config(self.cfg).data
        return builders._text_files_builder(d, self.fp, os.path.expanduser(d.data_dir))

    def _dir(self, name: str) -> pathlib.Path:
        return storage.data_path(self.work) / name

    def run(self, i: int, split: str, j: int) -> pathlib.Path:
        return self._dir("runs") / f"{i:06d}-{split}-{j:04d}.array_record"

    def run_summary(self, i: int) -> pathlib.Path:
        return self._dir("runs") / f"{i:06d}.json"

    def runs(self) -> list[dict]:
        return [json.loads(self.run_summary(i).read_text()) for i in range(len(self.files))]

    def shard(self, split: str, b: int) -> pathlib.Path:
        return self._dir("shards") / f"{split}-{b:05d}.array_record"

    def shard_summary(self, split: str, b: int) -> pathlib.Path:
        return self._dir("shards") / f"{split}-{b:05d}.json"


def _write_records(path: pathlib.Path, records: list[bytes]) -> None:
    """ArrayRecord with the options of TFDS's ArrayRecord writer, published whole."""
    from array_record.python.array_record_module import ArrayRecordWriter

    with storage.local_file(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), tokenized.WRITER_OPTIONS)
        for r in records:
            writer.write(r)
        writer.close()


def _bucket(hkey: int, buckets: int) -> int:
    """As TFDS's shuffle.get_bucket_number: hash ranges, so buckets keep the global order."""
    return hkey * buckets >> 128


def _read_task(rank: int, world: int, plan: ReadPlan) -> None:
    from tensorflow_datasets.core import hashing

    features = plan.builder().info.features
    hashers = {s: hashing.Hasher(salt=s) for s in builders.SPLITS}
    text_field = _config(plan.cfg).data.text_field
    for i in _mine(list(range(len(plan.files))), rank, world):
        if not plan.run_summary(i).is_file():  # done before this task was killed
            _read_file(plan, i, features, hashers, text_field)


def _read_file(plan: ReadPlan, i: int, features, hashers: dict, text_field: str) -> None:
    """File i's documents as runs per split (a run each time plan.run_bytes of examples
    have come): each example serialized as TFDS's writer stores it (features.serialize_example)
    behind its 16-byte TFDS shuffle key (the md5 of its key salted with the split: the order
    TFDS's one-process build writes), a run sorted by that key; the summary (counts, bytes,
    where each hash bucket starts in each run) marks the file read."""
    plan.run(i, "x", 0).parent.mkdir(parents=True, exist_ok=True)
    summary = {s: {"count": 0, "bytes": 0, "runs": []} for s in builders.SPLITS}
    pending: dict[str, list[bytes]] = {s: [] for s in builders.SPLITS}

    def flush() -> None:
        for split, run in pending.items():
            if not run:
                continue
            run.sort()
            owners = np.array([_bucket(int.from_bytes(r[:16], "big"), plan.buckets)
                               for r in run], np.int64)
            row = summary[split]
            _write_records(plan.run(i, split, len(row["runs"])), run)
            row["runs"].append(np.searchsorted(owners, np.arange(plan.buckets + 1)).tolist())
            run.clear()

    held = 0
    for key, text in readers.file_documents(plan.files[i], plan.names[i], text_field):
        split = builders.hash_split(key)
        record = features.serialize_example({"text": text})
        pending[split].append(hashers[split].hash_key(key).to_bytes(16, "big") + record)
        summary[split]["count"] += 1
        summary[split]["bytes"] += len(record)
        held += len(record)
        if held >= plan.run_bytes:
            flush()
            held = 0
    flush()
    _write_json(plan.run_summary(i), summary)


def _sort_task(rank: int, world: int, plan: ReadPlan) -> None:
    """Hash bucket b of each split (b = rank, rank + world, ...): its examples from every
    file's run, in TFDS's shuffle order, as one shard of the split."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    runs = plan.runs()
    for b in _mine(list(range(plan.buckets)), rank, world):
        for split in builders.SPLITS:
            if plan.shard_summary(split, b).is_file():
                continue
            items: list[bytes] = []
            for i, r in enumerate(runs):
                for j, bounds in enumerate(r[split]["runs"]):
                    lo, hi = bounds[b], bounds[b + 1]
                    if hi > lo:
                        items += ArrayRecordDataSource(
                            [str(plan.run(i, split, j))]).__getitems__(range(lo, hi))
            items.sort()  # by shuffle key, then bytes: as TFDS's shuffler iterates
            records = [x[16:] for x in items]
            if records:
                plan.shard(split, b).parent.mkdir(parents=True, exist_ok=True)
                _write_records(plan.shard(split, b), records)
            _write_json(plan.shard_summary(split, b),
                        {"count": len(records), "bytes": sum(map(len, records))})


def _publish(src: pathlib.Path, dst: pathlib.Path) -> None:
    """A shard into the dataset's folder: a rename on a file system, a copy in a bucket (the
    work folder is removed once the dataset is complete); a rerun after a kill finds it
    done."""
    if storage.is_remote(str(dst)):
        import fsspec

        if src.exists():
            fsspec.filesystem("gs").copy(str(src), str(dst))
        return
    if src.exists():
        os.replace(src, dst)
    elif not dst.exists():
        raise DataError(f"engine stage info: {src} is gone and {dst} was never written",
                        f"remove {src.parent.parent} and run the same command again")


def _info_task(rank: int, world: int, plan: ReadPlan) -> None:
    """Each split's non-empty bucket shards named as its TFDS shards in bucket order, then
    the dataset's metadata as TFDS writes it (features.json, dataset_info.json last: what
    marks it prepared)."""
    del rank, world
    builder = plan.builder()
    if builder.is_prepared():
        return
    data = storage.data_path(str(builder.data_path))
    data.mkdir(parents=True, exist_ok=True)
    infos = []
    for split in builders.SPLITS:
        rows = [(b, json.loads(plan.shard_summary(split, b).read_text()))
                for b in range(plan.buckets)]
        mine = [(b, r) for b, r in rows if r["count"]]
        template = builder._get_filename_template(split)
        for (b, _), dst in zip(mine, template.sharded_filepaths(len(mine)), strict=True):
            _publish(plan.shard(split, b), data / dst.name)
        infos.append(tfds.core.SplitInfo(
            name=split, shard_lengths=[r["count"] for _, r in mine],
            num_bytes=sum(r["bytes"] for _, r in mine), filename_template=template))
    builder.info.set_splits(tfds.core.SplitDict(infos))
    remote = storage.is_remote(str(data))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=".info", dir=None if remote else plan.work))
    try:
        builder.info.write_to_directory(tmp)
        last = ("features.json", "dataset_info.json")
        if remote:
            storage.upload_tree(tmp, str(data), last=last)
        else:
            marks = [tmp / n for n in last if (tmp / n).is_file()]
            for p in [p for p in tmp.iterdir() if p not in marks] + marks:
                os.replace(p, data / p.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_text_files(eng: Engine, cfg: ml_collections.ConfigDict, builder: builders.TextFiles,
                    log: Callable[[str], None] | None = None) -> None:
    """Prepares the text_files dataset `builder` as engine stages (read, sort, info): the
    dataset TFDS's one-process build writes, its documents in the same order, its splits of
    the same sizes; a corpus where a split would be empty is built by TFDS in this process,
    as without the engine (builders.assign_splits gives each split a document)."""
    log = log or (lambda msg: None)
    d = cfg.data
    files = readers.list_text_files(d.text_files)
    buckets = eng.buckets(sum(map(_example_bytes, files)))
    name = f"{builder.name}-{builder.builder_config.name}-n{eng.tasks}" + (
        f"-b{buckets}" if buckets != eng.tasks else "")
    work = storage.data_path(d.data_dir) / ENGINE_DIR / name
    plan = ReadPlan(cfg.to_dict(), builder.builder_config.name[1:], tuple(files),
                    tuple(readers.doc_names(files)), str(work), buckets, eng.run_bytes)
    log(f"[engine] read: {len(files)} file(s), {eng.tasks} task(s) on the {eng.executor} "
        f"executor, {buckets} sort bucket(s); work in {work}")
    t0 = time.time()
    run_stage(eng, work, "read", _read_task, (plan,))
    log(f"[engine] read done ({time.time() - t0:.1f}s)")
    runs = plan.runs()
    if all(sum(r[s]["count"] for r in runs) for s in builders.SPLITS):
        for stage, fn, tasks in (("sort", _sort_task, buckets), ("info", _info_task, 1)):
            run_stage(eng, work, stage, fn, (plan,), tasks)
            log(f"[engine] {stage} done ({time.time() - t0:.1f}s)")
    else:
        log("[engine] a split would be empty (a tiny corpus): TFDS's one-process build")
        builders.build_one_process(cfg, builder)
    for folder in ("runs", "shards"):
        _remove_tree(work / folder)


def _example_bytes(path: str) -> float:
    """About the bytes of examples raw file `path` holds: its size, times
    COMPRESSED_TEXT_RATIO for a compressed or parquet file."""
    size = readers._size_and_crc32c(path)[0]  # memoised: the corpus fingerprint's
    compressed = path.endswith((".gz", ".zst", ".parquet"))
    return size * COMPRESSED_TEXT_RATIO if compressed else size


def _remove_tree(p: pathlib.Path) -> None:
    if storage.is_remote(str(p)):
        import fsspec

        with contextlib.suppress(FileNotFoundError):
            fsspec.filesystem("gs").rm(str(p), recursive=True)
    else:
        shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------
# Filtering


@dataclasses.dataclass(frozen=True)
class FilterPlan:
    """What every filter task needs to know, picklable."""

    cfg: dict
    fcfg: Any
    train_split: str
    jobs: tuple  # (split, shard, start, stop, eval offset or -1 for the training split)
    out: str
    fp: str
    docs_per_shard: int
    tasks: int  # the rules, confirm and docs tasks; the owners of shards and results
    partitions: int  # the dedup's hash partitions: the partition stage's tasks
    spill_bytes: int  # dedup records of each kind a rules task keeps in memory

    @property
    def work(self) -> pathlib.Path:
        return storage.data_path(self.out) / artefacts.FILTER_WORK

    def stage1(self, split: str, k: int, suffix: str) -> pathlib.Path:
        return self.work / f"{split}-{k:05d}-{self.fp}{suffix}"

    def dedup_dir(self) -> pathlib.Path:
        """The stages' work: one folder per (tasks, partitions), which lay out its files."""
        name = f"{self.fp}-n{self.tasks}" + (
            f"-p{self.partitions}" if self.partitions != self.tasks else "")
        return storage.data_path(self.out) / ENGINE_DIR / name

    def owner(self) -> Callable[[np.ndarray], np.ndarray]:
        return functools.partial(_owner, self.docs_per_shard, self.tasks)

    def train_jobs(self) -> list:
        return [j for j in self.jobs if j[4] < 0]

    def eval_jobs(self) -> list:
        return [j for j in self.jobs if j[4] >= 0]


def _owner(docs_per_shard: int, owners: int, ids: np.ndarray) -> np.ndarray:
    return (ids // docs_per_shard) % owners


def _rules_task(rank: int, world: int, plan: FilterPlan) -> dict:
    from gopher_jax.data import corpus_filter

    cfg = _config(plan.cfg)
    with dedup_sharded.Emitter(plan.dedup_dir(), rank, plan.partitions,
                               plan.spill_bytes) as emitter:
        for split, k, a, b, offset in _mine(list(plan.jobs), rank, world):
            corpus_filter._stage1_shard(cfg, plan.fcfg, split, k, a, b, str(plan.work),
                                        plan.fp, offset < 0)
            arr = shards.load_arrays(plan.stage1(split, k, ".npz"))
            if offset < 0:
                docs, hashes = arr["ids"], arr["hashes"]
            else:
                docs, hashes = -(offset + arr["ids"] + 1), None
            emitter.add(docs, hashes, arr["sigs"])
    return {"spilled_runs": emitter.spilled_runs}


def _partition_task(rank: int, world: int, plan: FilterPlan) -> None:
    del world
    dedup_sharded.partition(plan.dedup_dir(), rank, plan.owner(), plan.tasks)


def _shard_sets(plan: FilterPlan) -> dedup_sharded.ShardSets:
    """13-gram sets by document code (training id, or -(eval index + 1)); training shards
    are keys k >= 0, evaluation shards -(1 + their index in plan.eval_jobs())."""
    evals = plan.eval_jobs()
    starts = np.array([off + a for _, _, a, _, off in evals], np.int64)

    def shard_of(doc: int) -> int:
        if doc >= 0:
            return doc // plan.docs_per_shard
        return -(1 + int(np.searchsorted(starts, -doc - 1, side="right") - 1))

    def load(key: int) -> tuple[np.ndarray, list[np.ndarray]]:
        if key >= 0:
            split, k, offset = plan.train_split, key, None
        else:
            split, k, _, _, offset = evals[-key - 1]
        arr = shards.load_arrays(plan.stage1(split, k, ".npz"))
        sets = (np.split(arr["set_values"], np.cumsum(arr["set_lengths"])[:-1])
                if len(arr["ids"]) else [])
        if offset is None:
            return arr["ids"], sets
        return (-(offset + arr["ids"] + 1))[::-1], sets[::-1]

    return dedup_sharded.ShardSets(load, shard_of)


def _confirm_task(rank: int, world: int, plan: FilterPlan) -> None:
    del world
    dedup_sharded.confirm(plan.dedup_dir(), rank, _shard_sets(plan))


def _cluster_task(rank: int, world: int, plan: FilterPlan) -> None:
    del rank, world
    dedup_sharded.cluster(plan.dedup_dir(), plan.owner(), plan.tasks)


def _eval_id(plan: FilterPlan, e: int) -> str:
    from gopher_jax.data import corpus_filter

    for split, _, a, b, off in plan.eval_jobs():
        if off + a <= e < off + b:
            return corpus_filter._doc_id(split, e - off)
    raise ValueError(f"evaluation index {e} outside every shard")


def _docs_task(rank: int, world: int, plan: FilterPlan) -> None:
    from gopher_jax.data import corpus_filter

    folder = plan.dedup_dir()
    removed = dedup_sharded.removals(folder, rank)
    gone_all = {i for v in removed.values() for i in v}
    docs_dir = storage.data_path(plan.out) / artefacts.FILTER_DOCS
    for split, k, _, _, _ in _mine(plan.train_jobs(), rank, world):
        summary = json.loads(plan.stage1(split, k, ".json").read_text())
        arr = shards.load_arrays(plan.stage1(split, k, ".npz"))
        row = {int(i): j for j, i in enumerate(arr["ids"])}
        later = {}
        for stage, gone in removed.items():
            mine = {i: (_eval_id(plan, j) if stage == "test_set"
                        else corpus_filter._doc_id(split, j))
                    for i, j in gone.items() if i in row}
            later[stage] = corpus_filter.removal_rules(
                stage, split, mine, lambda i, a=arr, r=row: int(a["nbytes"][r[i]]),
                lambda i, a=arr, r=row: str(a["snippets"][r[i]]))
        kept = [(i, t) for i, t in shards.read_docs(plan.stage1(split, k, ".jsonl"))
                if i not in gone_all]
        shard, pii = corpus_filter.write_shard_docs(docs_dir, summary, kept,
                                                    corpus_filter.pii_on(_config(plan.cfg)))
        _write_json(folder / "docs" / f"{k:05d}.json",
                    {"rules": later, "shard": dataclasses.asdict(shard), "pii": pii})


def _report_task(rank: int, world: int, plan: FilterPlan, conf: dict, t0: float) -> None:
    from gopher_jax.data import corpus_filter
    from gopher_jax.data.records import FilterShard

    del rank, world
    folder = plan.dedup_dir()
    train = plan.train_jobs()
    summaries = [json.loads(plan.stage1(s, k, ".json").read_text()) for s, k, *_ in train]
    parts = [json.loads((folder / "docs" / f"{k:05d}.json").read_text()) for _, k, *_ in train]
    later = {stage: corpus_filter._merge_rules(parts, stage)
             for stage in ("exact_dedup", "near_dedup", "test_set")}
    corpus_filter.write_reports(storage.data_path(plan.out), plan.fp, conf, plan.train_split,
                                summaries, later, [FilterShard(**p["shard"]) for p in parts],
                                [p["pii"] for p in parts if p["pii"] is not None],
                                lambda msg: None, t0)


def filter_corpus(eng: Engine, cfg: ml_collections.ConfigDict, fcfg, out: pathlib.Path,
                  fp: str, conf: dict, plans: dict[str, list[tuple[int, int]]],
                  log: Callable[[str], None]):
    """corpus_filter.filter_corpus's stages 1-5 and its outputs, as engine stages (called by
    it once the settings, fingerprint and shard plans are known)."""
    from gopher_jax.data import corpus_filter

    t0 = time.time()
    d = cfg.data
    builder = builders.get_builder(cfg)
    check_filter(eng, cfg, builder)
    jobs, offset = [], 0
    for split, plan in plans.items():
        for k, (a, b) in enumerate(plan):
            jobs.append((split, k, a, b, -1 if split == d.train_split else offset))
        if split != d.train_split:
            offset += plan[-1][1] if plan else 0
    docs = sum(plan[-1][1] for plan in plans.values() if plan)
    fplan = FilterPlan(cfg.to_dict(), fcfg, d.train_split, tuple(jobs), str(out), fp,
                       d.docs_per_shard, eng.tasks, eng.partitions(docs), eng.spill_bytes)
    work = fplan.dedup_dir()
    log(f"[engine] filter: {len(jobs)} shards, {eng.tasks} task(s) on the {eng.executor} "
        f"executor, {fplan.partitions} hash partition(s); work in {work}")
    n = eng.tasks
    for stage, fn, args, tasks in (
            ("rules", _rules_task, (fplan,), n),
            ("partition", _partition_task, (fplan,), fplan.partitions),
            ("confirm", _confirm_task, (fplan,), n), ("cluster", _cluster_task, (fplan,), 1),
            ("docs", _docs_task, (fplan,), n), ("report", _report_task, (fplan, conf, t0), 1)):
        if stage == "cluster":
            _warn_cluster(eng, work, log)
        run_stage(eng, work, stage, fn, args, tasks)
        log(f"[engine] {stage} done ({time.time() - t0:.1f}s)")
    return corpus_filter.read_manifest(out)


def _mean_doc_bytes(builder, splits) -> float:
    """The largest mean example size (TFDS's split info: bytes / examples) of `splits`."""
    infos = [builder.info.splits[s] for s in splits if s in builder.info.splits]
    return max([i.num_bytes / i.num_examples for i in infos if i.num_examples] or [0.0])


def _shard_docs(cfg: ml_collections.ConfigDict, builder) -> int:
    """Documents in the largest shard: docs_per_shard, or the largest split if smaller."""
    return min(cfg.data.docs_per_shard,
               max([s.num_examples for s in builder.info.splits.values()] or [0]))


FILTER_SHARD_STAGES = ("rules", "docs", "confirm")  # the filter's tasks that hold a shard
TOKENIZE_SHARD_STAGES = ("tokenize", "pack")


def check_filter(eng: Engine, cfg: ml_collections.ConfigDict, builder) -> None:
    """Refuses a filtering whose shard a rules, docs or confirm task could not hold
    (Engine.check_shard), from the prepared dataset's split sizes."""
    eng.check_shard(FILTER_SHARD_STAGES, _shard_docs(cfg, builder),
                    _mean_doc_bytes(builder, builder.info.splits))


def check_plan(eng: Engine, cfg: ml_collections.ConfigDict, filtering: bool,
               tokenizing: bool) -> None:
    """Refuses a --task_memory that one shard of the dataset, if it is prepared, would
    exceed in a filter (with `filtering`) or a tokenize task (with `tokenizing`); a
    mixture's sources each (those marked filter filtered). The CLI calls it before any work;
    pipeline.prepare again once the engine has read a raw corpus, before the filter's and
    the tokenizer's stages."""
    from gopher_jax.data import sources

    if sources.is_mixture(cfg):
        for src in sources.sources(cfg):
            check_plan(eng, sources.corpus_config(cfg, src), src.filter, tokenizing)
        return
    builder = builders.get_builder(cfg)
    if not builder.is_prepared():
        return
    stages = FILTER_SHARD_STAGES * filtering + TOKENIZE_SHARD_STAGES * tokenizing
    if stages:
        eng.check_shard(stages, _shard_docs(cfg, builder),
                        _mean_doc_bytes(builder, builder.info.splits))


def _warn_cluster(eng: Engine, work: pathlib.Path, log: Callable[[str], None]) -> None:
    """The cluster stage is one task holding every confirmed pair: a line when their
    count says it needs more than the budget (no --tasks or partition count shrinks it)."""
    edges = storage.tree_bytes(work / "edges") // dedup_sharded.PAIR_REC.itemsize
    need = edges * CLUSTER_BYTES_PER_EDGE
    if need > eng.task_bytes:
        log(f"[engine] cluster: {edges:,} confirmed near-duplicate pairs need ~"
            f"{need / 2**20:,.0f} MB in its one task, over --task_memory "
            f"{eng.task_memory_mb}: it runs anyway, on a machine that must have that memory")


# ---------------------------------------------------------------------------------------
# Tokenization and chunks


@dataclasses.dataclass(frozen=True)
class SplitPlan:
    cfg: dict
    split: str
    tokenizer_path: str
    folder: str
    sources: tuple
    fps: tuple

    def token_file(self, k: int) -> pathlib.Path:
        return artefacts.token_shard(storage.data_path(self.folder), k, self.fps[k])

    def packed(self, work: pathlib.Path, k: int) -> pathlib.Path:
        return work / "packed" / f"{k:05d}.json"


def _tokenize_task(rank: int, world: int, plan: SplitPlan) -> None:
    cfg = _config(plan.cfg)
    for k in _mine(list(range(len(plan.sources))), rank, world):
        shards.tokenize_shard(cfg, plan.tokenizer_path, plan.split, k, plan.sources[k],
                              plan.folder, plan.fps[k])


def _emitted(tokens: int, seq_len: int) -> int:
    """Chunks a packer has emitted after `tokens` tokens (neighbours share one token)."""
    return max(0, (tokens - 1) // seq_len)


def pack_shard(token_files: list[pathlib.Path], k: int, counts: np.ndarray, seq_len: int,
               eos_id: int, pad_id: int, piece_bytes: np.ndarray) -> np.ndarray:
    """The records the one-pass packer (shards.pack_shards) emits after adding token shard k:
    chunks c of [emitted(T_<k), emitted(T_<=k)) (and the padded last chunk after the last
    shard), read from the token shards that hold tokens [c*L, ...). `counts` are the
    shards' token counts."""
    ends = np.cumsum(counts)
    before = int(ends[k - 1]) if k else 0
    start = _emitted(before, seq_len) * seq_len
    first = int(np.searchsorted(ends, start, side="right"))
    packer = tokenized.ChunkPacker(seq_len, eos_id, pad_id, piece_bytes)
    records = []
    for j in range(first, k + 1):
        a = shards.load_arrays(token_files[j])
        flat, lens = a["tokens"], a["lengths"]
        skip = start - (int(ends[j - 1]) if j else 0)
        if skip > 0:  # begin mid-shard, maybe mid-document (segments are relative)
            doc_ends = np.cumsum(lens)
            d0 = int(np.searchsorted(doc_ends, skip, side="right"))
            lens = np.concatenate([[doc_ends[d0] - skip], lens[d0 + 1:]]) \
                if d0 < len(lens) else lens[:0]
            flat = flat[skip:]
        records.append(packer.add_flat(flat, lens))
    if k == len(token_files) - 1:
        records.append(packer.finish())
    return np.concatenate(records) if records else np.zeros((0, 2 * seq_len + 3), np.int32)


def _pack_task(rank: int, world: int, plan: SplitPlan, work: str, eos: int, pad: int) -> None:
    from gopher_jax.data.tokenizer import Tokenizer

    piece_bytes = Tokenizer.load(plan.tokenizer_path).piece_bytes
    files = [plan.token_file(k) for k in range(len(plan.sources))]
    counts = np.array([int(shards.load_arrays(f)["lengths"].sum()) for f in files], np.int64)
    seq_len = _config(plan.cfg).data.seq_len
    for k in _mine(list(range(len(files))), rank, world):
        records = pack_shard(files, k, counts, seq_len, eos, pad, piece_bytes)
        a = shards.load_arrays(files[k])
        row = {"num_docs": len(a["lengths"]), "num_tokens": int(counts[k]),
               "num_text_bytes": int(a["text_bytes"][0]),
               "num_bytes": int(records[:, -1].sum()) if len(records) else 0, "file": None}
        if len(records):
            name = artefacts.chunk_file(k)
            row["file"] = {"path": name, "num_chunks": len(records), "sha256":
                           tokenized.write_records(storage.data_path(plan.folder) / name,
                                                   records)}
        _write_json(plan.packed(storage.data_path(work), k), row)


def _meta_task(rank: int, world: int, plan: SplitPlan, work: str, fingerprint: dict,
               t0: float) -> None:
    del rank, world
    rows = [json.loads(plan.packed(storage.data_path(work), k).read_text())
            for k in range(len(plan.sources))]
    files = [r["file"] for r in rows if r["file"]]
    packed = {"files": files, "num_chunks": sum(f["num_chunks"] for f in files),
              **{key: sum(r[key] for r in rows)
                 for key in ("num_docs", "num_tokens", "num_bytes", "num_text_bytes")}}
    token_files = [plan.token_file(k) for k in range(len(plan.sources))]
    shards.write_split_meta(storage.data_path(plan.folder), fingerprint,
                            _config(plan.cfg).data.seq_len, packed, list(plan.fps),
                            token_files, t0)


def prepare_split(eng: Engine, cfg: ml_collections.ConfigDict, split: str, num_docs: int,
                  tokenizer, tokenizer_path: str | os.PathLike, fingerprint: dict,
                  chunks_dir: pathlib.Path, filtered=None,
                  log: Callable[[str], None] | None = None) -> dict:
    """shards.prepare_split (same arguments but `processes`) as engine stages: the same
    files and metadata. Its shards are checked against the budget before (check_plan)."""
    log = log or (lambda msg: None)
    folder = chunks_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    shards.remove_stale_temporaries(folder)
    sources, fps = shards.split_sources(cfg, num_docs, fingerprint, filtered)
    t0 = time.time()
    plan = SplitPlan(cfg.to_dict(), split, str(tokenizer_path), str(folder), tuple(sources),
                     tuple(fps))
    work = folder.parent / ENGINE_DIR / f"{split}-{digest(list(fps))}-n{eng.tasks}"
    log(f"[engine] {split}: {len(sources)} shard(s), {eng.tasks} task(s) on the "
        f"{eng.executor} executor")
    run_stage(eng, work, "tokenize", _tokenize_task, (plan,))
    run_stage(eng, work, "pack", _pack_task,
              (plan, str(work), tokenizer.eos_id, tokenizer.pad_id))
    run_stage(eng, work, "meta", _meta_task, (plan, str(work), fingerprint, t0), 1)
    return tokenized.read_meta(folder)


def task_report(work: pathlib.Path) -> list[dict]:
    """Every task's record under a stage folder `work`: stage, rank, seconds, and with
    trace_memory its tracemalloc peak and the process's peak resident set (max_rss)."""
    folder = work / "tasks"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] \
        if folder.is_dir() else []
