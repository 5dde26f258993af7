"""Where runs live: local paths or Cloud Storage (`gs://`), through one layer (etils.epath).

epath reaches gs:// through gcsfs; Orbax writes checkpoints there through tensorstore. Both
talk to a GCS-API emulator instead of Google when STORAGE_EMULATOR_HOST=http://host:port is
set (the variable Google's own clients read): `configure()` derives the other libraries'
settings from it, so users and tests set that one variable.

A data dir may be a bucket too. Readers go straight to it (ArrayRecord reads gs:// objects
itself, the rest goes through epath). Writers that only write local files (ArrayRecord, TFDS's
builders) write into a local temporary folder that is then uploaded (`local_file`,
`upload_tree`): a Cloud Storage object appears whole when its upload is finalised or not at
all, and a set of objects is uploaded with the file that marks it finished last.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from etils import epath

from gopher_jax.errors import UsageError, UserError

REMOTE_SCHEMES = ("gs",)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme(p: str | os.PathLike) -> str | None:
    m = _SCHEME.match(str(p))
    return m.group(1).lower() if m else None


def is_remote(p: str | os.PathLike) -> bool:
    return scheme(p) is not None


def check(p: str | os.PathLike, what: str) -> None:
    """Refuses a path whose scheme nothing here can read and write (before any work)."""
    s = scheme(p)
    if s is not None and s not in REMOTE_SCHEMES:
        raise UsageError(f"{what} {p}: the {s}:// scheme is not supported",
                         "use a local path or gs://BUCKET/...")


def path(p: str | os.PathLike) -> epath.Path:
    """An epath for a local (made absolute) or gs:// path; never a local dir named 'gs:'."""
    if is_remote(p):
        check(p, "path")
        return epath.Path(str(p))
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(p))))


def data_path(p: str | os.PathLike) -> pathlib.Path | epath.Path:
    """A path of a data dir: on a file system a pathlib.Path as given (~ expanded), on Cloud
    Storage an epath; both have the methods data/ uses (/, open, read_bytes, is_file, glob,
    iterdir, mkdir, unlink)."""
    if is_remote(p):
        return path(p)
    return pathlib.Path(os.path.expanduser(os.fspath(p)))


def _gcs_fs():
    import fsspec

    return fsspec.filesystem("gs")


def read_range(p: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: one ranged request on Cloud Storage (a file object
    there would fetch a whole read-ahead block per seek)."""
    if is_remote(p):
        return _gcs_fs().cat_file(str(p), start=start, end=end)
    with open(p, "rb") as f:
        f.seek(start)
        return f.read(end - start)


def upload(local: str | os.PathLike, remote: str | os.PathLike) -> None:
    """One local file as one object; it appears whole once the upload is finalised, never in
    part (a killed upload leaves nothing)."""
    _gcs_fs().put_file(os.fspath(local), str(remote))


def upload_tree(local: str | os.PathLike, remote: str | os.PathLike,
                last: Sequence[str] = ()) -> None:
    """Every file below the local folder to the same names below `remote`, the files named
    in `last` (names in the folder itself, the ones that mark the set finished) after all
    the others, in that order: a reader that checks for them never sees a part."""
    local = pathlib.Path(local)
    marks = [local / name for name in last]
    files = sorted(p for p in local.rglob("*") if p.is_file() and p not in marks)
    for p in files + [m for m in marks if m.is_file()]:
        upload(p, f"{str(remote).rstrip('/')}/{p.relative_to(local).as_posix()}")


@contextlib.contextmanager
def local_file(p: str | os.PathLike) -> Iterator[pathlib.Path]:
    """A local path for a writer that cannot stream to `p`'s place (ArrayRecord): written
    there, it is moved into place once the block succeeds (a rename on a file system, one
    upload to Cloud Storage); a failed or killed write leaves nothing at `p`."""
    if is_remote(p):
        tmp_dir = tempfile.mkdtemp(prefix="gopher_jax_upload")
        try:
            tmp = pathlib.Path(tmp_dir) / pathlib.PurePosixPath(str(p)).name
            yield tmp
            upload(tmp, p)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    p = pathlib.Path(p)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def configure() -> None:
    """Settings for the Cloud Storage clients; call before gcsfs is imported.

    Listings are never cached (another process's new checkpoint or lock must be seen). With
    STORAGE_EMULATOR_HOST set, tensorstore (Orbax), array_record and gcsfs all go to that
    emulator, anonymously, and nothing asks a metadata server for credentials.
    """
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    os.environ.setdefault("FSSPEC_GCS_USE_LISTINGS_CACHE", "false")
    url = os.environ.get("STORAGE_EMULATOR_HOST")
    if url:
        if "://" not in url:
            url = f"http://{url}"
        os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        os.environ.setdefault("CLOUD_STORAGE_EMULATOR_ENDPOINT", url)
        os.environ.setdefault("FSSPEC_GCS_TOKEN", "anon")
        os.environ.setdefault("NO_GCE_CHECK", "true")
        for key in ("GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"):
            os.environ.setdefault(key, "127.0.0.1:1")  # no metadata server: fail fast
    import fsspec.config

    gcs = fsspec.config.conf.setdefault("gcs", {})
    gcs.setdefault("use_listings_cache", False)
    if url:
        gcs.setdefault("token", "anon")


def create_exclusive(p: epath.Path, text: str) -> bool:
    """Writes `text` to a new file at `p`; False when one is already there. Atomic: on a
    file system through O_EXCL, on Cloud Storage through a create-only precondition
    (ifGenerationMatch=0)."""
    if is_remote(p):
        import fsspec

        fs = fsspec.filesystem("gs")
        try:
            fs.pipe_file(str(p), text.encode(), mode="create")
        except FileExistsError:
            return False
        return True
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def write_atomic(p: str | os.PathLike, data: str | bytes) -> None:
    """Writes a whole file so that readers see the old or the new content, never a part; a
    failed write (a full disk) leaves no temporary file behind. On Cloud Storage one upload
    is that already (an object appears whole or not at all)."""
    p = path(p)
    if is_remote(p):
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return
    tmp = p.parent / f".{p.name}.tmp{os.getpid()}"
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
        tmp.replace(p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_json(p: str | os.PathLike, fix: str = "") -> Any:
    """A JSON file a run wrote (a workdir's or a data dir's); a damaged one (half-written,
    hand-edited, not UTF-8) is one UserError naming the file and the line, with `fix`."""
    import json

    text = path(p).read_bytes()
    fix = fix or "restore the file, or delete it to have it rebuilt where it can be"
    try:
        return json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UserError(f"{p} is not UTF-8 text (byte {e.start})", fix) from e
    except json.JSONDecodeError as e:
        raise UserError(f"{p} line {e.lineno} column {e.colno} is not valid JSON ({e.msg})",
                        fix) from e


def append_text(p: epath.Path, text: str) -> None:
    """Appends to a file; Cloud Storage objects cannot grow, so there the file is rewritten
    (fine for metrics: one small row per logging step)."""
    if is_remote(p):
        old = p.read_text() if p.exists() else ""
        p.write_text(old + text)
        return
    with open(p, "a") as f:
        f.write(text)


def tree_bytes(p: epath.Path) -> int:
    """Bytes of all files below `p`."""
    if is_remote(p):
        import fsspec

        return int(fsspec.filesystem("gs").du(str(p)))
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(p) for f in files)
