"""Cached decoding: `prefill` runs a prompt through the model and keeps every layer's keys and
values; `step` then takes one new token per row at a time and attends to the cache.

Every array has a fixed shape (the cache holds S = max_len positions, chosen up front, and a
position index), so one compile of `step` serves every position: under jax.lax.while_loop or
a jitted step. Positions are relative, so S may exceed the training length.

Rows of different prompt lengths are left-padded with segment id 0 (they then see none of
their padding, exactly as `Gopher.__call__` with those segment ids); a new token continues
the segment of the last token of its row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from gopher_jax.model.attention import relative_sinusoids, sinusoids
from gopher_jax.model.gopher import EMBED_ACT, Block, Gopher
from gopher_jax.parallel.rules import constrain


class Cache(NamedTuple):
    k: jax.Array  # [L, B, S, H, K] keys of positions 0, ..., S-1
    v: jax.Array  # [L, B, S, H, K]
    r: jax.Array  # [L, S, H, K] per-head keys W_r R_d of distances d = 0, ..., S-1
    segment_ids: jax.Array  # [B, S] int32
    length: jax.Array  # int32 []: positions filled, the position of the next token

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


def _over_layers(model: Gopher, fn: Callable[[Block, jax.Array, Any], tuple[jax.Array, Any]],
                 x: jax.Array, xs: Any) -> tuple[jax.Array, Any]:
    """x through fn(block, x, xs[l]) for each layer l -> (x, the per-layer outputs stacked)."""
    if model.m.scan_layers:
        @nnx.scan(in_axes=(0, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
        def run(block: Block, x: jax.Array, xs_l: Any) -> tuple[jax.Array, Any]:
            return fn(block, x, xs_l)

        return run(model.blocks, x, xs)
    ys = []
    for i, block in enumerate(model.blocks):
        x, y = fn(block, x, jax.tree.map(lambda a, i=i: a[i], xs))
        ys.append(y)
    return x, jax.tree.map(lambda *a: jnp.stack(a), *ys)


def prefill(model: Gopher, tokens: jax.Array, max_len: int,
            segment_ids: jax.Array | None = None, length: int | jax.Array | None = None
            ) -> tuple[jax.Array, Cache]:
    """tokens [B, T] (T <= max_len) -> (float32 logits [B, vocab] of the token after position
    length-1, a cache of max_len positions holding the first `length` (default T)).

    Positions from `length` to T-1 (right padding) are in the cache but never seen: each step
    overwrites the next of them before attending to it.
    """
    m = model.m
    t = tokens.shape[1]
    if t > max_len:
        raise ValueError(f"a prompt of {t} tokens does not fit a cache of {max_len}")
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    length = t if length is None else length
    rel = relative_sinusoids(t, m.d_model, m.rel_pos_max_wavelength)
    by_distance = sinusoids(jnp.arange(max_len), m.d_model, m.rel_pos_max_wavelength)
    pad = [(0, 0), (0, max_len - t), (0, 0), (0, 0)]

    def layer(block: Block, x: jax.Array, _: Any) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        x, (k, v) = block.prefill(x, rel, segment_ids)
        return x, (jnp.pad(k, pad), jnp.pad(v, pad), block.attn.relative_keys(by_distance))

    x = constrain(model.embed(tokens), EMBED_ACT)
    x, (k, v, r) = _over_layers(model, layer, x, jnp.zeros(m.num_layers))
    last = jax.lax.dynamic_index_in_dim(model.final_norm(x), length - 1, axis=1)  # [B, 1, D]
    segments = jnp.pad(segment_ids.astype(jnp.int32), [(0, 0), (0, max_len - t)])
    return model.logits(last)[:, 0], Cache(k, v, r, segments, jnp.asarray(length, jnp.int32))


def step(model: Gopher, cache: Cache, tokens: jax.Array) -> tuple[jax.Array, Cache]:
    """tokens [B] at position cache.length -> (float32 logits [B, vocab] of the token after
    them, the cache with them appended). At most max_len - length steps fit: a step past the
    end is not detected (it overwrites the last position)."""
    pos = cache.length
    seg = jax.lax.dynamic_index_in_dim(cache.segment_ids, pos - 1, axis=1)  # [B, 1]
    segment_ids = jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, seg, pos, axis=1)
    visible = (jnp.arange(cache.max_len) <= pos)[None] & (segment_ids == seg)  # [B, S]
    mask = visible[:, None, None, :]

    def layer(block: Block, x: jax.Array, xs: tuple[jax.Array, ...]
              ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        k, v, r = xs
        return block.step(x, (k, v), r, pos, mask)

    x = constrain(model.embed(tokens[:, None]), EMBED_ACT)
    x, (k, v) = _over_layers(model, layer, x, (cache.k, cache.v, cache.r))
    logits = model.logits(model.final_norm(x))[:, 0]
    return logits, cache._replace(k=k, v=v, segment_ids=segment_ids, length=pos + 1)
