"""Orbax checkpoints: async atomic saves, exact resume, restore onto any mesh.

A checkpoint holds the train state (params, optimiser state, step) and JSON metadata: the
config, the data position, the layout (scanned or not) and the mesh it was written from.
Orbax writes each step to a temporary directory and renames it when complete, so an
interrupted save is never listed as a step.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from gopher_jax.train.state import State

log = logging.getLogger(__name__)

# Config keys that change the shapes or structure of the state: a resume must not change them.
SHAPE_KEYS = (
    "model.vocab_size", "model.num_layers", "model.num_heads", "model.head_dim",
    "model.d_model", "model.mlp_ratio", "model.tie_embeddings", "model.param_dtype",
    "model.scan_layers", "train.optimizer", "train.master_fp32",
)


class CheckpointError(RuntimeError):
    pass


def _get(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        d = d.get(k, {}) if isinstance(d, dict) else {}
    return d


def config_diff(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(shape-changing keys that differ, other keys that differ)."""
    def flat(d: dict, prefix: str = "") -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(saved), flat(current)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shape = [k for k in changed if k in SHAPE_KEYS]
    return shape, [k for k in changed if k not in SHAPE_KEYS]


class Checkpointer:
    def __init__(self, workdir: str | pathlib.Path, keep: int = 3, async_save: bool = True):
        self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state: State, meta: dict[str, Any], force: bool = False) -> bool:
        """Starts an async save; returns at once (the previous save is awaited first)."""
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            force=force)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict[str, Any]:
        path = self.directory / str(step) / "meta" / "metadata"
        return json.loads(path.read_text())

    def restore(self, step: int, target: State) -> State:
        """Restores into `target` (ShapeDtypeStructs with the *current* mesh's shardings)."""
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))
        return out["state"]

    def restore_latest(self, target: State) -> tuple[State, dict[str, Any]] | None:
        """The newest checkpoint that restores; a broken one is skipped with a warning (and
        kept on disk for inspection). None when there is no checkpoint at all."""
        steps = self.steps()
        errors = []
        for step in reversed(steps):
            try:
                meta = self.read_meta(step)
                state = self.restore(step, target)
                _check_finite(state, step)
            except Exception as e:  # noqa: BLE001 - any failure means "this one is bad"
                msg = f"checkpoint step {step} in {self.directory} is unreadable ({e!r:.300})"
                log.warning("%s; falling back to an earlier one", msg)
                print(f"WARNING: {msg}; falling back to an earlier one", flush=True)
                errors.append(msg)
                continue
            return state, meta
        if errors:
            raise CheckpointError("no checkpoint could be restored:\n" + "\n".join(errors)
                                  + "\nMove the checkpoints directory away to start afresh.")
        return None

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _check_finite(state: State, step: int) -> None:
    import jax.numpy as jnp

    bad = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(state)
           if jnp.issubdtype(x.dtype, jnp.floating) and not bool(jnp.all(jnp.isfinite(x)))]
    if bad:
        raise CheckpointError(f"non-finite values in {bad[:3]} at step {step}")


def meta_for(c: ml_collections.ConfigDict, step: int, mesh: jax.sharding.Mesh) -> dict[str, Any]:
    return {
        "step": step,
        "data_step": step,  # the data order is a pure function of (seed, step)
        "config": json.loads(c.to_json()),
        "layout": "scanned" if c.model.scan_layers else "unscanned",
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "rules": c.mesh.rules,
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
    }
