"""`checkpoint info`: one row per step directory of a workdir (complete, an incomplete save,
or set aside as broken) with its size, its metadata (layout, mesh, topology, goodput) and
its stored metrics."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.checkpoint.errors import CheckpointError
from gopher_jax.checkpoint.manager import CORRUPT_DIR
from gopher_jax.checkpoint.meta import CheckpointMeta, meta_path


@dataclasses.dataclass(frozen=True)
class StepRow:
    """One step directory: its step (None when the name is not a number), "complete",
    "incomplete" or "set aside (broken)", where it is, its bytes, its metadata (None when
    unreadable) and the metrics Orbax stored with it (validation bits per byte with
    keep_best)."""

    step: int | None
    status: str
    path: str
    bytes: int
    meta: CheckpointMeta | None = None
    metrics: dict[str, Any] | None = None

    @property
    def goodput(self) -> float | None:
        """Productive step time over wall time, over the workdir's runs up to this save."""
        g = self.meta.goodput if self.meta is not None else {}
        return g["step"] / g["wall"] if g.get("wall") else None


def _step_metrics(step_dir: epath.Path) -> dict[str, Any] | None:
    """What Orbax stored with the step (validation bits per byte with keep_best)."""
    try:
        return json.loads((step_dir / "metrics" / "metrics").read_text()) or None
    except (OSError, ValueError):
        return None


def _read_meta(step_dir: epath.Path) -> CheckpointMeta | None:
    try:
        return CheckpointMeta.from_json(json.loads(meta_path(step_dir).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def info(workdir: str | os.PathLike) -> list[StepRow]:
    """One row per step directory (complete, incomplete save, or set aside as broken)."""
    workdir = storage.path(workdir)
    directory = workdir / workdir_lib.CHECKPOINTS
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {workdir}: {directory} does not exist",
                              "pass the --workdir of a training run")
    complete = set(ocp.utils.checkpoint_steps(directory))
    entries = [(p, "complete" if p.name.isdigit() and int(p.name) in complete else "incomplete")
               for p in directory.iterdir() if p.is_dir()]
    corrupt = workdir / CORRUPT_DIR
    if corrupt.is_dir():
        entries += [(p, "set aside (broken)") for p in corrupt.iterdir() if p.is_dir()]
    rows = []
    for path, status in entries:
        step = path.name.split(".")[0]
        rows.append(StepRow(step=int(step) if step.isdigit() else None, status=status,
                            path=str(path), bytes=storage.tree_bytes(path),
                            meta=_read_meta(path), metrics=_step_metrics(path)))
    return sorted(rows, key=lambda r: (r.step is None, r.step or 0, r.status))
