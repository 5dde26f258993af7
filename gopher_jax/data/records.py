"""The typed records the data package hands across its seams. Each is written to disk as
the JSON its `to_json` gives (field order = the file's key order) and read back with
`from_json`, so the files keep the form they always had."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class FilterShard:
    """One shard of filtered documents: docs/<path>, its input range and counts."""

    index: int
    start: int
    stop: int
    docs_in: int
    docs_out: int
    path: str
    sha256: str


@dataclasses.dataclass(frozen=True)
class FilterManifest:
    """What `data filter` kept (manifest.json): the settings and fingerprint it depends on,
    the training split's documents and bytes in and out, what each stage removed, and the
    shards of kept documents, and the personal data redacted in them."""

    fingerprint: str
    settings: dict[str, Any]
    split: str
    docs_in: int
    bytes_in: int
    docs_out: int
    bytes_out: int
    stages: dict[str, dict[str, int]]  # stage -> {"docs_removed", "bytes_removed"}
    shards: tuple[FilterShard, ...]
    # with data.pii: {"docs_redacted", "counts": {kind: matches}} of the kept documents
    pii: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"shards": [dataclasses.asdict(s) for s in self.shards]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FilterManifest:
        return cls(**{**d, "shards": tuple(FilterShard(**s) for s in d["shards"])})


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """One prepared split: its counts, and for one corpus the fingerprint of its inputs and
    its chunk files (from <split>.json); `reused`: the chunks were already there."""

    num_chunks: int
    num_docs: int
    num_tokens: int
    num_bytes: int
    tokens_per_byte: float
    reused: bool = False
    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)
    files: tuple[dict[str, Any], ...] = ()  # {"path", "num_chunks", "sha256"} in chunk order

    @classmethod
    def from_meta(cls, meta: dict[str, Any], reused: bool) -> SplitInfo:
        """From a split's metadata file (`shards.prepare_split` writes it)."""
        return cls(num_chunks=meta["num_chunks"], num_docs=meta["num_docs"],
                   num_tokens=meta["num_tokens"], num_bytes=meta["num_bytes"],
                   tokens_per_byte=meta["tokens_per_byte"], reused=reused,
                   fingerprint=meta["fingerprint"], files=tuple(meta.get("files", ())))


@dataclasses.dataclass(frozen=True)
class PrepareInfo:
    """What `data.prepare` built: the dataset, the tokenizer (its path and short hash), where
    the chunks are, every prepared split, and warnings (a split smaller than one batch). For
    a mixture also each source's own PrepareInfo, the sources' shares of the rows and the
    mixture's fingerprint; its splits then hold the counts summed over the sources."""

    dataset: str
    tokenizer: str
    tokenizer_sha: str
    chunks_dir: str
    splits: dict[str, SplitInfo]
    warnings: tuple[str, ...] = ()
    sources: dict[str, PrepareInfo] = dataclasses.field(default_factory=dict)
    shares: dict[str, float] = dataclasses.field(default_factory=dict)
    mixture: str = ""  # the sources' names and proportions, fingerprinted
