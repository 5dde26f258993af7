"""JAX's distributed runtime from the environment, and process-aware helpers.

Start-up, in order of precedence:
  explicit   GOPHER_COORDINATOR=host:port, GOPHER_NUM_PROCESSES, GOPHER_PROCESS_ID
             (launch/local.py and launch/slurm set them; `python -m gopher_jax --coordinator ...`
             too);
  detected   GOPHER_DISTRIBUTED=auto (launch/tpu_vm.py, launch/gke), a multi-worker GKE TPU pod
             (TPU_WORKER_HOSTNAMES lists several hosts) or a multi-task SLURM step: then
             jax.distributed.initialize() finds the coordinator itself;
  otherwise  a single process, nothing to start.
GOPHER_INIT_TIMEOUT (seconds, default 300) bounds the start-up.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import jax
from jax.experimental import multihost_utils

from gopher_jax.errors import ConfigError

T = TypeVar("T")
log = logging.getLogger(__name__)
DEFAULT_INIT_TIMEOUT_S = 300
# Extra time the clients wait beyond the coordinator's registration deadline, so the
# coordinator's report of the missing processes reaches them before their own deadline.
_CLIENT_SLACK_S = 30


def env_setting(env: dict[str, str] | None = None) -> dict[str, object] | None:
    """What initialize_from_env would do: None (single process), {'mode': 'auto'} or the
    explicit coordinator/num_processes/process_id. Raises ConfigError on a partial setting."""
    env = os.environ if env is None else env
    coord = env.get("GOPHER_COORDINATOR")
    if coord:
        missing = [k for k in ("GOPHER_NUM_PROCESSES", "GOPHER_PROCESS_ID") if k not in env]
        if missing:
            raise ConfigError(f"GOPHER_COORDINATOR={coord} is set but {missing} are not",
                              "set all three (or use launch/local.py, which does)")
        n, i = int(env["GOPHER_NUM_PROCESSES"]), int(env["GOPHER_PROCESS_ID"])
        if not 0 <= i < n:
            raise ConfigError(f"GOPHER_PROCESS_ID={i} must be in [0, GOPHER_NUM_PROCESSES={n})",
                              "number the processes 0 .. N-1")
        if ":" not in coord:
            raise ConfigError(f"GOPHER_COORDINATOR={coord} must be host:port",
                              "e.g. GOPHER_COORDINATOR=10.0.0.2:8476")
        return {"mode": "explicit", "coordinator": coord, "num_processes": n, "process_id": i}
    if env.get("GOPHER_DISTRIBUTED", "").lower() == "auto":
        return {"mode": "auto"}
    if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        return {"mode": "auto"}
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return {"mode": "auto"}
    return None


def init_timeout_s(env: dict[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    return int(env.get("GOPHER_INIT_TIMEOUT", DEFAULT_INIT_TIMEOUT_S))


def initialize_from_env() -> None:
    """Starts jax.distributed when a multi-process launch is detected (see the module doc)."""
    if jax.distributed.is_initialized():
        return
    setting = env_setting()
    if setting is None:
        return
    timeout = init_timeout_s()
    if setting["mode"] == "auto":
        with _watchdog(timeout + _CLIENT_SLACK_S, "jax.distributed.initialize() (auto-detected)"):
            jax.distributed.initialize(initialization_timeout=timeout)
    else:
        coord, n, i = setting["coordinator"], setting["num_processes"], setting["process_id"]
        log.info("process %d/%d: joining %s (start-up timeout %d s)", i, n, coord, timeout)
        what = (f"process {i} of {n} could not join the coordinator at {coord}: process 0 "
                "(the coordinator) did not arrive, or did not report the processes it waited for")
        with _registration_deadline(timeout), _watchdog(timeout + _CLIENT_SLACK_S // 2, what):
            jax.distributed.initialize(
                coordinator_address=coord, num_processes=n, process_id=i,
                initialization_timeout=timeout + _CLIENT_SLACK_S)
    setup_process_logging()


@contextlib.contextmanager
def _registration_deadline(seconds: int) -> Iterator[None]:
    """Gives the coordination service a registration deadline.

    jax.distributed.initialize does not expose it; with it the service (on process 0) fails
    the start-up barrier after `seconds` and names the processes that never registered
    ("# of tasks that reached the barrier: 1/3 ... Some timed out task names: 2"), and that
    error reaches every process that did arrive. Without it each client only reports its own
    deadline.
    """
    from jax._src import distributed as jax_distributed

    real = jax_distributed._jax

    class _WithDeadline:
        def __getattr__(self, name: str) -> object:
            return getattr(real, name)

        @staticmethod
        def get_distributed_runtime_service(*args: object, **kwargs: object) -> object:
            kwargs.setdefault("cluster_register_timeout", seconds)
            return real.get_distributed_runtime_service(*args, **kwargs)

    jax_distributed._jax = _WithDeadline()
    try:
        yield
    finally:
        jax_distributed._jax = real


@contextlib.contextmanager
def _watchdog(seconds: float, what: str) -> Iterator[None]:
    """Exits the process with a clear message if the block has not finished in `seconds`."""
    done = threading.Event()

    def fire() -> None:
        if not done.wait(seconds):
            log.error("start-up timed out after %.0f s: %s. Check that every process was "
                      "started with the same coordinator address and process count, or raise "
                      "GOPHER_INIT_TIMEOUT.", seconds, what)
            for h in logging.getLogger().handlers:
                h.flush()
            os._exit(3)

    t = threading.Thread(target=fire, name="gopher_jax-init-watchdog", daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()


_LOGGING_SET_UP = False


def setup_process_logging() -> None:
    """Every process prefixes its log records and uncaught errors with its index.

    Progress and metrics stay on process 0 (loop.say, MetricsWriter); warnings and errors
    come from all processes, so each must say which process it is.
    """
    global _LOGGING_SET_UP
    if _LOGGING_SET_UP or jax.process_count() == 1:
        return
    _LOGGING_SET_UP = True
    prefix = f"[process {jax.process_index()}/{jax.process_count()}] "
    # The record factory, not a filter: it reaches every logger and handler (absl's and
    # orbax's too), including handlers added later.
    make_record = logging.getLogRecordFactory()

    def prefixed(*args, **kwargs) -> logging.LogRecord:  # noqa: ANN002, ANN003
        record = make_record(*args, **kwargs)
        record.msg = f"{prefix}{record.msg}"
        return record

    logging.setLogRecordFactory(prefixed)
    previous = sys.excepthook

    def hook(tp, value, tb):  # noqa: ANN001 (the sys.excepthook signature)
        log.critical("uncaught %s: %s", tp.__name__, value)
        previous(tp, value, tb)
        sys.stdout.flush()
        sys.stderr.flush()
        # A normal exit would wait in jax.distributed's shutdown barrier for processes that
        # are themselves stuck in a collective with this one; exit now so the launcher
        # (launch/local.py, srun --kill-on-bad-exit, the JobSet) stops the rest.
        os._exit(1)

    sys.excepthook = hook


def run_on_process_zero_first(fn: Callable[[], T]) -> T:
    """Process 0 runs `fn` (e.g. preparing shared data) before the others do."""
    if jax.process_count() == 1:
        return fn()
    if jax.process_index() == 0:
        out = fn()
        multihost_utils.sync_global_devices("gopher_jax:process_zero_first")
        return out
    multihost_utils.sync_global_devices("gopher_jax:process_zero_first")
    return fn()
