"""The training loop: restore or init, then the steps, with the hooks (log, eval, checkpoint)
run at the steps their `every` names.

Nothing blocks on the host between steps except at hook steps: per-step metrics stay on
device until then, so dispatch runs ahead of the computation. At a hook step the pending
metrics are fetched and judged (spikes.SpikeGuard) before any hook sees the state, so no
checkpoint is written from a diverged one.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

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
from gopher_jax.train.goodput import START_SPLIT, Goodput, redone_after
from gopher_jax.train.spikes import Spike, SpikeGuard
from gopher_jax.train.watchdog import Watchdog


class NonFiniteLossError(UserError, FloatingPointError):
    """Training diverged (or spiked past the policy's rewinds); no checkpoint holds it."""


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


class Objective(Protocol):
    """What `train` minimises in place of the cross-entropy (train/distill.py): the train
    step it builds on the run's layout, and the fingerprints it adds to the data's in every
    checkpoint (a resume where they differ is refused like one onto other data)."""

    def identity(self, data_identity: dict[str, str]) -> dict[str, str]: ...

    def batches(self, data: data_lib.Batches) -> data_lib.Batches: ...

    def make_step(self, c: ml_collections.ConfigDict, layout: Layout) -> Callable: ...


def train(c: ml_collections.ConfigDict, workdir: str | os.PathLike,
          reporter: Reporter | None = None, accept_new_data: bool = False,
          objective: Objective | None = None) -> dict[str, Any]:
    """Trains to c.train.steps, resuming from the newest checkpoint in workdir. Returns a
    summary with the final metrics.

    The workdir is locked for the run (process 0 holds the lease): a second run on it is
    refused, naming the holder. A resume onto data whose fingerprints (tokenizer, training
    chunks) differ from the checkpoint's is refused unless `accept_new_data`; then the change
    is recorded in the metrics and the checkpoints record the new fingerprints.
    """
    from gopher_jax.parallel import distributed

    clock_start = time.perf_counter()
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
        run = _restore_or_init(c, mesh, storage.path(workdir), reporter or Reporter(),
                               accept_new_data, clock_start, objective)
        return _loop(run, lock)
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class Run:
    """What the steps and the hooks share."""

    c: ml_collections.ConfigDict
    mesh: jax.sharding.Mesh
    layout: Layout
    workdir: epath.Path
    reporter: Reporter
    data: Any
    identity: dict[str, str]
    ckpt: ckpt_lib.Checkpointer
    writer: MetricsWriter
    guard: SpikeGuard
    clock: Goodput
    state: Any
    step: int
    flops_per_token: float
    peak: hardware.Peak
    pending: list = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    eval: dict[str, float] | None = None  # this step's evaluation, for keep-best saves
    eval_step: Callable | None = None
    compiled: bool = False
    step_s_seen: float = 0.0  # step time booked up to the previous fetch
    objective: Objective | None = None  # None: the cross-entropy

    def meta(self) -> ckpt_lib.CheckpointMeta:
        return ckpt_lib.meta_for(self.c, self.step, self.mesh, self.identity,
                                 position=self.guard.index_of(self.step),
                                 spikes=self.guard.state(),
                                 goodput=self.clock.state())


def _loop(run: Run, lock: ckpt_lib.WorkdirLock | None) -> dict[str, Any]:
    c, total = run.c, run.c.train.steps
    train_step = (step_lib.make_train_step(c, run.layout) if run.objective is None
                  else run.objective.make_step(c, run.layout))
    hooks = _hooks(run)
    preempt, watchdog = Preemption(), Watchdog(c.train.watchdog_s).start()
    run.reporter.start(run.step, total)
    run.summary["start_step"], finished = run.step, False
    try:
        with jax.set_mesh(run.mesh):
            while run.step < total:
                _step(run, train_step, lock)
                due = [h for h in hooks if h.due(run.step, total)]
                stop = preempt.should_stop(sync=bool(due))  # one decision per step
                if not (due or stop):
                    continue
                rows = _fetch_checked(run)
                if rows is None:  # a spike: the run went back to a checkpoint
                    continue
                watchdog.beat(f"step {run.step}")
                _note_rates(run, rows)
                for hook in hooks:
                    if hook in due or hook.forced(run, stop):
                        hook.fn(run)
                        watchdog.beat(f"{hook.name} at step {run.step}")
                if stop:
                    run.ckpt.wait()
                    run.reporter.message(f"{preempt.name or 'a signal to another process'}: "
                                         f"saved step {run.step}; exiting to be resumed")
                    run.summary["preempted"] = True
                    break
        finished = True
    finally:
        watchdog.stop()
        preempt.restore()
        run.reporter.close()
        run.writer.close()
        # After a failure its own error is the one to report, not a second one from closing.
        run.ckpt.close(raise_errors=finished)
    run.summary.update(step=run.step, goodput=run.clock.summary())
    return run.summary


def _restore_or_init(c: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                     workdir: epath.Path, reporter: Reporter, accept_new_data: bool,
                     clock_start: float, objective: Objective | None = None) -> Run:
    """Prepares the data, then restores the newest checkpoint that is readable and matches
    the config and data (or initialises the state), and writes config.json."""
    from gopher_jax.parallel import distributed

    say = reporter.message
    say(f"mesh {dict(mesh.shape)} rules={c.mesh.rules} devices={jax.device_count()} "
        f"processes={jax.process_count()}")
    info = distributed.run_on_process_zero_first(lambda: data_lib.prepare(c, log=say))
    data = data_lib.train_data(c)
    if objective is not None:
        data = objective.batches(data)  # what the step reads beside the tokens
    layout = Layout.build(c, mesh)
    ckpt = ckpt_lib.Checkpointer(workdir, keep=c.train.checkpoint_keep,
                                 keep_best=c.train.checkpoint_keep_best)
    identity = data_lib.data_identity(info, c.data.train_split)
    if objective is not None:
        identity = objective.identity(identity)

    def check(meta: ckpt_lib.CheckpointMeta) -> None:
        # Before any restore: a different model or different data is refused by name.
        ckpt_lib.check_config(meta, c)
        ckpt_lib.check_data(meta, identity, accept_new_data)

    restored = ckpt.restore_latest(layout.state, check=check)
    data_changed: list[str] = []
    meta: ckpt_lib.CheckpointMeta | None = None
    if restored is None:
        state = state_lib.create_state(c, layout)
        say(f"new run in {workdir}: initialised state (seed {c.seed})")
    else:
        state, meta = restored
        other = ckpt_lib.check_config(meta, c)
        data_changed = ckpt_lib.check_data(meta, identity, accept_new_data)
        say(f"resumed from step {meta.step} in {ckpt.directory} (written on mesh "
            f"{meta.mesh}, {meta.process_count} process(es))"
            + (f"; config changes allowed: {other}" if other else "")
            + (f"; new data accepted: {data_changed}" if data_changed else ""))
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / workdir_lib.CONFIG_JSON).write_text(c.to_json(indent=2))
    step = int(jax.device_get(state["step"]))
    guard = SpikeGuard(c.train, meta.spikes if meta else None)
    writer = MetricsWriter(workdir, resume_step=step, keep=guard.knows)
    if data_changed:
        writer.write(step, {f"changed_{k}": 1.0 for k in data_changed}, prefix="data")
    # The interrupted runs' work after this checkpoint (their rows just dropped) is redone.
    redone = redone_after(meta.saved_at if meta else None, step, writer.dropped,
                          writer.last_kept.get(START_SPLIT))
    clock = Goodput(meta.goodput if meta else None, redone=redone, start=clock_start)
    clock.lap("startup")
    clock.saved_at(step)
    writer.write(step, clock.start_row(), prefix=START_SPLIT, tensorboard=False)
    flops_tok = sizes.flops_per_token(c.model, c.data.seq_len)["train"]
    peak = hardware.Peak(str(compute_dtype(c.model.dtype)))
    say(f"peak {peak.per_device / 1e9:.1f} GFLOP/s per device ({peak.source}); "
        f"{flops_tok:.3g} train FLOPs/token; {data.num_chunks:,} train chunks "
        f"({info.splits[c.data.train_split].num_tokens:,} tokens)")
    return Run(c=c, mesh=mesh, layout=layout, workdir=workdir, reporter=reporter, data=data,
               identity=identity, ckpt=ckpt, writer=writer,
               guard=guard, clock=clock, state=state,
               step=step,
               flops_per_token=flops_tok, peak=peak, objective=objective)


def _step(run: Run, train_step: Callable, lock: ckpt_lib.WorkdirLock | None) -> None:
    """Dispatches one step on the next batch not skipped; a failed background save or a
    lost workdir lock stops the run here."""
    index = run.guard.index_of(run.step)
    # Between hook steps nothing may come back to the host: on TPU/GPU the guard turns an
    # accidental sync (a float() of a metric) into an error (CPU buffers bypass transfer
    # guards; tests count host reads there instead).
    with jax.transfer_guard_device_to_host("disallow_explicit"):
        run.state, m = train_step(run.state, run.data.batch(index, run.layout.batch_sharding))
    if not run.compiled:
        run.clock.lap("compile")  # the first call compiles before it dispatches
        run.compiled = True
    run.pending.append((run.step, index, m))
    run.step += 1
    run.eval = None
    run.ckpt.check(run.step)
    if lock is not None and lock.lost:
        raise ckpt_lib.WorkdirLockedError(
            f"another run took the lock of {run.workdir} at step {run.step}",
            "make sure one run trains in a workdir")


def _fetch_checked(run: Run) -> list[dict[str, float]] | None:
    """The pending steps' metrics, each loss judged by the spike guard. On a spike: the run
    goes back to a checkpoint from before it (None), or stops (NonFiniteLossError)."""
    rows = []
    pending, run.pending = run.pending, []
    for s, index, m in jax.device_get(pending):
        row = {k: float(v) for k, v in m.items()}
        spike = run.guard.judge(s, index, row["loss"], row["grad_norm"])
        if spike is not None:
            _rewind_or_stop(run, spike)
            return None
        rows.append(row)
    run.clock.lap("step")
    return rows


def _rewind_or_stop(run: Run, spike: Spike) -> None:
    """Checkpoints at or after the spike's step may hold the bad update: they are set aside.
    With spike_policy=rewind the run restores the newest one before it (or the initial
    state) and skips the batches around the spike; otherwise it stops naming that one."""
    run.ckpt.wait()
    before = [s for s in run.ckpt.steps() if s < spike.state_step]
    target = max(before, default=0)
    suspect = [s for s in run.ckpt.steps() if s >= spike.state_step]
    if suspect:
        run.ckpt.set_aside(suspect)
    if not run.guard.can_rewind():
        aside = (f"; steps {suspect}, which may hold the bad update, were set aside in "
                 f"{run.workdir / ckpt_lib.CORRUPT_DIR}" if suspect else "")
        why = ("" if run.guard.policy == "off" else
               f" ({run.guard.rewinds} rewinds, train.spike_max_rewinds)")
        raise NonFiniteLossError(
            f"{spike.describe()}{why}; the newest checkpoint from before it is "
            f"{f'step {target}' if before else 'none (the start)'}{aside}",
            "lower train.learning_rate or raise train.warmup_steps, or set "
            f"train.spike_policy=rewind; a rerun resumes from step {target}")
    start, end = run.guard.skip_around(spike, target)
    spikes = None
    if before:
        run.state = run.ckpt.restore(target, run.layout.state)
        spikes = run.ckpt.read_meta(target).spikes
    else:
        run.state = state_lib.create_state(run.c, run.layout)
    run.guard.restart_window(spikes)
    run.step = target
    run.writer.rewind(target, keep=run.guard.knows)
    run.writer.write(spike.state_step + 1, {
        "loss": spike.loss, "grad_norm": spike.grad_norm, "median": spike.median,
        "rewound_to": target, "skip_start": start, "skip_end": end,
        "rewinds": run.guard.rewinds}, prefix="spike")
    run.clock.rewound_to(target)
    run.clock.lap("rewound")
    run.step_s_seen = run.clock.run["step"]
    run.reporter.message(f"{spike.describe()}: back to step {target}, skipping data batches "
                         f"[{start}, {end}) (rewind {run.guard.rewinds} of "
                         f"{run.guard.max_rewinds})")


def _note_rates(run: Run, rows: list[dict[str, float]]) -> None:
    """Throughput of the steps just fetched, on the last row (what the log hook writes)."""
    c, last = run.c, rows[-1]
    step_s, run.step_s_seen = run.clock.run["step"] - run.step_s_seen, run.clock.run["step"]
    tok_s = len(rows) * c.train.batch_size * c.data.seq_len / max(step_s, 1e-9)
    rate = tok_s * run.flops_per_token / jax.device_count()  # model FLOP/s per device
    last.update(tokens_per_s=tok_s, model_flops_per_s=rate, mfu=run.peak.mfu(rate))
    # A mixture's tokens and epochs per source.
    last.update(run.data.consumed(run.guard.index_of(run.step)))
    run.summary["train"] = last


# ------------------------------------------------------------------------------- hooks


@dataclasses.dataclass(frozen=True)
class Hook:
    """`fn(run)` at every `every`-th step and at the last (every <= 0: never, unless
    forced: a checkpoint when the run stops, or after an evaluation with keep-best)."""

    name: str
    every: int
    fn: Callable[[Run], None]
    forced: Callable[[Run, bool], bool] = lambda run, stop: False

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == total)


def _hooks(run: Run) -> list[Hook]:
    t = run.c.train
    keep_best = t.checkpoint_keep_best > 0
    return [
        Hook("log", t.log_every, _log),
        Hook("eval", t.eval_every, _evaluate),
        Hook("save", t.checkpoint_every, _save,
             forced=lambda run, stop: stop or (keep_best and run.eval is not None)),
    ]


def _log(run: Run) -> None:
    run.writer.write(run.step, run.summary["train"])
    run.reporter.metrics(run.step, run.summary["train"])


def _evaluate(run: Run) -> None:
    c = run.c
    if run.eval_step is None:
        run.eval_step = step_lib.make_eval_step(c, run.layout)
    ev = evaluate_split(c, run.layout, run.state["params"], c.data.eval_split, run.eval_step,
                        c.train.eval_batches)
    run.writer.write(run.step, ev, prefix="eval")
    run.reporter.message(f"step {run.step}: {c.data.eval_split} bits/byte "
                         f"{ev['bits_per_byte']:.4f} loss {ev['loss']:.4f}")
    run.summary["eval"] = run.eval = ev
    run.clock.lap("eval")


def _save(run: Run) -> None:
    best = ({ckpt_lib.BEST_METRIC: float(run.eval["bits_per_byte"])}
            if run.eval is not None and run.c.train.checkpoint_keep_best > 0 else None)
    run.ckpt.save(run.step, run.state, run.meta(), metrics=best, force=True)
    run.clock.lap("save")
    run.clock.saved_at(run.step)
    run.writer.write(run.step, run.clock.summary(), prefix="goodput")
