"""A save that fails (a full disk) stops training at once with one error line; the previous
checkpoint stays complete and restorable, and no temporary checkpoint directory is left."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from helpers import ROOT, cpu_env, run_cli

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax.metrics import read_jsonl


@contextlib.contextmanager
def small_tmpfs(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    path.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_full_disk_stops_at_the_failed_save_and_keeps_the_previous_checkpoint(data_dir,
                                                                               tmp_path):
    # The tiny model's state (params + Adam moments) takes ~1.7 MB a checkpoint: the first
    # save fits in 3 MB, the second cannot.
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        workdir = disk / "run"
        p = run_cli("train", "--config", ROOT / "experiments" / "tiny.py", "--workdir", workdir,
                    f"--config.data.data_dir={data_dir}", "--config.train.steps=40",
                    "--config.train.checkpoint_every=10", "--config.train.log_every=1",
                    "--config.train.eval_every=0", env=cpu_env(1))
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 1, (p.stdout + p.stderr)[-3000:]
        assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
        assert "saving step 20" in errors[0] and str(workdir / "checkpoints") in errors[0]
        assert "No space left" in errors[0], errors[0]
        assert "resumes from step 10" in errors[0], errors[0]
        leftovers = [q.name for q in (workdir / "checkpoints").iterdir()
                     if "tmp" in q.name]
        assert not leftovers, leftovers
        # Training stopped at the failure, at the latest when the next save was due.
        logged = max(r["step"] for r in read_jsonl(workdir / "metrics.jsonl"))
        assert logged <= 30, logged
        steps = ckpt_lib.Checkpointer(workdir, read_only=True).steps()
        assert steps == [10], steps
        info = run_cli("checkpoint", "info", "--workdir", workdir, env=cpu_env(1))
        assert info.returncode == 0 and "complete" in info.stdout, info.stdout + info.stderr
