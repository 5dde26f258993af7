"""Several JAX processes on this host through launch/local.py (gloo CPU collectives)."""

from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from helpers import ROOT, cli_command

from gopher_jax.parallel import distributed
from launch import local

PY = sys.executable
# Bounds a launch that should have stopped long before: a hang fails the test instead.
HANG_S = 120


def run_launch(cmd, **kw) -> tuple[int, str]:
    lines: list[str] = []
    result: dict[str, int] = {}

    class _Null:
        def write(self, s):
            pass

        def flush(self):
            pass

    t = threading.Thread(target=lambda: result.update(
        rc=local.launch(cmd, out=_Null(), capture=lines, **kw)), daemon=True)
    t.start()
    t.join(HANG_S)
    assert not t.is_alive(), "launcher did not return: it failed to stop the processes"
    return result["rc"], "".join(lines)


def test_env_setting():
    assert distributed.env_setting({}) is None
    s = distributed.env_setting({"GOPHER_COORDINATOR": "h:1", "GOPHER_NUM_PROCESSES": "4",
                                 "GOPHER_PROCESS_ID": "3"})
    assert s == {"mode": "explicit", "coordinator": "h:1", "num_processes": 4, "process_id": 3}
    assert distributed.env_setting({"GOPHER_DISTRIBUTED": "auto"}) == {"mode": "auto"}
    assert distributed.env_setting({"TPU_WORKER_HOSTNAMES": "a,b"}) == {"mode": "auto"}
    assert distributed.env_setting({"TPU_WORKER_HOSTNAMES": "a"}) is None
    assert distributed.env_setting({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"}) == {"mode": "auto"}
    with pytest.raises(ValueError, match="GOPHER_PROCESS_ID"):
        distributed.env_setting({"GOPHER_COORDINATOR": "h:1", "GOPHER_NUM_PROCESSES": "2"})
    with pytest.raises(ValueError, match=r"must be in \[0"):
        distributed.env_setting({"GOPHER_COORDINATOR": "h:1", "GOPHER_NUM_PROCESSES": "2",
                                 "GOPHER_PROCESS_ID": "2"})


def test_process_env():
    env = local.process_env(1, 2, 4, 1234, base={"XLA_FLAGS": "--xla_foo=1 "
                                                 "--xla_force_host_platform_device_count=8"})
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
    assert (env["GOPHER_COORDINATOR"], env["GOPHER_NUM_PROCESSES"], env["GOPHER_PROCESS_ID"],
            env["JAX_PLATFORMS"]) == ("127.0.0.1:1234", "2", "1", "cpu")


def test_launcher_rejects_bad_input():
    with pytest.raises(ValueError, match="after '--'"):
        local.launch([])
    assert local.main(["--num_processes", "2", "python"]) == 2


def test_output_is_prefixed_and_success_is_zero():
    rc, out = run_launch([PY, "-c", "import os; print('id', os.environ['GOPHER_PROCESS_ID'])"],
                         num_processes=3, devices_per_process=1)
    assert rc == 0
    assert {"[p0] id 0\n", "[p1] id 1\n", "[p2] id 2\n"} <= set(out.splitlines(keepends=True))


# Process 1 fails after start-up while process 0 waits in a cross-process collective that can
# never complete: the launcher must stop process 0 and report process 1's failure.
DYING = """
import os, jax, jax.numpy as jnp, numpy as np
from jax.experimental import multihost_utils
from gopher_jax.parallel import distributed
distributed.initialize_from_env()
assert jax.process_count() == 2 and jax.device_count() == 4
import logging
logging.getLogger("some.library").warning("a warning")
if jax.process_index() == 1:
    raise RuntimeError("simulated failure")
print("waiting in a collective", flush=True)
multihost_utils.sync_global_devices("never")
print("unreachable", flush=True)
"""


def test_dying_process_stops_the_others():
    rc, out = run_launch([PY, "-c", DYING], num_processes=2, devices_per_process=2, grace_s=3)
    assert rc != 0
    assert "[launch] process 1 exited with code 1; stopping the others" in out
    # Errors carry the index of the process that raised them.
    assert "[p1] [process 1/2] uncaught RuntimeError: simulated failure" in out
    assert "[p0] [process 0/2] a warning" in out and "[p1] [process 1/2] a warning" in out
    assert "[p0] unreachable" not in out


# Process 0 defers SIGTERM for ever; process 1 exits 1 after a moment (or, with STAY, waits
# and exits 0 on SIGTERM). The moment is shorter than GRACE_S, so that a launcher that kills
# at once is seen to stop too early.
STUBBORN = """
import os, signal, sys, time
if os.environ["GOPHER_PROCESS_ID"] == "0":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
elif os.environ.get("STAY"):
    signal.signal(signal.SIGTERM, lambda *_: (print("got SIGTERM", flush=True), sys.exit(0)))
else:
    print("pid", os.getpid(), flush=True)
    time.sleep(1)
    sys.exit(1)
print("pid", os.getpid(), flush=True)
time.sleep(600)
"""
GRACE_S = 1.5


def _run_stubborn(sigterm_launcher: bool) -> tuple[int, str, float, list[int]]:
    """launch/local.py running STUBBORN as 2 processes, with SIGTERM sent to the launcher once
    both are up, or not. Returns its code, output, seconds from then to its exit, and the
    processes' pids (killed here if still running)."""
    launcher = subprocess.Popen(
        [PY, "-m", "launch.local", "--num_processes", "2", "--devices_per_process", "1",
         "--grace_s", str(GRACE_S), "--", PY, "-c", STUBBORN],
        cwd=ROOT, env={**os.environ, **({"STAY": "1"} if sigterm_launcher else {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids: list[int] = []
    head = ""
    try:
        for line in launcher.stdout:
            head += line
            if " pid " in line:
                pids.append(int(line.split()[-1]))
            if len(pids) == 2:
                break
        t0 = time.monotonic()
        if sigterm_launcher:
            launcher.send_signal(signal.SIGTERM)
        out = head + launcher.communicate(timeout=GRACE_S + 15)[0]
        return launcher.returncode, out, time.monotonic() - t0, pids
    finally:
        launcher.kill()
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_process_deferring_sigterm_is_killed_after_grace():
    """Catches a stop that only sends SIGTERM (the launcher then waits for ever on a process
    that ignores it) or that kills without the grace period."""
    rc, out, elapsed, pids = _run_stubborn(sigterm_launcher=False)
    assert rc == 1, out
    assert "[launch] process 1 exited with code 1; stopping the others" in out
    assert GRACE_S <= elapsed <= GRACE_S + 10, elapsed
    assert all(_gone(p) for p in pids)


def test_sigterm_to_launcher_reaches_every_process():
    """Catches a launcher that dies on SIGTERM and leaves its processes running (each is in
    its own session, so nothing else stops them)."""
    rc, out, elapsed, pids = _run_stubborn(sigterm_launcher=True)
    assert all(_gone(p) for p in pids)
    assert "[launch] got SIGTERM; stopping all processes" in out
    assert "[p1] got SIGTERM" in out
    assert rc == 128 + signal.SIGKILL, out  # process 0 had to be killed
    assert GRACE_S <= elapsed <= GRACE_S + 10, elapsed


INIT_ONLY = "from gopher_jax.parallel import distributed; distributed.initialize_from_env()"


def test_missing_process_gives_startup_timeout_naming_it():
    # Processes 0 and 1 of 3 start; process 2 never does.
    rc, out = run_launch([PY, "-c", INIT_ONLY], num_processes=3, devices_per_process=1,
                         only=[0, 1], init_timeout_s=4, grace_s=3)
    assert rc != 0
    assert "reached the barrier: 2/3" in out
    assert _missing_named(out) == {2}, out[-2000:]


def _missing_named(out: str) -> set[int]:
    """Process ids the coordinator lists after 'Some timed out task names:' (one a line)."""
    lines = [ln.split("] ", 1)[-1].strip() for ln in out.splitlines() if ln.startswith("[p0]")]
    named: set[int] = set()
    for k, ln in enumerate(lines):
        if ln.endswith("Some timed out task names:"):
            for nxt in lines[k + 1:]:
                if not nxt.isdigit():
                    break
                named.add(int(nxt))
    return named


def _train(data_dir: pathlib.Path, workdir: pathlib.Path, n: int, m: int) -> list[float]:
    cmd = cli_command("train", "--config", ROOT / "experiments/tiny.py", "--workdir", workdir,
                      "--config.train.steps=20", "--config.train.log_every=1",
                      "--config.train.eval_every=0", "--config.train.checkpoint_every=20")
    rc, out = run_launch(cmd, num_processes=n, devices_per_process=m,
                         env={**os.environ, "GOPHER_JAX_DATA": str(data_dir)})
    assert rc == 0, out[-3000:]
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    one = _train(data, tmp_path_factory.mktemp("one"), 1, 8)
    two = _train(data, tmp_path_factory.mktemp("two"), 2, 4)
    assert len(one) == len(two) == 20
    assert one[-1] < one[0] - 0.5  # it learns
    np.testing.assert_allclose(two, one, rtol=2e-4, atol=2e-4)


def _tiny_2x4(workdir: pathlib.Path, data_dir: str, steps: int) -> list[str]:
    return cli_command("train", "--config", ROOT / "experiments/tiny.py", "--workdir", workdir,
                       f"--config.data.data_dir={data_dir}", f"--config.train.steps={steps}",
                       "--config.train.log_every=1", "--config.train.eval_every=0",
                       "--config.train.checkpoint_every=5")


def _train_rows(workdir: pathlib.Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["split"] == "train"]


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(data_dir, tmp_path):
    """Catches a stop decided by each process alone (no agreement at the sync step): the
    process that got SIGTERM saves and leaves while the other trains on, so the run hangs or
    fails instead of both saving one step, and the resume does not match an unbroken run."""
    steps = 60
    ref, run = tmp_path / "ref", tmp_path / "run"
    rc, out = run_launch(_tiny_2x4(ref, data_dir, steps), num_processes=2,
                         devices_per_process=4, timeout_s=HANG_S - 10)
    assert rc == 0, out[-3000:]

    lines: list[str] = []
    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.update(rc=local.launch(
        _tiny_2x4(run, data_dir, steps), num_processes=2, devices_per_process=4,
        timeout_s=HANG_S - 10, out=io.StringIO(), capture=lines)), daemon=True)
    t.start()
    while not (run / "checkpoints" / "5").is_dir() and t.is_alive():
        time.sleep(0.02)
    pid1 = int(next(x for x in lines if x.startswith("[launch] pids:")).split("p1=")[1])
    os.kill(pid1, signal.SIGTERM)  # process 1 only
    t.join(HANG_S)
    out = "".join(lines)
    assert not t.is_alive() and result["rc"] == 0, out[-3000:]
    saved = [int(x.split("saved step ")[1].split(";")[0]) for x in lines
             if "saved step" in x and "exiting to be resumed" in x]
    assert len(saved) == 1 and saved[0] < steps, out[-3000:]  # process 0 reports it
    # Both processes stopped at that step: it is the newest complete checkpoint.
    complete = [int(d.name) for d in (run / "checkpoints").iterdir() if d.name.isdigit()]
    assert max(complete) == saved[0]
    assert _train_rows(run)[-1][0] == saved[0]

    rc, out = run_launch(_tiny_2x4(run, data_dir, steps), num_processes=2,
                         devices_per_process=4, timeout_s=HANG_S - 10)
    assert rc == 0, out[-3000:]
    resumed, reference = _train_rows(run), _train_rows(ref)
    assert [s for s, _ in resumed] == list(range(1, steps + 1))  # each step exactly once
    assert resumed == reference  # bit for bit
