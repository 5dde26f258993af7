"""Runs on Cloud Storage, against a real GCS-API server on localhost (fake-gcs-server): a
gs:// workdir trains, survives a SIGKILL and resumes bit-identically to a local run; eval,
sample and checkpoint info read it; the lock works there; unknown schemes are refused in
one line (data dirs on gs://: tests/test_data_gcs.py, filtering there: tests/test_filter_gcs.py)."""

from __future__ import annotations

import re
import signal
import subprocess
import threading

import orbax.checkpoint as ocp
import pytest
from etils import epath
from helpers import ROOT, cli_command, cpu_env, run_cli

from gopher_jax.cli import main
from gopher_jax.metrics import read_jsonl

STEPS, EVERY = 12, 4


def _train_args(workdir: str, data_dir: str) -> list[str]:
    return ["train", "--config", str(ROOT / "experiments" / "tiny.py"), "--workdir", workdir,
            f"--config.data.data_dir={data_dir}", f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", f"--config.train.checkpoint_every={EVERY}",
            "--config.train.eval_every=0", "--config.train.warmup_steps=2"]


def _losses(workdir: str) -> dict[int, list[float]]:
    rows: dict[int, list[float]] = {}
    for r in read_jsonl(epath.Path(workdir) / "metrics.jsonl"):
        rows.setdefault(r["step"], []).append(r["loss"])
    return rows


@pytest.mark.slow  # ~45 s: two trainings and four CLI runs
def test_gs_workdir_trains_resumes_after_sigkill_and_serves_eval(data_dir, bucket, tmp_path):
    env = cpu_env(1)  # carries STORAGE_EMULATOR_HOST to the subprocesses
    local = str(tmp_path / "local")
    p = run_cli(*_train_args(local, data_dir), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    reference = _losses(local)

    remote = f"{bucket}/runs/tiny"
    proc = subprocess.Popen(cli_command(*_train_args(remote, data_dir)), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(600, proc.kill)
    watchdog.start()
    out = []
    for line in proc.stdout:
        out.append(line)
        m = re.match(r"step (\d+): loss", line)
        if m and int(m.group(1)) >= EVERY + 2:
            # Finalised steps only: on Cloud Storage a step's folder appears before its
            # commit marker, and a kill before the marker leaves nothing to resume from.
            if ocp.utils.checkpoint_steps(epath.Path(remote) / "checkpoints"):
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    watchdog.cancel()
    assert proc.returncode == -signal.SIGKILL, "".join(out)[-3000:]

    p = run_cli(*_train_args(remote, data_dir), env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert re.search(r"resumed from step \d+ in gs://", p.stdout), p.stdout[-2000:]
    assert "taking over the lock" in p.stderr
    resumed = _losses(remote)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step, losses in resumed.items():
        assert losses == reference[step], (step, losses, reference[step])

    for args in (["eval"], ["sample", "--max_new_tokens=5", "--temperature=0"],
                 ["checkpoint", "info"]):
        q = run_cli(*args, "--workdir", remote, env=env)
        assert q.returncode == 0, (args, q.stderr[-3000:])
    assert (epath.Path(remote) / "eval.json").exists()
    assert not (ROOT / "gs:").exists() and not list(tmp_path.glob("gs:*"))


def test_lock_on_gs_refuses_a_second_holder(bucket):
    from gopher_jax.checkpoint.lock import WorkdirLock, WorkdirLockedError

    first = WorkdirLock(f"{bucket}/run").acquire()
    try:
        with pytest.raises(WorkdirLockedError, match=f"pid {first.me.pid}"):
            WorkdirLock(f"{bucket}/run").acquire()
    finally:
        first.release()
    assert not (epath.Path(bucket) / "run" / "LOCK").exists()
    WorkdirLock(f"{bucket}/run").acquire().release()  # free again


def test_unknown_schemes_are_refused_before_any_work(bucket, capsys):
    tiny = ["--config", str(ROOT / "experiments" / "tiny.py")]
    cases = [(["data", "filter", *tiny, "--out=s3://elsewhere/filtered"], "s3:// scheme"),
             (["train", *tiny, "--workdir=s3://elsewhere/run"], "s3:// scheme"),
             (["eval", "--workdir=hdfs://x/run"], "hdfs:// scheme")]
    for argv, words in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and words in lines[0], err
    assert not list(epath.Path(bucket).iterdir())
