"""What a config trains on: one corpus, or a weighted mixture of sources (data.sources).

`is_mixture` is the one place that tells the two cases apart; everything else asks it. A
source is a corpus plus a weight; `corpus_config` is the single-corpus config that reads one
source. Weights become grain's integer proportions (`proportions`), and the shares the
metrics and fingerprints report are those proportions' (`shares`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence

import ml_collections

from gopher_jax.data import builders, digests
from gopher_jax.errors import DataError

# Bump when the tokenizer's training sample is drawn differently: new tokenizer files.
SAMPLE_VERSION = 1
PROPORTION_SCALE = 100  # the smallest weight's integer proportion (grain's own scale)


@dataclasses.dataclass(frozen=True)
class Source:
    name: str
    dataset: str
    text_files: str
    text_field: str
    weight: float
    filter: bool = False  # its training split goes through the filter stage (corpus_filter)


def is_mixture(cfg: ml_collections.ConfigDict) -> bool:
    """Whether data.sources names a mixture (else data.dataset is the one corpus)."""
    return bool(cfg.data.get("sources"))


def sources(cfg: ml_collections.ConfigDict) -> list[Source]:
    """The config's sources sorted by name: the order does not depend on how they were written."""
    out = [Source(name, s["dataset"], s["text_files"], s["text_field"], float(s["weight"]),
                  bool(s.get("filter", False)) or bool(cfg.data.get("filter", False)))
           for name, s in (cfg.data.get("sources") or {}).items()]
    return sorted(out, key=lambda s: s.name)


def proportions(weights: Sequence[float]) -> tuple[int, ...]:
    """Integer proportions for grain's mix, the smallest weight scaled to PROPORTION_SCALE.

    grain itself scales the smallest proportion to 100 and truncates (0.6 / 0.2 * 100 can
    give 299); integers whose smallest is exactly 100 pass through it unchanged."""
    low = min(weights)
    q = [max(PROPORTION_SCALE, round(PROPORTION_SCALE * w / low)) for w in weights]
    return tuple(PROPORTION_SCALE if w == low else v for w, v in zip(weights, q, strict=True))


def shares(cfg: ml_collections.ConfigDict) -> dict[str, float]:
    """Each source's effective share of the rows."""
    srcs = sources(cfg)
    q = proportions([s.weight for s in srcs])
    return {s.name: p / sum(q) for s, p in zip(srcs, q, strict=True)}


def source_seed(seed: int, name: str) -> int:
    """The seed of a source's shuffle: differs between sources, fits grain's 32 bits."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "big")


def corpus_config(cfg: ml_collections.ConfigDict, src: Source, tokenizer_path: str | None = None
                  ) -> ml_collections.ConfigDict:
    """A single-corpus config for one source: its dataset, its shuffle seed and, when given,
    `tokenizer_path` (the mixture's shared tokenizer); every other setting (model, seq_len,
    splits, batch) is cfg's."""
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.data.update(dataset=src.dataset, text_files=src.text_files, text_field=src.text_field)
    if "filter" in c.data:
        c.data.filter = src.filter
    c.data.sources = ml_collections.ConfigDict()  # update() would merge into the old one
    if tokenizer_path is not None:
        c.data.tokenizer_path = tokenizer_path
    c.seed = source_seed(cfg.seed, src.name)
    return c


def check_files(srcs: Sequence[Source]) -> None:
    """Every text_files source matches files: else one line naming the source."""
    for s in srcs:
        if s.dataset == "text_files":
            try:
                builders.list_text_files(s.text_files)
            except DataError:
                raise DataError(f"source {s.name!r}: no files match {s.text_files!r}",
                                f"point --config.data.sources.{s.name}.text_files at its "
                                "files (a quoted glob; ** is recursive)") from None


def mixture_fingerprint(cfg: ml_collections.ConfigDict) -> str:
    """The sources' names and proportions (what a resume must not change)."""
    srcs = sources(cfg)
    return digests.digest([[s.name for s in srcs], proportions([s.weight for s in srcs])])
