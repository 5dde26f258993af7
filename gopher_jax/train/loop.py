"""The training loop: mesh -> sharded state (fresh or restored) -> batches -> step -> logs.

Nothing blocks on the host between steps except at logging, evaluation and checkpoint steps:
per-step metrics stay on device until then, so dispatch runs ahead of the computation.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import data as data_lib
from gopher_jax import hardware, storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.errors import UserError
from gopher_jax.evaluate import evaluate_split
from gopher_jax.layout import Layout
from gopher_jax.metrics import MetricsWriter
from gopher_jax.model import sizes
from gopher_jax.model.gopher import compute_dtype
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.train import state as state_lib
from gopher_jax.train import step as step_lib


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged; no checkpoint was written from the bad state."""


class Reporter:
    """Where the loop reports to; the CLI's console shows it, library callers may ignore it.
    Only process 0's reports are shown."""

    def start(self, step: int, total: int) -> None: ...

    def metrics(self, step: int, row: dict[str, Any]) -> None: ...

    def message(self, msg: str) -> None: ...

    def close(self) -> None: ...


class Preemption:
    """SIGTERM (what TPU VMs and SLURM send before preempting) or Ctrl-C (SIGINT) -> finish the
    step, save, exit 0. A second Ctrl-C stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._old = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.name = signal.Signals(signum).name

    def should_stop(self, sync: bool) -> bool:
        """With several processes all must stop at the same step: they agree (a host
        all-gather) only at steps where the loop syncs anyway."""
        if jax.process_count() == 1:
            return self.requested
        if not sync:
            return False
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def train(c: ml_collections.ConfigDict, workdir: str | os.PathLike,
          reporter: Reporter | None = None, accept_new_data: bool = False) -> dict[str, Any]:
    """Trains to c.train.steps, resuming from the newest checkpoint in workdir. Returns a
    summary with the final metrics.

    The workdir is locked for the run (process 0 holds the lease): a second run on it is
    refused, naming the holder. A resume onto data whose fingerprints (tokenizer, training
    chunks) differ from the checkpoint's is refused unless `accept_new_data`; then the change
    is recorded in the metrics and the checkpoints record the new fingerprints.
    """
    from gopher_jax.parallel import distributed

    distributed.initialize_from_env()
    mesh = mesh_lib.make_mesh(c)  # validates the config first: a mistake touches nothing
    lock = ckpt_lib.WorkdirLock(workdir) if jax.process_index() == 0 else None
    error: Exception | None = None
    if lock is not None:
        try:
            lock.acquire()
        except ckpt_lib.WorkdirLockedError as e:
            error = e
    if not ckpt_lib.all_processes(error is None):
        raise error or ckpt_lib.WorkdirLockedError(
            f"process 0 could not lock workdir {workdir}", "see process 0's error")
    try:
        return _train(c, mesh, storage.path(workdir), reporter or Reporter(), accept_new_data,
                      lock)
    finally:
        if lock is not None:
            lock.release()


def _train(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, workdir: epath.Path,
           reporter: Reporter, accept_new_data: bool, lock: ckpt_lib.WorkdirLock | None
           ) -> dict[str, Any]:
    from gopher_jax.parallel import distributed

    say = reporter.message
    say(f"mesh {dict(mesh.shape)} rules={c.mesh.rules} devices={jax.device_count()} "
        f"processes={jax.process_count()}")

    info = distributed.run_on_process_zero_first(lambda: data_lib.prepare(c, log=say))
    data = data_lib.train_data(c)
    layout = Layout.build(c, mesh)
    sharding = layout.batch_sharding

    keep_best = c.train.get("checkpoint_keep_best", 0)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=c.train.checkpoint_keep, keep_best=keep_best)
    identity = data_lib.data_identity(info, c.data.train_split)

    def check(meta: dict[str, Any]) -> None:
        # Before any restore: a different model or different data is refused by name.
        ckpt_lib.check_config(meta, c)
        ckpt_lib.check_data(meta, identity, accept_new_data)

    restored = ckpt.restore_latest(layout.state, check=check)
    data_changed: list[str] = []
    if restored is None:
        state = state_lib.create_state(c, layout)
        say(f"new run in {workdir}: initialised state (seed {c.seed})")
    else:
        state, meta = restored
        other = ckpt_lib.check_config(meta, c)
        data_changed = ckpt_lib.check_data(meta, identity, accept_new_data)
        say(f"resumed from step {meta['step']} in {ckpt.directory} (written on mesh "
            f"{meta['mesh']}, {meta['process_count']} process(es))"
            + (f"; config changes allowed: {other}" if other else "")
            + (f"; new data accepted: {data_changed}" if data_changed else ""))
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / workdir_lib.CONFIG_JSON).write_text(c.to_json(indent=2))

    train_step = step_lib.make_train_step(c, layout)
    eval_step = step_lib.make_eval_step(c, layout)
    flops_tok = sizes.flops_per_token(c.model, c.data.seq_len)["train"]
    peak = hardware.Peak(str(compute_dtype(c.model.dtype)))
    say(f"peak {peak.per_device / 1e9:.1f} GFLOP/s per device ({peak.source}); "
        f"{flops_tok:.3g} train FLOPs/token; {data.num_chunks:,} train chunks "
        f"({info.splits[c.data.train_split].num_tokens:,} tokens)")
    tokens_per_step = c.train.batch_size * c.data.seq_len

    start = int(jax.device_get(state["step"]))
    writer = MetricsWriter(workdir, resume_step=start)
    if data_changed:
        writer.write(start, {f"changed_{k}": 1.0 for k in data_changed}, prefix="data")
    total = c.train.steps
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    preempt = Preemption()
    reporter.start(start, total)
    last_t, last_step = time.perf_counter(), start
    summary: dict[str, Any] = {"start_step": start}
    step = start
    finished = False
    try:
        with jax.set_mesh(mesh):
            while step < total:
                # Between logging steps nothing may come back to the host: on TPU/GPU the
                # guard turns an accidental sync (a float() of a metric) into an error (CPU
                # buffers bypass transfer guards; tests count host reads there instead).
                with jax.transfer_guard_device_to_host("disallow_explicit"):
                    state, m = train_step(state, data.batch(step, sharding))
                pending.append((step, m))
                step += 1
                ckpt.check()  # a background save that failed stops the run at the next step
                if lock is not None and lock.lost:
                    raise ckpt_lib.WorkdirLockedError(
                        f"another run took the lock of {workdir} at step {step}",
                        "make sure one run trains in a workdir")
                log_now = step % c.train.log_every == 0 or step == total
                eval_now = c.train.eval_every > 0 and (step % c.train.eval_every == 0
                                                       or step == total)
                save_now = step % c.train.checkpoint_every == 0 or step == total
                # One decision per step (a signal during eval is seen at the next step).
                stop = preempt.should_stop(sync=log_now or eval_now or save_now)
                save_now = save_now or stop or (eval_now and keep_best > 0)
                if not (log_now or eval_now or save_now):
                    continue
                rows = _fetch_checked(pending)  # raises before any bad state is saved
                pending = []
                now = time.perf_counter()
                tok_s = (step - last_step) * tokens_per_step / max(now - last_t, 1e-9)
                last_t, last_step = now, step
                last = rows[-1]
                rate = tok_s * flops_tok / jax.device_count()  # model FLOP/s per device
                last.update(tokens_per_s=tok_s, model_flops_per_s=rate, mfu=peak.mfu(rate))
                last.update(data.consumed(step))  # a mixture's tokens and epochs per source
                if log_now:
                    writer.write(step, last)
                    reporter.metrics(step, last)
                if eval_now:
                    ev = evaluate_split(c, layout, state["params"], c.data.eval_split, eval_step,
                                        c.train.eval_batches)
                    writer.write(step, ev, prefix="eval")
                    reporter.message(f"step {step}: {c.data.eval_split} bits/byte "
                                     f"{ev['bits_per_byte']:.4f} loss {ev['loss']:.4f}")
                    summary["eval"] = ev
                    last_t = time.perf_counter()  # eval time is not training time
                if save_now:
                    best = ({ckpt_lib.BEST_METRIC: float(ev["bits_per_byte"])}
                            if eval_now and keep_best > 0 else None)
                    ckpt.save(step, state, ckpt_lib.meta_for(c, step, mesh, identity), metrics=best,
                              force=True)
                summary["train"] = last
                if stop:
                    ckpt.wait()
                    reporter.message(f"{preempt.name or 'a signal to another process'}: saved step "
                                     f"{step}; exiting to be resumed")
                    summary["preempted"] = True
                    break
        finished = True
    finally:
        preempt.restore()
        reporter.close()
        writer.close()
        # After a failure its own error is the one to report, not a second one from closing.
        ckpt.close(raise_errors=finished)
    summary["step"] = step
    return summary


def _fetch_checked(pending: list[tuple[int, dict[str, jax.Array]]]) -> list[dict[str, float]]:
    rows = []
    for s, m in jax.device_get(pending):
        row = {k: float(v) for k, v in m.items()}
        if not math.isfinite(row["loss"]) or not math.isfinite(row["grad_norm"]):
            raise NonFiniteLossError(
                f"non-finite loss {row['loss']} (grad norm {row['grad_norm']}) at step {s + 1}; "
                "no checkpoint was written from it. Lower train.learning_rate or raise "
                "train.warmup_steps, then resume from the last checkpoint.")
        rows.append(row)
    return rows
