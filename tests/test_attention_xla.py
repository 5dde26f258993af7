"""The XLA attention path against a plain full-mask softmax: the tiled loop
(`attention.tiled_attention`, every case, also where `xla_attention` would unroll), the
dispatch between it and the unrolled blocks, and the tiled program's size against T."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gopher_jax.model import attention


def reference(qu, qv, k, v, r, segment_ids):
    """Non-blocked: every [T, T] score, the relative key of distance i-j gathered per pair,
    one masked softmax, all in float32."""
    qu, qv, k, v, r = (x.astype(jnp.float32) for x in (qu, qv, k, v, r))
    t, head_dim = qu.shape[1], qu.shape[-1]
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    by_pair = r[jnp.clip(t - 1 - (i - j), 0, t - 1)]  # r holds distances t-1, ..., 0
    hi = jax.lax.Precision.HIGHEST
    scores = (jnp.einsum("bihk,bjhk->bhij", qu, k, precision=hi)
              + jnp.einsum("bihk,ijhk->bhij", qv, by_pair, precision=hi)) / np.sqrt(head_dim)
    mask = (i >= j)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    return jnp.einsum("bhij,bjhk->bihk", jax.nn.softmax(scores, axis=-1), v, precision=hi)


def inputs(t, dtype, segments=1, batch=2, heads=2, head_dim=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 6)
    qkv = [jax.random.normal(kk, (batch, t, heads, head_dim), dtype) for kk in ks[:4]]
    r = jax.random.normal(ks[4], (t, heads, head_dim), dtype)
    seg = jnp.sort(jax.random.randint(ks[5], (batch, t), 0, segments), axis=1)
    return (*qkv, r), seg.astype(jnp.int32)


# Jitted, as the model runs it: one compile per case instead of one per op.
tiled = jax.jit(attention.tiled_attention, static_argnames="block_q")
SLOW = pytest.mark.slow
CASES = [  # (T, block_q, documents per row, dtype)
    (18, 4, 3, "float32"),  # T not a multiple of the block, odd block count, packed
    (18, 4, 3, "bfloat16"),
    pytest.param((1, 4, 1, "float32"), marks=SLOW),
    pytest.param((5, 8, 1, "float32"), marks=SLOW),  # T below the block
    pytest.param((9, 0, 2, "float32"), marks=SLOW),  # one block
    pytest.param((64, 8, 2, "float32"), marks=SLOW),  # 8 blocks: twice a 32-token model's
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_full_softmax(case):
    t, block, segments, dtype = case
    dtype = jnp.dtype(dtype)
    args, seg = inputs(t, dtype, segments)
    got = tiled(*args, seg, block_q=block)
    assert got.shape == args[0].shape and got.dtype == dtype
    want = jax.jit(reference)(*args, seg)
    # float32: summation order only. bfloat16: the unnormalised probabilities and the output
    # are rounded to 8 bits of mantissa (the reference keeps float32 throughout).
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), **tol)


def test_gradients_match_full_softmax():
    t, block, segments = 11, 4, 2  # 3 blocks, the last partial
    args, seg = inputs(t, jnp.float32, segments, seed=1)
    w = jax.random.normal(jax.random.key(9), args[0].shape)

    def loss(fn):
        return lambda *a: jnp.sum(fn(*a) * w)

    got = jax.jit(jax.grad(loss(lambda *a: attention.tiled_attention(*a, seg, block_q=block)),
                           argnums=range(5)))(*args)
    want = jax.jit(jax.grad(loss(lambda *a: reference(*a, seg)), argnums=range(5)))(*args)
    for name, g, e in zip(("qu", "qv", "k", "v", "r"), got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5,
                                   err_msg=name)


@pytest.mark.slow
def test_causal_and_within_document():
    """Changing a key/value changes no output before it, nor any in another document."""
    t, block = 12, 4
    (qu, qv, k, v, r), _ = inputs(t, jnp.float32, batch=1)
    seg = jnp.asarray([[1] * 5 + [2] * 7], jnp.int32)
    base = attention.tiled_attention(qu, qv, k, v, r, seg, block_q=block)
    for pos in (3, 4, 8):  # the last of a block, the first of the next, mid-block
        bump = lambda x, pos=pos: x.at[:, pos].add(1.0)  # noqa: E731
        out = attention.tiled_attention(qu, qv, bump(k), bump(v), r, seg, block_q=block)
        changed = np.any(np.abs(np.asarray(out - base)) > 1e-6, axis=(0, 2, 3))
        same_doc = np.asarray(seg[0] == seg[0, pos])
        np.testing.assert_array_equal(changed, (np.arange(t) >= pos) & same_doc)


@pytest.mark.slow
def test_dispatch_unrolls_only_a_few_blocks(monkeypatch):
    calls = []
    for name in ("unrolled_attention", "tiled_attention"):
        fn = getattr(attention, name)
        monkeypatch.setattr(attention, name,
                            lambda *a, fn=fn, name=name, **kw: calls.append(name) or fn(*a, **kw))
    limit = attention.UNROLLED_MAX_BLOCKS
    t = 4 * limit * (limit + 1)
    args, seg = inputs(t, jnp.float32, 2)
    for block in (t // limit, t // (limit + 1), 0):  # limit blocks, one more, one block
        got = attention.xla_attention(*args, seg, block_q=block)
        np.testing.assert_allclose(np.asarray(got), np.asarray(reference(*args, seg)),
                                   rtol=1e-5, atol=1e-5)
    assert calls == ["unrolled_attention", "tiled_attention", "unrolled_attention"]


def test_tile_plan_covers_the_causal_tiles_once():
    for n in range(1, 10):
        plan = attention.tile_plan(n)
        used = plan["part"] < 2
        tiles = sorted(zip(plan["q_block"][used], plan["k_block"][used], strict=True))
        assert tiles == [(i, j) for i in range(n) for j in range(i + 1)]
        assert plan["part"].size - used.sum() == (n + 1) // 2 * (n % 2)
        rows = plan["part"].shape[0]
        for i in range(n):  # block i's tiles: row i's part 0, or row n-1-i's part 1
            row, part = (i, 0) if i < rows else (n - 1 - i, 1)
            assert np.all(plan["q_block"][row][plan["part"][row] == part] == i)
            assert np.sum(plan["part"][row] == part) == i + 1


def hlo_op_counts(t: int, block: int, grad: bool) -> dict[str, int]:
    args, seg = inputs(t, jnp.float32, batch=1, heads=1, head_dim=4)

    def f(*a):
        return jnp.sum(attention.xla_attention(*a, seg, block_q=block))

    fn = jax.grad(f, argnums=range(5)) if grad else f
    text = jax.jit(fn).lower(*args).as_text()
    ops = re.findall(r"=\s+\"?(stablehlo\.\w+)", text)
    return {op: ops.count(op) for op in set(ops)}


@pytest.mark.parametrize("grad", [False, True])
def test_program_does_not_grow_with_length(grad):
    """Past `UNROLLED_MAX_BLOCKS`, the lowered program (forward, or forward + backward) is the
    same list of ops at T = 1024 and 8192 in blocks of 128: one loop over the tiles."""
    assert 1024 // 128 > attention.UNROLLED_MAX_BLOCKS
    short, long = hlo_op_counts(1024, 128, grad), hlo_op_counts(8192, 128, grad)
    assert short == long
    assert short.get("stablehlo.while", 0) == (2 if grad else 1)  # backward: a second loop
    assert short["stablehlo.dot_general"] <= (15 if grad else 6)
