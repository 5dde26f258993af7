"""The data API: what training, evaluation, tasks and the CLI call.

    info = data.prepare(cfg, log=print)          # datasets, tokenizer, chunks (idempotent)
    batches = data.train_data(cfg)               # a Batches: .batch(step, sharding)
    ids = data.data_identity(info, cfg.data.train_split)   # fingerprints a checkpoint keeps
    for b in data.eval_batches(cfg, split, 16): ...        # one corpus's split, in order

Whether the config trains on one corpus (pipeline.py) or a weighted mixture of sources
(mixture.py) is one predicate, `sources.is_mixture`, asked here once per call (and by
artefacts.corpus_name, which names a mixture's files); nothing else reads data.sources to
decide it. The layers, each importing only those under it:

    __init__ (this API)
    mixture          a mixture's preparation, batches and combined results
    pipeline         one corpus: preparation, chunks, TrainData, eval batches
    engine           the same preparation as datatrove executor stages (dedup_sharded)
    corpus_filter    the MassiveText filter stage (filters, dedup)
    shards           sharded, resumable, parallel tokenization
    artefacts        the names of every file and folder of a data dir
    prepare_lock     one preparation at a time per data dir (the others wait, then reuse)
    sources          sources and weights (mixture or not)
    builders, readers, tokenizer, tokenized, rows, digests, records    leaves: TFDS
                     builders and raw files, SentencePiece, the chunk format, batch rows per
                     process, short hashes, the typed records handed between the layers
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import ml_collections
import numpy as np

from gopher_jax.data.records import PrepareInfo, SplitInfo
from gopher_jax.data.sources import is_mixture
from gopher_jax.errors import DataError

if TYPE_CHECKING:
    import jax

    from gopher_jax.data.tokenizer import Tokenizer

# mixture and pipeline (grain, JAX) are imported by the functions below, not here: the
# preparation's workers (engine.py) import this package and need neither.

__all__ = ["Batches", "PrepareInfo", "SplitInfo", "data_identity", "eval_batches",
           "is_mixture", "load_tokenizer", "prepare", "train_data"]


@runtime_checkable
class Batches(Protocol):
    """Training batches whose order is a pure function of (seed, step): `TrainData` (one
    corpus) and `MixtureData` (a mixture)."""

    split: str
    num_chunks: int
    batch_size: int
    seq_len: int
    seed: int

    @property
    def shape(self) -> tuple[int, int]: ...

    def local_rows(self, step: int, process_index: int = 0, process_count: int = 1,
                   rows: Sequence[int] | None = None) -> dict[str, np.ndarray]: ...

    def batch(self, step: int, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]: ...

    def consumed(self, step: int) -> dict[str, float]: ...


def prepare(cfg: ml_collections.ConfigDict, log: Callable[[str], None] | None = None,
            processes: int = 1, engine=None) -> PrepareInfo:
    """Everything training reads, built once (`pipeline.prepare`, or `mixture.prepare` for
    data.sources)."""
    if is_mixture(cfg):
        from gopher_jax.data import mixture

        return mixture.prepare(cfg, log, processes=processes, engine=engine)
    from gopher_jax.data import pipeline

    return pipeline.prepare(cfg, log, processes=processes, engine=engine)


def train_data(cfg: ml_collections.ConfigDict, split: str | None = None) -> Batches:
    """The training batches of the config (default: its train split)."""
    from gopher_jax.data import mixture, pipeline

    if is_mixture(cfg):
        return mixture.MixtureData(cfg, split)
    return pipeline.TrainData(cfg, split)


def data_identity(info: PrepareInfo, train_split: str) -> dict[str, str]:
    """Content fingerprints of what training reads, from `prepare`'s result: a resume onto
    other data is refused by name."""
    from gopher_jax.data import mixture, pipeline

    if info.sources:
        return mixture.data_identity(info, train_split)
    return pipeline.data_identity(info, train_split)


def eval_batches(cfg: ml_collections.ConfigDict, split: str, batch_size: int,
                 sharding: jax.sharding.Sharding | None = None,
                 max_batches: int = -1) -> Iterator[dict]:
    """Every chunk of one corpus's `split` once, in order (`pipeline.eval_batches`). A
    mixture is evaluated source by source (evaluate.py): each has its own chunks."""
    if is_mixture(cfg):
        raise DataError("a mixture has one chunk set per source",
                        "evaluate each source's config (mixture.source_config)")
    from gopher_jax.data import pipeline

    return pipeline.eval_batches(cfg, split, batch_size, sharding, max_batches)


def load_tokenizer(cfg: ml_collections.ConfigDict) -> Tokenizer:
    """The config's tokenizer (one corpus's or a mixture's shared one)."""
    from gopher_jax.data import pipeline

    return pipeline.load_tokenizer(cfg)
