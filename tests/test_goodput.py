"""Goodput's redone work: what an interrupted run did after the checkpoint a rerun resumes
from, read back from metrics.jsonl (the one record such a run leaves)."""

from __future__ import annotations

import json
import pathlib

import pytest
from helpers import ROOT

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax.data import pipeline
from gopher_jax.metrics import MetricsWriter, read_jsonl
from gopher_jax.train.goodput import START_SPLIT, redone_after

SAVED_AT = 1000.0  # when the checkpoint of step 10 was saved


def _redone(tmp_path: pathlib.Path, rows: list[dict], saved_at: float | None = SAVED_AT,
            resume_step: int = 10) -> tuple[float, int]:
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    w = MetricsWriter(tmp_path, enabled=True, resume_step=resume_step)
    w.close()
    return redone_after(saved_at, resume_step, w.dropped, w.last_kept.get(START_SPLIT))


def _train(step: int, t: float) -> dict:
    return {"step": step, "split": "train", "time": t, "loss": 1.0}


def _start(step: int, t: float, redone_s: float = 0.0, redone_steps: int = 0) -> dict:
    return {"step": step, "split": START_SPLIT, "time": t + 0.5, "started_at": t,
            "redone_s": redone_s, "redone_steps": redone_steps}


def test_redone_work_is_the_interrupted_runs_time_and_steps_after_the_checkpoint(tmp_path):
    """Run A starts at 990, logs steps 1..10, saves step 10 at 1000. Catches redone time
    never booked, steps past the checkpoint miscounted, and a second interruption that books
    the pause between the runs (and the second run's rows from the first's checkpoint
    time: 106 s here instead of 3 + 6)."""
    a = [_start(0, 990.0), *[_train(s, 990.0 + s * 0.9) for s in range(1, 11)],
         {"step": 10, "split": "goodput", "time": SAVED_AT + 0.2}]
    # A stopped right after the checkpoint: nothing after it to redo.
    assert _redone(tmp_path, a) == (0.0, 0)
    # A ran 3 steps past it (rows at +1, +2, +3 s).
    after = [_train(s, SAVED_AT + s - 10) for s in (11, 12, 13)]
    assert _redone(tmp_path, a + after) == (pytest.approx(3.0), 3)
    # Run B resumed from step 10 after a 100 s pause (carrying A's 3 s and 3 steps) and was
    # interrupted after 2 steps of its own, 6 s after it started.
    b = [_start(10, 1100.0, redone_s=3.0, redone_steps=3), _train(11, 1105.0),
         _train(12, 1106.0)]
    assert _redone(tmp_path, a + b) == (pytest.approx(9.0), 5)
    # B was interrupted before its first step: A's work is still redone.
    assert _redone(tmp_path, a + b[:1]) == (pytest.approx(3.0), 3)
    # B saved step 20 and ran on 1 step: only that is redone, from step 20's save.
    b20 = [*b, *[_train(s, 1100.0 + s - 6) for s in range(13, 21)], _train(21, 1120.0)]
    assert _redone(tmp_path, a + b20, saved_at=1114.5, resume_step=20) == \
        (pytest.approx(5.5), 1)


def test_a_run_interrupted_before_its_first_checkpoint_is_redone_from_its_start(tmp_path):
    rows = [_start(0, 50.0), _train(1, 60.0), _train(2, 61.0)]
    assert _redone(tmp_path, rows, saved_at=None, resume_step=0) == (pytest.approx(11.0), 2)
    # Without a start row (a workdir of an older version) nothing tells when it began.
    assert _redone(tmp_path, rows[1:], saved_at=None, resume_step=0) == (0.0, 0)


class _Killed(BaseException):
    """The process dies before a known step (only `finally` blocks run)."""


def _kill_at_read(monkeypatch, n: int) -> None:
    """The n+1-th batch read kills the run: steps 1..n are done, nothing after."""
    batch, reads = pipeline.TrainData.batch, []

    def read(self, index, sharding):
        reads.append(index)
        if len(reads) > n:
            raise _Killed
        return batch(self, index, sharding)

    monkeypatch.setattr(pipeline.TrainData, "batch", read)


@pytest.mark.slow
@pytest.mark.parametrize("past", [0, 3])
def test_the_rerun_books_the_killed_runs_steps_past_its_checkpoint(data_dir, tmp_path,
                                                                   monkeypatch, past):
    """A run killed `past` steps after its checkpoint of step 5 (log_every=1), then rerun:
    the rerun's goodput books exactly those steps as redone, and time for them only when
    there were some. Catches redone time never booked and steps miscounted."""
    from gopher_jax.cli import main

    argv = ["train", "--config", str(ROOT / "experiments" / "tiny.py"),
            f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}",
            "--config.train.steps=10", "--config.train.warmup_steps=2",
            "--config.train.log_every=1",
            "--config.train.checkpoint_every=5", "--config.train.eval_every=0"]
    _kill_at_read(monkeypatch, 5 + past)
    with pytest.raises(_Killed):
        main(argv)
    monkeypatch.undo()
    assert ckpt_lib.Checkpointer(tmp_path, read_only=True).steps() == [5]
    assert max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")) == 5 + past
    assert main(argv) == 0
    g = read_jsonl(tmp_path / "metrics.jsonl", split="goodput")[-1]
    assert g["redone_steps"] == past and g["total_redone_steps"] == past, g
    assert (g["redone_s"] > 0) == (past > 0), g
    meta = ckpt_lib.Checkpointer(tmp_path, read_only=True).read_meta(10)
    assert meta.goodput["redone_steps"] == past
    assert meta.goodput["redone"] == pytest.approx(g["total_redone_s"], rel=0.01)
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 11))
