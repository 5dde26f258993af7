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
from gopher_jax.checkpoint.lock import WorkdirLock, WorkdirLockedError
from gopher_jax.scaling.ladder import c_split, describe, member_config, member_names, resolve_member
from gopher_jax.scaling.results import RESULT, is_finished, write_results

SPLIT_KEYS = ("bits_per_byte", "loss", "tokens", "bytes")
LOCKS = "locks"  # <workdir>/locks/<member>/LOCK: held while a process trains and evaluates it
PREPARE_LOCK = "_prepare"
PREPARE_WAIT_S = 3600.0


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
        entry["curve"] = curve(mdir, entry["flops_per_token"],
                               c.train.batch_size * c.data.seq_len)
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


def curve(mdir: epath.Path, flops_per_token: float, tokens_per_step: int
          ) -> list[dict[str, float]]:
    """The member's periodic validation bits per byte (metrics.jsonl "eval" rows) against the
    tokens and training FLOPs spent to reach them."""
    path = mdir / workdir_lib.METRICS_JSONL
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if row.get("split") == "eval" and "bits_per_byte" in row:
            tokens = row["step"] * tokens_per_step
            out.append({"step": row["step"], "tokens": tokens,
                        "flops": tokens * flops_per_token,
                        "bits_per_byte": row["bits_per_byte"]})
    return out


def _wait_for(lock: WorkdirLock, timeout_s: float) -> None:
    """Acquires `lock`, waiting while another live process holds it."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            lock.acquire()
            return
        except WorkdirLockedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


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
    """Runs every unfinished member (or those of `member`: names or indices, comma-separated),
    then rewrites the results files.

    Each member is trained under its own lock (<workdir>/locks/<member>), so several
    processes may run one ladder at once: a member another live process holds is left to it
    ("busy"); a member whose process died is taken over and resumes from its checkpoint.

    Returns {"trained", "skipped", "failed", "busy": [names], "results": <results.json>}.
    """
    from gopher_jax import data

    workdir = storage.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = member_names(ladder)
    todo = names if member in (None, "") else list(dict.fromkeys(
        resolve_member(ladder, m.strip()) for m in member.split(",") if m.strip()))
    from gopher_jax.parallel import mesh as mesh_lib

    for n in names:  # a bad member is refused before anything trains
        mesh_lib.validate(member_config(ladder, n), _device_count())
    from gopher_jax.parallel import distributed

    first = member_config(ladder, names[0])
    # Several processes may start on one ladder at once: one prepares, the others wait.
    prepare_lock = WorkdirLock(workdir / LOCKS / PREPARE_LOCK)
    _wait_for(prepare_lock, PREPARE_WAIT_S)
    try:
        distributed.run_on_process_zero_first(lambda: data.prepare(first))
        storage.write_atomic(workdir / workdir_lib.LADDER_JSON, ladder.to_json(indent=2))
    finally:
        prepare_lock.release()
    trained, skipped, failed, busy = [], [], [], []
    for name in todo:
        d = describe(ladder, name)
        if is_finished(ladder, workdir, name):
            log(f"[scaling] {name}: finished earlier; skipped")
            skipped.append(name)
            continue
        lock = WorkdirLock(workdir / LOCKS / name)
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            log(f"[scaling] {name}: {e.args[0] if e.args else e}; left to it")
            busy.append(name)
            continue
        try:
            if is_finished(ladder, workdir, name):  # by another process, after the check
                log(f"[scaling] {name}: finished by another run; skipped")
                skipped.append(name)
                continue
            log(f"[scaling] {name}: {d['params_non_embedding']:,} non-embedding params, "
                f"{d['train_tokens']:,} tokens, {d['train_flops']:.3g} FLOPs, "
                f"lr {d['learning_rate']:g}")
            entry = run_member(ladder, workdir, name, log)
        finally:
            lock.release()
        (failed if entry["status"] == "failed" else trained).append(name)
        if entry["status"] == "ok":
            bpb = ", ".join(f"{s} {entry[s]['bits_per_byte']:.4f}" for s in c_split(ladder))
            log(f"[scaling] {name}: bits/byte {bpb} ({entry['wall_s']:.0f}s train, "
                f"{entry['eval_wall_s']:.0f}s eval)")
    results = write_results(ladder, workdir)
    return {"trained": trained, "skipped": skipped, "failed": failed, "busy": busy,
            "results": results}


def _device_count() -> int:
    import jax

    return jax.device_count()
