"""Flash-style Pallas kernels for Transformer-XL relative attention on NVIDIA GPUs (Triton
lowering; interpret mode on CPU).

Same semantics as `attention.xla_attention`: for queries i and keys j of one row,

    score(i, j) = ((qu_i . k_j) + (qv_i . r[T-1-(i-j)])) * head_dim**-0.5

causal and only within equal segment ids, softmax in float32. Square tiles of b queries x b
keys; the forward kernel runs one program per (query block, row, head) and loops over the key
blocks at or below the causal diagonal only, with an online softmax (float32 running max, sum
and output). Nothing of size [T, T] exists.

The position term of tile (query block i, key block j) needs the relative keys of distances
(i-j)b - (b-1) .. (i-j)b + (b-1): one [b, 2b] product of the query block with that window of
r, whose row a must then be shifted left by b-1-a (Transformer-XL's relative shift, per tile).
Triton has no per-row roll or gather of register values, so the product goes through a
[b, 2b] float32 slot of global memory owned by the program (the `skew` output, L1/L2
resident) and comes back as a gather load; the backward pass un-shifts dScores the same way.
The slots cost 8*b bytes per (position, head): a transient output, not a [T, T] buffer.

Backward, all deterministic (no atomics): d(k), d(v) per key block looping over query blocks;
d(qu), d(qv) per query block looping over key blocks; d(r) per tile diagonal i-j, whose tiles
all read the same window of r, so its sum over rows and tiles is one program's loop (adjacent
diagonals' windows overlap by b rows: summed after the kernel).

Layout: [B, T, H, K] as given, T padded to a multiple of b, K to a power of two (Triton
tensors); padded keys sit after every real query, so causality hides them; padded query rows
get zero cotangents and are dropped. Written here rather than taken from
jax.experimental.pallas.ops.gpu.attention: that kernel has no relative-position term.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from gopher_jax.errors import ConfigError
from gopher_jax.model import flash_attention
from gopher_jax.parallel import rules as rules_lib

# Tile side: 64 x 64 fp32 scores plus the [64, 128] accumulators fit a 4-8 warp program's
# registers; Triton's dot needs every side >= 16 and tensor sides powers of two.
DEFAULT_BLOCK = 64
# Triton's software-pipelining depth of the forward and d(k), d(v) kernels. At 2 a 128-wide
# head asks for 240-256 KiB of shared memory on an H200 (227 KiB per block).
DEFAULT_STAGES = 1
MIN_SIDE = 16
_MASKED = float(jnp.finfo(jnp.float32).min)
GPU_PLATFORMS = ("gpu", "cuda", "rocm")  # jax names of the platforms Triton lowers for


def _pow2_at_least(x: int, floor: int) -> int:
    return max(floor, 1 << max(0, x - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class _Tiles:
    block: int  # b: queries and keys per tile, a power of two >= MIN_SIDE
    length: int  # L: padded T, a multiple of b
    head_dim: int  # padded K, a power of two >= MIN_SIDE
    scale: float  # true head_dim ** -0.5
    interpret: bool
    stages: int  # Triton's num_stages

    @property
    def blocks(self) -> int:
        return self.length // self.block

    @property
    def r_rows(self) -> int:  # padded r: L rows (distances L-1 .. 0), then b zero rows
        return self.length + self.block


def tiles_for(length: int, head_dim: int, block: int, interpret: bool,
              stages: int = DEFAULT_STAGES) -> _Tiles:
    """Tile side `block` (rounded to a power of two, at most the padded length); T padded to
    it, head_dim to a power of two."""
    b = min(_pow2_at_least(block, MIN_SIDE), _pow2_at_least(length, MIN_SIDE))
    return _Tiles(b, -(-length // b) * b, _pow2_at_least(head_dim, MIN_SIDE), head_dim**-0.5,
                  interpret, stages)


def _window_start(i: jax.Array, j: jax.Array, t: _Tiles) -> jax.Array:
    """First row of padded r (row p: distance L-1-p) that tile (i, j) reads: distance
    (i-j)b + b-1, the largest in the tile (query b-1, key 0)."""
    return t.length - (i - j + 1) * t.block


def _barrier(t: _Tiles) -> None:
    """Every thread of the program past this point sees the others' stores to its slot
    (__syncthreads); interpret mode runs one program at a time and needs none."""
    if not t.interpret:
        plgpu.debug_barrier()


def _grid_rows(t: _Tiles) -> tuple[jax.Array, jax.Array]:
    a = jax.lax.broadcasted_iota(jnp.int32, (t.block, t.block), 0)
    c = jax.lax.broadcasted_iota(jnp.int32, (t.block, t.block), 1)
    return a, c


def _gather(slot_ref, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """slot[rows, cols], a volatile load: other threads of the program wrote the slot just
    before, so no cached copy may be read (the ".cg" cache modifier, L2 only, would do as
    well, but this JAX's Triton lowering does not map its name)."""
    return plgpu.load(slot_ref.at[rows, cols], volatile=True)


def _shift(by_distance: jax.Array, skew_ref, t: _Tiles) -> jax.Array:
    """[b, 2b] by window row -> [b, b] by key: entry (a, c) from column b-1-a+c."""
    skew_ref[...] = by_distance
    _barrier(t)
    a, c = _grid_rows(t)
    out = _gather(skew_ref, a, t.block - 1 - a + c)
    _barrier(t)  # the next tile overwrites the slot
    return out


def _unshift(ds: jax.Array, skew_ref, t: _Tiles) -> jax.Array:
    """The transpose of `_shift`: dScores [b, b] by key -> [b, 2b] by window row (column m of
    row a holds key m-(b-1-a), zero where that is outside the tile)."""
    skew_ref[:, pl.ds(0, t.block)] = ds
    _barrier(t)
    a = jax.lax.broadcasted_iota(jnp.int32, (t.block, 2 * t.block), 0)
    m = jax.lax.broadcasted_iota(jnp.int32, (t.block, 2 * t.block), 1)
    key = m - (t.block - 1) + a
    inside = (key >= 0) & (key < t.block)
    out = jnp.where(inside, _gather(skew_ref, a, jnp.clip(key, 0, t.block - 1)), 0.0)
    _barrier(t)
    return out


def _scores(qu, qv, k, r_window, q_seg, k_seg, i, j, skew_ref, t: _Tiles):
    """Scaled float32 scores [b, b] of tile (i, j) and the mask of allowed pairs."""
    content = _dot(qu, k, trans_b=True)
    position = _shift(_dot(qv, r_window, trans_b=True), skew_ref, t)
    a, c = _grid_rows(t)
    mask = (i * t.block + a >= j * t.block + c) & (q_seg[:, None] == k_seg[None, :])
    return jnp.where(mask, (content + position) * t.scale, _MASKED), mask


def _dot(a: jax.Array, b: jax.Array, **kw) -> jax.Array:
    """Triton's dot with a float32 result; float32 operands in full float32 (Triton would
    otherwise take TF32, ~1e-3 relative, where `xla_attention` at "highest" is exact)."""
    full = a.dtype == jnp.float32 and b.dtype == jnp.float32
    return plgpu.dot(a, b, **kw, precision=jax.lax.Precision.HIGHEST if full else None)


def _params(t: _Tiles, gathers_into_dot: bool = False) -> dict:
    """gathers_into_dot: a kernel whose dot reads the `_unshift` gather (d(qv), d(r)) never
    pipelines: at num_stages 2 Triton prefetched that load across the barrier, ahead of the
    store it must see (d(qv) wrong by 77x its largest value on an H200)."""
    if t.interpret:
        return {"interpret": True}
    warps = 4 if t.head_dim <= 64 else 8
    stages = 1 if gathers_into_dot else t.stages
    return {"compiler_params": plgpu.CompilerParams(num_warps=warps, num_stages=stages)}


def _specs(t: _Tiles, batch: int):
    """BlockSpecs for a grid (block, row, head): one block of b positions, the whole (padded)
    sequence, the head's r, the row's segment ids and [B, H, L] per-position rows."""
    b, d = t.block, t.head_dim
    block = pl.BlockSpec((None, b, None, d), lambda i, n, h: (n, i, h, 0))
    whole = pl.BlockSpec((None, t.length, None, d), lambda i, n, h: (n, 0, h, 0))
    r = pl.BlockSpec((t.r_rows, None, d), lambda i, n, h: (0, h, 0))
    seg = pl.BlockSpec((None, t.length), lambda i, n, h: (n, 0))
    row_block = pl.BlockSpec((None, None, b), lambda i, n, h: (n, h, i))
    row_whole = pl.BlockSpec((None, None, t.length), lambda i, n, h: (n, h, 0))
    skew = pl.BlockSpec((None, None, None, b, 2 * b), lambda i, n, h: (n, h, i, 0, 0))
    return block, whole, r, seg, row_block, row_whole, skew


def _skew_shape(t: _Tiles, lead: tuple[int, ...]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((*lead, t.blocks, t.block, 2 * t.block), jnp.float32)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, seg_ref, o_ref, lse_ref, skew_ref, *,
                t: _Tiles):
    i = pl.program_id(0)
    b = t.block
    qu, qv = qu_ref[...], qv_ref[...]
    q_seg = seg_ref[pl.ds(i * b, b)]

    def tile(j, carry):
        acc, m_prev, l_prev = carry
        keys = pl.ds(j * b, b)
        r_window = r_ref[pl.ds(_window_start(i, j, t), 2 * b), :]
        s, mask = _scores(qu, qv, k_ref[keys, :], r_window, q_seg, seg_ref[keys], i, j,
                          skew_ref, t)
        m_new = jnp.maximum(m_prev, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        acc = alpha[:, None] * acc + _dot(p.astype(v_ref.dtype), v_ref[keys, :])
        return acc, m_new, alpha * l_prev + p.sum(axis=1)

    init = (jnp.zeros((b, t.head_dim), jnp.float32), jnp.full((b,), _MASKED, jnp.float32),
            jnp.zeros((b,), jnp.float32))
    # Key blocks 0..i: those above the diagonal have no key at or before any query.
    acc, m, total = jax.lax.fori_loop(0, i + 1, tile, init)
    o_ref[...] = (acc / total[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(total)


def _forward(qu, qv, k, v, r, seg, t: _Tiles):
    batch, _, heads, _ = qu.shape
    block, whole, rs, segs, row_block, _, skew = _specs(t, batch)
    o, lse, _ = pl.pallas_call(
        functools.partial(_fwd_kernel, t=t),
        grid=(t.blocks, batch, heads),
        in_specs=[block, block, whole, whole, rs, segs],
        out_specs=[block, row_block, skew],
        out_shape=[jax.ShapeDtypeStruct(qu.shape, v.dtype),
                   jax.ShapeDtypeStruct((batch, heads, t.length), jnp.float32),
                   _skew_shape(t, (batch, heads))],
        name="relative_flash_gpu_fwd",
        **_params(t),
    )(qu, qv, k, v, r, seg)
    return o, lse


# ----------------------------------------------------------------------------- backward


def _tile_grads(qu, qv, k, v, r_window, q_seg, k_seg, do, lse, delta, i, j, skew_ref,
                t: _Tiles):
    """Probabilities p and dScores (scale folded in) [b, b] float32 of tile (i, j)."""
    s, mask = _scores(qu, qv, k, r_window, q_seg, k_seg, i, j, skew_ref, t)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    dp = _dot(do, v, trans_b=True)
    return p, p * (dp - delta[:, None]) * t.scale


def _dkv_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, seg_ref, do_ref, lse_ref, delta_ref,
                dk_ref, dv_ref, skew_ref, *, t: _Tiles):
    """d(k), d(v) of key block j, summed over query blocks j..n-1."""
    j = pl.program_id(0)
    b, dt = t.block, k_ref.dtype
    k, v = k_ref[...], v_ref[...]
    k_seg = seg_ref[pl.ds(j * b, b)]

    def tile(i, carry):
        dk, dv = carry
        qs = pl.ds(i * b, b)
        qu, do = qu_ref[qs, :], do_ref[qs, :]
        r_window = r_ref[pl.ds(_window_start(i, j, t), 2 * b), :]
        p, ds = _tile_grads(qu, qv_ref[qs, :], k, v, r_window, seg_ref[qs], k_seg, do,
                            lse_ref[qs], delta_ref[qs], i, j, skew_ref, t)
        return (dk + _dot(ds.astype(dt), qu, trans_a=True),
                dv + _dot(p.astype(dt), do, trans_a=True))

    zeros = jnp.zeros((b, t.head_dim), jnp.float32)
    dk, dv = jax.lax.fori_loop(j, t.blocks, tile, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, seg_ref, do_ref, lse_ref, delta_ref,
               dqu_ref, dqv_ref, skew_ref, *, t: _Tiles):
    """d(qu), d(qv) of query block i, summed over key blocks 0..i."""
    i = pl.program_id(0)
    b, dt = t.block, k_ref.dtype
    qu, qv, do = qu_ref[...], qv_ref[...], do_ref[...]
    q_seg, lse, delta = seg_ref[pl.ds(i * b, b)], lse_ref[...], delta_ref[...]

    def tile(j, carry):
        dqu, dqv = carry
        keys = pl.ds(j * b, b)
        k = k_ref[keys, :]
        r_window = r_ref[pl.ds(_window_start(i, j, t), 2 * b), :]
        _, ds = _tile_grads(qu, qv, k, v_ref[keys, :], r_window, q_seg, seg_ref[keys], do,
                            lse, delta, i, j, skew_ref, t)
        ds_window = _unshift(ds, skew_ref, t).astype(dt)
        return (dqu + _dot(ds.astype(dt), k), dqv + _dot(ds_window, r_window))

    zeros = jnp.zeros((b, t.head_dim), jnp.float32)
    dqu, dqv = jax.lax.fori_loop(0, i + 1, tile, (zeros, zeros))
    dqu_ref[...] = dqu.astype(dqu_ref.dtype)
    dqv_ref[...] = dqv.astype(dqv_ref.dtype)


def _dr_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, seg_ref, do_ref, lse_ref, delta_ref,
               dr_ref, skew_ref, *, t: _Tiles, batch: int):
    """Grid (diagonal e, head): d(r) of the window of tiles (i, i-e), summed over the rows
    and the tiles i = e..n-1 of the diagonal in one loop."""
    e = pl.program_id(0)
    b, dt = t.block, k_ref.dtype
    r_window = r_ref[pl.ds(_window_start(e, 0, t), 2 * b), :]

    def tile(step, dr):
        row, i = jax.lax.div(step, t.blocks - e), e + jax.lax.rem(step, t.blocks - e)
        qs, keys = pl.ds(i * b, b), pl.ds((i - e) * b, b)
        qv = qv_ref[row, qs, :]
        _, ds = _tile_grads(qu_ref[row, qs, :], qv, k_ref[row, keys, :], v_ref[row, keys, :],
                            r_window, seg_ref[row, qs], seg_ref[row, keys], do_ref[row, qs, :],
                            lse_ref[row, qs], delta_ref[row, qs], i, i - e, skew_ref, t)
        return dr + _dot(_unshift(ds, skew_ref, t).astype(dt), qv, trans_a=True)

    dr = jax.lax.fori_loop(0, batch * (t.blocks - e), tile,
                           jnp.zeros((2 * b, t.head_dim), jnp.float32))
    dr_ref[...] = dr


def _combine_dr(dr_diag: jax.Array, t: _Tiles) -> jax.Array:
    """[H, n, 2b, K] per-diagonal window gradients -> [H, L, K] by padded r row. Diagonal e's
    window is row blocks n-1-e (first half) and n-e (second half; block n: negative
    distances, dropped)."""
    heads, b = dr_diag.shape[0], t.block
    first = jnp.flip(dr_diag[:, :, :b], axis=1)  # [H, n, b, K]: block p from diagonal n-1-p
    second = jnp.flip(dr_diag[:, 1:, b:], axis=1)  # block p+1 ... from diagonal n-1-p
    second = jnp.pad(second, ((0, 0), (1, 0), (0, 0), (0, 0)))
    return (first + second).reshape(heads, t.length, t.head_dim)


def _backward(qu, qv, k, v, r, seg, o, lse, do, t: _Tiles):
    batch, _, heads, _ = qu.shape
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
    delta = jnp.swapaxes(delta, 1, 2)  # [B, H, L]
    args = (qu, qv, k, v, r, seg, do, lse, delta)
    block, whole, rs, segs, row_block, row_whole, skew = _specs(t, batch)
    grid = (t.blocks, batch, heads)

    dk, dv, _ = pl.pallas_call(
        functools.partial(_dkv_kernel, t=t), grid=grid,
        in_specs=[whole, whole, block, block, rs, segs, whole, row_whole, row_whole],
        out_specs=[block, block, skew],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype),
                   _skew_shape(t, (batch, heads))],
        name="relative_flash_gpu_dkv", **_params(t),
    )(*args)

    dqu, dqv, _ = pl.pallas_call(
        functools.partial(_dq_kernel, t=t), grid=grid,
        in_specs=[block, block, whole, whole, rs, segs, block, row_block, row_block],
        out_specs=[block, block, skew],
        out_shape=[jax.ShapeDtypeStruct(qu.shape, qu.dtype),
                   jax.ShapeDtypeStruct(qv.shape, qv.dtype), _skew_shape(t, (batch, heads))],
        name="relative_flash_gpu_dq", **_params(t, gathers_into_dot=True),
    )(*args)

    def rows(shape):  # every row of the batch, one head
        return pl.BlockSpec((batch, *shape), lambda e, h: (0, *(h if s is None else 0
                                                                for s in shape)))

    b, d, length = t.block, t.head_dim, t.length
    dr_diag, _ = pl.pallas_call(
        functools.partial(_dr_kernel, t=t, batch=batch), grid=(t.blocks, heads),
        in_specs=[rows((length, None, d))] * 4
        + [pl.BlockSpec((t.r_rows, None, d), lambda e, h: (0, h, 0)),
           pl.BlockSpec((batch, length), lambda e, h: (0, 0)),
           rows((length, None, d)), rows((None, length)), rows((None, length))],
        out_specs=[pl.BlockSpec((None, None, 2 * b, d), lambda e, h: (h, e, 0, 0)),
                   pl.BlockSpec((None, None, b, 2 * b), lambda e, h: (h, e, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct((heads, t.blocks, 2 * b, d), jnp.float32),
                   _skew_shape(t, (heads,))],
        name="relative_flash_gpu_dr", **_params(t, gathers_into_dot=True),
    )(*args)
    dr = jnp.pad(jnp.swapaxes(_combine_dr(dr_diag, t), 0, 1), ((0, b), (0, 0), (0, 0)))
    return dqu, dqv, dk, dv, dr.astype(r.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _attention(qu, qv, k, v, r, seg, t: _Tiles):
    return _forward(qu, qv, k, v, r, seg, t)[0]


def _attention_fwd(qu, qv, k, v, r, seg, t: _Tiles):
    o, lse = _forward(qu, qv, k, v, r, seg, t)
    return o, (qu, qv, k, v, r, seg, o, lse)


def _attention_bwd(t: _Tiles, res, do):
    return (*_backward(*res, do, t), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def gpu_flash_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array,
                        r: jax.Array, segment_ids: jax.Array, *, block: int = DEFAULT_BLOCK,
                        interpret: bool | None = None,
                        stages: int = DEFAULT_STAGES) -> jax.Array:
    """qu, qv, k, v [B, T, H, K]; r [T, H, K] relative keys of distances T-1, ..., 0;
    segment_ids [B, T] int -> [B, T, H, K] in v's dtype. interpret=None: Triton on GPU,
    interpret mode elsewhere (`flash_attention.target_platform`); stages: Triton's
    num_stages."""
    if interpret is None:
        platform = flash_attention.target_platform()
        if platform == "tpu":
            raise ConfigError("model.attention_impl=pallas_gpu is the GPU (Triton) kernel",
                              "set --config.model.attention_impl=auto (or pallas) on TPU")
        interpret = platform not in GPU_PLATFORMS
    _, length, _, head_dim = qu.shape
    t = tiles_for(length, head_dim, block, interpret, stages)
    pad_t, pad_k = t.length - length, t.head_dim - head_dim

    def padded(x):  # [B, T, H, K] -> [B, L, H, K_padded]
        return jnp.pad(x, ((0, 0), (0, pad_t), (0, 0), (0, pad_k)))

    # Distances T..L-1 in front (only padded queries reach them), b negative ones after.
    r = jnp.pad(r, ((pad_t, t.block), (0, 0), (0, pad_k)))
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad_t)))
    out = _attention(padded(qu), padded(qv), padded(k), padded(v), r, seg, t)
    return out[:, :length, :, :head_dim]


def sharded_gpu_flash_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array,
                                r: jax.Array, segment_ids: jax.Array, *,
                                block: int = DEFAULT_BLOCK, interpret: bool | None = None,
                                rules: rules_lib.Rules | None = None) -> jax.Array:
    """`gpu_flash_attention` per device under `jax.shard_map` over the current mesh, with the
    TPU kernel's specs (`flash_attention.attention_specs`); without a mesh or rules, the
    kernel as is. shard_map's transpose sums the gradient of r over the batch axes."""
    rules = rules if rules is not None else rules_lib.active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    kernel = functools.partial(gpu_flash_attention, block=block, interpret=interpret)
    if rules is None or mesh.empty:
        return kernel(qu, qv, k, v, r, segment_ids)
    heads, rel, seg = flash_attention.attention_specs(rules)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, heads, rel, seg),
                         out_specs=heads, check_vma=False)(qu, qv, k, v, r, segment_ids)


def kernel_runs_here() -> bool:
    """Whether the traced-for device is a GPU on which the kernel was run correct and faster
    than XLA attention (`hardware.GPU_ATTENTION_KERNEL_RUNS`): what attention_impl=auto asks."""
    from gopher_jax.hardware import gpu_attention_kernel_runs

    if flash_attention.target_platform() not in GPU_PLATFORMS:
        return False
    return gpu_attention_kernel_runs(jax.devices()[0].device_kind)
