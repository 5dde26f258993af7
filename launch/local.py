"""Runs N JAX processes x M fake CPU devices on 127.0.0.1, like N hosts of a slice.

    python launch/local.py --num_processes 2 --devices_per_process 4 [--port P] \
        -- python -m gopher_jax train --config experiments/tiny.py --workdir /tmp/run

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=M and
GOPHER_COORDINATOR / GOPHER_NUM_PROCESSES / GOPHER_PROCESS_ID, which
gopher_jax.parallel.distributed.initialize_from_env reads (CPU collectives use gloo). Output
lines are streamed with a "[pI] " prefix, after a "[launch] pids: p0=PID ..." line. When
one process fails, the others are terminated (then killed after `grace_s`) and the launcher
exits with the first failing return code.
SIGTERM to the launcher is passed on to every process (killed after `grace_s` if still
running); it then exits 0 if they all exited 0, else with the first failing code.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import TextIO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    process_id: int,
    num_processes: int,
    devices_per_process: int,
    port: int,
    base: dict[str, str] | None = None,
    init_timeout_s: int | None = None,
) -> dict[str, str]:
    """The environment of process `process_id` (copy of `base`, default os.environ)."""
    env = dict(os.environ if base is None else base)
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
    env.update(
        XLA_FLAGS=" ".join(flags),
        JAX_PLATFORMS="cpu",
        GOPHER_COORDINATOR=f"127.0.0.1:{port}",
        GOPHER_NUM_PROCESSES=str(num_processes),
        GOPHER_PROCESS_ID=str(process_id),
        PYTHONUNBUFFERED="1",
    )
    if init_timeout_s is not None:
        env["GOPHER_INIT_TIMEOUT"] = str(init_timeout_s)
    return env


def _pump(stream: TextIO, prefix: str, out: TextIO, lock: threading.Lock,
          sink: list[str] | None) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line)
            out.flush()
            if sink is not None:
                sink.append(prefix + line)
    stream.close()


def launch(
    command: Sequence[str],
    num_processes: int = 2,
    devices_per_process: int = 4,
    port: int | None = None,
    grace_s: float = 10.0,
    timeout_s: float | None = None,
    init_timeout_s: int | None = None,
    only: Sequence[int] | None = None,
    env: dict[str, str] | None = None,
    out: TextIO | None = None,
    capture: list[str] | None = None,
) -> int:
    """Runs `command` as processes 0..num_processes-1; returns 0 or the first failure's code.

    `only` starts just those process ids (the others never arrive: for start-up timeout
    tests). `timeout_s` bounds the whole run (exit code 124). `capture`, when given,
    collects the prefixed output lines as well.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError("--num_processes and --devices_per_process must be >= 1")
    if not command:
        raise ValueError("no command: put it after '--', e.g. -- python -m gopher_jax train ...")
    port = port or free_port()
    out = out or sys.stdout
    lock = threading.Lock()
    ids = list(range(num_processes)) if only is None else list(only)
    procs: dict[int, subprocess.Popen] = {}
    pumps = []
    for i in ids:
        p = subprocess.Popen(
            list(command),
            env=process_env(i, num_processes, devices_per_process, port, env, init_timeout_s),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            start_new_session=True,  # so stopping it takes its children too
        )
        procs[i] = p
        t = threading.Thread(target=_pump, args=(p.stdout, f"[p{i}] ", out, lock, capture),
                             daemon=True)
        t.start()
        pumps.append(t)

    def note(msg: str) -> None:
        with lock:
            out.write(f"[launch] {msg}\n")
            out.flush()
            if capture is not None:
                capture.append(f"[launch] {msg}\n")

    note("pids: " + " ".join(f"p{i}={p.pid}" for i, p in procs.items()))
    rc = 0
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    terminated = threading.Event()
    old_handler = None
    if threading.current_thread() is threading.main_thread():
        old_handler = signal.signal(signal.SIGTERM, lambda *_: terminated.set())
    try:
        while True:
            if terminated.is_set():
                note("got SIGTERM; stopping all processes")
                break
            codes = {i: p.poll() for i, p in procs.items()}
            failed = [i for i, c in codes.items() if c not in (None, 0)]
            if failed:
                rc = codes[failed[0]]
                note(f"process {failed[0]} exited with code {rc}; stopping the others")
                break
            if all(c == 0 for c in codes.values()):
                break
            if deadline is not None and time.monotonic() > deadline:
                rc = 124
                note(f"timed out after {timeout_s:.0f} s; stopping all processes")
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        rc = 130
        note("interrupted; stopping all processes")
    _stop(procs.values(), grace_s)
    if old_handler is not None:
        signal.signal(signal.SIGTERM, old_handler)
    if terminated.is_set():
        # Preempted: 0 when every process saved and exited cleanly, else the first failure.
        rc = next((p.returncode for p in procs.values() if p.returncode != 0), 0)
    for t in pumps:
        t.join(timeout=5)
    # Negative codes (killed by a signal) become 128+N, as shells report them.
    return rc if rc >= 0 else 128 - rc


def _stop(procs, grace_s: float) -> None:
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal(p, signal.SIGTERM)
    end = time.monotonic() + grace_s
    for p in live:
        try:
            p.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait()


def _signal(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print("usage: launch/local.py [options] -- COMMAND ...", file=sys.stderr)
        return 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num_processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=4)
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--grace_s", type=float, default=10.0,
                    help="seconds between SIGTERM and SIGKILL when stopping processes")
    ap.add_argument("--timeout_s", type=float, default=None, help="bound on the whole run")
    ap.add_argument("--init_timeout_s", type=int, default=None,
                    help="jax.distributed start-up timeout (GOPHER_INIT_TIMEOUT)")
    args = ap.parse_args(argv[:cut])
    try:
        return launch(argv[cut + 1:], args.num_processes, args.devices_per_process, args.port,
                      args.grace_s, args.timeout_s, args.init_timeout_s)
    except ValueError as e:
        print(f"launch/local.py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
