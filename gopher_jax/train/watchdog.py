"""The progress watchdog: no completed step for `timeout_s` -> every thread's stack on stderr,
then the process exits with EXIT_CODE, which launchers and schedulers take as a failure (a
restarted job resumes from its newest checkpoint).

A hung collective (a dead or stopped host) leaves the other hosts waiting for ever; this is
what ends them. A Python thread does the timing and writes one error line first; as a
backstop for a hang that holds the GIL, faulthandler's own C thread dumps and exits
`BACKSTOP_S` later.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time

log = logging.getLogger(__name__)

EXIT_CODE = 3
BACKSTOP_S = 30.0


class Watchdog:
    """Armed by `start()`, fed by `beat()` whenever steps are known to have completed,
    disarmed by `stop()`. timeout_s <= 0: never fires."""

    def __init__(self, timeout_s: float, what: str = "training"):
        self.timeout_s = float(timeout_s)
        self.what = what
        self._last = time.monotonic()
        self._progress = "no step yet"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout_s > 0:
            self.beat(self._progress)
            self._thread = threading.Thread(target=self._watch, name="gopher_jax-watchdog",
                                            daemon=True)
            self._thread.start()
        return self

    def beat(self, progress: str) -> None:
        self._last = time.monotonic()
        self._progress = progress
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s + BACKSTOP_S, exit=True,
                                              file=_stderr())

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            faulthandler.cancel_dump_traceback_later()
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                self._fire(idle)

    def _fire(self, idle: float) -> None:
        # Written here, not by the CLI: this thread ends the process, no one else can.
        sys.stderr.write(f"error: {self.what} made no progress for {idle:.0f} s (last: "
                         f"{self._progress}); a host may be dead or stuck in a collective. "
                         f"Stacks of every thread follow; exiting {EXIT_CODE} so that the "
                         "job is restarted (a rerun resumes from the newest checkpoint)\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=_stderr(), all_threads=True)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(EXIT_CODE)


def _stderr():
    """A stream with a file descriptor (faulthandler writes to the fd): stderr, or the
    process's original stderr where sys.stderr was replaced (a captured output)."""
    try:
        sys.stderr.fileno()
        return sys.stderr
    except (AttributeError, OSError, ValueError):
        return sys.__stderr__
