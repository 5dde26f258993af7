"""Goodput: the share of wall time spent on training steps that were kept, and where the rest
went (start-up and restore, compiling, evaluation, saving, steps thrown away by a spike
rewind, and the work an interrupted run did after its last checkpoint, redone on restart).

Counted per run (one `train` invocation) and in total over the runs of a workdir: the total
is saved with each checkpoint and carried on by the run that resumes from it. Time between
runs (a queue, a pause) is not counted: it cannot be told apart from a deliberate stop.

Redone work is read from metrics.jsonl, the one record an interrupted run leaves: the time
from the checkpoint's save to the run's newest row after it, and the steps those rows reach
past the checkpoint. Work after the newest row (a step that hung until the watchdog ended
it, say) leaves no record and is not counted.
"""

from __future__ import annotations

import time
from typing import Any

KINDS = ("step", "startup", "compile", "eval", "save", "rewound", "redone")
START_SPLIT = "run"  # the metrics row each run writes as it starts (`Goodput.start_row`)


class Goodput:
    """Seconds per kind; `lap(kind)` books the time since the previous lap to `kind`.

    `saved`: the totals of the checkpoint resumed from (`state()`); `redone`: the seconds and
    steps the interrupted runs spent after that checkpoint (`redone_after`).
    """

    def __init__(self, saved: dict[str, Any] | None = None, redone: tuple[float, int] = (0.0, 0),
                 start: float | None = None):
        saved = saved or {}
        self.run = dict.fromkeys(KINDS, 0.0)
        self.run["redone"] = max(0.0, redone[0])
        self.redone_steps = redone[1]
        self._before = {k: float(saved.get(k, 0.0)) for k in (*KINDS, "wall", "redone_steps")}
        self._start = self._last = time.perf_counter() if start is None else start
        self._step_s_at: dict[int, float] = {}

    def lap(self, kind: str) -> float:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        self.run[kind] += dt
        return dt

    def saved_at(self, step: int) -> None:
        """Remembers the step time booked when `step` was checkpointed (for `rewound`)."""
        self._step_s_at[step] = self.run["step"]

    def rewound_to(self, step: int) -> None:
        """The step time booked since checkpoint `step` (or since the run began) was spent on
        steps thrown away."""
        lost = self.run["step"] - self._step_s_at.get(step, 0.0)
        self.run["step"] -= lost
        self.run["rewound"] += lost
        self._step_s_at = {s: v for s, v in self._step_s_at.items() if s <= step}

    def summary(self) -> dict[str, float]:
        """This run's seconds per kind and goodput, and the totals over the workdir's runs."""
        wall = time.perf_counter() - self._start + self.run["redone"]
        out = {f"{k}_s": v for k, v in self.run.items()}
        out.update(wall_s=wall, goodput=_ratio(self.run["step"], wall),
                   redone_steps=self.redone_steps,
                   total_redone_steps=self._before["redone_steps"] + self.redone_steps)
        total_wall = self._before["wall"] + wall
        total_step = self._before["step"] + self.run["step"]
        out.update({f"total_{k}_s": self._before[k] + self.run[k] for k in KINDS},
                   total_wall_s=total_wall, total_goodput=_ratio(total_step, total_wall))
        return out

    def state(self) -> dict[str, float]:
        """The totals a checkpoint stores (seconds per kind and wall)."""
        s = self.summary()
        return {**{k: s[f"total_{k}_s"] for k in KINDS}, "wall": s["total_wall_s"],
                "redone_steps": s["total_redone_steps"]}

    def start_row(self) -> dict[str, float]:
        """What a later run needs to know of this one if it is interrupted before its next
        checkpoint: when it started (wall clock) and the redone work it carries."""
        started = time.time() - (time.perf_counter() - self._start)
        return {"started_at": started, "redone_s": self.run["redone"],
                "redone_steps": self.redone_steps}


def redone_after(saved_at: float | None, resume_step: int, dropped: list[dict[str, Any]],
                 started: dict[str, Any] | None) -> tuple[float, int]:
    """(seconds, steps) of the work interrupted runs did after the checkpoint of `resume_step`
    (saved at `saved_at`; None: no checkpoint, the start), now redone.

    `dropped`: the metrics rows after `resume_step` that the interrupted run wrote (just
    dropped); `started`: the newest start row (`Goodput.start_row`) kept. A run that started
    after the checkpoint was saved resumed from it and was interrupted in turn: its carried
    redone work plus its own time from its start to its newest row count, not the time
    between the runs. Steps are those the newest row reaches (with log_every > 1 the steps
    after the last logged one are not known)."""
    since = float("-inf") if saved_at is None else saved_at
    carried_s, carried_steps = 0.0, 0
    if started is not None and started["started_at"] > since:
        since = started["started_at"]
        carried_s, carried_steps = started["redone_s"], int(started["redone_steps"])
    if since == float("-inf"):
        return 0.0, 0
    last = max((r["time"] for r in dropped), default=since)
    steps = max((r["step"] for r in dropped), default=resume_step) - resume_step
    return carried_s + max(0.0, last - since), carried_steps + steps


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0
