"""One preparation at a time per data dir, so that two jobs preparing one (shared) data dir
at once end with the files one preparation writes.

    with prepare_lock.preparing(data_dir, log):      # nested calls share one session
        if not artefact_is_there():
            prepare_lock.hold(data_dir)               # waits while another job prepares
            if not artefact_is_there():               # it may have been written meanwhile
                write_it()

A writer takes the lock `<data_dir>/PREPARE_LOCK` (the workdir lease of
checkpoint/lock.py: create-only on a file system and on Cloud Storage, renewed, taken over
when its holder died) only when it is about to write, and holds it until its outermost
session ends; the other job waits, then finds the artefacts written and reuses them.
Reading needs no lock: every artefact is published whole (a rename, or one Cloud Storage
upload) and a split's metadata, which says it is complete, last, so a job that finds
everything prepared (every host of a multi-host run) never waits or writes.

Why a lock and not atomic renames alone: those keep every single file whole, but two
preparations at once would still do all the work twice, and they clean up after killed
runs (temporary files, shards of other settings) in folders where the other one is
writing; TFDS's build of one dataset twice at once fails on its final rename.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator

from gopher_jax import storage

LOCK_NAME = "PREPARE_LOCK"
_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


class _Session:
    def __init__(self, log: Callable[[str], None]):
        self.log, self.depth, self.lock = log, 0, None


_sessions: dict[tuple[str, int], _Session] = {}  # (data dir, thread): this thread's session


def _key(data_dir: str | os.PathLike) -> tuple[str, int]:
    return str(storage.path(data_dir)), threading.get_ident()


@contextlib.contextmanager
def preparing(data_dir: str | os.PathLike,
              log: Callable[[str], None] | None = None) -> Iterator[None]:
    """A preparation of `data_dir` by this thread; sessions nest (the lock a nested one
    takes is released when the outermost ends)."""
    key = _key(data_dir)
    session = _sessions.setdefault(key, _Session(log or (lambda msg: None)))
    session.depth += 1
    try:
        yield
    finally:
        session.depth -= 1
        if session.depth == 0:
            del _sessions[key]
            if session.lock is not None:
                session.lock.release()


def hold(data_dir: str | os.PathLike) -> None:
    """Before writing to `data_dir` inside `preparing(data_dir)`: takes its lock unless this
    session holds it, waiting while another job's preparation holds it. The caller then
    checks again whether what it is about to write is there. A data dir that cannot be
    written (read-only) is not locked: the write itself fails with its own message."""
    session = _sessions.get(_key(data_dir))
    if session is None:
        raise RuntimeError(f"prepare_lock.hold({data_dir!r}) outside preparing()")
    if session.lock is not None:
        return
    from gopher_jax.checkpoint.lock import WorkdirLock  # orbax: only when writing

    def waiting(holder) -> None:
        who = holder.describe(time.time()) if holder is not None else "unknown holder"
        session.log(f"[data] waiting: another job is preparing {data_dir} ({who})")

    lock = WorkdirLock(data_dir, name=LOCK_NAME)
    try:
        session.lock = lock.acquire_waiting(on_wait=waiting)
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
