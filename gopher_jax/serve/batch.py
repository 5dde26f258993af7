"""The served model's device functions: one prompt's prefill into a slot of a shared KV cache,
one decode step for every slot at once, sampling per row, prompt log-probabilities.

The cache (model/decode.py's Cache) holds `slots` rows of `max_len` positions. Each row has
its own length: the step is decode.step vmapped over rows, so a request's row starts at
position 0 whatever the others are doing, and its tokens depend on its own prompt, sampling
settings and seed alone (the other rows are other data in the same fixed shapes). Rows are
split over the rule set's batch axes (vmap's spmd_axis_name); params stay sharded as
restored. Inside a row, and for the one-row prefill, the batch axes are replicated.

Every shape is fixed: the step at (slots, max_len), the prefill and the prompt scorer at a
few prompt widths (powers of two from 16 up to the longest prompt), so no request compiles.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from gopher_jax.layout import Layout
from gopher_jax.model import decode, gopher
from gopher_jax.parallel import rules as rules_lib

TOP_LOGPROBS = 5  # the most alternatives a request may ask for (OpenAI's limit)


def prompt_widths(max_prompt: int) -> tuple[int, ...]:
    """Powers of two from 16 below max_prompt, then max_prompt itself."""
    widths, w = [], 16
    while w < max_prompt:
        widths.append(w)
        w *= 2
    return (*widths, max_prompt)


def width_for(n: int, max_prompt: int) -> int:
    return next(w for w in prompt_widths(max_prompt) if w >= n)


def choose(logits: jax.Array, seed: jax.Array, index: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One row: logits [V] -> (the token, its log-probability under the model).

    Temperature 0 is greedy; else the logits / temperature, cut to the top_k tokens (0: all)
    and then to the smallest set holding top_p of the probability, are sampled with the key
    of (seed, index): the index-th token of a request always gets the same key."""
    x = _cut(logits / jnp.maximum(temperature, 1e-6), top_k, top_p)
    return _pick(logits, _sampled(x, seed, index), temperature)


def choose_rows(logits: jax.Array, seeds: jax.Array, index: jax.Array,
                temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """`choose` for every row of logits [B, V], token for token the same. The cut's sort of
    the vocabulary (most of a small model's step) runs only when some row has a top_k or
    top_p, and the sampling only when some row samples: a row without them gets the same
    logits from the cut, and a greedy row ignores the sample."""
    x = logits / jnp.maximum(temperature, 1e-6)[:, None]
    x = jax.lax.cond(jnp.any((top_k > 0) | (top_p < 1)),
                     lambda x: jax.vmap(_cut)(x, top_k, top_p), lambda x: x, x)
    sampled = jax.lax.cond(jnp.any(temperature > 0),
                           lambda x: jax.vmap(_sampled)(x, seeds, index),
                           lambda x: jnp.zeros(x.shape[0], jnp.int32), x)
    return jax.vmap(_pick)(logits, sampled, temperature)


def _cut(x: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """One row's scaled logits with every token outside top_k, then top_p, at -inf (none is
    cut with top_k 0 and top_p 1)."""
    ordered = jnp.sort(x)[::-1]
    kth = jnp.where(top_k > 0, ordered[jnp.clip(top_k - 1, 0, x.shape[0] - 1)], -jnp.inf)
    ordered = jnp.where(ordered < kth, -jnp.inf, ordered)
    p = jax.nn.softmax(ordered)
    keep = jnp.where(top_p >= 1, x.shape[0], jnp.maximum(jnp.sum((jnp.cumsum(p) - p) < top_p), 1))
    return jnp.where(x < jnp.maximum(kth, ordered[keep - 1]), -jnp.inf, x)


def _sampled(x: jax.Array, seed: jax.Array, index: jax.Array) -> jax.Array:
    key = jax.random.fold_in(jax.random.key(seed), index)
    return jax.random.categorical(key, x).astype(jnp.int32)


def _pick(logits: jax.Array, sampled: jax.Array, temperature: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
    token = jnp.where(temperature > 0, sampled, jnp.argmax(logits).astype(jnp.int32))
    return token, jax.nn.log_softmax(logits)[token]


class Rows(NamedTuple):
    """Per-row inputs of a decode step, each [slots]: the row's last token, whether it is
    decoding, its request's seed, the token's index in the request, sampling settings."""

    tokens: Any
    active: Any
    seeds: Any
    index: Any
    temperature: Any
    top_k: Any
    top_p: Any


_ROW_DTYPES = Rows(np.int32, np.bool_, np.uint32, np.int32, np.float32, np.int32, np.float32)


def _top(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """logits [..., V] -> the TOP_LOGPROBS most likely (ids, log-probabilities)."""
    lp, ids = jax.lax.top_k(jax.nn.log_softmax(logits), TOP_LOGPROBS)
    return ids.astype(jnp.int32), lp


class Batch:
    """The jitted functions of one model on one mesh, and the cache's shardings."""

    def __init__(self, c: ml_collections.ConfigDict, layout: Layout, params: Any, slots: int,
                 max_prompt: int, max_len: int):
        self.layout, self.params = layout, params
        self.slots, self.max_prompt, self.max_len = slots, max_prompt, max_len
        m = c.model
        graphdef = layout.graphdef
        batch_axes = rules_lib.mesh_axes_for(layout.rules, "act_batch")
        heads = rules_lib.mesh_axes_for(layout.rules, "act_heads") or None
        # Rows of one request: nothing to split over the batch axes.
        self.row_rules = tuple((k, v) for k, v in layout.rules
                               if k not in ("act_batch", "batch"))
        mesh = layout.mesh
        rows = batch_axes or None
        kv = NamedSharding(mesh, PartitionSpec(None, rows, None, heads, None))
        self.cache_sharding = decode.Cache(
            k=kv, v=kv, r=NamedSharding(mesh, PartitionSpec(None, None, heads, None)),
            segment_ids=NamedSharding(mesh, PartitionSpec(rows, None)),
            length=NamedSharding(mesh, PartitionSpec(rows)))
        self.replicated = layout.replicated
        self._kv_shape = (m.num_layers, slots, max_len, m.num_heads, m.head_dim)
        self._dtype = gopher.compute_dtype(m.dtype, mesh.devices.flat[0].platform)

        @functools.partial(jax.jit, static_argnums=3)
        def prefill(params: Any, tokens: jax.Array, length: jax.Array, max_len: int
                    ) -> tuple[jax.Array, decode.Cache]:
            logits, cache = decode.prefill(nnx.merge(graphdef, params), tokens, max_len,
                                           length=length)
            return logits[0], cache

        @functools.partial(jax.jit, out_shardings=(self.replicated,) * 2)
        def first(logits: jax.Array, seed: jax.Array, temperature: jax.Array,
                  top_k: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
            token, lp = choose(logits, seed, jnp.int32(0), temperature, top_k, top_p)
            ids, top_lp = _top(logits)
            return jnp.concatenate([token[None], ids]), jnp.concatenate([lp[None], top_lp])

        @functools.partial(jax.jit, donate_argnums=0, out_shardings=self.cache_sharding)
        def insert(cache: decode.Cache, row: decode.Cache, slot: jax.Array) -> decode.Cache:
            put = functools.partial(jax.lax.dynamic_update_index_in_dim, index=slot)
            return decode.Cache(k=put(cache.k, row.k[:, 0], axis=1),
                                v=put(cache.v, row.v[:, 0], axis=1), r=row.r,
                                segment_ids=put(cache.segment_ids, row.segment_ids[0], axis=0),
                                length=put(cache.length, row.length, axis=0))

        def row_step(params: Any, r: jax.Array, k: jax.Array, v: jax.Array,
                     segment_ids: jax.Array, length: jax.Array, token: jax.Array
                     ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
            cache = decode.Cache(k[:, None], v[:, None], r, segment_ids[None], length)
            logits, cache = decode.step(nnx.merge(graphdef, params), cache, token[None])
            return logits[0], (cache.k[:, 0], cache.v[:, 0], cache.segment_ids[0],
                               cache.length)

        rows_step = jax.vmap(row_step, in_axes=(None, None, 1, 1, 0, 0, 0),
                             out_axes=(0, (1, 1, 0, 0)), spmd_axis_name=batch_axes or None)

        row_sharding = self.cache_sharding.length
        self.rows_sharding = Rows(*(row_sharding,) * len(Rows._fields))

        @functools.partial(jax.jit, donate_argnums=1, out_shardings=(
            (self.replicated,) * 2, self.cache_sharding, self.rows_sharding))
        def step(params: Any, cache: decode.Cache, rows: Rows
                 ) -> tuple[tuple[jax.Array, jax.Array], decode.Cache, Rows]:
            """-> (([B, 1+TOP] the sampled token then the top ids, [B, 1+TOP] their
            log-probabilities), the cache with each active row one longer, the rows' inputs
            of the next step: each active row's new token at the next index)."""
            logits, (k, v, seg, length) = rows_step(params, cache.r, cache.k, cache.v,
                                                    cache.segment_ids, cache.length,
                                                    rows.tokens)
            token, lp = choose_rows(logits, rows.seeds, rows.index, rows.temperature, rows.top_k,
                               rows.top_p)
            ids, top_lp = _top(logits)
            length = jnp.where(rows.active, length, cache.length)
            out = (jnp.concatenate([token[:, None], ids], 1),
                   jnp.concatenate([lp[:, None], top_lp], 1))
            following = rows._replace(tokens=jnp.where(rows.active, token, rows.tokens),
                                      index=rows.index + rows.active.astype(jnp.int32))
            return out, decode.Cache(k, v, cache.r, seg, length), following

        @functools.partial(jax.jit, out_shardings=(self.replicated,) * 2)
        def score(params: Any, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
            """tokens [1, W] -> ([W-1, 1+TOP] token i+1 then the top ids after position i,
            their log-probabilities)."""
            logits = gopher.apply(graphdef, params, tokens)[0, :-1].astype(jnp.float32)
            lp = jax.nn.log_softmax(logits)
            nxt = tokens[0, 1:]
            ids, top_lp = _top(logits)
            return (jnp.concatenate([nxt[:, None], ids], 1),
                    jnp.concatenate([jnp.take_along_axis(lp, nxt[:, None], 1), top_lp], 1))

        self._prefill, self._first, self._insert = prefill, first, insert
        self._step, self._score = step, score

    @contextlib.contextmanager
    def _on_mesh(self, rules: rules_lib.Rules) -> Iterator[None]:
        with jax.set_mesh(self.layout.mesh), rules_lib.use_rules(rules):
            yield

    def _put(self, x: np.ndarray, sharding: NamedSharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    def prefill(self, cache: decode.Cache, slot: int, ids: list[int], seed: int,
                temperature: float, top_k: int, top_p: float
                ) -> tuple[np.ndarray, np.ndarray, decode.Cache]:
        """The prompt `ids` into row `slot` -> (its first token then the top ids, their
        log-probabilities, the cache)."""
        n = len(ids)
        tokens = np.zeros((1, width_for(n, self.max_prompt)), np.int32)
        tokens[0, :n] = ids
        with self._on_mesh(self.row_rules):
            logits, row = self._prefill(self.params, self._put(tokens, self.replicated),
                                        np.int32(n), self.max_len)
            ids_lp = self._first(logits, np.uint32(seed), np.float32(temperature),
                                 np.int32(top_k), np.float32(top_p))
            cache = self._insert(cache, row, np.int32(slot))
        return np.asarray(ids_lp[0]), np.asarray(ids_lp[1]), cache

    def rows(self, tokens: np.ndarray, active: np.ndarray, seeds: np.ndarray,
             index: np.ndarray, temperature: np.ndarray, top_k: np.ndarray, top_p: np.ndarray
             ) -> Rows:
        """The step's per-row inputs (host arrays of length `slots`) on the device."""
        host = Rows(tokens, active, seeds, index, temperature, top_k, top_p)
        return Rows(*(self._put(np.asarray(a, t), s) for a, t, s in zip(
            host, _ROW_DTYPES, self.rows_sharding, strict=True)))

    def step(self, cache: decode.Cache, rows: Rows
             ) -> tuple[np.ndarray, np.ndarray, decode.Cache, Rows]:
        """One token for every row -> ([slots, 1+TOP] tokens and top ids, their
        log-probabilities, the cache, the next step's `rows` while no row starts or ends)."""
        with self._on_mesh(self.row_rules):
            (ids, lp), cache, rows = self._step(self.params, cache, rows)
        ids, lp = jax.device_get((ids, lp))
        return ids, lp, cache, rows

    def score(self, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """([n-1, 1+TOP] token i+1 then the top ids after position i, log-probabilities) of
        the prompt `ids` (n tokens)."""
        n = len(ids)
        tokens = np.zeros((1, width_for(n, self.max_prompt)), np.int32)
        tokens[0, :n] = ids
        with self._on_mesh(self.row_rules):
            out_ids, lp = self._score(self.params, self._put(tokens, self.replicated))
        return np.asarray(out_ids)[:n - 1], np.asarray(lp)[:n - 1]

    def new_cache(self) -> decode.Cache:
        """A cache of `slots` empty rows."""
        (L, B, S, H, K), sh = self._kv_shape, self.cache_sharding  # noqa: N806
        return decode.Cache(
            k=jax.device_put(jnp.zeros((L, B, S, H, K), self._dtype), sh.k),
            v=jax.device_put(jnp.zeros((L, B, S, H, K), self._dtype), sh.v),
            r=jax.device_put(jnp.zeros((L, S, H, K), self._dtype), sh.r),
            segment_ids=jax.device_put(jnp.zeros((B, S), jnp.int32), sh.segment_ids),
            length=jax.device_put(jnp.zeros((B,), jnp.int32), sh.length))

    def warm_up(self) -> decode.Cache:
        """Compiles every shape once (a prompt of each width into slot 0, one step, one
        score) -> an empty cache."""
        cache = self.new_cache()
        for w in prompt_widths(self.max_prompt):
            _, _, cache = self.prefill(cache, 0, [1] * w, 0, 1.0, 0, 1.0)
            self.score([1] * w)
        z = np.zeros(self.slots)
        _, _, cache, _ = self.step(cache, self.rows(z, z, z, z, z, z, z + 1))
        return self.clear(cache)

    def clear(self, cache: decode.Cache) -> decode.Cache:
        """The cache with every row's length 0 (its keys and values stay, never seen)."""
        return cache._replace(length=jax.device_put(jnp.zeros((self.slots,), jnp.int32),
                                                    self.cache_sharding.length))
