"""Metrics to stdout, JSONL and TensorBoard event files (tensorboardX: no TensorFlow).

Only process 0 writes; the other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib


class MetricsWriter:
    """Rows of metrics.jsonl and TensorBoard scalars, one per (split, step).

    With `resume_step` (the step a run restored), rows written after that step by the run that
    was interrupted are dropped from metrics.jsonl, and TensorBoard is told to purge its events
    from the step after it, so the resumed run's rows are the only ones for those steps.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None,
                 resume_step: int = 0):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = storage.path(workdir) / workdir_lib.METRICS_JSONL
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self.path.exists():
                self._truncate_after(resume_step)
            from tensorboardX import SummaryWriter

            purge = {"purge_step": resume_step + 1} if resume_step > 0 else {}
            self._tb = SummaryWriter(str(storage.path(workdir) / workdir_lib.TENSORBOARD), **purge)

    def _truncate_after(self, step: int) -> None:
        lines = self.path.read_text().splitlines()
        keep = [line for line in lines if line and json.loads(line)["step"] <= step]
        if len(keep) != len(lines):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(f"{line}\n" for line in keep))
            tmp.replace(self.path)

    def write(self, step: int, scalars: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": prefix, "time": time.time()}
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        row.update(scalars)
        storage.append_text(self.path, json.dumps(row) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in storage.path(path).read_text().splitlines() if line]
    return [r for r in rows if r["split"] == split]
