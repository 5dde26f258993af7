"""Shards: a split cut into fixed ranges of documents, processed by N local processes,
each shard written atomically (temporary file, then rename) so that a rerun skips finished
shards and a killed run resumes where it stopped.

    plan = shard_ranges(num_docs, docs_per_shard)     # [(start, stop)], never depends on N
    results = run_tasks(fn, tasks, processes)          # in task order, any N

The shard boundaries depend on `data.docs_per_shard` only, never on the number of processes,
and every result is combined in shard order (= document-id order), so 1, 2 or 16 processes
write the same bytes.

Token shards (`tokenize_shards`) hold each shard's documents encoded ([eos] + ids per
document); `pack_shards` then packs them in document order into fixed-length chunks exactly
as one pass over the whole split would (tokenized.py), written as one ArrayRecord file per
token shard: the chunks, their order and the training order do not depend on how the split
was cut or on how many processes cut it.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import multiprocessing
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from gopher_jax import storage
from gopher_jax.data import artefacts, builders, tokenized
from gopher_jax.data.digests import digest
from gopher_jax.data.records import FilterManifest
from gopher_jax.data.tokenizer import Tokenizer


def shard_ranges(num_docs: int, docs_per_shard: int) -> list[tuple[int, int]]:
    """[(start, stop)] covering range(num_docs) in shards of docs_per_shard documents."""
    return [(s, min(s + docs_per_shard, num_docs)) for s in range(0, num_docs, docs_per_shard)]


def run_tasks(fn: Callable[..., Any], tasks: Sequence[tuple], processes: int) -> list[Any]:
    """fn(*task) for every task, results in task order. processes == 1 runs here; more use a
    pool of spawned processes (spawn: no forked JAX/TFDS state, the same on every OS)."""
    if processes <= 1 or len(tasks) <= 1:
        return [fn(*t) for t in tasks]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(min(processes, len(tasks)),
                                                mp_context=ctx) as pool:
        futures = [pool.submit(fn, *t) for t in tasks]
        return [f.result() for f in futures]


def remove_stale_temporaries(folder: pathlib.Path) -> None:
    """Temporary files a killed run left behind (finished files are never temporary)."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp*"):
            p.unlink(missing_ok=True)


def read_range(cfg, split: str, start: int, stop: int) -> list[str]:
    """Documents [start, stop) of `split` of the dataset `cfg.data` names (prepared)."""
    builder = builders.get_builder(cfg)
    field = builders.text_feature(builder, cfg.data.text_field)
    source = builder.as_data_source(split)
    texts = [ex[field] for ex in source.__getitems__(range(start, stop))]
    return [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]


# ---------------------------------------------------------------------------------------
# Documents as JSON lines: {"id": int, "text": str}


def write_docs(path: pathlib.Path, docs: Iterator[tuple[int, str]] | Sequence[tuple[int, str]]
               ) -> None:
    lines = [json.dumps({"id": i, "text": t}, ensure_ascii=False) + "\n" for i, t in docs]
    storage.write_atomic(path, "".join(lines).encode("utf-8"))


def read_docs(path: str | os.PathLike) -> list[tuple[int, str]]:
    with storage.data_path(path).open(encoding="utf-8") as f:
        return [(r["id"], r["text"]) for r in map(json.loads, f)]


# ---------------------------------------------------------------------------------------
# Arrays (npz without pickle)


def save_arrays(path: pathlib.Path, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_atomic(path, buf.getvalue())


def load_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    if storage.is_remote(path):
        path = io.BytesIO(storage.data_path(path).read_bytes())
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------------------------------
# Token shards and packing


def tokenize_docs(tokenizer, texts: Sequence[str], batch: int = 256) -> dict[str, np.ndarray]:
    """{"tokens": int32 [eos, ids of doc 0, eos, ids of doc 1, ...], "lengths": int64 (1 +
    tokens of each doc), "text_bytes": int64 [1]}."""
    pieces = [np.zeros(0, np.int32)]
    lengths = []
    for s in range(0, len(texts), batch):
        for ids in tokenizer.encode_batch(list(texts[s:s + batch])):
            pieces.append(np.array([tokenizer.eos_id, *ids], np.int32))
            lengths.append(len(ids) + 1)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {"tokens": np.concatenate(pieces), "lengths": np.array(lengths, np.int64),
            "text_bytes": np.array([n_bytes], np.int64)}


def tokenize_shard(cfg, tokenizer_path: str, split: str, index: int, source: tuple,
                   folder: str, fingerprint: str) -> str:
    """Encodes one shard of documents into `tokens-<index>-<fingerprint>.npz` unless that
    file exists. `source` is ("range", start, stop) of the dataset's split or ("file", path)
    of filtered documents."""
    path = artefacts.token_shard(storage.data_path(folder), index, fingerprint)
    if path.is_file():
        return str(path)
    if source[0] == "range":
        texts = read_range(cfg, split, source[1], source[2])
    else:
        texts = [t for _, t in read_docs(source[1])]
    save_arrays(path, **tokenize_docs(Tokenizer.load(tokenizer_path), texts))
    return str(path)


def pack_shards(token_files: Sequence[pathlib.Path], folder: pathlib.Path, seq_len: int,
                eos_id: int, pad_id: int, piece_bytes: np.ndarray) -> dict:
    """Packs the token shards, in order, into chunks; writes chunks-<k>.array_record for each
    shard that completes at least one chunk (the last also takes the padded final chunk).
    Returns {"files": [{"path", "num_chunks", "sha256"}], "num_chunks", "num_docs",
    "num_tokens", "num_bytes", "num_text_bytes"}."""
    folder.mkdir(parents=True, exist_ok=True)
    packer = tokenized.ChunkPacker(seq_len, eos_id, pad_id, piece_bytes)
    files, n_bytes, n_text_bytes = [], 0, 0
    for k, tf in enumerate(token_files):
        a = load_arrays(tf)
        n_text_bytes += int(a["text_bytes"][0])
        records = packer.add_flat(a["tokens"], a["lengths"])
        if k == len(token_files) - 1:
            records = np.concatenate([records, packer.finish()])
        if len(records):
            name = artefacts.chunk_file(k)
            files.append({"path": name, "num_chunks": len(records),
                          "sha256": tokenized.write_records(folder / name, records)})
            n_bytes += int(records[:, -1].sum())
    return {"files": files, "num_chunks": sum(f["num_chunks"] for f in files),
            "num_docs": packer.num_docs, "num_tokens": packer.num_tokens,
            "num_bytes": n_bytes, "num_text_bytes": n_text_bytes}


def prepare_split(cfg, split: str, num_docs: int, tokenizer, tokenizer_path: str | os.PathLike,
                  fingerprint: dict, chunks_dir: pathlib.Path, processes: int = 1,
                  filtered: tuple[pathlib.Path, FilterManifest] | None = None,
                  log: Callable[[str], None] | None = None) -> dict:
    """Tokenizes `split` in shards on `processes` processes and packs it into
    `<chunks_dir>/<split>/chunks-<k>.array_record`; writes `<chunks_dir>/<split>.json` last.
    `filtered` = (filter output dir, its manifest): read the filtered documents instead of
    the dataset's split. Finished token shards are reused."""
    log = log or (lambda msg: None)
    t0 = time.time()
    folder = chunks_dir / split
    folder.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(folder)
    sources, fps = split_sources(cfg, num_docs, fingerprint, filtered)
    tasks = [(cfg, str(tokenizer_path), split, k, src, str(folder), fp)
             for k, (src, fp) in enumerate(zip(sources, fps, strict=True))]
    log(f"[data] {split}: tokenizing {len(tasks)} shard(s) on {processes} process(es)")
    token_files = [storage.data_path(p) for p in run_tasks(tokenize_shard, tasks, processes)]
    packed = pack_shards(token_files, folder, cfg.data.seq_len, tokenizer.eos_id,
                         tokenizer.pad_id, tokenizer.piece_bytes)
    return write_split_meta(folder, fingerprint, cfg.data.seq_len, packed, fps, token_files,
                            t0)


def split_sources(cfg, num_docs: int, fingerprint: dict,
                  filtered: tuple[pathlib.Path, FilterManifest] | None = None
                  ) -> tuple[list[tuple], list[str]]:
    """A split's token shards: their sources (("range", start, stop) of the dataset's split
    or ("file", path) of filtered documents) and their fingerprints."""
    split_fp = digest(fingerprint)
    if filtered is not None:
        root, manifest = filtered
        sources = [("file", str(root / artefacts.FILTER_DOCS / s.path)) for s in manifest.shards]
        keys = [[split_fp, s.sha256] for s in manifest.shards]
    else:
        plan = shard_ranges(num_docs, cfg.data.docs_per_shard)
        sources = [("range", a, b) for a, b in plan]
        keys = [[split_fp, a, b] for a, b in plan]
    return sources, [digest(k) for k in keys]


def write_split_meta(folder: pathlib.Path, fingerprint: dict, seq_len: int, packed: dict,
                     fps: Sequence[str], token_files: Sequence[pathlib.Path], t0: float) -> dict:
    """Removes files of an earlier preparation from the split's folder, then writes its
    metadata (`<split>.json`, last); returns it."""
    current = {p.name for p in token_files} | {f["path"] for f in packed["files"]}
    for p in folder.iterdir():  # files of an earlier preparation with other inputs
        if p.name not in current:
            p.unlink()
    info = {"fingerprint": fingerprint, "format": "sharded", "seq_len": seq_len,
            **packed, "tokens_per_byte": packed["num_tokens"] / max(packed["num_bytes"], 1),
            "shards": [{"index": k, "fingerprint": fp, "tokens": path.name}
                       for k, (fp, path) in enumerate(zip(fps, token_files, strict=True))],
            "seconds": round(time.time() - t0, 2)}
    storage.write_atomic(tokenized.meta_path(folder), json.dumps(info, indent=1))
    return info
