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
                 sorted by TFDS's shuffle key: runs of at most RUN_BYTES per file and split
      sort       (N tasks, hash bucket r) a bucket's examples from every run, in key order:
                 one shard of the split
      info       (1 task) the shards named as TFDS's in bucket order, then features.json
                 and dataset_info.json, last: TFDS's one-process build's records in its
                 order (it writes a split sorted by the same keys; only the shard count
                 differs). A corpus where a split would be empty (assign_splits' donor
                 rule) is built by TFDS in one process instead, as without the engine.
    filter (data.filter):
      rules      quality and repetition per shard (corpus_filter's stage 1, as `data filter`)
                 and the task's hash and band records (dedup_sharded.Emitter)
      partition  exact duplicates and LSH candidates per hash partition
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
shards r, r + N, r + 2N...; the hash partitions are N. Every output is a function of the
documents: the chunk files, their order, the manifest and the fingerprints equal `data
prepare`'s byte for byte (tests/test_engine.py).

Why steps of our own on datatrove's executors rather than datatrove's reader, filter,
MinHash and tokenizer steps: the documents are the prepared dataset's, numbered by their
index in the split (what "the first of a duplicate cluster" and the shards are defined on);
the rules, the exact-Jaccard confirmation and the chunk format are gopher_jax's (filters.py,
dedup_sharded.py, tokenized.py say why for each). The executors are datatrove's: tasks,
workers, completion markers, SLURM job arrays, Ray placement and retries.

Each task records its wall time in `<work>/tasks/<stage>-<rank>.json`; with `trace_memory`
also its peak Python/numpy allocation (tracemalloc) and the process's peak resident set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
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


@dataclasses.dataclass(frozen=True)
class Engine:
    """Where and how wide the pipeline runs. `workers`: tasks at once (local: processes; 1
    runs them one after another in this process; Ray: concurrent tasks, -1 all). SLURM
    settings go to SlurmPipelineExecutor as they are (partition, time, ...)."""

    executor: str = "local"
    tasks: int = 1
    workers: int = 1
    slurm: tuple[tuple[str, Any], ...] = ()
    trace_memory: bool = False

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise UsageError(f"--executor {self.executor}", f"use one of {', '.join(EXECUTORS)}")
        if self.tasks < 1:
            raise UsageError(f"--tasks {self.tasks}", "give 1 or more")
        if self.workers < 1 and self.workers != -1:
            raise UsageError(f"--workers {self.workers}", "give 1 or more (or -1: all tasks)")

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


class Step:
    """One stage as a datatrove pipeline step: fn(rank, world_size, *args) for the task's
    rank. A plain picklable callable (datatrove accepts any callable with (data, rank,
    world_size)); there are no documents flowing between our stages, only files. Each task
    records its wall time (and with `trace`, its peak memory) in <report_dir>."""

    def __init__(self, stage: str, fn: Callable, args: tuple, report_dir: str, trace: bool):
        self.stage, self.fn, self.args = stage, fn, args
        self.report_dir, self.trace = report_dir, trace
        self.name = f"gopher_jax {stage}"

    def __repr__(self) -> str:
        return self.name

    def __call__(self, data, rank: int = 0, world_size: int = 1):
        del data
        storage.configure()  # a gs:// data dir from a fresh worker process
        t0 = time.perf_counter()
        if self.trace:
            tracemalloc.start()
        try:
            self.fn(rank, world_size, *self.args)
            record = {"stage": self.stage, "rank": rank,
                      "seconds": time.perf_counter() - t0}
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
    pipeline = [Step(stage, fn, args, str(work / "tasks"), eng.trace_memory)]
    logs = str(work / "logs" / stage)
    if eng.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        workers = n if eng.workers == -1 else min(eng.workers, n)
        LocalPipelineExecutor(pipeline, tasks=n, workers=workers, logging_dir=logs,
                              start_method="spawn").run()
    elif eng.executor == "ray":
        from datatrove.executor import RayPipelineExecutor

        eng.check()  # connects to the cluster once
        RayPipelineExecutor(pipeline, tasks=n, workers=eng.workers, logging_dir=logs,
                            cpus_per_task=1, mem_per_cpu_gb=1).run()
    else:
        from datatrove.executor import SlurmPipelineExecutor

        kwargs = dict(eng.slurm)
        kwargs.setdefault("time", "24:00:00")
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
    folder and the number of hash buckets (the sort tasks)."""

    cfg: dict
    fp: str
    files: tuple
    names: tuple
    work: str
    buckets: int

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


RUN_BYTES = 64 << 20  # a read task's examples in memory before it writes them as runs


def _read_file(plan: ReadPlan, i: int, features, hashers: dict, text_field: str) -> None:
    """File i's documents as runs per split (a run each time RUN_BYTES of examples have
    come): each example serialized as TFDS's writer stores it (features.serialize_example)
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
        if held >= RUN_BYTES:
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
    name = f"{builder.name}-{builder.builder_config.name}-n{eng.tasks}"
    work = storage.data_path(d.data_dir) / ENGINE_DIR / name
    plan = ReadPlan(cfg.to_dict(), builder.builder_config.name[1:], tuple(files),
                    tuple(readers.doc_names(files)), str(work), eng.tasks)
    log(f"[engine] read: {len(files)} file(s), {eng.tasks} task(s) on the {eng.executor} "
        f"executor; work in {work}")
    t0 = time.time()
    run_stage(eng, work, "read", _read_task, (plan,))
    log(f"[engine] read done ({time.time() - t0:.1f}s)")
    runs = plan.runs()
    if all(sum(r[s]["count"] for r in runs) for s in builders.SPLITS):
        for stage, fn, tasks in (("sort", _sort_task, None), ("info", _info_task, 1)):
            run_stage(eng, work, stage, fn, (plan,), tasks)
            log(f"[engine] {stage} done ({time.time() - t0:.1f}s)")
    else:
        log("[engine] a split would be empty (a tiny corpus): TFDS's one-process build")
        builders.build_one_process(cfg, builder)
    for folder in ("runs", "shards"):
        _remove_tree(work / folder)


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

    @property
    def work(self) -> pathlib.Path:
        return storage.data_path(self.out) / artefacts.FILTER_WORK

    def stage1(self, split: str, k: int, suffix: str) -> pathlib.Path:
        return self.work / f"{split}-{k:05d}-{self.fp}{suffix}"

    def dedup_dir(self, tasks: int) -> pathlib.Path:
        return storage.data_path(self.out) / ENGINE_DIR / f"{self.fp}-n{tasks}"

    def train_jobs(self) -> list:
        return [j for j in self.jobs if j[4] < 0]

    def eval_jobs(self) -> list:
        return [j for j in self.jobs if j[4] >= 0]


def _owner(docs_per_shard: int, owners: int, ids: np.ndarray) -> np.ndarray:
    return (ids // docs_per_shard) % owners


def _rules_task(rank: int, world: int, plan: FilterPlan) -> None:
    from gopher_jax.data import corpus_filter

    cfg = _config(plan.cfg)
    with dedup_sharded.Emitter(plan.dedup_dir(world), rank, world) as emitter:
        for split, k, a, b, offset in _mine(list(plan.jobs), rank, world):
            corpus_filter._stage1_shard(cfg, plan.fcfg, split, k, a, b, str(plan.work),
                                        plan.fp, offset < 0)
            arr = shards.load_arrays(plan.stage1(split, k, ".npz"))
            if offset < 0:
                docs, hashes = arr["ids"], arr["hashes"]
            else:
                docs, hashes = -(offset + arr["ids"] + 1), None
            emitter.add(docs, hashes, arr["sigs"])


def _partition_task(rank: int, world: int, plan: FilterPlan) -> None:
    dedup_sharded.partition(plan.dedup_dir(world), rank,
                            functools.partial(_owner, plan.docs_per_shard, world), world)


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
    dedup_sharded.confirm(plan.dedup_dir(world), rank, _shard_sets(plan))


def _cluster_task(rank: int, world: int, plan: FilterPlan, owners: int) -> None:
    del rank, world
    dedup_sharded.cluster(plan.dedup_dir(owners),
                          functools.partial(_owner, plan.docs_per_shard, owners), owners)


def _eval_id(plan: FilterPlan, e: int) -> str:
    from gopher_jax.data import corpus_filter

    for split, _, a, b, off in plan.eval_jobs():
        if off + a <= e < off + b:
            return corpus_filter._doc_id(split, e - off)
    raise ValueError(f"evaluation index {e} outside every shard")


def _docs_task(rank: int, world: int, plan: FilterPlan) -> None:
    from gopher_jax.data import corpus_filter

    folder = plan.dedup_dir(world)
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


def _report_task(rank: int, world: int, plan: FilterPlan, owners: int, conf: dict,
                 t0: float) -> None:
    from gopher_jax.data import corpus_filter
    from gopher_jax.data.records import FilterShard

    del rank, world
    folder = plan.dedup_dir(owners)
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
    jobs, offset = [], 0
    for split, plan in plans.items():
        for k, (a, b) in enumerate(plan):
            jobs.append((split, k, a, b, -1 if split == d.train_split else offset))
        if split != d.train_split:
            offset += plan[-1][1] if plan else 0
    fplan = FilterPlan(cfg.to_dict(), fcfg, d.train_split, tuple(jobs), str(out), fp,
                       d.docs_per_shard)
    work = fplan.dedup_dir(eng.tasks)
    log(f"[engine] filter: {len(jobs)} shards, {eng.tasks} task(s) on the {eng.executor} "
        f"executor; work in {work}")
    n = eng.tasks
    for stage, fn, args, tasks in (
            ("rules", _rules_task, (fplan,), n), ("partition", _partition_task, (fplan,), n),
            ("confirm", _confirm_task, (fplan,), n),
            ("cluster", _cluster_task, (fplan, n), 1), ("docs", _docs_task, (fplan,), n),
            ("report", _report_task, (fplan, n, conf, t0), 1)):
        run_stage(eng, work, stage, fn, args, tasks)
        log(f"[engine] {stage} done ({time.time() - t0:.1f}s)")
    return corpus_filter.read_manifest(out)


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
    files and metadata."""
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
