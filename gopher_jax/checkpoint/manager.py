"""The Checkpointer: an Orbax CheckpointManager over <workdir>/checkpoints (async atomic saves,
the newest and the best steps kept, restore onto the current mesh, fallback past broken steps
that are then set aside), and the JSON metadata saved with each step."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.checkpoint.errors import CheckpointError
from gopher_jax.checkpoint.meta import CheckpointMeta, read_meta
from gopher_jax.train.state import State

log = logging.getLogger(__name__)

BEST_METRIC = "eval_bits_per_byte"  # lower is better
CORRUPT_DIR = "checkpoints_corrupt"


class Checkpointer:
    """An Orbax CheckpointManager over <workdir>/checkpoints.

    Keeps the newest `keep` steps and, with keep_best > 0, also the `keep_best` steps with the
    lowest validation bits per byte (saves given `metrics={BEST_METRIC: ...}`).
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 3, keep_best: int = 0,
                 async_save: bool = True, read_only: bool = False):
        self.workdir = storage.path(workdir)
        self.directory = self.workdir / workdir_lib.CHECKPOINTS
        cm = ocp.checkpoint_managers
        self.keep_best = keep_best
        policies = [cm.LatestN(n=keep)]
        best = {}
        if keep_best > 0:
            metric = lambda m: m[BEST_METRIC]  # noqa: E731
            # Saves without an evaluation are kept only while they are among the newest.
            policies.append(cm.BestN(get_metric_fn=metric, reverse=True, n=keep_best,
                                     keep_checkpoints_without_metrics=False))
            # best_fn makes Orbax write the metrics into each step (read back on restart).
            best = {"best_fn": metric, "best_mode": "min"}
        options = ocp.CheckpointManagerOptions(
            preservation_policy=cm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save, create=not read_only, **best)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None  # the step whose async save may still be running

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: State, meta: CheckpointMeta,
             metrics: dict[str, float] | None = None, force: bool = False) -> bool:
        """Starts an async save and returns once the arrays are copied off the devices (the
        previous save is awaited first); the files are written in the background. A failure,
        of this save or of an earlier one still being written, raises CheckpointError."""
        self.wait()  # Orbax awaits it anyway; so its failure is reported as its own step's
        try:
            saved = self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta.to_json())),
                metrics=metrics, force=force)
        except Exception as e:  # noqa: BLE001 - any failure to save ends the run
            raise self._failed(e, step) from e
        self._in_flight = step
        return saved

    def check(self, step: int | None = None) -> None:
        """Raises CheckpointError if a background save has failed (`step`: where training
        stopped, for the message); never waits for a save still being written. Orbax's
        finalize thread takes the writer's error for itself (check_for_errors then finds
        none), so a save that has ended is joined here: that raises its error at once
        rather than at the next save."""
        if self._in_flight is None:
            return
        try:
            self.manager.check_for_errors()
            if not self.manager.is_saving_in_progress():
                # The save has ended: its thread is done, so joining it does not block.
                self.manager.wait_until_finished()
                self._in_flight = None
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, self._in_flight, stopped_at=step) from e

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(e, self._in_flight) from e
        self._in_flight = None

    def _failed(self, error: BaseException, step: int | None = None,
                stopped_at: int | None = None) -> CheckpointError:
        """The save failure as one line; the unfinished step's temporary directory is removed,
        so the newest complete checkpoint stays the one a restart resumes from."""
        if jax.process_index() == 0:
            for tmp in self.directory.glob("*.orbax-checkpoint-tmp*"):
                tmp.rmtree(missing_ok=True)
        cause = error
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, OSError):
                break
            cause = cause.__cause__ or cause.__context__
        what = f"step {step}" if step is not None else "a checkpoint"
        good = ocp.utils.checkpoint_steps(self.directory) if self.directory.is_dir() else []
        resume = f"step {max(good)}" if good else "the start"
        stopped = f"; training stopped at step {stopped_at}" if stopped_at is not None else ""
        return CheckpointError(
            f"saving {what} to {self.directory} failed: {type(cause).__name__}: {cause}"
            f"{stopped}",
            f"free space or fix the path's permissions; a rerun resumes from {resume}")

    def read_meta(self, step: int) -> CheckpointMeta:
        return read_meta(self.directory, step)

    def best_step(self) -> int | None:
        """The kept step with the lowest validation bits per byte (None without keep_best
        or without any evaluated step)."""
        return self.manager.best_step() if self.keep_best > 0 else None

    def restore(self, step: int, target: State) -> State:
        """Restores into `target` (ShapeDtypeStructs with the *current* mesh's shardings)."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return out["state"]

    def restore_latest(self, target: State,
                       check: Callable[[CheckpointMeta], Any] | None = None
                       ) -> tuple[State, CheckpointMeta] | None:
        """The newest checkpoint that restores, or None when there is none.

        `check(meta)` runs before each restore; what it raises (e.g. ConfigMismatchError)
        propagates. A checkpoint that fails to restore is skipped with a warning naming its
        step; once an earlier one restores, the broken ones are moved to
        <workdir>/checkpoints_corrupt/ for inspection (never deleted), so that new saves of
        those steps do not collide with them.
        """
        bad: list[int] = []
        errors: list[str] = []
        for step in reversed(self.steps()):
            meta = None
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001 - unreadable metadata: a broken checkpoint
                err = e
            if meta is not None and check is not None:
                check(meta)
            if meta is not None:
                try:
                    state = self.restore(step, target)
                    _check_finite(state, step)
                    err = None
                except Exception as e:  # noqa: BLE001 - any failure means "this one is bad"
                    err = e
            if all_processes(err is None):
                if bad:
                    self.set_aside(bad)
                return state, meta
            msg = (f"checkpoint step {step} in {self.directory} is unreadable "
                   f"({'another process failed to read it' if err is None else repr(err)[:300]})")
            log.warning("%s; falling back to an earlier one", msg)
            bad.append(step)
            errors.append(msg)
        if errors:
            raise CheckpointError("no checkpoint could be restored:\n" + "\n".join(errors)
                                  + "\nIf the config differs from the one trained (see "
                                  "config.json in the workdir), pass that one; to start "
                                  "afresh, use another --workdir.")
        return None

    def set_aside(self, steps: list[int]) -> None:
        """Moves these steps to <workdir>/checkpoints_corrupt/ (never deleted): a resume
        skips them and new saves of those steps do not collide with them."""
        self.wait()
        if jax.process_index() == 0:
            dest_root = self.workdir / CORRUPT_DIR
            dest_root.mkdir(exist_ok=True)
            for step in steps:
                dest = dest_root / str(step)
                if dest.exists():
                    dest = dest_root / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
                (self.directory / str(step)).rename(dest)
                log.warning("broken checkpoint step %d moved to %s", step, dest)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("gopher_jax:checkpoint_set_aside")
        self.manager.reload()

    def close(self, raise_errors: bool = True) -> None:
        try:
            self.wait()
        except CheckpointError:
            if raise_errors:
                raise
        finally:
            self.manager.close()


def all_processes(ok: bool) -> bool:
    """Whether every process got `ok` (they must agree on which checkpoint they resume)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _check_finite(state: State, step: int) -> None:
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return
    sharding = leaves[0][1].sharding
    # Replicated, so that every process can read the answer.
    out = (NamedSharding(sharding.mesh, PartitionSpec())
           if isinstance(sharding, NamedSharding) else None)
    finite = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]),
                     out_shardings=out)([x for _, x in leaves])
    bad = [name for (name, _), ok in zip(leaves, np.asarray(finite), strict=True) if not ok]
    if bad:
        raise CheckpointError(f"non-finite values in {bad[:3]} at step {step}")
