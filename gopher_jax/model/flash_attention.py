"""Flash-style Pallas kernels for Transformer-XL relative attention (TPU Mosaic; interpret
mode on CPU).

Same semantics as `attention.xla_attention`: for queries i and keys j of one row,

    score(i, j) = ((qu_i . k_j) + (qv_i . r[T-1-(i-j)])) * head_dim**-0.5

causal and only within equal segment ids, softmax in float32. Nothing of size [T, T] exists:
the grid walks (query block, key block) tiles with an online softmax (float32 running max,
sum and output), and tiles above the causal diagonal are not computed (their grid steps do
nothing, and their index maps repeat the previous block, so no new DMA either).

The position term of a tile (queries qs..qe-1, keys ks..ke-1) needs the relative keys of
distances qs-ke+1 .. qe-1-ks: one [block_q, block_q + block_k] product of the query block
with that window of r (a dynamic slice of the per-head r kept in VMEM), then row a is rolled
left by block_q-1-a (`pltpu.roll` with a stride along rows) so that column b holds the
distance (qs+a)-(ks+b). The backward pass rolls dS back the other way to get d(qv) and d(r).

Layout inside: [B, H, T, K], T padded to a multiple of the blocks. Padded keys sit after every
real query, so causality already hides them; padded query rows are dropped.
Written here rather than taken from jax.experimental.pallas.ops (flash / splash attention):
those have no relative-position term.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from gopher_jax.errors import ConfigError
from gopher_jax.parallel import rules as rules_lib

DEFAULT_BLOCK_K = 512
# Mosaic wants tiles whose minor dimensions are whole vector registers (8 sublanes x 128
# lanes); the score tiles put block_q and block_k on lanes. Interpret mode takes any
# multiple of 8.
TPU_ALIGN, INTERPRET_ALIGN = 128, 8
_MASKED = float(jnp.finfo(jnp.float32).min)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


@dataclasses.dataclass(frozen=True)
class _Tiles:
    block_q: int
    block_k: int  # a multiple of block_q
    length: int  # padded T, a multiple of block_k
    scale: float
    interpret: bool

    @property
    def window(self) -> int:  # rows of r one tile reads (one more than it needs: aligned)
        return self.block_q + self.block_k

    @property
    def r_rows(self) -> int:  # padded r: T rows, then zero rows for negative distances
        return self.length + self.window


def tiles_for(length: int, head_dim: int, block_q: int, block_k: int, interpret: bool
              ) -> _Tiles:
    """Block sizes for sequence length `length`: block_q as asked (0: one block) but no
    larger than the aligned length, block_k a multiple of it; T padded to block_k."""
    align = INTERPRET_ALIGN if interpret else TPU_ALIGN
    bq = _round_up(min(block_q or length, _round_up(length, align)), align)
    bk = _round_up(min(block_k or length, _round_up(length, bq)), bq)
    return _Tiles(bq, bk, _round_up(length, bk), head_dim**-0.5, interpret)


def _needed(i: jax.Array, j: jax.Array, t: _Tiles) -> jax.Array:
    """Whether tile (query block i, key block j) has any key at or before one of its queries."""
    return j * t.block_k <= i * t.block_q + t.block_q - 1


# Index maps use lax.div (truncating; the operands are non-negative): `//` lowers through
# `sign`, whose Mosaic rule asks the default backend for its TPU generation (fails in AOT
# compiles from a CPU host). The divisor takes the grid index's dtype: lax.div does not
# promote, and with jax_enable_x64 a Python int would become int64 against int32 indices.
def _div(x: jax.Array, n: int) -> jax.Array:
    return jax.lax.div(x, jnp.asarray(n, x.dtype))


def _last_key_block(i: jax.Array, t: _Tiles) -> jax.Array:
    return _div(i * t.block_q + t.block_q - 1, t.block_k)


def _first_query_block(j: jax.Array, t: _Tiles) -> jax.Array:
    return _div(j * t.block_k, t.block_q)


def _window_start(i: jax.Array, j: jax.Array, t: _Tiles) -> jax.Array:
    """First row of padded r (distance length-1 at row 0) that tile (i, j) reads: the distance
    (i+1)*block_q - 1 - j*block_k sits at row length - (i+1)*block_q + j*block_k."""
    return pl.multiple_of(t.length - (i + 1) * t.block_q + j * t.block_k, INTERPRET_ALIGN)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """a @ b contracting a's dim contract[0] with b's dim contract[1], float32 result."""
    return jax.lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())),
                               preferred_element_type=jnp.float32)


def _tile_scores(qu, qv, k, r_window, q_seg, k_seg, i, j, t: _Tiles):
    """Scaled float32 scores [block_q, block_k] of tile (i, j) and the mask of allowed pairs."""
    content = _dot(qu, k, (1, 1))
    by_distance = _dot(qv, r_window, (1, 1))  # [bq, window]: column c = window row c
    # Row a needs columns block_q-1-a .. block_q-1-a+block_k-1: roll row a right by a+1+bk.
    position = pltpu.roll(by_distance, t.block_k + 1, 1, stride=1, stride_axis=0)
    scores = (content + position[:, :t.block_k]) * t.scale
    rows = i * t.block_q + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 0)
    cols = j * t.block_k + jax.lax.broadcasted_iota(jnp.int32, scores.shape, 1)
    mask = (rows >= cols) & (q_seg == k_seg)
    return jnp.where(mask, scores, _MASKED), mask


def _flip_rows(x: jax.Array) -> jax.Array:
    """x [n, m] with its rows in reverse order, float32, as a product with the exchange matrix
    on the MXU (Mosaic has no row reversal). Exact: one nonzero term per output."""
    n = x.shape[0]
    rows = jax.lax.broadcasted_iota(jnp.int32, (n, n), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (n, n), 1)
    exchange = (rows + cols == n - 1).astype(x.dtype)
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jax.lax.dot_general(exchange, x, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=jnp.float32)


def _unshift_flipped(ds: jax.Array, t: _Tiles) -> jax.Array:
    """dScores [bq, bk] (compute dtype) by key -> by window row [bq, window], rows in reverse
    order, compute dtype.

    The inverse of the forward roll shifts row a by block_q-1-a, a stride of -1, which Mosaic
    cannot do; on reversed rows a' = block_q-1-a the shift is a', a stride of +1. The roll
    runs in float32 (Mosaic does not rotate packed types).
    """
    padded = jnp.concatenate([_flip_rows(ds), jnp.zeros((t.block_q, t.block_q), jnp.float32)],
                             axis=1)
    return pltpu.roll(padded, 0, 1, stride=1, stride_axis=0).astype(ds.dtype)


def flip_blocks(x: jax.Array, block: int) -> jax.Array:
    """[..., T, K] with the rows of each block of `block` rows in reverse order (an
    involution)."""
    *lead, length, d = x.shape
    x = x.reshape(*lead, length // block, block, d)
    return jnp.flip(x, axis=-2).reshape(*lead, length, d)


# ----------------------------------------------------------------------------- forward


def _fwd_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, qseg_ref, kseg_ref,
                o_ref, lse_ref, m_sc, l_sc, acc_sc, *, t: _Tiles):
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full_like(m_sc, _MASKED)
        l_sc[...] = jnp.zeros_like(l_sc)
        acc_sc[...] = jnp.zeros_like(acc_sc)

    @pl.when(_needed(i, j, t))
    def _tile():
        r_window = r_ref[pl.ds(_window_start(i, j, t), t.window), :]
        s, mask = _tile_scores(qu_ref[...], qv_ref[...], k_ref[...], r_window, qseg_ref[...],
                               kseg_ref[...], i, j, t)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
        p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
        alpha = jnp.exp(m_prev - m_new)
        l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + _dot(p.astype(v_ref.dtype), v_ref[...], (1, 0))
        m_sc[...] = m_new

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _specs(t: _Tiles, head_dim: int, grid_order: str):
    """BlockSpecs for a grid over (b, h, query block i, key block j) in `grid_order` (a
    permutation of 'bhij'), with skipped tiles mapped to a block already loaded."""

    def unpack(f):
        def index_map(*g):
            d = dict(zip(grid_order, g, strict=True))
            return f(d["b"], d["h"], d["i"], d["j"])
        return index_map

    def q_block(b, h, i, j):
        if grid_order.index("i") > grid_order.index("j"):  # keys outer: clamp the queries
            i = jnp.maximum(i, _first_query_block(j, t))
        return b, h, i, 0

    def k_block(b, h, i, j):
        if grid_order.index("j") > grid_order.index("i"):  # queries outer: clamp the keys
            j = jnp.minimum(j, _last_key_block(i, t))
        return b, h, j, 0

    q = pl.BlockSpec((None, None, t.block_q, head_dim), unpack(q_block))
    k = pl.BlockSpec((None, None, t.block_k, head_dim), unpack(k_block))
    row = pl.BlockSpec((None, None, t.block_q, 1), unpack(q_block))  # lse, delta
    r = pl.BlockSpec((None, t.r_rows, head_dim), unpack(lambda b, h, i, j: (h, 0, 0)))
    q_seg = pl.BlockSpec((None, t.block_q, 1),
                         unpack(lambda b, h, i, j: (b, q_block(b, h, i, j)[2], 0)))
    k_seg = pl.BlockSpec((None, 1, t.block_k),
                         unpack(lambda b, h, i, j: (b, 0, k_block(b, h, i, j)[2])))
    return q, k, row, r, q_seg, k_seg


def _tiles_computed(t: _Tiles) -> int:
    """Tiles of one (row, head) the grid computes: those not above the causal diagonal."""
    nq = t.length // t.block_q
    return sum((i * t.block_q + t.block_q - 1) // t.block_k + 1 for i in range(nq))


def _cost(t: _Tiles, batch: int, heads: int, head_dim: int, products: dict[str, int],
          exps: int, arrays: list) -> pl.CostEstimate:
    """What XLA's cost analysis should count for a kernel: `products` maps each matmul of a
    tile to its (rows x cols) output count per unit head_dim ('w': window, 'k': block_k,
    'qq': block_q^2 per key), `exps` exponentials per score."""
    sizes = {"k": t.block_q * t.block_k * head_dim, "w": t.block_q * t.window * head_dim,
             "qq": t.block_q * t.block_q * t.block_k}
    per_tile = sum(2 * n * sizes[kind] for kind, n in products.items())
    tiles = _tiles_computed(t) * batch * heads
    return pl.CostEstimate(
        flops=per_tile * tiles, transcendentals=exps * t.block_q * t.block_k * tiles,
        bytes_accessed=sum(int(a.size) * a.dtype.itemsize for a in arrays))


def _params(t: _Tiles, semantics: tuple[str, ...]) -> dict:
    if t.interpret:
        return {"interpret": True}
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=semantics)}


def _forward(qu, qv, k, v, r, q_seg, k_seg, t: _Tiles):
    b, h, _, d = qu.shape
    nq, nk = t.length // t.block_q, t.length // t.block_k
    q, kk, row, rs, qs, ks = _specs(t, d, "bhij")
    return pl.pallas_call(
        functools.partial(_fwd_kernel, t=t),
        grid=(b, h, nq, nk),
        in_specs=[q, q, kk, kk, rs, qs, ks],
        out_specs=[q, row],
        out_shape=[jax.ShapeDtypeStruct(qu.shape, v.dtype),
                   jax.ShapeDtypeStruct((b, h, t.length, 1), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((t.block_q, 1), jnp.float32),
                        pltpu.VMEM((t.block_q, 1), jnp.float32),
                        pltpu.VMEM((t.block_q, d), jnp.float32)],
        name="relative_flash_fwd",
        # content and p @ v per key block, the position term over the window
        cost_estimate=_cost(t, b, h, d, {"k": 2, "w": 1}, 1, [qu, qv, k, v, r, qu]),
        **_params(t, ("parallel", "parallel", "parallel", "arbitrary")),
    )(qu, qv, k, v, r, q_seg, k_seg)


# ----------------------------------------------------------------------------- backward


def _tile_grads(qu_ref, qv_ref, k_ref, v_ref, r_window, qseg_ref, kseg_ref, do_ref, lse_ref,
                delta_ref, i, j, t: _Tiles):
    """Probabilities p and dScores (scale folded in) [bq, bk] float32 of tile (i, j)."""
    s, mask = _tile_scores(qu_ref[...], qv_ref[...], k_ref[...], r_window, qseg_ref[...],
                           kseg_ref[...], i, j, t)
    p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
    dp = _dot(do_ref[...], v_ref[...], (1, 1))
    return p, p * (dp - delta_ref[...]) * t.scale


def _dq_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
               delta_ref, qv_flipped_ref, dqu_ref, dqv_flipped_ref, dr_ref, dqu_sc, dqv_sc, *,
               t: _Tiles):
    """Grid (h, b, i, j): d(qu), d(qv) of query block i summed over key blocks j, and d(r) of
    head h summed over the whole (b, i, j) loop (its block stays in VMEM). d(qv) comes out
    with the rows of each block reversed (`flip_blocks`), as qv_flipped goes in."""
    b, i, j = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when((b == 0) & (i == 0) & (j == 0))
    def _init_dr():
        dr_ref[...] = jnp.zeros_like(dr_ref)

    @pl.when(j == 0)
    def _init():
        dqu_sc[...] = jnp.zeros_like(dqu_sc)
        dqv_sc[...] = jnp.zeros_like(dqv_sc)

    @pl.when(_needed(i, j, t))
    def _tile():
        start = _window_start(i, j, t)
        r_window = r_ref[pl.ds(start, t.window), :]
        _, ds = _tile_grads(qu_ref, qv_ref, k_ref, v_ref, r_window, qseg_ref, kseg_ref, do_ref,
                            lse_ref, delta_ref, i, j, t)
        dt = k_ref.dtype
        dqu_sc[...] += _dot(ds.astype(dt), k_ref[...], (1, 0))
        ds_window = _unshift_flipped(ds.astype(dt), t)  # [bq, window], rows reversed
        dqv_sc[...] += _dot(ds_window, r_window, (1, 0))
        dr_ref[pl.ds(start, t.window), :] += _dot(ds_window, qv_flipped_ref[...], (0, 0))

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dqu_ref[...] = dqu_sc[...].astype(dqu_ref.dtype)
        dqv_flipped_ref[...] = dqv_sc[...].astype(dqv_flipped_ref.dtype)


def _dkv_kernel(qu_ref, qv_ref, k_ref, v_ref, r_ref, qseg_ref, kseg_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, dk_sc, dv_sc, *, t: _Tiles):
    """Grid (b, h, j, i): d(k), d(v) of key block j summed over query blocks i."""
    j, i = pl.program_id(2), pl.program_id(3)

    @pl.when(i == 0)
    def _init():
        dk_sc[...] = jnp.zeros_like(dk_sc)
        dv_sc[...] = jnp.zeros_like(dv_sc)

    @pl.when(_needed(i, j, t))
    def _tile():
        r_window = r_ref[pl.ds(_window_start(i, j, t), t.window), :]
        p, ds = _tile_grads(qu_ref, qv_ref, k_ref, v_ref, r_window, qseg_ref, kseg_ref, do_ref,
                            lse_ref, delta_ref, i, j, t)
        dt = k_ref.dtype
        dv_sc[...] += _dot(p.astype(dt), do_ref[...], (0, 0))
        dk_sc[...] += _dot(ds.astype(dt), qu_ref[...], (0, 0))

    @pl.when(i == pl.num_programs(3) - 1)
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _backward(qu, qv, k, v, r, q_seg, k_seg, o, lse, do, t: _Tiles):
    b, h, _, d = qu.shape
    nq, nk = t.length // t.block_q, t.length // t.block_k
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
    args = (qu, qv, k, v, r, q_seg, k_seg, do, lse, delta)

    q, kk, row, rs, qs, ks = _specs(t, d, "hbij")
    dqu, dqv_flipped, dr = pl.pallas_call(
        functools.partial(_dq_kernel, t=t),
        grid=(h, b, nq, nk),
        in_specs=[q, q, kk, kk, rs, qs, ks, q, row, row, q],
        out_specs=[q, q, rs],
        out_shape=[jax.ShapeDtypeStruct(qu.shape, qu.dtype),
                   jax.ShapeDtypeStruct(qv.shape, qv.dtype),
                   jax.ShapeDtypeStruct(r.shape, jnp.float32)],
        scratch_shapes=[pltpu.VMEM((t.block_q, d), jnp.float32),
                        pltpu.VMEM((t.block_q, d), jnp.float32)],
        name="relative_flash_dq_dr",
        # content, do @ v^T, dS @ k; position, dS_w @ r, dS_w^T @ qv; the row flip of dS
        cost_estimate=_cost(t, b, h, d, {"k": 3, "w": 3, "qq": 1}, 1,
                            [qu, qv, k, v, r, qu, qu, qv, r]),
        **_params(t, ("parallel", "arbitrary", "arbitrary", "arbitrary")),
    )(*args, flip_blocks(qv, t.block_q))
    dqv = flip_blocks(dqv_flipped, t.block_q)

    q, kk, row, rs, qs, ks = _specs(t, d, "bhji")
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, t=t),
        grid=(b, h, nk, nq),
        in_specs=[q, q, kk, kk, rs, qs, ks, q, row, row],
        out_specs=[kk, kk],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                   jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((t.block_k, d), jnp.float32),
                        pltpu.VMEM((t.block_k, d), jnp.float32)],
        name="relative_flash_dkv",
        # content, do @ v^T, p^T @ do, dS^T @ qu; position
        cost_estimate=_cost(t, b, h, d, {"k": 4, "w": 1}, 1, [qu, qv, k, v, r, qu, k, v]),
        **_params(t, ("parallel", "parallel", "parallel", "arbitrary")),
    )(*args)
    return dqu, dqv, dk, dv, dr.astype(r.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _attention(qu, qv, k, v, r, q_seg, k_seg, t: _Tiles):
    return _forward(qu, qv, k, v, r, q_seg, k_seg, t)[0]


def _attention_fwd(qu, qv, k, v, r, q_seg, k_seg, t: _Tiles):
    o, lse = _forward(qu, qv, k, v, r, q_seg, k_seg, t)
    return o, (qu, qv, k, v, r, q_seg, k_seg, o, lse)


def _attention_bwd(t: _Tiles, res, do):
    return (*_backward(*res, do, t), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _target_device() -> tuple[str, str]:
    """(platform, device kind) being traced for: the current mesh's devices (a TPU topology
    in an AOT compile from a CPU host), else the default backend's."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.abstract_device is None:
        return jax.default_backend(), jax.devices()[0].device_kind
    return mesh.abstract_device.platform, mesh.abstract_device.device_kind


def target_platform() -> str:
    return _target_device()[0]


def kernel_runs_here() -> bool:
    """Whether the traced-for device is a TPU generation Mosaic lowers this kernel for."""
    from gopher_jax.hardware import tpu_generation

    platform, kind = _target_device()
    gen = tpu_generation(kind) if platform == "tpu" else None
    return gen is not None and gen.flash_attention


def check_supported() -> None:
    """Refuses to compile the kernel for a TPU generation Mosaic cannot lower it for."""
    platform, kind = _target_device()
    if platform == "tpu" and not kernel_runs_here():
        raise ConfigError(f"model.attention_impl=pallas needs TPU v5 or later ({kind} lacks "
                          "the strided roll the kernel uses)",
                          "set --config.model.attention_impl=auto (or xla)")


def flash_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array, r: jax.Array,
                    segment_ids: jax.Array, *, block_q: int, block_k: int = DEFAULT_BLOCK_K,
                    interpret: bool | None = None) -> jax.Array:
    """qu, qv, k, v [B, T, H, K]; r [T, H, K] relative keys of distances T-1, ..., 0;
    segment_ids [B, T] int -> [B, T, H, K] in v's dtype. interpret=None: Mosaic on TPU,
    interpret mode elsewhere (`target_platform`)."""
    if interpret is None:
        check_supported()
        interpret = target_platform() != "tpu"
    _, length, _, head_dim = qu.shape
    t = tiles_for(length, head_dim, block_q, block_k, interpret)
    pad = t.length - length

    def heads_major(x):  # [B, T, H, K] -> [B, H, T_padded, K]
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

    # Distances T..T_padded-1 in front (only padded queries reach them), negative ones after.
    r = jnp.pad(jnp.swapaxes(r, 0, 1), ((0, 0), (pad, t.window), (0, 0)))
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))
    out = _attention(heads_major(qu), heads_major(qv), heads_major(k), heads_major(v), r,
                     seg[:, :, None], seg[:, None, :], t)
    return jnp.swapaxes(out[:, :, :length], 1, 2)


# ----------------------------------------------------------------------------- shard_map


def attention_specs(rules: rules_lib.Rules) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """PartitionSpecs of (q/k/v/output [B, T, H, K], r [T, H, K], segment_ids [B, T]) from the
    logical activation names: batch over act_batch's axes, heads over act_heads'. r is the
    same for every row, so it is replicated over the batch axes."""
    if rules_lib.mesh_axes_for(rules, "act_length"):
        raise ConfigError("flash attention needs whole sequences per device; the rules split "
                          "act_length", "pick a rule set that keeps act_length whole")
    heads = rules_lib.logical_to_spec(("act_batch", "act_length", "act_heads", None), rules)
    rel = rules_lib.logical_to_spec(("act_length", "act_heads", None), rules)
    seg = rules_lib.logical_to_spec(("act_batch", "act_length"), rules)
    return heads, rel, seg


def sharded_flash_attention(qu: jax.Array, qv: jax.Array, k: jax.Array, v: jax.Array,
                            r: jax.Array, segment_ids: jax.Array, *, block_q: int,
                            block_k: int = DEFAULT_BLOCK_K, interpret: bool | None = None,
                            rules: rules_lib.Rules | None = None) -> jax.Array:
    """`flash_attention` run per device under `jax.shard_map` over the current mesh, with
    specs from `rules` (default: the active rules of `rules_lib.use_rules`). Without a mesh
    or rules, the kernel runs as is. The gradient of r is summed over the batch axes by
    shard_map's transpose."""
    rules = rules if rules is not None else rules_lib.active_rules()
    mesh = jax.sharding.get_abstract_mesh()
    kernel = functools.partial(flash_attention, block_q=block_q, block_k=block_k,
                               interpret=interpret)
    if rules is None or mesh.empty:
        return kernel(qu, qv, k, v, r, segment_ids)
    heads, rel, seg = attention_specs(rules)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, heads, heads, heads, rel, seg),
                         out_specs=heads, check_vma=False)(qu, qv, k, v, r, segment_ids)
