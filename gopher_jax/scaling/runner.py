"""`scaling run`: trains (resuming) and evaluates each unfinished member of a ladder, records
a failure in the member's result.json instead of stopping the ladder, then rewrites the
ladder's results files."""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections
from etils import epath

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.scaling.ladder import c_split, describe, member_config, member_names, resolve_member
from gopher_jax.scaling.results import RESULT, is_finished, write_results

SPLIT_KEYS = ("bits_per_byte", "loss", "tokens", "bytes")


def _quiet(msg: str) -> None:
    """The default `log`: progress goes nowhere."""


def run_member(ladder: ml_collections.ConfigDict, workdir: str | os.PathLike, name: str,
               log: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """Trains (resuming) and evaluates one member; a failure is recorded, not raised."""
    from gopher_jax.train import loop

    mdir = storage.path(workdir) / name
    mdir.mkdir(parents=True, exist_ok=True)
    entry = describe(ladder, name)
    c = member_config(ladder, name)
    t0 = time.perf_counter()
    stage = "train"
    try:
        summary = loop.train(c, mdir)
        entry["wall_s"] = time.perf_counter() - t0
        entry["start_step"] = summary["start_step"]
        train = summary.get("train", {})
        entry["train_loss"] = train.get("loss")
        entry["tokens_per_s"] = train.get("tokens_per_s")
        if summary["step"] < c.train.steps:  # preempted (SIGTERM): resume on the next run
            raise InterruptedError(f"stopped at step {summary['step']} of {c.train.steps}")
        stage = "eval"
        t1 = time.perf_counter()
        entry.update(evaluate_member(c, mdir, ladder.scaling.get("eval_batches", -1)))
        entry["eval_wall_s"] = time.perf_counter() - t1
        entry["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - the ladder goes on; the error is recorded
        entry.update(status="failed", stage=stage, error=f"{type(e).__name__}: {e}",
                     wall_s=time.perf_counter() - t0)
        entry.setdefault("step", None)
        (mdir / "error.txt").write_text(traceback.format_exc())
        log(f"[scaling] {name} FAILED in {stage}: {entry['error']}")
    storage.write_atomic(mdir / RESULT, json.dumps(entry, indent=2))
    return entry


def evaluate_member(c: ml_collections.ConfigDict, mdir: epath.Path,
                    max_batches: int = -1) -> dict[str, Any]:
    """Bits per byte of the member's last checkpoint on the validation and test splits."""
    from gopher_jax import evaluate
    from gopher_jax.layout import Layout
    from gopher_jax.parallel import mesh as mesh_lib
    from gopher_jax.train import step as step_lib

    layout = Layout.build(c, mesh_lib.make_mesh(c))
    params, step = evaluate.restore_params(c, mdir, layout)
    eval_step = step_lib.make_eval_step(c, layout)
    out: dict[str, Any] = {"step": step}
    for split in (c.data.eval_split, c.data.test_split):
        r = evaluate.evaluate_split(c, layout, params, split, eval_step, max_batches)
        out[split] = {k: float(r[k]) for k in SPLIT_KEYS}
    return out


def run(ladder: ml_collections.ConfigDict, workdir: str | os.PathLike,
        member: str | None = None, log: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """Runs every unfinished member (or only `member`), then rewrites the results files.

    Returns {"trained": [...], "skipped": [...], "failed": [...], "results": <results.json>}.
    """
    from gopher_jax import data

    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = member_names(ladder)
    todo = [resolve_member(ladder, member)] if member not in (None, "") else names
    from gopher_jax.parallel import mesh as mesh_lib

    for n in names:  # a bad member is refused before anything trains
        mesh_lib.validate(member_config(ladder, n), _device_count())
    from gopher_jax.parallel import distributed

    first = member_config(ladder, names[0])
    distributed.run_on_process_zero_first(lambda: data.prepare(first))
    storage.write_atomic(workdir / workdir_lib.LADDER_JSON, ladder.to_json(indent=2))
    trained, skipped, failed = [], [], []
    for name in todo:
        d = describe(ladder, name)
        if is_finished(ladder, workdir, name):
            log(f"[scaling] {name}: finished earlier; skipped")
            skipped.append(name)
            continue
        log(f"[scaling] {name}: {d['params_non_embedding']:,} non-embedding params, "
            f"{d['train_tokens']:,} tokens, {d['train_flops']:.3g} FLOPs, "
            f"lr {d['learning_rate']:g}")
        entry = run_member(ladder, workdir, name, log)
        (failed if entry["status"] == "failed" else trained).append(name)
        if entry["status"] == "ok":
            bpb = ", ".join(f"{s} {entry[s]['bits_per_byte']:.4f}" for s in c_split(ladder))
            log(f"[scaling] {name}: bits/byte {bpb} ({entry['wall_s']:.0f}s train, "
                f"{entry['eval_wall_s']:.0f}s eval)")
    results = write_results(ladder, workdir)
    return {"trained": trained, "skipped": skipped, "failed": failed, "results": results}


def _device_count() -> int:
    import jax

    return jax.device_count()
