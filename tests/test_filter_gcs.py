"""Filtering (data.filter, `data filter`) with a gs:// data dir, against a real GCS-API server
on localhost (fake-gcs-server): the whole pipeline (quality and repetition rules, exact dedup,
MinHash near-dedup, test-set filtering, tokenization, chunks) from a gs:// corpus into a
gs:// data dir on the engine with several tasks writes the bytes a local `data prepare`
writes, every task's work in the bucket (where the tasks of a cluster all see it); a filter
task SIGKILLed mid-way leaves no manifest and the rerun the same bytes; two filterings into
one output folder outside a data dir are locked against each other."""

from __future__ import annotations

import json
import pathlib
import threading
import time

import pytest
from etils import epath
from helpers import ROOT, cli_command, run_released_together
from test_data_gcs import kill_engine_prepare_when
from test_engine import plays_corpus

from gopher_jax import storage
from gopher_jax.config import base_config
from gopher_jax.data import artefacts, corpus_filter, engine, pipeline, prepare_lock


def _config(text_files: str, data_dir: str):
    c = base_config()
    c.model.vocab_size, c.train.batch_size = 400, 8
    c.data.update(dataset="text_files", seq_len=32, docs_per_shard=16, filter=True,
                  text_files=text_files, data_dir=data_dir)
    return c


def _filter_outputs(out) -> dict[str, bytes]:
    """manifest.json, docs/ and audit/ of a filter output folder (local or gs://)."""
    out = storage.data_path(out)
    files = [out / artefacts.MANIFEST, *out.glob(f"{artefacts.FILTER_DOCS}/*"),
             *out.glob(f"{artefacts.FILTER_AUDIT}/*")]
    return {str(p)[len(str(out)) + 1:]: p.read_bytes() for p in files}


def _chunk_files(cfg) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes()
            for p in artefacts.chunks_dir(cfg).glob("*/chunks-*.array_record")}


def _identity(info) -> dict:
    return {s: (v.fingerprint, v.num_chunks, v.num_tokens, v.num_bytes, v.files)
            for s, v in info.splits.items()}


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    """The plays corpus (every dedup stage removes documents) prepared with data.filter in
    a local data dir by `data prepare`'s one-process route: the reference."""
    root = tmp_path_factory.mktemp("filter_ref")
    (root / "raw").mkdir()
    c = _config(plays_corpus(root / "raw"), str(root / "data"))
    with open(sorted((root / "raw").glob("*.jsonl"))[0], "a") as f:
        f.write(json.dumps({"text": "A line too short for the quality rules."}) + "\n")
    info = pipeline.prepare(c)
    m = corpus_filter.read_manifest(artefacts.filter_dir(c))
    assert all(m.stages[s]["docs_removed"] > 0 for s in corpus_filter.STAGES), m.stages
    return c, info


def _upload_corpus(cfg, bucket: str) -> str:
    for f in sorted(pathlib.Path(cfg.data.text_files).parent.glob("*.jsonl")):
        storage.upload(f, f"{bucket}/raw/{f.name}")
    return f"{bucket}/raw/*.jsonl"


def _assert_same_preparation(c, info, ref_cfg, ref) -> None:
    assert _identity(info) == _identity(ref)
    assert _chunk_files(c) == _chunk_files(ref_cfg) != {}
    assert (epath.Path(info.tokenizer).read_bytes()
            == epath.Path(ref.tokenizer).read_bytes())
    assert _filter_outputs(artefacts.filter_dir(c)) == _filter_outputs(
        artefacts.filter_dir(ref_cfg))


def test_filtered_pipeline_from_gs_into_a_gs_data_dir_on_the_engine_writes_the_local_bytes(
        local_ref, bucket):
    """Catches a filter step that still writes through pathlib (a local 'gs:' folder, or a
    gs:// path it cannot write), work that stays on the driver's disk instead of the
    bucket, and outputs that differ from the local route's."""
    ref_cfg, ref = local_ref
    c = _config(_upload_corpus(ref_cfg, bucket), f"{bucket}/data")
    info = pipeline.prepare(c, engine=engine.Engine("local", tasks=2, workers=1))
    assert info.chunks_dir.startswith(f"{bucket}/data/chunks/")
    _assert_same_preparation(c, info, ref_cfg, ref)
    fs = storage._gcs_fs()
    filtered = f"{bucket}/data/filtered/*"
    assert fs.glob(f"{filtered}/engine/*-n2/band/p00001/*.bin")  # the tasks' shared work
    assert fs.glob(f"{filtered}/work/train-*.npz")
    assert not list(ROOT.glob("gs:*")) and not list(pathlib.Path.cwd().glob("gs:*"))
    again = pipeline.prepare(c)  # the one-process route finds it all prepared
    assert all(s.reused for s in again.splits.values())


def test_data_filter_out_a_gs_folder_writes_the_local_filter_outputs(local_ref, bucket,
                                                                     capsys):
    """`data filter --out gs://...` on one process (the CLI's refusal is gone)."""
    from gopher_jax.cli.app import main

    ref_cfg, _ = local_ref
    out = f"{bucket}/filtered"
    argv = ["data", "filter", "--config", str(ROOT / "experiments" / "tiny.py"),
            f"--out={out}", *[f"--config.data.{k}={ref_cfg.data[k]}" for k in
                              ("dataset", "text_files", "data_dir", "docs_per_shard")]]
    assert main(argv) == 0, capsys.readouterr().err
    assert _filter_outputs(out) == _filter_outputs(artefacts.filter_dir(ref_cfg))


@pytest.mark.slow  # ~8 s alone: a killed engine preparation into the bucket, its rerun
def test_a_filter_task_killed_mid_way_leaves_no_manifest_and_the_rerun_the_same_bytes(
        local_ref, bucket):
    """Killed once the first shard of the rules stage is finished: no manifest in the
    bucket, every finished shard's files whole; the rerun redoes only the unfinished
    shards and writes the local bytes. Catches a shard marked finished before its files
    are written, a manifest written before the work it lists, and a rerun that trusts
    half-written work."""
    ref_cfg, ref = local_ref
    c = _config(_upload_corpus(ref_cfg, bucket), f"{bucket}/data")
    fs = storage._gcs_fs()
    work = f"{bucket}/data/filtered/*/{artefacts.FILTER_WORK}"
    kill_engine_prepare_when(c, lambda: bool(fs.glob(f"{work}/train-*.json")))
    assert not fs.glob(f"{bucket}/data/filtered/*/{artefacts.MANIFEST}")
    ref_work = artefacts.filter_dir(ref_cfg) / artefacts.FILTER_WORK
    done = {}
    for marker in fs.glob(f"{work}/*.json"):
        stem = marker[:-len(".json")]
        suffixes = (".json", ".npz", ".jsonl") if "/train-" in stem else (".json", ".npz")
        for suffix in suffixes:  # a finished shard's files are all there, whole
            name = pathlib.PurePosixPath(stem + suffix).name
            assert fs.cat_file(stem + suffix) == (ref_work / name).read_bytes(), name
        done[marker] = fs.info(marker)["generation"]
    assert done
    info = pipeline.prepare(c, engine=engine.Engine("local", tasks=2, workers=1))
    for marker, generation in done.items():  # finished shards were not redone
        assert fs.info(marker, refresh=True)["generation"] == generation, marker
    _assert_same_preparation(c, info, ref_cfg, ref)


def test_a_filtering_into_a_folder_another_job_holds_waits_for_it(local_ref, tmp_path):
    """An output folder outside the data dir has its own lock: while another job holds it,
    the filtering waits (writing nothing there), then does the work. Catches a filtering
    that locks only the data dir (two `data filter --out DIR` at once on one DIR)."""
    from gopher_jax.checkpoint.lock import WorkdirLock

    ref_cfg, _ = local_ref
    out = tmp_path / "out"
    other = WorkdirLock(out, name=prepare_lock.LOCK_NAME).acquire()
    said: list[str] = []
    result = []
    job = threading.Thread(target=lambda: result.append(
        corpus_filter.filter_corpus(ref_cfg, out, log=said.append)))
    job.start()
    deadline = time.time() + 120
    while not any(line.startswith("[data] waiting") for line in said):
        assert time.time() < deadline and job.is_alive(), said
        time.sleep(0.05)
    time.sleep(0.5)
    assert sorted(p.name for p in out.rglob("*")) == [prepare_lock.LOCK_NAME], said
    other.release()
    job.join(timeout=120)
    assert result and str(out) in said[0], said
    assert _filter_outputs(out) == _filter_outputs(artefacts.filter_dir(ref_cfg))
    assert not (out / prepare_lock.LOCK_NAME).exists()


@pytest.mark.slow  # ~6 s alone: two CLI filterings at once
def test_two_data_filter_runs_into_one_out_folder_at_once_end_as_one(local_ref, tmp_path):
    """`data filter --out DIR` twice at once on one DIR, each with its own data dir (so the
    data dir's lock does not order them). The test holds DIR's lock until both wait for it,
    then lets them go at once: both succeed, one filters, the other reuses its result."""
    from gopher_jax.checkpoint.lock import WorkdirLock

    ref_cfg, _ = local_ref
    out = tmp_path / "shared_out"
    gate = WorkdirLock(out, name=prepare_lock.LOCK_NAME).acquire()
    logs = run_released_together(
        [cli_command("data", "filter", "--config", "experiments/tiny.py", f"--out={out}",
                     "--config.data.dataset=text_files",
                     f"--config.data.text_files={ref_cfg.data.text_files}",
                     f"--config.data.data_dir={tmp_path / f'data{k}'}",
                     "--config.data.docs_per_shard=16") for k in range(2)],
        gate, f"[data] waiting: another job is preparing {out}")
    assert sum("[filter] quality and repetition done" in log for log in logs) == 1, logs
    assert sum(f"[filter] reusing {out}" in log for log in logs) == 1, logs
    assert _filter_outputs(out) == _filter_outputs(artefacts.filter_dir(ref_cfg))
    manifest = json.loads((out / artefacts.MANIFEST).read_text())
    assert manifest["docs_out"] < manifest["docs_in"]


def test_datatrove_rules_pipeline_reads_and_writes_gs_folders(local_ref, bucket):
    """The rules as datatrove steps (corpus_filter.datatrove_rules_pipeline) on gs://
    folders: datatrove's readers and writers take fsspec URLs, so input, output and logs
    go straight to the bucket; the kept documents are those stage 1-2 keeps."""
    from datatrove.executor import LocalPipelineExecutor

    from gopher_jax.data import filters

    ref_cfg, _ = local_ref
    texts = [json.loads(line)["text"] for f in sorted(
        pathlib.Path(ref_cfg.data.text_files).parent.glob("*.jsonl"))
        for line in f.read_text().splitlines()][:60]
    texts += ["too short", "the the the the " * 30]  # the length rule, the repetition rules
    fs = storage._gcs_fs()
    for k in range(2):
        fs.pipe_file(f"{bucket}/in/{k}.jsonl", "".join(
            json.dumps({"id": str(i), "text": texts[i]}) + "\n"
            for i in range(k, len(texts), 2)).encode())
    steps = corpus_filter.datatrove_rules_pipeline(f"{bucket}/in", f"{bucket}/kept")
    LocalPipelineExecutor(steps, tasks=2, workers=1, logging_dir=f"{bucket}/logs").run()
    kept = sorted(int(json.loads(line)["id"]) for p in fs.glob(f"{bucket}/kept/*.jsonl")
                  for line in fs.cat_file(p).decode().splitlines())
    expected = [i for i, t in enumerate(texts) if filters.first_rule(t) is None]
    assert kept == expected and len(expected) < len(texts)
    assert len(fs.glob(f"{bucket}/logs/completions/*")) == 2
