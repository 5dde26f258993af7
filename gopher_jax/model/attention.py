"""Multi-head attention with Transformer-XL relative positions (Dai et al. 2019, section 3.3).

score(i, j) = (q_i + u) . k_j  +  (q_i + v) . (W_r R_{i-j})
with R_d the sinusoid of distance d, W_r a per-layer projection, u and v learned per head.
(Transformer-XL shares u and v across layers; here each layer has its own, which keeps the
scanned block self-contained and costs 2 x d_model parameters per layer.)
The position term is one batched contraction against the projected sinusoids of every
distance, followed by the "relative shift" that lines distance i-j up with key j.

Prefill and training (`xla_attention`) run the queries in blocks of `block_q` and compute
only the [block, block] tiles on or below the causal diagonal. Up to `UNROLLED_MAX_BLOCKS`
blocks are unrolled into the program (`unrolled_attention`, fastest on CPU); longer sequences
run `tiled_attention`, one `jax.lax.scan` over rows that each hold two query blocks' tiles
(`tile_plan`), whose program does not grow with T (unrolled, 16 blocks at T=2048 made
compile time grow with T / block_q: benchmarks/attention_compile.py).

Decoding (`step`, driven by model/decode.py) scores one new query at position p against S
cached keys: the position term is the query against the per-head keys of every distance
0, ..., S-1 (computed once per cache), gathered at distance p - j for key j.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gopher_jax import names
from gopher_jax.model import flash_attention, gpu_attention
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


def tile_plan(num_blocks: int) -> dict[str, np.ndarray]:
    """The causal tiles of `num_blocks` = n query blocks as (n+1)//2 rows of n+1 tiles.

    Row r holds query block r against key blocks r, r-1, ..., 0 (part 0) and then query block
    n-1-r against key blocks 0, 1, ..., n-1-r (part 1): n+1 tiles in every row, so the rows run
    as one loop body and no tile above the causal diagonal is formed. A row's keys are then
    the n+1 blocks from n-1-r of the blocks mirrored, [n-1, ..., 1, 0, 0, 1, ..., n-1]: one
    slice. With n odd the middle row holds its block once and its last (n+1)/2 tiles are
    unused (part 2). [rows, n+1] int32 arrays q_block, k_block and part.
    """
    n = num_blocks
    rows = np.arange((n + 1) // 2)[:, None]
    s = np.arange(n + 1)[None, :]
    first = s <= rows
    part = np.where(first, 0, np.where(n - 1 - rows == rows, 2, 1))
    q_block = np.where(first, rows, n - 1 - rows)
    k_block = np.where(first, rows - s, s - rows - 1)
    return {key: a.astype(np.int32) for key, a in
            (("q_block", q_block), ("k_block", k_block), ("part", part))}


# Up to this many query blocks, `xla_attention` unrolls one block per `block_q` queries into
# the program; beyond, it runs the causal tiles as one loop (`tiled_attention`). On CPU the
# unrolled blocks are ~2x faster (forward + backward, gopher_44m shapes; they run
# concurrently and each does one relative shift over its whole key prefix), and at 4 blocks
# their compile is still short: benchmarks/attention_compile.py.
UNROLLED_MAX_BLOCKS = 4


def xla_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                  segment_ids: jax.Array, *, block_q: int) -> jax.Array:
    """Causal relative attention within packed documents, before the output projection.

    qu = q + u, qv = q + v, k, v [B, T, H, K] in the compute dtype; r [T, H, K]: the per-head
    keys of distances T-1, ..., 0 (`RelativeAttention.relative_keys`); segment_ids [B, T] int
    (a query sees keys at or before it with its segment id). Scores and softmax in float32,
    scaled by K**-0.5. Returns [B, T, H, K] in the compute dtype.

    Queries run in blocks of b = min(block_q, T) (block_q 0: one block): up to
    `UNROLLED_MAX_BLOCKS` blocks as `unrolled_attention`, more as `tiled_attention` (the
    same numbers up to float32 summation order; its program does not grow with T).
    """
    b = min(block_q or qu.shape[1], qu.shape[1])
    fn = unrolled_attention if -(-qu.shape[1] // b) <= UNROLLED_MAX_BLOCKS else tiled_attention
    return fn(qu, qv, k, v, r, segment_ids, block_q=b)


def unrolled_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                       segment_ids: jax.Array, *, block_q: int) -> jax.Array:
    """`xla_attention` as a Python loop over query blocks, unrolled at trace time: block
    [s, e) against keys [0, e), so the blocks above the causal diagonal are never computed,
    and each block's [B, H, block_q, e] scores stay small enough to be cache-resident on CPU."""
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


def tiled_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                    segment_ids: jax.Array, *, block_q: int) -> jax.Array:
    """`xla_attention` as one loop over the causal [b, b] tiles, b = min(block_q, T): T padded
    to n blocks, a `jax.lax.scan` over the rows of `tile_plan(n)`; one compiled body whatever
    T, n(n+1)/2 tiles computed (plus (n+1)/2 masked ones when n is odd), none above the
    diagonal."""
    dt = qu.dtype
    batch, t, heads, head_dim = qu.shape
    b = min(block_q or t, t)
    n = -(-t // b)
    tp = n * b
    plan = tile_plan(n)
    rows, slots = plan["part"].shape

    def blocks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [B, n, b, ...], zero-padded
        x = jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(batch, n, b, *x.shape[2:])

    def row_keys(x: jax.Array) -> jax.Array:
        """[B, n, ...] -> [rows, B, n+1, ...]: row r's key blocks, n+1 from n-1-r of the blocks
        mirrored (n-1, ..., 0, 0, ..., n-1). Built by reshaping rows+1 copies with a row
        stride of 2n-1 (one block less than a copy), so that its transpose is a sum of
        slices, not a scatter."""
        m = jnp.concatenate([jnp.flip(x, axis=1), x], axis=1)  # [B, 2n, ...]
        if rows == 1:  # n <= 2 (at n = 1 the stride, 1 block, is shorter than a row)
            return m[None, :, n - 1:n - 1 + slots]
        m = jnp.broadcast_to(m[:, None], (batch, rows + 1, *m.shape[1:]))
        m = m.reshape(batch, (rows + 1) * 2 * n, *x.shape[2:])
        m = m[:, n - 1:n - 1 + rows * (2 * n - 1)]
        m = m.reshape(batch, rows, 2 * n - 1, *x.shape[2:])[:, :, :slots]
        return jnp.moveaxis(m, 1, 0)

    def head_major(x: jax.Array) -> jax.Array:  # [rows, B, S, b, H, K] -> [rows, B, H, S, b, K]
        return jnp.moveaxis(x, 4, 2)

    # Head-major, so that every tile product below has its batch dimensions leading in both
    # operands (no per-tile transposes); everything per row is sliced here, outside the loop,
    # so that the loop's backward pass only stacks per-row gradients.
    qub, qvb = (jnp.moveaxis(blocks(x), 3, 1) for x in (qu, qv))  # [B, H, n, b, K]
    q_rows = [(x[:, :, :rows], jnp.flip(x, axis=2)[:, :, :rows]) for x in (qub, qvb)]
    q_rows = [tuple(jnp.moveaxis(y, 2, 0) for y in pair)  # [rows, B, H, b, K]: parts 0, 1
              for pair in q_rows]
    # Padded keys come after every real query, so causally masked: any segment id will do.
    segq = blocks(segment_ids)  # [B, n, b]
    seg_rows = tuple(jnp.moveaxis(x[:, :rows], 1, 0) for x in (segq, jnp.flip(segq, 1)))
    k_rows, v_rows = (head_major(row_keys(blocks(x))) for x in (k, v))
    segk_rows = row_keys(segq)  # [rows, B, S, b]
    # Per-head keys by distance block: rk[:, p] holds distances tp-1-p*b, ..., tp-b-p*b
    # (p = n: the negative distances -1, ..., -b, which only masked scores read); tile (i, j)
    # needs block p = n-1-(i-j) (and p+1, see below).
    rk = jnp.pad(r, [(tp - t, b), (0, 0), (0, 0)]).reshape(n + 1, b, heads, head_dim)
    rk = jnp.moveaxis(rk, 2, 0)  # [H, n+1, b, K]
    p_rows = jnp.moveaxis(rk[:, n - 1 - plan["q_block"] + plan["k_block"]], 1, 0)
    causal_in_tile = jnp.arange(b)[:, None] >= jnp.arange(b)[None, :]
    neg = jnp.finfo(jnp.float32).min
    scale = head_dim**-0.5

    def row(_: None, xs: tuple[jax.Array, ...]) -> tuple[None, jax.Array]:
        (qu_a, qu_b), (qv_a, qv_b), (sq_a, sq_b), kw, vw, skw, pw, qi, kj, part = xs
        first = (part == 0)[:, None, None]  # [S, 1, 1]
        content = jnp.einsum("bhsqk,bhsck->bhsqc",
                             jnp.where(first, qu_a[:, :, None], qu_b[:, :, None]), kw,
                             preferred_element_type=jnp.float32)
        # Tile (i, j)'s position term, distances (i-j)b + a - c for query a and key c: the
        # query block against distance blocks p and p+1 (distances (i-j)b + b-1-m in column
        # m of the two side by side), then entry (a, c) from column b-1-a+c, read as a row
        # stride of 2b-1 in the flattened [b, 2b] (Transformer-XL's relative shift). Block
        # p+1 is the block p of the part's tile with key block j+1 (the previous tile in
        # part 0, the next in part 1); the diagonal tile reads it only where masked.
        raw = jnp.einsum("bhsqk,hsmk->bhsqm",
                         jnp.where(first, qv_a[:, :, None], qv_b[:, :, None]), pw,
                         preferred_element_type=jnp.float32)  # [B, H, S, b, b]
        zero = jnp.zeros_like(raw[:, :, :1])
        neighbour = jnp.where(first, jnp.concatenate([zero, raw[:, :, :-1]], axis=2),
                              jnp.concatenate([raw[:, :, 1:], zero], axis=2))
        raw = jnp.concatenate([raw, neighbour], axis=-1)  # [B, H, S, b, 2b]
        flat = raw.reshape(*raw.shape[:3], 2 * b * b)[..., b - 1:b - 1 + b * (2 * b - 1)]
        position = flat.reshape(*raw.shape[:3], b, 2 * b - 1)[..., :b]
        scores = (content + position) * scale  # [B, H, S, b, b]
        seg_q = jnp.where(first[:, 0], sq_a[:, None], sq_b[:, None])  # [B, S, b]
        same = seg_q[..., None] == skw[:, :, None, :]
        causal = (causal_in_tile | (qi > kj)[:, None, None]) & (part < 2)[:, None, None]
        mask = (same & causal)[:, None]  # [B, 1, S, b, b]
        scores = jnp.where(mask, scores, neg)
        onehot = (part[:, None] == jnp.arange(2)).astype(jnp.float32)  # [S, 2]
        row_max = jnp.max(scores, axis=-1)  # [B, H, S, b]
        part_max = jnp.max(jnp.where(onehot.T[:, :, None] > 0, row_max[:, :, None], neg),
                           axis=3)  # [B, H, 2, b]
        part_max = jax.lax.stop_gradient(part_max)  # softmax is invariant to it
        slot_max = jnp.take(part_max, jnp.minimum(part, 1), axis=2)  # [B, H, S, b]
        e = jnp.where(mask, jnp.exp(scores - slot_max[..., None]), 0.0)
        total = jnp.einsum("bhsq,sp->bhpq", jnp.sum(e, axis=-1), onehot)
        pv = jnp.einsum("bhsqc,bhsck->bhsqk", e.astype(dt), vw,
                        preferred_element_type=jnp.float32)
        out = jnp.einsum("bhsqk,sp->bhpqk", pv, onehot)  # [B, H, 2, b, K]
        return None, out / jnp.where(total > 0, total, 1.0)[..., None]

    xs = (*q_rows, seg_rows, k_rows, v_rows, segk_rows, p_rows,
          *(jnp.asarray(plan[key]) for key in ("q_block", "k_block", "part")))
    _, out = jax.lax.scan(row, None, xs)  # [rows, B, H, 2, b, K]
    # Query blocks 0..rows-1 are the rows' part 0; n-1 down to rows, their part 1.
    out = jnp.concatenate([out[:, :, :, 0], jnp.flip(out[: n - rows, :, :, 1], axis=0)])
    out = jnp.transpose(out, (1, 0, 3, 2, 4))  # [B, n, b, H, K]
    return out.reshape(batch, tp, heads, head_dim)[:, :t].astype(dt)


def pallas_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                     segment_ids: jax.Array, *, block_q: int) -> jax.Array:
    """`xla_attention` as the Pallas flash kernels (model/flash_attention.py), per device under
    shard_map with the active rules; Mosaic on TPU, interpret mode elsewhere."""
    return flash_attention.sharded_flash_attention(qu, qv, k, v, r, segment_ids,
                                                   block_q=block_q)


def pallas_gpu_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array,
                         r: jax.Array, segment_ids: jax.Array, *, block_q: int) -> jax.Array:
    """`xla_attention` as the Pallas Triton kernels (model/gpu_attention.py) under shard_map;
    interpret mode off GPU. block_q sizes the XLA path's blocks, not the kernel's tiles."""
    del block_q
    return gpu_attention.sharded_gpu_flash_attention(qu, qv, k, v, r, segment_ids)


# `RelativeAttention(impl=...)` -> the function computing `xla_attention`'s contract.
ATTENTION_IMPLS: dict[str, Callable[..., jax.Array]] = {"xla": xla_attention,
                                                        "pallas": pallas_attention,
                                                        "pallas_gpu": pallas_gpu_attention}
# model.attention_impl: a key of ATTENTION_IMPLS, or "auto" (`resolve_impl`).
names.check_table("model.attention_impl", ("auto", *ATTENTION_IMPLS), names.ATTENTION_IMPLS)


def resolve_impl(name: str) -> str:
    """'auto' -> 'pallas' when tracing for a TPU the kernel lowers on (v5 and later),
    'pallas_gpu' on a GPU `hardware.GPU_ATTENTION_KERNEL_RUNS` records, else 'xla'; other
    names as they are."""
    if name != "auto":
        return name
    if flash_attention.kernel_runs_here():
        return "pallas"
    return "pallas_gpu" if gpu_attention.kernel_runs_here() else "xla"


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
        self.impl = impl  # one of names.ATTENTION_IMPLS

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
        attend = ATTENTION_IMPLS[resolve_impl(self.impl)]
        out = attend(qu, qv, k, v, r, segment_ids, block_q=self.block_q)
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
