"""Preparing a corpus, and batches whose order is a pure function of (seed, step).

    info = prepare(cfg)                 # TFDS dataset, tokenizer, tokenized chunks (idempotent)
    data = train_data(cfg)              # TrainData, or MixtureData for data.sources
    batch = data.batch(step, sharding)  # global jax.Arrays; this process reads only its rows
    for b in eval_batches(cfg, cfg.data.eval_split, 16): ...

The chunk format and the loss weights are described in `tokenized.py`; a weighted mixture
of sources (data.sources) in `mixture.py`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gopher_jax.data import builders, shards, tokenized
from gopher_jax.data.builders import DataError
from gopher_jax.data.tokenizer import Tokenizer, default_path, train_tokenizer

__all__ = ["DataError", "TrainData", "eval_batches", "load_tokenizer",
           "prepare", "rows_for_devices", "train_data"]


def file_sha(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def load_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    path = default_path(cfg)
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}: run `python -m gopher_jax data prepare "
                        "--config ...` (or `tokenizer train`) first.")
    tok = Tokenizer.load(path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size is "
                        f"{cfg.model.vocab_size}: set model.vocab_size={tok.vocab_size} or "
                        "point data.tokenizer_path at a smaller tokenizer.")
    return tok


def chunks_root(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    return pathlib.Path(os.path.expanduser(cfg.data.data_dir)) / "chunks"


def chunks_dir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """<data_dir>/chunks/<corpus>/<tokenizer sha>-L<seq_len>: new tokenizer, new chunks."""
    tok_sha = file_sha(default_path(cfg))
    return chunks_root(cfg) / builders.corpus_name(cfg) / f"tok{tok_sha}-L{cfg.data.seq_len}"


def _splits(cfg: ml_collections.ConfigDict) -> list[str]:
    d = cfg.data
    return list(dict.fromkeys([d.train_split, d.eval_split, d.test_split]))


def prepare(cfg: ml_collections.ConfigDict,
            log: Callable[[str], None] | None = None, processes: int = 1) -> dict:
    """Build the dataset, train the tokenizer if absent, tokenize every split. Idempotent.

    Returns {"dataset", "tokenizer", "chunks_dir", "splits": {split: {num_chunks, num_docs,
    num_tokens, num_bytes, tokens_per_byte, path, reused}}, "warnings": [...]}. `log`
    receives progress lines. A split with fewer chunks than one batch is a warning (its bits
    per byte rest on little text); a training split without any chunk is an error.
    Splits are tokenized in shards on `processes` processes (shards.py; the chunks never
    depend on it); with data.filter the training split is first filtered (corpus_filter.py).
    """
    if cfg.data.get("sources"):
        from gopher_jax.data import mixture

        return mixture.prepare(cfg, log, processes=processes)
    d = cfg.data
    log = log or (lambda msg: None)
    builder = builders.prepare_builder(cfg, log)
    if d.train_split not in builder.info.splits:
        raise DataError(f"dataset {d.dataset!r} has no split {d.train_split!r} (it has "
                        f"{builders.split_names(builder)}); set data.train_split.")
    tok_path = default_path(cfg)
    if not tok_path.is_file():
        t0 = time.time()
        log(f"[data] training a {cfg.model.vocab_size}-piece tokenizer on "
            f"{d.dataset}:{d.train_split}")
        train_tokenizer(builders.iter_texts(builder, d.train_split, d.text_field), tok_path,
                        cfg.model.vocab_size, nfkc=d.nfkc)
        log(f"[data] tokenizer written to {tok_path} ({time.time() - t0:.1f}s)")
    tok = load_tokenizer(cfg)
    out = chunks_dir(cfg)
    fingerprint_base = {"format": tokenized.FORMAT_VERSION, "tokenizer": file_sha(tok_path),
                        "corpus": builders.corpus_fingerprint(builder), "seq_len": d.seq_len}
    info = {"dataset": d.dataset, "tokenizer": str(tok_path), "chunks_dir": str(out),
            "tokenizer_sha": file_sha(tok_path), "splits": {}}
    filtered = None
    if d.filter:
        from gopher_jax.data import corpus_filter

        filtered = (corpus_filter.filter_dir(cfg),
                    corpus_filter.filter_corpus(cfg, None, processes, log))
    for split in _splits(cfg):
        if split not in builder.info.splits:
            log(f"[data] {d.dataset} has no {split!r} split; skipped")
            continue
        fp = dict(fingerprint_base, split=split)
        if filtered is not None and split == d.train_split:
            fp["filter"] = filtered[1]["fingerprint"]
        meta = tokenized.read_meta(out / split)
        if meta is not None and meta["fingerprint"] == fp:
            log(f"[data] {split}: reusing {meta['num_chunks']:,} chunks in {out}")
            info["splits"][split] = dict(meta, reused=True)
            continue
        meta = shards.prepare_split(
            cfg, split, builder.info.splits[split].num_examples, tok, tok_path, fp, out,
            processes, filtered if split == d.train_split else None, log)
        log(f"[data] {split}: {meta['num_docs']:,} docs, {meta['num_bytes']:,} bytes -> "
            f"{meta['num_tokens']:,} tokens -> {meta['num_chunks']:,} chunks of "
            f"{d.seq_len}+1 ({meta['seconds']}s)")
        info["splits"][split] = dict(meta, reused=False)
    info["warnings"] = _small_splits(cfg, info["splits"])
    for w in info["warnings"]:
        log(f"[data] warning: {w}")
    return info


def data_identity(info: dict, train_split: str) -> dict[str, str]:
    """Content fingerprints of what training reads (from `prepare`'s result): the tokenizer
    model's bytes, and the training chunks' inputs (tokenizer, corpus content, length,
    format), which decide the chunks since tokenization is deterministic. A mixture's: see
    `mixture.data_identity`."""
    if "sources" in info:
        from gopher_jax.data import mixture

        return mixture.data_identity(info, train_split)
    s = info["splits"][train_split]
    blob = json.dumps([s["fingerprint"], s["num_chunks"], s["num_tokens"]], sort_keys=True)
    return {"tokenizer": info["tokenizer_sha"],
            "train_chunks": hashlib.sha256(blob.encode()).hexdigest()[:12]}


def _small_splits(cfg: ml_collections.ConfigDict, splits: dict[str, dict]) -> list[str]:
    d, batch = cfg.data, cfg.train.batch_size
    train = splits.get(d.train_split)
    if train is not None and train["num_chunks"] == 0:
        raise DataError(f"the {d.train_split!r} split of {d.dataset!r} holds no tokens after "
                        "tokenization", "add text to the corpus or check data.text_files")
    return [f"split {name!r} of {d.dataset!r} holds {s['num_chunks']} chunk(s) "
            f"({s['num_tokens']:,} tokens), fewer than one batch of {batch}: its bits per byte "
            "rest on very little text (add text, or choose other files for it)"
            for name, s in splits.items() if s["num_chunks"] < batch]


def open_chunks(cfg: ml_collections.ConfigDict, split: str) -> tokenized.Chunks:
    if cfg.data.get("sources"):
        raise ValueError("a mixture has one chunk set per source: open those of "
                         "mixture.source_config(cfg, source)")
    path = chunks_dir(cfg) / split
    try:
        chunks = tokenized.Chunks(path)
    except FileNotFoundError as e:
        raise DataError(f"split {split!r} of {cfg.data.dataset!r} is not tokenized for this "
                        f"tokenizer and seq_len ({path}.json missing): run `python -m "
                        "gopher_jax data prepare --config ...` (it skips splits the dataset "
                        "lacks: check data.eval_split / test_split).") from e
    if chunks.seq_len != cfg.data.seq_len:
        raise DataError(f"{path} has seq_len {chunks.seq_len}, config {cfg.data.seq_len}: "
                        "prepare again.")
    return chunks


# ---------------------------------------------------------------------------------------
# Which rows of a [batch, seq_len + 1] array a process (or a set of devices) holds


def rows_for_devices(sharding: jax.sharding.Sharding, shape: tuple[int, ...],
                     devices: Sequence[jax.Device] | None = None) -> np.ndarray:
    """Sorted rows (dim 0) the given devices (default: this process's) hold under sharding."""
    if devices is None:
        index_map = sharding.addressable_devices_indices_map(shape)
    else:
        full = sharding.devices_indices_map(shape)
        index_map = {dev: full[dev] for dev in devices}
    rows: set[int] = set()
    for index in index_map.values():
        rows.update(range(*index[0].indices(shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def _batch_sharding_1d(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding:
    """The sharding of a [batch] array that splits rows like `sharding` does."""
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"batches need a NamedSharding over a mesh, got {type(sharding)}")
    spec = sharding.spec
    return NamedSharding(sharding.mesh, PartitionSpec(spec[0] if len(spec) else None))


def to_global(local: dict[str, np.ndarray], sharding: jax.sharding.Sharding,
              batch_size: int, seq_len: int) -> dict[str, jax.Array]:
    s1 = _batch_sharding_1d(sharding)
    out = {}
    for key, value in local.items():
        if value.ndim == 2:
            out[key] = jax.make_array_from_process_local_data(
                sharding, value, (batch_size, seq_len + 1))
        else:
            out[key] = jax.make_array_from_process_local_data(s1, value, (batch_size,))
    return out


def contiguous_rows(batch_size: int, process_index: int, process_count: int) -> np.ndarray:
    if batch_size % process_count:
        raise ValueError(f"batch {batch_size} is not divisible by {process_count} processes")
    per = batch_size // process_count
    return np.arange(process_index * per, (process_index + 1) * per)


# ---------------------------------------------------------------------------------------
# Training batches


class TrainData:
    """Training batches: step s holds chunks order[s*B : (s+1)*B] of a seeded order.

    The order is grain's index shuffle of the chunk indices, reshuffled every epoch from
    (seed, epoch), so a batch depends on (seed, step) only: resuming needs only the step,
    on any number of processes.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, split: str | None = None):
        self.split = split or cfg.data.train_split
        self.chunks = open_chunks(cfg, self.split)
        self.num_chunks = len(self.chunks)
        if self.num_chunks == 0:
            raise DataError(f"split {self.split!r} of {cfg.data.dataset!r} has no chunks.")
        self.batch_size: int = cfg.train.batch_size
        self.seq_len: int = cfg.data.seq_len
        self.seed: int = cfg.seed
        self.order = grain.MapDataset.range(self.num_chunks).seed(self.seed).shuffle().repeat()

    @property
    def shape(self) -> tuple[int, int]:
        return (self.batch_size, self.seq_len + 1)

    def global_indices(self, step: int, rows: Sequence[int] | None = None) -> np.ndarray:
        """The chunk index of every row (or of `rows`) of the global batch at `step`."""
        if rows is None:
            rows = range(self.batch_size)
        elif len(rows) and not 0 <= min(rows) <= max(rows) < self.batch_size:
            raise IndexError(f"rows must lie in [0, {self.batch_size}), got {list(rows)}")
        start = step * self.batch_size
        return np.array([self.order[start + int(r)] for r in rows], dtype=np.int64)

    def local_rows(self, step: int, process_index: int = 0, process_count: int = 1,
                   rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Rows `rows` of the global batch (default: process `process_index`'s contiguous
        block of `process_count`), read without touching any other row."""
        if rows is None:
            rows = contiguous_rows(self.batch_size, process_index, process_count)
        return self.chunks.read(self.global_indices(step, rows))

    def batch(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
        """The global batch at `step` as jax.Arrays sharded by `sharding` (batch on dim 0)."""
        rows = rows_for_devices(sharding, self.shape)
        return to_global(self.local_rows(step, rows=rows), sharding, self.batch_size,
                         self.seq_len)

    def consumed(self, step: int) -> dict[str, float]:
        """Per-source reading metrics; a single dataset has none (see MixtureData)."""
        del step
        return {}


def train_data(cfg: ml_collections.ConfigDict, split: str | None = None):
    """The training batches of the config: `TrainData`, or `mixture.MixtureData` when
    data.sources names a mixture."""
    if cfg.data.get("sources"):
        from gopher_jax.data import mixture

        return mixture.MixtureData(cfg, split)
    return TrainData(cfg, split)


# ---------------------------------------------------------------------------------------
# Evaluation


def eval_batches(cfg: ml_collections.ConfigDict, split: str, batch_size: int,
                 sharding: jax.sharding.Sharding | None = None,
                 max_batches: int = -1) -> Iterator[dict]:
    """Every chunk of `split` exactly once, in order; the last batch padded with weight-0 rows.

    numpy dicts when `sharding` is None, else global jax.Arrays of which this process read
    only its own rows.
    """
    chunks = open_chunks(cfg, split)
    n, L = len(chunks), cfg.data.seq_len
    pad_id = load_tokenizer(cfg).pad_id
    num = math.ceil(n / batch_size)
    if max_batches >= 0:
        num = min(num, max_batches)
    shape = (batch_size, L + 1)
    rows = np.arange(batch_size) if sharding is None else rows_for_devices(sharding, shape)
    for b in range(num):
        index = b * batch_size + rows
        real = index < n
        got = chunks.read(index[real])
        local = {"tokens": np.full((len(rows), L + 1), pad_id, np.int32),
                 "segment_ids": np.zeros((len(rows), L + 1), np.int32),
                 "num_bytes": np.zeros(len(rows), np.int32)}
        for key, value in got.items():
            local[key][real] = value
        yield local if sharding is None else to_global(local, sharding, batch_size, L)
