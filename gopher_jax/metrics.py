"""Metrics to stdout, JSONL and TensorBoard event files (tensorboardX: no TensorFlow).

Only process 0 writes; the other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import jax


class MetricsWriter:
    def __init__(self, workdir: str | pathlib.Path, enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self._tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

    def write(self, step: int, scalars: dict[str, Any], prefix: str = "train") -> None:
        if not self.enabled:
            return
        row = {"step": step, "split": prefix, "time": time.time()}
        row.update({k: float(v) for k, v in scalars.items()})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | pathlib.Path, split: str = "train") -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]
    return [r for r in rows if r["split"] == split]
