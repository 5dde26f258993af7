"""Metrics to stdout, JSONL and TensorBoard event files (tensorboardX: no TensorFlow).

Only process 0 writes; the other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.errors import UserError

log = logging.getLogger(__name__)


class MetricsWriter:
    """Rows of metrics.jsonl and TensorBoard scalars, one per (split, step).

    With `resume_step` (the step a run restored), rows written after that step by the run that
    was interrupted are dropped from metrics.jsonl, and TensorBoard is told to purge its events
    from the step after it, so the resumed run's rows are the only ones for those steps.
    Rows after it that `keep` accepts stay (the spikes the checkpoint knows of).
    `dropped`: the rows dropped; `last_kept`: the newest row kept of each split.
    """

    def __init__(self, workdir: str | os.PathLike, enabled: bool | None = None,
                 resume_step: int = 0, keep: Callable[[dict[str, Any]], bool] | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = storage.path(workdir) / workdir_lib.METRICS_JSONL
        self._tb_dir = storage.path(workdir) / workdir_lib.TENSORBOARD
        self._tb = None
        self.dropped: list[dict[str, Any]] = []
        self.last_kept: dict[str, dict[str, Any]] = {}
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._open(resume_step, keep)

    def _open(self, resume_step: int, keep: Callable[[dict[str, Any]], bool] | None) -> None:
        if self.path.exists():
            self._truncate_after(resume_step, keep or (lambda row: False))
        from tensorboardX import SummaryWriter

        purge = {"purge_step": resume_step + 1} if resume_step > 0 else {}
        self._tb = SummaryWriter(str(self._tb_dir), **purge)

    def rewind(self, step: int, keep: Callable[[dict[str, Any]], bool] | None = None) -> None:
        """Drops the rows after `step` (a run that went back to the checkpoint of `step`)
        but those `keep` accepts."""
        if self.enabled:
            self.close()
            self._open(step, keep)

    def _truncate_after(self, step: int, kept: Callable[[dict[str, Any]], bool]) -> None:
        rows = _rows(self.path)
        keep = [r for r in rows if r["step"] <= step or kept(r)]
        self.dropped = [r for r in rows if not (r["step"] <= step or kept(r))]
        self.last_kept = {r.get("split", ""): r for r in keep}
        if len(keep) != len(self.path.read_text().splitlines()):
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))
            tmp.replace(self.path)

    def write(self, step: int, scalars: dict[str, Any], prefix: str = "train",
              tensorboard: bool = True) -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": prefix, "time": time.time()}
        scalars = {k: float(v) for k, v in scalars.items() if v is not None}
        row.update(scalars)
        storage.append_text(self.path, json.dumps(row) + "\n")
        for k, v in scalars.items() if tensorboard else ():
            self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    return [r for r in _rows(storage.path(path)) if r.get("split") == split]


def _rows(path: Any) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl. A torn last line (a run killed while appending) is
    dropped with a warning; any other line that is not a row is one error naming it."""
    lines = path.read_text().splitlines()
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row with a step")
        except ValueError as e:
            if n == len(lines):
                log.warning("%s: dropping its torn last line %d (%s)", path, n, e)
                continue
            raise UserError(f"{path} line {n} is not a metrics row ({e})",
                            "fix or delete that line (a rerun rewrites the file from its "
                            "rows)") from None
        rows.append(row)
    return rows
