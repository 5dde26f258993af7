"""One corpus (data.dataset): its preparation, its chunks, and batches whose order is a
pure function of (seed, step).

    info = prepare(cfg)                 # TFDS dataset, tokenizer, tokenized chunks (idempotent)
    data = TrainData(cfg)               # data.batch(step, sharding): global jax.Arrays
    for b in eval_batches(cfg, cfg.data.eval_split, 16): ...

Callers use the data API (gopher_jax/data/__init__.py), which sends a mixture to mixture.py
and one corpus here. The chunk format and the loss weights are described in `tokenized.py`.
"""

from __future__ import annotations

import contextlib
import errno
import math
import time
from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import ml_collections
import numpy as np

from gopher_jax.data import (
    artefacts,
    builders,
    digests,
    prepare_lock,
    readers,
    shards,
    tokenized,
)
from gopher_jax.data import rows as rows_lib
from gopher_jax.data.records import PrepareInfo, SplitInfo
from gopher_jax.data.tokenizer import Tokenizer, held_out_stats, train_tokenizer
from gopher_jax.errors import DataError


def load_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The config's tokenizer (a mixture's shared one too), checked against model.vocab_size."""
    path = artefacts.tokenizer_path(cfg)
    if not path.is_file():
        raise DataError(f"no tokenizer at {path}", "run `python -m gopher_jax data prepare "
                        "--config ...` (or `tokenizer train`) first")
    tok = Tokenizer.load(path)
    if tok.vocab_size > cfg.model.vocab_size:
        raise DataError(f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size is "
                        f"{cfg.model.vocab_size}", f"set model.vocab_size={tok.vocab_size} or "
                        "point data.tokenizer_path at a smaller tokenizer")
    return tok


def _splits(cfg: ml_collections.ConfigDict) -> list[str]:
    d = cfg.data
    return list(dict.fromkeys([d.train_split, d.eval_split, d.test_split]))


def prepare(cfg: ml_collections.ConfigDict,
            log: Callable[[str], None] | None = None, processes: int = 1,
            engine=None) -> PrepareInfo:
    """Build the dataset, train the tokenizer if absent, tokenize every split. Idempotent.

    `log` receives progress lines. A split with fewer chunks than one batch is a warning (its bits
    per byte rest on little text); a training split without any chunk is an error.
    Splits are tokenized in shards on `processes` processes (shards.py; the chunks never
    depend on it); with data.filter the training split is first filtered (corpus_filter.py).
    With `engine` (an engine.Engine) reading the raw files (text_files), filtering and
    tokenization run as datatrove stages on its executor instead of `processes`, with the
    same files. Two jobs preparing one data dir at once: one writes, the other waits for it
    and reuses its files (prepare_lock.py).
    """
    log = log or (lambda msg: None)
    with prepare_lock.preparing(cfg.data.data_dir, log):
        return _prepare(cfg, log, processes, engine)


def _prepare(cfg: ml_collections.ConfigDict, log: Callable[[str], None], processes: int,
             engine) -> PrepareInfo:
    d = cfg.data
    with _writing(f"the TFDS dataset {d.dataset!r}", d.data_dir):
        builder = builders.prepare_builder(cfg, log, engine)
    builders.require_split(builder, d.train_split, f"dataset {d.dataset!r}",
                           "set data.train_split")
    if engine is not None:  # the dataset is read now: its shards are checked against the
        from gopher_jax.data import engine as engine_lib  # budget before filter or tokenizer

        engine_lib.check_plan(engine, cfg, d.filter, True)
    tok_path = artefacts.tokenizer_path(cfg)
    if not tok_path.is_file():
        prepare_lock.hold(d.data_dir)
    if not tok_path.is_file():
        t0 = time.time()
        log(f"[data] training a {cfg.model.vocab_size}-piece tokenizer on "
            f"{d.dataset}:{d.train_split}")
        with _writing(f"the tokenizer {tok_path.name}", tok_path.parent):
            train_tokenizer(builders.iter_texts(builder, d.train_split, d.text_field),
                            tok_path, cfg.model.vocab_size, nfkc=d.nfkc)
        log(f"[data] tokenizer written to {tok_path} ({time.time() - t0:.1f}s)")
    tok = load_tokenizer(cfg)
    out = artefacts.chunks_dir(cfg)
    tok_sha = artefacts.tokenizer_sha(cfg)
    fingerprint_base = {"format": tokenized.FORMAT_VERSION, "tokenizer": tok_sha,
                        "corpus": builders.corpus_fingerprint(builder), "seq_len": d.seq_len}
    splits: dict[str, SplitInfo] = {}
    filtered = None
    if d.filter:
        from gopher_jax.data import corpus_filter  # datatrove: only when filtering

        filtered = (artefacts.filter_dir(cfg),
                    corpus_filter.filter_corpus(cfg, None, processes, log, engine=engine))
    for split in _splits(cfg):
        if split not in builder.info.splits:
            log(f"[data] {d.dataset} has no {split!r} split; skipped")
            continue
        fp = dict(fingerprint_base, split=split)
        if filtered is not None and split == d.train_split:
            fp["filter"] = filtered[1].fingerprint
        meta = tokenized.read_meta(out / split)
        if meta is None or meta["fingerprint"] != fp:
            prepare_lock.hold(d.data_dir)  # and look again: another job may have written it
            meta = tokenized.read_meta(out / split)
        if meta is not None and meta["fingerprint"] == fp:
            log(f"[data] {split}: reusing {meta['num_chunks']:,} chunks in {out}")
            splits[split] = SplitInfo.from_meta(meta, reused=True)
            continue
        num_docs = builder.info.splits[split].num_examples
        source = filtered if split == d.train_split else None
        if engine is not None:
            meta = engine_lib.prepare_split(engine, cfg, split, num_docs, tok, tok_path, fp,
                                            out, source, log)
        else:
            with _writing(f"the {split!r} chunks for seq_len {d.seq_len}", out):
                meta = shards.prepare_split(cfg, split, num_docs, tok, tok_path, fp, out,
                                            processes, source, log)
        log(f"[data] {split}: {meta['num_docs']:,} docs, {meta['num_bytes']:,} bytes -> "
            f"{meta['num_tokens']:,} tokens -> {meta['num_chunks']:,} chunks of "
            f"{d.seq_len}+1 ({meta['seconds']}s)")
        splits[split] = SplitInfo.from_meta(meta, reused=False)
    warnings = _small_splits(cfg, splits)
    if d.dataset == "text_files":
        skipped = readers.scan_text_files(d.text_files)[1]
        if skipped:
            warnings.append(f"{len(skipped)} file(s) of data.text_files skipped as not text "
                            f"(NUL bytes or mostly invalid UTF-8): {', '.join(skipped)}")
    for w in warnings:
        log(f"[data] warning: {w}")
    return PrepareInfo(dataset=d.dataset, tokenizer=str(tok_path), tokenizer_sha=tok_sha,
                       chunks_dir=str(out), splits=splits, warnings=tuple(warnings))


@contextlib.contextmanager
def _writing(what: str, where: object) -> Iterator[None]:
    """Preparing `what`: a data dir that refuses the write (read-only, shared) is one error
    naming the missing piece; a prepared one is only read."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise DataError(f"{what} is not prepared and cannot be written to {where} "
                        f"({e.strerror})", "prepare it once where data.data_dir is writable "
                        "(`python -m gopher_jax data prepare --config ...`), or set "
                        "data.data_dir to a writable copy") from e


def data_identity(info: PrepareInfo, train_split: str) -> dict[str, str]:
    """Content fingerprints of what training reads (from `prepare`'s result): the tokenizer
    model's bytes, and the training chunks' inputs (tokenizer, corpus content, length,
    format), which decide the chunks since tokenization is deterministic."""
    s = info.splits[train_split]
    return {"tokenizer": info.tokenizer_sha,
            "train_chunks": digests.digest([s.fingerprint, s.num_chunks, s.num_tokens])}


def _small_splits(cfg: ml_collections.ConfigDict, splits: dict[str, SplitInfo]) -> list[str]:
    d, batch = cfg.data, cfg.train.batch_size
    train = splits.get(d.train_split)
    if train is not None and train.num_chunks == 0:
        raise DataError(f"the {d.train_split!r} split of {d.dataset!r} holds no tokens after "
                        "tokenization", "add text to the corpus or check data.text_files")
    return [f"split {name!r} of {d.dataset!r} holds {s.num_chunks} chunk(s) "
            f"({s.num_tokens:,} tokens), fewer than one batch of {batch}: its bits per byte "
            "rest on very little text (add text, or choose other files for it)"
            for name, s in splits.items() if s.num_chunks < batch]


def train_from_config(cfg: ml_collections.ConfigDict) -> Tokenizer:
    """Train on the config's train split and write to the config's tokenizer path (while
    no other job prepares the data dir)."""
    with prepare_lock.preparing(cfg.data.data_dir):
        builder = builders.prepare_builder(cfg)
        prepare_lock.hold(cfg.data.data_dir)
        texts = builders.iter_texts(builder, cfg.data.train_split, cfg.data.text_field)
        return train_tokenizer(texts, artefacts.tokenizer_path(cfg), cfg.model.vocab_size,
                               nfkc=cfg.data.nfkc)


def train_and_measure(cfg: ml_collections.ConfigDict) -> dict:
    """(Re)train the config's tokenizer; with its held-out stats on the eval split when the
    dataset has one: {"tokenizer", "seconds", "held_out": {...} | None}."""
    t0 = time.time()
    tok = train_from_config(cfg)
    out = {"tokenizer": tok, "seconds": time.time() - t0, "held_out": None}
    builder = builders.prepare_builder(cfg)
    if cfg.data.eval_split in builder.info.splits:
        out["held_out"] = held_out_stats(tok, builders.iter_texts(builder, cfg.data.eval_split,
                                                                  cfg.data.text_field))
    return out


def has_split(cfg: ml_collections.ConfigDict, split: str) -> bool:
    """Whether the corpus's split is tokenized (for this tokenizer and seq_len)."""
    return tokenized.read_meta(artefacts.chunks_dir(cfg) / split) is not None


def open_chunks(cfg: ml_collections.ConfigDict, split: str) -> tokenized.Chunks:
    path = artefacts.chunks_dir(cfg) / split
    if tokenized.read_meta(path) is None:
        raise DataError(f"split {split!r} of {cfg.data.dataset!r} is not tokenized for this "
                        f"tokenizer and seq_len ({tokenized.meta_path(path)} missing)",
                        "run `python -m gopher_jax data prepare --config ...` (it skips splits "
                        "the dataset lacks: check data.eval_split / test_split)")
    chunks = tokenized.Chunks(path)
    if chunks.seq_len != cfg.data.seq_len:
        raise DataError(f"{path} has seq_len {chunks.seq_len}, config {cfg.data.seq_len}",
                        "run `python -m gopher_jax data prepare --config ...` again")
    return chunks


# ---------------------------------------------------------------------------------------
# Training batches


class TrainData(rows_lib.RowBatches):
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
            raise DataError(f"split {self.split!r} of {cfg.data.dataset!r} has no chunks",
                            "add text to the corpus, or train on another split")
        self.batch_size: int = cfg.train.batch_size
        self.seq_len: int = cfg.data.seq_len
        self.seed: int = cfg.seed
        self.order = grain.MapDataset.range(self.num_chunks).seed(self.seed).shuffle().repeat()

    def global_indices(self, step: int, rows: Sequence[int] | None = None) -> np.ndarray:
        """The chunk index of every row (or of `rows`) of the global batch at `step`."""
        start = step * self.batch_size
        return np.array([self.order[start + r] for r in self.checked_rows(rows)],
                        dtype=np.int64)

    def local_rows(self, step: int, process_index: int = 0, process_count: int = 1,
                   rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Rows `rows` of the global batch (default: process `process_index`'s contiguous
        block of `process_count`), read without touching any other row."""
        rows = self.process_rows(rows, process_index, process_count)
        return self.chunks.read(self.global_indices(step, rows))

    def consumed(self, step: int) -> dict[str, float]:
        """Per-source reading metrics; a single dataset has none (see MixtureData)."""
        del step
        return {}


# ---------------------------------------------------------------------------------------
# Evaluation


def eval_batches(cfg: ml_collections.ConfigDict, split: str, batch_size: int,
                 sharding: jax.sharding.Sharding | None = None,
                 max_batches: int = -1) -> Iterator[dict]:
    """Every chunk of `split` exactly once, in order; the last batch padded with weight-0 rows
    (`tokenized.padded_batch`).

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
    mine = (np.arange(batch_size) if sharding is None
            else rows_lib.rows_for_devices(sharding, shape))
    for b in range(num):
        index = b * batch_size + mine
        real = index < n
        local = tokenized.padded_batch(len(mine), L, pad_id)
        for key, value in chunks.read(index[real]).items():
            local[key][real] = value
        yield local if sharding is None else rows_lib.to_global(local, sharding, batch_size, L)
