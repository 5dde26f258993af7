"""Stage 1 of the sharded dedup (data/dedup_sharded.py's Emitter): one file per task,
partition and kind whatever the shard count; records spilled to a local folder come back in
the bytes kept in memory would give; a failed task writes nothing and its rerun writes
exactly its files."""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np
import pytest
from test_engine import _prose_config

from gopher_jax.data import artefacts, corpus_filter, dedup, dedup_sharded, engine


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes()
            for kind in ("hash", "band") for f in sorted((folder / kind).rglob("*.bin"))}


def test_stage1_writes_one_file_per_task_partition_and_kind_not_per_shard(tmp_path):
    tasks = 3
    c = _prose_config(tmp_path, 40, 400, [(1, 38, 200)], 2)
    m = corpus_filter.filter_corpus(c, tmp_path / "engine",
                                    engine=engine.Engine("local", tasks=tasks, workers=1))
    shards = len(list((tmp_path / "engine" / artefacts.FILTER_WORK).glob("*.json")))
    assert shards >= 4 * tasks  # every task owns several shards
    (work,) = (tmp_path / "engine" / "engine").iterdir()
    names = sorted(_files(work))
    assert names == sorted(f"{kind}/p{p:05d}/t{t:05d}.bin" for kind in ("hash", "band")
                           for p in range(tasks) for t in range(tasks))
    assert m.stages["near_dedup"]["docs_removed"] == 1
    assert m == corpus_filter.filter_corpus(c, tmp_path / "ref")


def _shards(n: int, docs: int) -> list[tuple[np.ndarray, np.ndarray | None, np.ndarray]]:
    """`n` shards of `docs` documents' ids, text hashes and signatures (the last one an
    evaluation shard: no hashes)."""
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        ids = np.arange(k * docs, (k + 1) * docs, dtype=np.int64)
        sigs = rng.integers(0, 2**63, (docs, dedup.NUM_PERM), dtype=np.uint64)
        hashes = rng.integers(0, 2**63, docs, dtype=np.uint64)
        out.append((ids, hashes, sigs) if k < n - 1 else (-(ids + 1), None, sigs))
    return out


SPILL = 1000  # bytes: a run of band records every shard, of hash records every 2-3


def _emit(folder: pathlib.Path, shards, spill_bytes: int = SPILL) -> None:
    with dedup_sharded.Emitter(folder, 1, 5, spill_bytes) as em:
        for s in shards:
            em.add(*s)


def test_spilled_records_give_the_same_files_and_a_failed_task_leaves_nothing(
        tmp_path, monkeypatch):
    shards = _shards(6, 30)
    _emit(tmp_path / "memory", shards, 1 << 30)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    runs = []
    to_run = dedup_sharded._Records._to_run
    monkeypatch.setattr(dedup_sharded._Records, "_to_run",
                        lambda self: runs.append(1) or to_run(self))
    _emit(tmp_path / "spilled", shards)
    assert len(runs) == 6 + 2
    ref = _files(tmp_path / "memory")
    assert len(ref) == 2 * 5 and _files(tmp_path / "spilled") == ref
    assert not list(spill.iterdir())

    out = tmp_path / "killed"
    with pytest.raises(RuntimeError), dedup_sharded.Emitter(out, 1, 5, SPILL) as em:
        for s in shards[:4]:
            em.add(*s)
        raise RuntimeError("killed")
    assert not out.exists() and not list(spill.iterdir())

    writes = []
    write_bin = dedup_sharded.write_bin

    def dies_after_three(path, rec):
        if len(writes) == 3:
            raise RuntimeError("killed while writing")
        writes.append(path)
        write_bin(path, rec)

    monkeypatch.setattr(dedup_sharded, "write_bin", dies_after_three)
    with pytest.raises(RuntimeError):
        _emit(out, shards)
    assert len(_files(out)) == 3 and not list(spill.iterdir())
    monkeypatch.setattr(dedup_sharded, "write_bin", write_bin)
    _emit(out, shards)  # the rerun: the same names and bytes, nothing more
    assert _files(out) == ref
