"""Goodput: the share of wall time spent on training steps that were kept, and where the rest
went (start-up and restore, compiling, evaluation, saving, steps thrown away by a spike
rewind, and the work an interrupted run did after its last checkpoint, redone on restart).

Counted per run (one `train` invocation) and in total over the runs of a workdir: the total
is saved with each checkpoint and carried on by the run that resumes from it. Time between
runs (a queue, a pause) is not counted: it cannot be told apart from a deliberate stop.
"""

from __future__ import annotations

import time
from typing import Any

KINDS = ("step", "startup", "compile", "eval", "save", "rewound", "redone")


class Goodput:
    """Seconds per kind; `lap(kind)` books the time since the previous lap to `kind`.

    `saved`: the totals of the checkpoint resumed from (`state()`); `redone_s`: the time the
    interrupted run spent after that checkpoint.
    """

    def __init__(self, saved: dict[str, Any] | None = None, redone_s: float = 0.0,
                 start: float | None = None):
        saved = saved or {}
        self.run = dict.fromkeys(KINDS, 0.0)
        self.run["redone"] = max(0.0, redone_s)
        self._before = {k: float(saved.get(k, 0.0)) for k in (*KINDS, "wall")}
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
        out.update(wall_s=wall, goodput=_ratio(self.run["step"], wall))
        total_wall = self._before["wall"] + wall
        total_step = self._before["step"] + self.run["step"]
        out.update({f"total_{k}_s": self._before[k] + self.run[k] for k in KINDS},
                   total_wall_s=total_wall, total_goodput=_ratio(total_step, total_wall))
        return out

    def state(self) -> dict[str, float]:
        """The totals a checkpoint stores (seconds per kind and wall)."""
        s = self.summary()
        return {**{k: s[f"total_{k}_s"] for k in KINDS}, "wall": s["total_wall_s"]}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0.0
