"""Score a Gopher on tasks with its params sharded on the mesh: `score_tasks` returns the
results, `run` also writes <workdir>/tasks.json and tasks.md.

`ShardedModel` is the model_queries.Model of params on a mesh: every batch is split over the rule
set's batch axes (data and fsdp), so the batch size is rounded up to a multiple of their
device count (`rows_per_batch`); greedy decoding runs through the KV cache (model/decode.py).
Results are the same for any batch size and device count (model_queries.py packs requests so that
a row's result depends on the row alone).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.layout import Layout
from gopher_jax.model import decode, gopher
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.tasks import model_queries
from gopher_jax.tasks.grading import MAIN_METRIC, TokenizerLike, score
from gopher_jax.tasks.records import GroupResult, TaskResult, TaskResults, TaskScore
from gopher_jax.tasks.spec import LANGUAGE_MODELLING, LOWER_IS_BETTER, Task


def model_logits_fn(c: ml_collections.ConfigDict, params: Any) -> model_queries.LogitsFn:
    """The unsharded forward pass as a logits_fn (params on one device): for stubs, tests and
    the lm-eval adapter."""
    graphdef, _ = gopher.abstract(c.model)
    forward = jax.jit(lambda p, tokens: gopher.apply(graphdef, p, tokens).astype(np.float32))
    return lambda tokens: np.asarray(forward(params, tokens))


def batch_devices(layout: Layout) -> int:
    """How many ways a batch's rows are split: the product of the batch axes' mesh sizes."""
    axes = rules_lib.mesh_axes_for(layout.rules, "batch")
    return math.prod(layout.mesh.shape[a] for a in axes)


def rows_per_batch(batch_size: int, layout: Layout) -> int:
    """batch_size rounded up to a multiple of the batch axes' device count."""
    n = batch_devices(layout)
    return -(-batch_size // n) * n


def _host(x: jax.Array) -> np.ndarray:
    """A replicated array's value from this process's first device (any process count)."""
    return np.asarray(x.addressable_data(0))


_FUNCTIONS: dict[tuple[str, str, rules_lib.Rules], tuple[Callable, ...]] = {}


def _functions(m: ml_collections.ConfigDict, platform: str, rules: rules_lib.Rules
               ) -> tuple[Callable, ...]:
    """The jitted (score, argmax_at, prefill, step) of a model config, built once per process
    so that models of one config share their compiles (traced under the caller's mesh)."""
    key = (m.to_json(), platform, rules)
    if key in _FUNCTIONS:
        return _FUNCTIONS[key]
    graphdef, _ = gopher.abstract(m, platform)

    def replicate(x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, PartitionSpec())

    @jax.jit
    def score(params: Any, inputs: jax.Array, targets: jax.Array
              ) -> tuple[jax.Array, jax.Array]:
        logits = gopher.apply(graphdef, params, inputs)  # [B, W, V] float32
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)
        top = jnp.argmax(logits, axis=-1) == targets
        return replicate(logp[..., 0]), replicate(top)

    @jax.jit
    def argmax_at(params: Any, tokens: jax.Array, lengths: jax.Array) -> jax.Array:
        model = nnx.merge(graphdef, params)
        x = jnp.take_along_axis(model.hidden(tokens), (lengths - 1)[:, None, None], 1)
        return replicate(jnp.argmax(model.logits(x)[:, 0], axis=-1).astype(jnp.int32))

    @functools.partial(jax.jit, static_argnums=3)
    def prefill(params: Any, tokens: jax.Array, segment_ids: jax.Array, max_len: int
                ) -> tuple[jax.Array, decode.Cache]:
        logits, cache = decode.prefill(nnx.merge(graphdef, params), tokens, max_len,
                                       segment_ids)
        return replicate(jnp.argmax(logits, axis=-1).astype(jnp.int32)), cache

    @functools.partial(jax.jit, donate_argnums=1)
    def step(params: Any, cache: decode.Cache, tokens: jax.Array
             ) -> tuple[jax.Array, decode.Cache]:
        logits, cache = decode.step(nnx.merge(graphdef, params), cache, tokens)
        return replicate(jnp.argmax(logits, axis=-1).astype(jnp.int32)), cache

    _FUNCTIONS[key] = (score, argmax_at, prefill, step)
    return _FUNCTIONS[key]


class ShardedModel(model_queries.Uncached):
    """A Gopher's params on a mesh as a model_queries.Model: a jitted forward for log-likelihoods
    and cached greedy decoding (or, with cached=False, the uncached baseline: the forward
    re-run for every token). Inputs are sharded over the batch axes; the small outputs (token
    log-probabilities, next tokens) come back replicated, so every process reads them."""

    def __init__(self, c: ml_collections.ConfigDict, params: Any, layout: Layout,
                 cached: bool = True):
        self.c, self.params, self.layout, self.cached = c, params, layout, cached
        platform = layout.mesh.devices.flat[0].platform
        self._score, self._argmax_at, self._prefill, self._step = _functions(
            c.model, platform, layout.rules)

    @contextlib.contextmanager
    def _on_mesh(self) -> Iterator[None]:
        with jax.set_mesh(self.layout.mesh), rules_lib.use_rules(self.layout.rules):
            yield

    def _put(self, x: np.ndarray) -> jax.Array:
        """A host array (the same on every process) split by rows over the batch axes."""
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, self.layout.batch_sharding,
                                            lambda index: x[index])

    def rows(self, batch_size: int) -> int:
        return rows_per_batch(batch_size, self.layout)

    def score(self, inputs: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with self._on_mesh():
            logp, top = self._score(self.params, self._put(inputs), self._put(targets))
        return _host(logp), _host(top)

    def argmax_at(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        with self._on_mesh():
            return _host(self._argmax_at(self.params, self._put(tokens), self._put(lengths)))

    def start(self, tokens: np.ndarray, lengths: np.ndarray, max_len: int
              ) -> tuple[np.ndarray, Any]:
        if not self.cached:
            return super().start(tokens, lengths, max_len)
        # decode.py takes rows of different lengths left-aligned to the width, their padding
        # in segment 0 (never seen; positions are relative, so nothing else changes).
        lengths = np.asarray(lengths, np.int32)
        source = np.arange(tokens.shape[1])[None] - (tokens.shape[1] - lengths)[:, None]
        segment_ids = (source >= 0).astype(np.int32)
        left = np.take_along_axis(tokens, np.maximum(source, 0), axis=1) * segment_ids
        with self._on_mesh():
            nxt, cache = self._prefill(self.params, self._put(left), self._put(segment_ids),
                                       max_len)
        return _host(nxt), cache

    def next(self, state: Any, tokens: np.ndarray) -> tuple[np.ndarray, Any]:
        if not self.cached:
            return super().next(state, tokens)
        if int(state.length) >= state.max_len:
            raise ValueError(f"no room left: decoding was started with max_len {state.max_len}")
        with self._on_mesh():
            nxt, cache = self._step(self.params, state, self._put(np.asarray(tokens, np.int32)))
        return _host(nxt), cache


def load(c: ml_collections.ConfigDict, source: Any, mesh: Mesh | Layout,
         cached: bool = True, int8: bool = False) -> tuple[ShardedModel, int | None]:
    """(the model, its training step) from `source`: a workdir (its newest checkpoint,
    restored with the mesh's shardings) or a param tree (placed on the mesh; step None)."""
    layout = Layout.of(c, mesh)
    if isinstance(source, (str, os.PathLike)):
        from gopher_jax.evaluate import restore_params

        params, step = restore_params(c, source, layout, int8)
        if int8:  # corpora's eval step takes the int8 kernels' shardings
            layout = layout.with_params(params)
    else:
        params, step = jax.device_put(source, layout.param_shardings), None
    return ShardedModel(c, params, layout, cached), step


def summarize(tasks: Sequence[Task], scored: Sequence[TaskScore], step: int | None
              ) -> TaskResults:
    """Per task: its result; per group: the mean of its tasks' main metrics."""
    results: dict[str, TaskResult] = {}
    by_group: dict[str, list[float]] = {}
    for task, s in zip(tasks, scored, strict=True):
        r = TaskResult(group=task.group, kind=task.kind,
                       n=len(task.examples) if s.n is None else s.n, chance=task.chance,
                       main_metric=task.main_metric or MAIN_METRIC[task.kind],
                       metrics=s.metrics, counts=s.counts)
        results[task.name] = r
        by_group.setdefault(task.group, []).append(r.main)
    return TaskResults(step=step, tasks=results, groups={
        g: GroupResult(mean=float(np.mean(v)), tasks=len(v)) for g, v in by_group.items()})


def markdown(results: TaskResults) -> str:
    """tasks.md: a row per task, then a row per group."""
    rows = ["| task | group | kind | n | metrics | chance |", "|---|---|---|---:|---|---:|"]
    for name, t in results.tasks.items():
        values = ", ".join(f"{k} {v:.3f}" for k, v in t.metrics.items())
        chance = "n/a" if t.main_metric in LOWER_IS_BETTER else f"{t.chance:.3f}"
        rows.append(f"| {name} | {t.group} | {t.kind} | {t.n} | {values} | {chance} |")
    rows += ["", "| group | tasks | mean of main metric |", "|---|---:|---:|"]
    rows += [f"| {g} | {v.tasks} | {v.mean:.3f} |" for g, v in results.groups.items()]
    return "\n".join(rows) + "\n"


def score_model(c: ml_collections.ConfigDict, model: ShardedModel, tasks: Sequence[Task],
                tok: TokenizerLike, batch_size: int = 8, max_new_tokens: int = 32,
                step: int | None = None, packed: bool = True) -> TaskResults:
    """The results of `tasks` scored with a loaded model (batch_size rounded up to a
    multiple of the batch axes' device count)."""
    rows = model.rows(batch_size)
    scored = []
    for t in tasks:
        if t.kind == LANGUAGE_MODELLING:  # a corpus: bits per byte through evaluate.py
            from gopher_jax.tasks import corpora

            scored.append(corpora.score(c, model.layout, model.params, t))
        else:
            scored.append(score(t, tok, model, c.data.seq_len, rows, max_new_tokens, packed))
    return summarize(tasks, scored, step)


def score_tasks(c: ml_collections.ConfigDict, source: Any, mesh: Mesh | Layout,
                tasks: Sequence[Task], batch_size: int = 8, max_new_tokens: int = 32,
                tok: TokenizerLike | None = None, int8: bool = False) -> TaskResults:
    """The results of `tasks` scored with `source` (a workdir or a param tree, see `load`)
    on `mesh`; writes nothing. The tokenizer defaults to the config's."""
    model, step = load(c, source, mesh, int8=int8)
    if tok is None:
        from gopher_jax import data

        tok = data.load_tokenizer(c)
    return score_model(c, model, tasks, tok, batch_size, max_new_tokens, step)


def run(c: ml_collections.ConfigDict, workdir: str | os.PathLike, tasks: Sequence[Task],
        batch_size: int = 8, max_new_tokens: int = 32, int8: bool = False) -> TaskResults:
    """The tasks scored with the workdir's newest checkpoint on the config's mesh; written to
    <workdir>/tasks.json and tasks.md (by process 0; with `int8`, tasks_int8.json and
    tasks_int8.md), and returned."""
    from gopher_jax.parallel import distributed
    from gopher_jax.parallel import mesh as mesh_lib

    distributed.initialize_from_env()
    results = score_tasks(c, workdir, mesh_lib.make_mesh(c), tasks, batch_size,
                          max_new_tokens, int8=int8)
    table = markdown(results)
    if jax.process_index() == 0:
        out = storage.path(workdir)
        (out / workdir_lib.int8_name(workdir_lib.TASKS_JSON, int8)).write_text(
            json.dumps(results.to_json(), indent=2))
        (out / workdir_lib.int8_name(workdir_lib.TASKS_MD, int8)).write_text(table)
    return results
