"""The decode loop: requests wait in a bounded queue, take a free slot of the batch as one
frees, and then share every decode step with the other slots until they finish.

One thread owns the device (prefills, steps, prompt scoring run there, in arrival order);
the web handlers talk to it through `Job`s: `submit` queues one (or raises `QueueFull`),
the loop reports progress through the job's `notify` callback, and `cancel` (a client gone)
frees its slot at the next step.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np

from gopher_jax.serve.batch import Batch, Rows
from gopher_jax.serve.text import TextSoFar

log = logging.getLogger(__name__)

# finish reasons (OpenAI's, and ours for a request that did not finish)
STOP, LENGTH, TIMEOUT, CANCELLED, FAILED = "stop", "length", "timeout", "cancelled", "error"


class QueueFull(Exception):
    pass


class EngineFailed(Exception):
    """The decoding loop has stopped (the device could not be reset after a failure)."""


@dataclasses.dataclass
class Job:
    """One prompt to continue. `ids` is the model's input (EOS first); `score_prompt` asks
    for the log-probabilities of ids[1:]; max_tokens 0 only scores. Filled in by the loop:
    tokens, their log-probabilities and top alternatives, the text (cut before a stop
    string), finish_reason; `decoded` grows the text token by token."""

    ids: list[int]
    max_tokens: int
    seed: int
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    score_prompt: bool = False
    deadline: float = float("inf")
    notify: Callable[[Job], None] = lambda job: None
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[float] = dataclasses.field(default_factory=list)
    prompt_top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str = ""
    cancelled: bool = False
    decoded: TextSoFar = dataclasses.field(default_factory=TextSoFar, repr=False)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True

    def visible(self) -> str:
        """The text that can be shown now: all of it when finished, else without a tail
        that may still turn into a stop string or an unfinished UTF-8 character."""
        if self.done:
            return self.text
        hold = max((len(s) - 1 for s in self.stop), default=0)
        text = self.text[:len(self.text) - hold] if hold else self.text
        return text.rstrip("\ufffd")


def _top(ids: np.ndarray, lp: np.ndarray) -> list[tuple[int, float]]:
    return [(int(i), float(p)) for i, p in zip(ids, lp, strict=True)]


class Engine:
    """The loop over a `Batch` of `slots` rows; `queue_size` jobs may wait for a slot."""

    def __init__(self, batch: Batch, token_bytes: Callable[[Sequence[int]], bytes],
                 eos_id: int, queue_size: int):
        self.batch, self.token_bytes, self.eos_id = batch, token_bytes, eos_id
        self.queue_size = queue_size
        self.pending: collections.deque[Job] = collections.deque()
        self.rows: list[Job | None] = [None] * batch.slots
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="gopher-serve-engine",
                                       daemon=True)
        self.cache = None
        self.inputs = None  # the step's Rows on the device; None after a row starts or ends
        self.steps = 0  # decode steps run (all rows at once)
        self.failed: str | None = None  # why the loop stopped (the cache could not be reset)
        self.tokens_out = 0

    def start(self) -> None:
        self.cache = self.batch.warm_up()
        self.thread.start()

    def stop(self) -> None:
        """Finishes the jobs it has, then ends the loop."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread.is_alive():
            self.thread.join()

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queues every job or none (QueueFull when they do not all fit; EngineFailed once
        the loop has stopped)."""
        with self.cond:
            if self.failed is not None:
                raise EngineFailed(self.failed)
            if len(self.pending) + len(jobs) > self.queue_size:
                raise QueueFull(f"{len(self.pending)} requests wait already "
                                f"(the queue holds {self.queue_size})")
            self.pending.extend(jobs)
            self.cond.notify()

    @property
    def waiting(self) -> int:
        return len(self.pending)

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    # -- the loop ---------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not any(self.rows) and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.pending and not any(self.rows):
                    return
            try:
                self._admit()
                if any(self.rows):
                    self._step()
            except Exception as e:  # noqa: BLE001 - a device failure fails its jobs, not the server
                log.error("decoding failed: %s: %s", type(e).__name__, e)
                for i, job in enumerate(self.rows):
                    if job is not None:
                        self._finish(job, FAILED, f"{type(e).__name__}: {e}")
                        self._set_row(i, None)
                try:
                    self.cache = self.batch.new_cache()
                except Exception as e2:  # noqa: BLE001 - no cache: no decoding, end cleanly
                    self._give_up(f"{type(e2).__name__}: {e2} (resetting the cache after "
                                  f"{type(e).__name__}: {e})")
                    return

    def _give_up(self, reason: str) -> None:
        """The loop ends: every waiting job fails with `reason`, later submits raise
        EngineFailed, and the server's /health and /ready answer 503."""
        log.error("the decoding loop stopped: %s", reason)
        with self.cond:
            self.failed = reason
            jobs = list(self.pending)
            self.pending.clear()
        for job in jobs:
            self._finish(job, FAILED, reason)

    def _expired(self, job: Job) -> str | None:
        if job.cancelled:
            return CANCELLED
        if time.monotonic() > job.deadline:
            return TIMEOUT
        return None

    def _admit(self) -> None:
        while True:
            with self.cond:
                free = [i for i, r in enumerate(self.rows) if r is None]
                if not self.pending or not free:
                    return
                job = self.pending.popleft()
            reason = self._expired(job)
            if reason:
                self._finish(job, reason)
                continue
            try:
                started = self._start(job, free[0])
            except Exception as e:  # out of every queue: fail it here, the rows in _run
                self._finish(job, FAILED, f"{type(e).__name__}: {e}")
                raise
            if not started:
                self._finish(job, LENGTH)

    def _start(self, job: Job, slot: int) -> bool:
        """Scores the job's prompt if asked; prefills it into `slot` unless it only scores
        (-> False)."""
        if job.score_prompt:
            ids, lp = self.batch.score(job.ids)
            job.prompt_logprobs = [float(x) for x in lp[:, 0]]
            job.prompt_top = [_top(i[1:], p[1:]) for i, p in zip(ids, lp, strict=True)]
        if job.max_tokens == 0:
            return False
        ids, lp, self.cache = self.batch.prefill(self.cache, slot, job.ids, job.seed,
                                                 job.temperature, job.top_k, job.top_p)
        self._set_row(slot, job)
        self._append(slot, job, ids, lp)
        return True

    def _set_row(self, slot: int, job: Job | None) -> None:
        self.rows[slot] = job
        self.inputs = None

    def _step(self) -> None:
        if self.inputs is None:
            self.inputs = self._inputs()
        ids, lp, self.cache, self.inputs = self.batch.step(self.cache, self.inputs)
        self.steps += 1
        for i, job in enumerate(self.rows):
            if job is not None:
                self._append(i, job, ids[i], lp[i])

    def _inputs(self) -> Rows:
        """The rows' step inputs from their jobs. A step returns the next step's itself (each
        active row's new token at the next index), so this runs only after a row started or
        ended: one transfer to the device per change, not per token."""
        b = self.batch.slots
        tokens, active = np.zeros(b, np.int32), np.zeros(b, bool)
        seeds, index = np.zeros(b, np.uint32), np.zeros(b, np.int32)
        temperature, top_k, top_p = np.zeros(b, np.float32), np.zeros(b, np.int32), np.ones(b)
        for i, job in enumerate(self.rows):
            if job is not None:
                tokens[i], active[i] = job.tokens[-1], True
                seeds[i], index[i] = job.seed, len(job.tokens)
                temperature[i], top_k[i], top_p[i] = job.temperature, job.top_k, job.top_p
        return self.batch.rows(tokens, active, seeds, index, temperature, top_k, top_p)

    def _append(self, slot: int, job: Job, ids: np.ndarray, lp: np.ndarray) -> None:
        """The row's new token (ids[0]) and its alternatives; finishes the job at EOS, a stop
        string, max_tokens, a timeout or a cancel."""
        token = int(ids[0])
        reason = self._expired(job)
        if reason is None and token == self.eos_id:
            reason = STOP
        if reason is None:
            job.tokens.append(token)
            job.logprobs.append(float(lp[0]))
            job.top.append(_top(ids[1:], lp[1:]))
            self.tokens_out += 1
            finished_before = len(job.decoded.finished)
            job.text = job.decoded.add(self.token_bytes((token,)))
            cut = job.decoded.find_stop(job.stop, finished_before) if job.stop else -1
            if cut >= 0:
                job.text = job.text[:cut]
                reason = STOP
            elif len(job.tokens) >= job.max_tokens:
                reason = LENGTH
            elif len(job.tokens) + len(job.ids) >= self.batch.max_len:
                reason = LENGTH
        if reason is not None:
            self._set_row(slot, None)
            self._finish(job, reason)
        else:
            job.notify(job)

    def _finish(self, job: Job, reason: str, error: str = "") -> None:
        job.finish_reason, job.error = reason, error
        job.notify(job)
