"""The user's raw corpus files, local or on Cloud Storage (`gs://`), in the formats real
corpora ship in.

    files = list_text_files("gs://bucket/raw/*.jsonl.gz")        # sorted, ** recursive
    for key, text in file_documents(path, name, "text"): ...      # one file's documents
    fp = text_files_fingerprint(pattern, "text")                  # changes with any content

Formats, by the name's ending: `.jsonl`, `.jsonl.gz`, `.jsonl.zst` (one JSON object per
line, `text_field` holds the text; key `<name>:<line>`), `.parquet` (the `text_field`
column; key `<name>:<row>`, from 1), anything else one document per file (key `<name>`).
Files are streamed (a line or a parquet row group at a time), never read whole, so a
multi-GB shard costs one line's memory. Bytes that are not UTF-8 become U+FFFD, counted and
warned about. Cloud Storage goes through fsspec's gcsfs (`storage.configure` points it at
an emulator when STORAGE_EMULATOR_HOST is set). The fingerprint hashes each file's name,
size and CRC32C: a bucket's from the objects' metadata (nothing read), a disk's computed
from the bytes, so moving a corpus between the two keeps it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import glob as glob_lib
import gzip
import hashlib
import io
import json
import os
import posixpath
import warnings
from collections.abc import Iterator

from gopher_jax import storage
from gopher_jax.errors import DataError

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_SUFFIX = ".parquet"
_PARQUET_BATCH = 1024  # rows per read


def decode_utf8(data: bytes) -> tuple[str, int]:
    """UTF-8 with invalid sequences replaced by U+FFFD; returns (text, replacements)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        # Valid U+FFFD already in the file decode to U+FFFD too: don't count them.
        return text, text.count("\ufffd") - data.count("\ufffd".encode())


def _cannot_read(path: str, e: BaseException) -> DataError:
    return DataError(f"cannot read corpus file {path}: {getattr(e, 'strerror', None) or e}",
                     "fix its permissions or remove it from data.text_files")


def _gcs():
    storage.configure()
    import fsspec

    return fsspec.filesystem("gs")


def read_text(path: str | os.PathLike, warn: bool = True) -> str:
    """A file's text; never fails on bad UTF-8 (replaced, counted, warned about)."""
    try:
        data = storage.path(path).read_bytes()
    except OSError as e:
        raise _cannot_read(str(path), e) from e
    text, bad = decode_utf8(data)
    if bad and warn:
        _warn_bad(str(path), bad)
    return text


def _warn_bad(path: str, bad: int) -> None:
    warnings.warn(f"{path}: {bad} invalid UTF-8 byte sequence(s) replaced by U+FFFD",
                  UnicodeWarning, stacklevel=3)


def list_text_files(pattern: str) -> list[str]:
    """The files matching a local or gs:// glob, sorted (** is recursive): each real local
    file once however many symlinks lead to it, files that are not text left out (each
    named in a warning; `scan_text_files` returns them)."""
    files, skipped = scan_text_files(pattern)
    for path in skipped:
        warnings.warn(f"{path}: not text (NUL bytes or mostly invalid UTF-8); skipped",
                      UnicodeWarning, stacklevel=2)
    return files


def scan_text_files(pattern: str) -> tuple[list[str], list[str]]:
    """(the text files matching the glob, the files skipped as not text)."""
    if not pattern:
        raise DataError("data.dataset='text_files' needs data.text_files",
                        "give a glob of your files, e.g. "
                        "--config.data.text_files='/corpus/**/*.txt'")
    if storage.is_remote(pattern):
        storage.check(pattern, "data.text_files")
        fs = _gcs()
        try:
            found = fs.glob(pattern, detail=True)
        except OSError as e:
            raise DataError(f"cannot list data.text_files={pattern!r}: {e}",
                            "check the bucket's name and your access to it") from e
        objects = sorted((f"gs://{k}", v) for k, v in found.items()
                         if v.get("type") != "directory")
        texts = {p for p, v in objects if _object_is_text(p, str(v.get("generation", "")))}
        files = [p for p, _ in objects if p in texts]
        skipped = [p for p, _ in objects if p not in texts]
    else:
        found = glob_lib.glob(os.path.expanduser(pattern), recursive=True)
        real = _once_per_real_file(p for p in found if not os.path.isdir(p))
        files = sorted(p for p in real if _is_text(p))
        skipped = sorted(set(real) - set(files))
    if not files:
        raise DataError(f"no text files match data.text_files={pattern!r}"
                        + (f"; skipped as not text: {skipped[:3]}" if skipped else ""),
                        "fix the glob: use ** with a recursive pattern, quote it in the shell")
    return files, skipped


def _once_per_real_file(paths: Iterator[str]) -> list[str]:
    """One path per real file (a symlinked directory, or a loop of them, that ** walks
    through again): the one with the fewest parts, then the first in order."""
    best: dict[str, str] = {}
    for p in paths:
        key = os.path.realpath(p)
        if key not in best or (p.count(os.sep), p) < (best[key].count(os.sep), best[key]):
            best[key] = p
    return list(best.values())


TEXT_SNIFF_BYTES = 8192
MAX_INVALID_FRACTION = 0.3  # random bytes without NUL decode ~45% invalid; latin-1 prose ~5%
_NOT_SNIFFED = (".gz", ".zst", PARQUET_SUFFIX)  # compressed or columnar: their own readers


def _is_text(path: str) -> bool:
    """Judged by the first block, as git and grep do: text has no NUL byte and is mostly
    valid UTF-8."""
    try:
        with open(path, "rb") as f:
            head = f.read(TEXT_SNIFF_BYTES)
    except OSError as e:
        raise _cannot_read(path, e) from e
    return _head_is_text(path, head)


@functools.lru_cache(maxsize=1 << 16)
def _object_is_text(path: str, generation: str) -> bool:
    """`_is_text` of a bucket's object (one ranged read of its first block), memoised per
    process by its path and generation, so a bucket's corpus skips the files a disk's does."""
    if path.endswith(_NOT_SNIFFED):
        return True
    try:
        head = _gcs().cat_file(path, start=0, end=TEXT_SNIFF_BYTES)
    except OSError as e:
        raise _cannot_read(path, e) from e
    return _head_is_text(path, head)


def _head_is_text(path: str, head: bytes) -> bool:
    if path.endswith(_NOT_SNIFFED):
        return True
    _, bad = decode_utf8(head[:-4] if len(head) == TEXT_SNIFF_BYTES else head)
    return b"\0" not in head and bad <= MAX_INVALID_FRACTION * max(len(head), 1)


def doc_names(files: list[str]) -> list[str]:
    """Names relative to the files' common directory, so moving the corpus (also between a
    disk and a bucket) keeps the names, and with them the splits."""
    if all(storage.is_remote(f) for f in files):
        plain = [f.split("://", 1)[1] for f in files]
        root = posixpath.commonpath([posixpath.dirname(f) for f in plain])
        return [posixpath.relpath(f, root) for f in plain]
    root = os.path.commonpath([os.path.abspath(os.path.dirname(f)) for f in files])
    return [os.path.relpath(os.path.abspath(f), root) for f in files]


@contextlib.contextmanager
def _open_binary(path: str) -> Iterator[io.BufferedIOBase]:
    """The file's decompressed bytes (.gz, .zst by name), streamed."""
    try:
        raw = _gcs().open(path, "rb") if storage.is_remote(path) else open(path, "rb")
    except OSError as e:
        raise _cannot_read(path, e) from e
    with raw:
        if path.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as f:
                yield f
        elif path.endswith(".zst"):
            import zstandard

            with zstandard.ZstdDecompressor().stream_reader(raw) as z:
                yield io.BufferedReader(z)
        else:
            yield raw


def _jsonl_documents(path: str, name: str, text_field: str,
                     warn: bool) -> Iterator[tuple[str, str]]:
    bad = 0
    with _open_binary(path) as f:
        try:
            for i, raw in enumerate(f):
                line, b = decode_utf8(raw[:-1] if raw.endswith(b"\n") else raw)
                bad += b
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i + 1}: not valid JSON ({e.msg})",
                                    "make each line of a .jsonl file one JSON object") from e
                if not isinstance(record, dict) or text_field not in record:
                    raise DataError(f"{path}:{i + 1}: no {text_field!r} key",
                                    "set data.text_field to the key that holds the text")
                doc = record[text_field]
                if not isinstance(doc, str):
                    raise DataError(f"{path}:{i + 1}: {text_field!r} is "
                                    f"{type(doc).__name__}, not text",
                                    "set data.text_field to the key that holds the text")
                if doc:
                    yield f"{name}:{i + 1}", doc
        except (OSError, EOFError) as e:  # a truncated .gz/.zst or a lost connection
            raise _cannot_read(path, e) from e
    if bad and warn:
        _warn_bad(path, bad)


def _parquet_documents(path: str, name: str, text_field: str) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    with _open_binary(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # pyarrow's own error types: not a parquet file
            raise DataError(f"{path}: not a parquet file ({e})",
                            "remove it from data.text_files") from e
        if text_field not in pf.schema_arrow.names:
            raise DataError(f"{path}: no column {text_field!r} (it has "
                            f"{pf.schema_arrow.names})", "set data.text_field to the column "
                            "that holds the text")
        row = 0
        for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=[text_field]):
            for doc in batch.column(0).to_pylist():
                row += 1
                if doc is not None and not isinstance(doc, str):
                    raise DataError(f"{path} row {row}: {text_field!r} is "
                                    f"{type(doc).__name__}, not text",
                                    "set data.text_field to a column that holds text")
                if doc:
                    yield f"{name}:{row}", doc


def file_documents(path: str, name: str, text_field: str,
                   warn: bool = True) -> Iterator[tuple[str, str]]:
    """(key, text) for each non-empty document of one file (the module docstring says how
    each format is read)."""
    if path.endswith(JSONL_SUFFIXES):
        yield from _jsonl_documents(path, name, text_field, warn)
    elif path.endswith(PARQUET_SUFFIX):
        yield from _parquet_documents(path, name, text_field)
    else:
        text = read_text(path, warn=warn)
        if text:
            yield name, text


def text_files_fingerprint(pattern: str, text_field: str) -> str:
    """A hash of the files' names, sizes and CRC32C checksums: changes when a file is added,
    removed, renamed or edited, and is the same for the same files on a disk and in a bucket
    (names are relative to the files' common folder; GCS keeps each object's CRC32C, a disk's
    is computed by reading the file once per process)."""
    files = list_text_files(pattern)
    return _digest(text_field, files, [_size_and_crc32c(f) for f in files])


def legacy_text_files_fingerprint(pattern: str, text_field: str) -> str | None:
    """What `text_files_fingerprint` was for a local corpus before it hashed CRC32C (the
    files' names, sizes and bytes): the name of data prepared from those files then. None
    for a bucket's corpus, whose fingerprint it always was."""
    if storage.is_remote(pattern):
        return None
    files = list_text_files(pattern)
    return _legacy_digest(text_field, tuple((f, *_stat_key(f)) for f in files))


def _digest(text_field: str, files: list[str], sums: list[tuple[int, str]]) -> str:
    m = hashlib.sha256(text_field.encode())
    for name, (size, crc) in zip(doc_names(files), sums, strict=True):
        m.update(f"{name}\0{size}\0crc32c:{crc}\0".encode())
    return m.hexdigest()[:12]


def _size_and_crc32c(path: str) -> tuple[int, str]:
    """(size, CRC32C as GCS's metadata writes it: base64 of the 4 big-endian bytes)."""
    if not storage.is_remote(path):
        return _local_crc32c(path, *_stat_key(path))
    try:
        info = _gcs().info(path)
    except OSError as e:
        raise _cannot_read(path, e) from e
    crc = info.get("crc32c")
    if not crc:  # not kept for this object: computed from its bytes, as for a disk's
        crc = _stream_crc32c(path)
    return int(info["size"]), str(crc)


def _stat_key(path: str) -> tuple[int, int, int]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise _cannot_read(path, e) from e
    return st.st_size, st.st_mtime_ns, st.st_ino


@functools.lru_cache(maxsize=1 << 16)
def _local_crc32c(path: str, size: int, mtime_ns: int, ino: int) -> tuple[int, str]:
    """Memoised per process by the file's (path, size, mtime, inode): one read per run."""
    return size, _stream_crc32c(path)


def _stream_crc32c(path: str) -> str:
    import google_crc32c

    crc = 0
    try:
        with _gcs().open(path, "rb") if storage.is_remote(path) else open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                crc = google_crc32c.extend(crc, block)
    except OSError as e:
        raise _cannot_read(path, e) from e
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


@functools.lru_cache(maxsize=16)
def _legacy_digest(text_field: str, stats: tuple[tuple[str, int, int, int], ...]) -> str:
    """Memoised per process by the files' (path, size, mtime, inode)."""
    m = hashlib.sha256(text_field.encode())
    for (f, size, *_), name in zip(stats, doc_names([s[0] for s in stats]), strict=True):
        m.update(f"{name}\0{size}\0".encode())
        try:
            with open(f, "rb") as fh:
                while block := fh.read(1 << 20):
                    m.update(block)
        except OSError as e:
            raise _cannot_read(f, e) from e
    return m.hexdigest()[:12]
