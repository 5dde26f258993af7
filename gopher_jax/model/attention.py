"""Multi-head attention with Transformer-XL relative positions (Dai et al. 2019, section 3.3).

score(i, j) = (q_i + u) . k_j  +  (q_i + v) . (W_r R_{i-j})
with R_d the sinusoid of distance d, W_r a per-layer projection, u and v learned per head.
(Transformer-XL shares u and v across layers; here each layer has its own, which keeps the
scanned block self-contained and costs 2 x d_model parameters per layer.)
The position term is one batched contraction against the projected sinusoids of every
distance, followed by the "relative shift" that lines distance i-j up with key j.

Queries run in blocks of `block_q`: block [s, e) scores only keys [0, e), so the blocks above
the causal diagonal are never computed, and each block's [B, H, block_q, e] scores stay small
enough to be cache-resident on CPU (on the gopher_44m shapes this made attention's forward +
backward ~30% faster on CPU, for any block count from 2 to 16).

Decoding (`step`, driven by model/decode.py) scores one new query at position p against S
cached keys: the position term is the query against the per-head keys of every distance
0, ..., S-1 (computed once per cache), gathered at distance p - j for key j.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gopher_jax.model.layers import Dtype, fan_in_init, param
from gopher_jax.parallel.rules import constrain


def sinusoids(distances: jax.Array, dim: int, max_wavelength: float) -> jax.Array:
    """[N] distances -> [N, dim] float32: sin in the first half, cos in the second."""
    inv_freq = 1.0 / (max_wavelength ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
    angles = distances.astype(jnp.float32)[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def relative_sinusoids(length: int, dim: int, max_wavelength: float) -> jax.Array:
    """[T, dim] sinusoids of distances T-1, ..., 1, 0 (the order `rel_shift` expects)."""
    return sinusoids(jnp.arange(length - 1, -1, -1), dim, max_wavelength)


def rel_shift(x: jax.Array) -> jax.Array:
    """[..., Q, K] scores indexed (query i, distance K-1-m) -> (query i, key j), Q <= K, for the
    Q queries at positions K-Q, ..., K-1 (Transformer-XL's shift with a memory of K-Q keys).

    Pads a zero column, re-reads the buffer as K+1 rows of Q, and drops the first row: entry
    (i, j) lands on column Q-1-i+j of the input, the distance (K-Q+i)-j. Entries past the
    diagonal are garbage, and masked.
    """
    *lead, q, k = x.shape
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, 0), (1, 0)])
    x = x.reshape(*lead, k + 1, q)[..., 1:, :]
    return x.reshape(*lead, q, k)


def xla_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                  segment_ids: jax.Array, *, block_q: int) -> jax.Array:
    """Causal relative attention within packed documents, before the output projection.

    qu = q + u, qv = q + v, k, v [B, T, H, K] in the compute dtype; r [T, H, K]: the per-head
    keys of distances T-1, ..., 0 (`RelativeAttention.relative_keys`); segment_ids [B, T] int
    (a query sees keys at or before it with its segment id). Scores and softmax in float32,
    scaled by K**-0.5. Returns [B, T, H, K] in the compute dtype.
    """
    dt = qu.dtype
    t, head_dim = qu.shape[1], qu.shape[-1]
    block = block_q or t
    outs = []
    for start in range(0, t, block):  # static: T is known at trace time
        end = min(start + block, t)
        content = jnp.einsum("bqhk,bthk->bhqt", qu[:, start:end], k[:, :end],
                             preferred_element_type=jnp.float32)
        position = jnp.einsum("bqhk,thk->bhqt", qv[:, start:end], r[t - end:],
                              preferred_element_type=jnp.float32)
        scores = (content + rel_shift(position)) * (head_dim**-0.5)
        causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        same = segment_ids[:, start:end, None] == segment_ids[:, None, :end]
        mask = (causal[None] & same)[:, None]  # [B, 1, q, end]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        outs.append(jnp.einsum("bhqt,bthk->bqhk", probs, v[:, :end]))
    return jnp.concatenate(outs, axis=1)


# `RelativeAttention(impl=...)` -> the function computing `xla_attention`'s contract.
ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {"xla": xla_attention}


class RelativeAttention(nnx.Module):
    def __init__(self, d_model: int, num_heads: int, head_dim: int, out_scale: float,
                 param_dtype: Dtype, dtype: Dtype, rngs: nnx.Rngs, block_q: int = 0,
                 impl: str = "xla"):
        qkv = fan_in_init(d_model)
        shape, names = (d_model, num_heads, head_dim), ("embed", "heads", "kv")
        self.wq = param(rngs, qkv, shape, names, param_dtype)
        self.wk = param(rngs, qkv, shape, names, param_dtype)
        self.wv = param(rngs, qkv, shape, names, param_dtype)
        self.wr = param(rngs, qkv, shape, names, param_dtype)  # sinusoid -> per-head key
        self.wo = param(rngs, fan_in_init(num_heads * head_dim, out_scale),
                        (num_heads, head_dim, d_model), ("heads", "kv", "embed"), param_dtype)
        zeros = nnx.initializers.zeros
        self.u = param(rngs, zeros, (num_heads, head_dim), ("heads", "kv"), param_dtype)
        self.v = param(rngs, zeros, (num_heads, head_dim), ("heads", "kv"), param_dtype)
        self.head_dim = head_dim
        self.dtype = dtype
        self.block_q = block_q  # 0: all queries in one block
        self.impl = impl  # a key of ATTENTION_IMPLS

    def __call__(self, x: jax.Array, rel: jax.Array, segment_ids: jax.Array) -> jax.Array:
        """x [B, T, D]; rel [T, D] from `relative_sinusoids`; segment_ids [B, T] int."""
        return self.prefill(x, rel, segment_ids)[0]

    def qkv(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x [B, T, D] -> q, k, v [B, T, H, K] in the compute dtype."""
        dt = self.dtype
        heads = ("act_batch", "act_length", "act_heads", None)
        return tuple(constrain(jnp.einsum("btd,dhk->bthk", x, w[...].astype(dt)), heads)
                     for w in (self.wq, self.wk, self.wv))

    def relative_keys(self, rel: jax.Array) -> jax.Array:
        """Sinusoids [N, D] -> their per-head keys W_r R [N, H, K] (in the same order)."""
        return jnp.einsum("td,dhk->thk", rel.astype(self.dtype), self.wr[...].astype(self.dtype))

    def prefill(self, x: jax.Array, rel: jax.Array, segment_ids: jax.Array
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """`__call__` that also returns the keys and values [B, T, H, K] (for a decoding
        cache)."""
        dt = self.dtype
        q, k, v = self.qkv(x)
        r = self.relative_keys(rel)  # distances T-1, ..., 0
        qu, qv = q + self.u[...].astype(dt), q + self.v[...].astype(dt)
        out = ATTENTION_IMPLS[self.impl](qu, qv, k, v, r, segment_ids, block_q=self.block_q)
        return jnp.einsum("bqhk,hkd->bqd", out, self.wo[...].astype(dt)), (k, v)

    def step(self, x: jax.Array, cache: tuple[jax.Array, jax.Array], r: jax.Array,
             pos: jax.Array, mask: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One new query per row against a cache of S positions.

        x [B, 1, D] at position `pos` (int32 []); cache: keys and values [B, S, H, K], written
        at `pos` and returned; r [S, H, K]: `relative_keys` of distances 0, ..., S-1;
        mask [B, 1, 1, S]: the keys this query may see (none past `pos`).
        """
        dt = self.dtype
        q, k, v = self.qkv(x)
        cached = ("act_batch", None, "act_heads", None)
        k_cache, v_cache = (constrain(jax.lax.dynamic_update_slice_in_dim(c, new, pos, axis=1),
                                      cached) for c, new in zip(cache, (k, v), strict=True))
        qu, qv = q + self.u[...].astype(dt), q + self.v[...].astype(dt)
        content = jnp.einsum("bqhk,bthk->bhqt", qu, k_cache, preferred_element_type=jnp.float32)
        by_distance = jnp.einsum("bqhk,thk->bhqt", qv, r, preferred_element_type=jnp.float32)
        s = k_cache.shape[1]
        distance = jnp.clip(pos - jnp.arange(s), 0, s - 1)  # keys past pos: masked anyway
        position = jnp.take(by_distance, distance, axis=-1)
        scores = (content + position) * (self.head_dim**-0.5)
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bhqt,bthk->bqhk", probs, v_cache)
        return jnp.einsum("bqhk,hkd->bqd", out, self.wo[...].astype(dt)), (k_cache, v_cache)
