"""A split tokenized once into fixed-length packed chunks, stored as ArrayRecord.

Format (the contract with the loss): the split's documents are concatenated, each encoded
as [eos] + encode(doc), so EOS *starts* a document and every real token is predicted from
its own document. Chunk k is tokens[k*L : k*L + L + 1] (neighbours share one token, so every
token but the split's first is a target exactly once). segment_ids number the documents
1, 2, 3... within each chunk; 0 marks padding (only in the last chunk). The loss weight of
target j is `target_weights(tokens, segment_ids)` (EOS, which has no bytes, is a target
too); num_bytes[k] is the UTF-8 bytes of chunk k's
weighted targets, so it sums to the split's byte count (with an NFKC tokenizer: the byte
count of the normalised text, which is what the model sees; `num_text_bytes` has the raw one).

One record = int32 [tokens (L+1), segment_ids (L+1), num_bytes (1)], raw little-endian.

Files: `<split>.json` (the metadata, written last) lists the split's ArrayRecord files in
chunk order, `<split>/chunks-<k>.array_record` (written by shards.py); a metadata file that
names one `path` instead of `files` (one `<split>.array_record`) is read the same way.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from gopher_jax import storage
from gopher_jax.data import digests
from gopher_jax.data.tokenizer import EOS_ID
from gopher_jax.errors import DataError

FORMAT_VERSION = 1
# One record per group: random access reads one chunk, not a block of them.
WRITER_OPTIONS = "group_size:1"
ENCODE_BATCH = 256  # documents per SentencePiece call


def target_weights(tokens, segment_ids, eos_id: int = EOS_ID):
    """Which targets (tokens[..., 1:]) count, for numpy or jax arrays: those in their input's
    document, and the EOS that opens the next document (predicted from the end of the previous
    one, so the model learns where documents end; its input never sees the next document).
    Padding (segment 0) never counts."""
    s, t = segment_ids, tokens
    return ((s[..., 1:] == s[..., :-1]) | (t[..., 1:] == eos_id)) & (s[..., 1:] != 0)


class ChunkPacker:
    """Streams documents' token ids into packed chunks (see the module docstring)."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int, piece_bytes: np.ndarray):
        self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
        self.piece_bytes = np.asarray(piece_bytes, dtype=np.int64)
        self._tokens = np.zeros(0, np.int32)
        self._docs = np.zeros(0, np.int64)
        self.num_docs = 0
        self.num_tokens = 0  # including the EOS that starts each document

    def add(self, docs: Sequence[Sequence[int]]) -> np.ndarray:
        """Add documents; returns the records [n, 2*(L+1)+1] that are now complete."""
        if not docs:
            return np.zeros((0, 2 * self.seq_len + 3), np.int32)
        lens = np.array([len(d) + 1 for d in docs])
        flat = np.concatenate([np.array([self.eos_id] + list(d), np.int32) for d in docs])
        return self.add_flat(flat, lens)

    def add_flat(self, flat: np.ndarray, lens: np.ndarray) -> np.ndarray:
        """`add` for documents already encoded as [eos] + ids and concatenated: `flat` [T]
        int32, `lens` [docs] (each document's length with its EOS)."""
        if len(lens) == 0:
            return np.zeros((0, 2 * self.seq_len + 3), np.int32)
        flat = np.asarray(flat, np.int32)
        ids = np.repeat(np.arange(self.num_docs, self.num_docs + len(lens)), lens)
        self.num_docs += len(lens)
        self.num_tokens += len(flat)
        self._tokens = np.concatenate([self._tokens, flat])
        self._docs = np.concatenate([self._docs, ids])
        return self._emit(final=False)

    def finish(self) -> np.ndarray:
        return self._emit(final=True)

    def _emit(self, final: bool) -> np.ndarray:
        L = self.seq_len
        tok, doc = self._tokens, self._docs
        n = (len(tok) - 1) // L if len(tok) > 1 else 0
        if final and len(tok) - n * L > 1:  # a last, partial chunk: pad it
            pad = (n + 1) * L + 1 - len(tok)
            tok = np.concatenate([tok, np.full(pad, self.pad_id, np.int32)])
            doc = np.concatenate([doc, np.full(pad, -1, np.int64)])
            n += 1
        if n == 0:
            return np.zeros((0, 2 * L + 3), np.int32)
        window = np.lib.stride_tricks.sliding_window_view
        t = window(tok[: n * L + 1], L + 1)[::L]
        d = window(doc[: n * L + 1], L + 1)[::L]
        seg = np.where(d >= 0, d - d[:, :1] + 1, 0).astype(np.int32)
        nbytes = (self.piece_bytes[t[:, 1:]] * target_weights(t, seg)).sum(axis=1)
        self._tokens, self._docs = tok[n * L:], doc[n * L:]
        if final:
            self._tokens, self._docs = self._tokens[:0], self._docs[:0]
        return np.concatenate([t, seg, nbytes[:, None].astype(np.int32)], axis=1)


def decode_records(records: Sequence[bytes], seq_len: int) -> dict[str, np.ndarray]:
    a = np.frombuffer(b"".join(records), dtype="<i4").reshape(len(records), 2 * seq_len + 3)
    return {"tokens": a[:, : seq_len + 1].astype(np.int32),
            "segment_ids": a[:, seq_len + 1: 2 * seq_len + 2].astype(np.int32),
            "num_bytes": a[:, -1].astype(np.int32)}


def batch_shapes(batch_size: int, seq_len: int) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of each array of a batch of `batch_size` chunks, as `decode_records`
    returns them."""
    rows = (batch_size, seq_len + 1)
    i32 = np.dtype(np.int32)
    return {"tokens": (rows, i32), "segment_ids": (rows, i32), "num_bytes": ((batch_size,), i32)}


def padded_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """A batch of `batch_size` padding rows (pad tokens, segment 0, no bytes: weight 0), for
    a last batch that real chunks fill only in part."""
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in
           batch_shapes(batch_size, seq_len).items()}
    out["tokens"][:] = pad_id
    return out


def meta_path(path: str | os.PathLike) -> pathlib.Path:
    """The metadata file of the split whose chunks are under `path` (<folder>/<split>)."""
    return storage.data_path(path).with_suffix(".json")


def write_records(path: pathlib.Path, records: np.ndarray) -> str:
    """Records [n, 2*(L+1)+1] as one ArrayRecord file; returns its SHA-256 (16 digits).
    ArrayRecord writes local files only: it writes a temporary file that is renamed, or on
    Cloud Storage uploaded as one object (storage.local_file), so no reader sees a part."""
    try:
        with storage.local_file(path) as tmp:
            writer = ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
            try:
                for r in records:
                    writer.write(r.astype("<i4").tobytes())
            except BaseException:
                with contextlib.suppress(Exception):
                    writer.close()
                raise
            writer.close()
            sha = digests.file_sha(tmp)
        return sha
    except BaseException as e:
        if isinstance(e, RuntimeError | OSError):  # array_record reports I/O as RuntimeError
            raise DataError(f"writing token chunks to {path.parent} failed: {e}",
                            "free space or choose another data.data_dir, then run again"
                            ) from None
        raise


def read_meta(path: str | os.PathLike) -> dict | None:
    meta = meta_path(path)
    if not meta.is_file():
        return None
    return storage.read_json(meta, "delete it, then `python -m gopher_jax data prepare "
                             "--config ...` rebuilds the split")


def chunk_files(path: str | os.PathLike, meta: dict) -> list[str]:
    """The split's ArrayRecord files in chunk order: `files` (sharded, relative to the
    folder `<path>/`, in shard order), or the one file a metadata `path` names."""
    if "files" in meta:
        folder = storage.data_path(path)
        return [str(folder / f["path"]) for f in meta["files"]]
    return [meta["path"]]


class Chunks:
    """Random access to one tokenized split: chunk i of the split is record i of its files
    taken in their listed (shard) order."""

    def __init__(self, path: str | os.PathLike):
        self.meta = read_meta(path)
        if self.meta is None:
            raise DataError(f"no tokenized chunks at {meta_path(path)}",
                            "run `python -m gopher_jax data prepare --config ...`")
        self.seq_len: int = self.meta["seq_len"]
        self.files = chunk_files(path, self.meta)
        import grain  # readers only: the preparation's writers need no grain (orbax, JAX)

        self.source = grain.sources.ArrayRecordDataSource(self.files)
        if len(self.source) != self.meta["num_chunks"]:
            raise DataError(f"{storage.data_path(path).parent} holds {len(self.source)} chunks "
                            f"for {storage.data_path(path).name}, its metadata says "
                            f"{self.meta['num_chunks']}", "run `data prepare` again")

    def __len__(self) -> int:
        return self.meta["num_chunks"]

    def read(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
        records = self.source.__getitems__([int(i) for i in indices]) if len(indices) else []
        return decode_records(records, self.seq_len)
