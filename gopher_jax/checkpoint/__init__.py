"""Orbax checkpoints: async atomic saves, exact resume, restore onto any mesh.

A checkpoint holds the train state (params, optimiser state, step) and JSON metadata: the
config, the data position, the layout (scanned or not) and the mesh it was written from.
Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save is never listed as a step. The data position is the step: the data order
is a pure function of (seed, step), so the batch after a resume is the one the original run
would have drawn next, on any topology.

The package:
  errors.py   CheckpointError, the one-line user error of this package
  compat.py   which config changes a resume refuses (shapes, dtypes, data order) and why
  manager.py  the Checkpointer (Orbax manager: save, keep-best, restore the newest readable
              step, set broken ones aside)
  meta.py     CheckpointMeta, the metadata written with each step
  listing.py  `checkpoint info`: one row per step directory of a workdir
  lock.py     one writer per workdir: a renewed lease in <workdir>/LOCK

The names below are re-exported for callers (`from gopher_jax import checkpoint as ckpt_lib`).
"""

from gopher_jax.checkpoint.compat import (
    EVAL_KEYS,
    SHAPE_KEYS,
    ConfigMismatchError,
    DataChangedError,
    check_config,
    check_data,
    config_diff,
)
from gopher_jax.checkpoint.errors import CheckpointError
from gopher_jax.checkpoint.listing import StepRow, info
from gopher_jax.checkpoint.lock import WorkdirLock, WorkdirLockedError
from gopher_jax.checkpoint.manager import BEST_METRIC, CORRUPT_DIR, Checkpointer, all_processes
from gopher_jax.checkpoint.meta import CheckpointMeta, meta_for, read_meta

__all__ = [
    "BEST_METRIC", "CORRUPT_DIR", "EVAL_KEYS", "SHAPE_KEYS", "CheckpointError", "CheckpointMeta",
    "Checkpointer", "StepRow",
    "ConfigMismatchError", "DataChangedError", "check_config", "check_data", "config_diff",
    "WorkdirLock", "WorkdirLockedError", "all_processes", "info", "meta_for",
    "read_meta",
]
