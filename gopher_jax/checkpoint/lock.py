"""One writer per workdir: a lease held in <workdir>/LOCK while a run trains there.

The holder writes {host, pid, start, renewed, token} and renews `renewed` from a background
thread every lease/4 seconds. Another run refuses while the lease is live, naming the holder.
A lease is stale when its holder's process is gone (same host: the pid no longer exists) or
it was not renewed for `lease_s` seconds (any host: a killed VM); a stale lock is taken over.
In a multi-process job only process 0 holds it, for the whole job.

Written by hand: Orbax has no workdir lock, and a lease (rather than an flock) also works on
object stores where nothing is held open, and survives a killed host.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from etils import epath

from gopher_jax import storage
from gopher_jax.checkpoint.errors import CheckpointError

log = logging.getLogger(__name__)

LOCK_NAME = "LOCK"
LEASE_S = 60.0


class WorkdirLockedError(CheckpointError):
    """Another live run holds the workdir."""


@dataclasses.dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    start: float
    renewed: float
    token: str

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.start))
        return (f"host {self.host}, pid {self.pid}, started {started}, lease renewed "
                f"{now - self.renewed:.0f} s ago")


def _read(path: epath.Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError, KeyError):
        return None  # a torn or foreign file: no live holder can be named from it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


class WorkdirLock:
    """Held from `acquire()` to `release()`; also a context manager."""

    def __init__(self, workdir: str | os.PathLike, lease_s: float = LEASE_S,
                 name: str = LOCK_NAME):
        self.workdir = storage.path(workdir)
        self.name = name
        self.path = self.workdir / name
        self.lease_s = lease_s
        self.me = Holder(host=socket.gethostname(), pid=os.getpid(), start=time.time(),
                         renewed=time.time(), token=uuid.uuid4().hex)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _stale(self, other: Holder, now: float) -> bool:
        if other.host == self.me.host and not _pid_alive(other.pid):
            return True
        return now - other.renewed > self.lease_s

    def acquire(self) -> WorkdirLock:
        self.workdir.mkdir(parents=True, exist_ok=True)  # a no-op on Cloud Storage
        for _ in range(3):
            if storage.create_exclusive(self.path, self._text()):
                break
            other = _read(self.path)
            now = time.time()
            if other is not None and not self._stale(other, now):
                raise WorkdirLockedError(
                    f"workdir {self.workdir} is in use by another run ({other.describe(now)})",
                    f"wait for it to end or stop it, or use another --workdir; a lock whose "
                    f"holder died is taken over after {self.lease_s:.0f} s")
            # Stale: remove it unless it changed since it was read (a racing taker won).
            if _read(self.path) == other:
                log.warning("taking over the lock of a run that is gone (%s)",
                            other.describe(now) if other else "unreadable lock file")
                self.path.unlink(missing_ok=True)
        else:
            raise WorkdirLockedError(f"could not lock workdir {self.workdir}: the lock file "
                                     "keeps changing", "make sure one run trains there")
        self._thread = threading.Thread(target=self._renew, name="gopher_jax-lock",
                                        daemon=True)
        self._thread.start()
        return self

    def acquire_waiting(self, timeout_s: float | None = None, poll_s: float = 1.0,
                        on_wait: Callable[[Holder | None], None] | None = None
                        ) -> WorkdirLock:
        """`acquire`, waiting while another live run holds the lock (at most `timeout_s`
        seconds, None: no limit); `on_wait(holder)` is called once, when the wait begins."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                return self.acquire()
            except WorkdirLockedError:
                if deadline is not None and time.monotonic() > deadline:
                    raise
                if not waited and on_wait is not None:
                    on_wait(_read(self.path))
                waited = True
                time.sleep(poll_s)

    def _text(self) -> str:
        return json.dumps(dataclasses.asdict(self.me))

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            current = _read(self.path)
            if current is None or current.token != self.me.token:
                self.lost = True
                log.error("the lock of workdir %s was taken by another run (%s)", self.workdir,
                          current.describe(time.time()) if current else "lock file removed")
                return
            self.me = dataclasses.replace(self.me, renewed=time.time())
            try:
                tmp = self.workdir / f"{self.name}.{self.me.token}.tmp"
                tmp.write_text(self._text())
                tmp.replace(self.path)
            except OSError as e:  # a storage hiccup: the next renewal tries again
                log.warning("could not renew the lock of %s: %s", self.workdir, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            current = _read(self.path)
            if current is not None and current.token == self.me.token:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
