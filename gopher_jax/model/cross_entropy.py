"""Cross-entropy against the output embedding, in float32, without keeping [B, T, vocab] logits.

`nll_sum(x, w_out, targets, weights, chunk)` = sum of weights * -log softmax(x w_out^T)[target].
Its forward pass runs over chunks of `chunk` positions (every chunk spans the whole batch, so
each data shard keeps its share), and computes the gradients as it goes: (softmax - one-hot)
* weight for the chunk's logits, then their products with w_out and x. The backward pass only
scales those by the incoming cotangent. Memory: one chunk's logits instead of the whole
batch's logits and their gradient; FLOPs: the same three matmuls autodiff would run.
Written by hand (custom VJP + scan) because autodiff of a chunked loss would keep every
chunk's logits for the backward pass, or recompute them under remat.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gopher_jax.parallel.rules import constrain

OUT_AXES = ("vocab", "embed")


def _chunks(a: jax.Array, n: int) -> jax.Array:
    """[B, T, ...] -> [n, B, T / n, ...]."""
    b, t = a.shape[:2]
    return jnp.moveaxis(a.reshape(b, n, t // n, *a.shape[2:]), 1, 0)


def _unchunk(a: jax.Array) -> jax.Array:
    """[n, B, T / n, ...] -> [B, T, ...]."""
    n, b, c = a.shape[:3]
    return jnp.moveaxis(a, 0, 1).reshape(b, n * c, *a.shape[3:])


def _chunk_nll(xc: jax.Array, w_out: jax.Array, tc: jax.Array
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """xc [B, c, D], targets [B, c] -> (float32 logits [B, c, V], logsumexp [B, c], nll [B, c])."""
    logits = jnp.einsum("btd,vd->btv", xc, w_out, preferred_element_type=jnp.float32)
    logits = constrain(logits, ("act_batch", "act_length", "act_vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, tc[..., None], axis=-1)[..., 0]
    return logits, lse, lse - picked


def _chunked(x: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The scan's inputs: x, targets and weights split into chunks of `chunk` positions (one
    chunk when it does not divide T; XLA drops a loop of one trip)."""
    t = x.shape[1]
    n = t // chunk if 0 < chunk < t and t % chunk == 0 else 1
    return _chunks(x, n), _chunks(targets, n), _chunks(weights, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def nll_sum(x: jax.Array, w_out: jax.Array, targets: jax.Array, weights: jax.Array,
            chunk: int) -> jax.Array:
    """x [B, T, D] (final hidden states), w_out [V, D], targets [B, T] int, weights [B, T]
    -> float32 scalar. `chunk` positions per chunk (one chunk when it does not divide T)."""

    def body(total: jax.Array, xs: tuple[jax.Array, ...]) -> tuple[jax.Array, None]:
        xc, tc, wc = xs
        return total + jnp.sum(_chunk_nll(xc, w_out, tc)[2] * wc), None

    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32),
                            _chunked(x, targets, weights, chunk))
    return total


def _fwd(x: jax.Array, w_out: jax.Array, targets: jax.Array, weights: jax.Array, chunk: int
         ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    vocab = w_out.shape[0]

    def body(carry: tuple[jax.Array, jax.Array], xs: tuple[jax.Array, ...]
             ) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
        total, dwt = carry
        xc, tc, wc = xs
        logits, lse, nll = _chunk_nll(xc, w_out, tc)
        probs = jnp.exp(logits - lse[..., None])
        dlogits = (probs - jax.nn.one_hot(tc, vocab, dtype=jnp.float32)) * wc[..., None]
        dlogits = dlogits.astype(x.dtype)
        dxc = jnp.einsum("btv,vd->btd", dlogits, w_out, preferred_element_type=jnp.float32)
        # [D, V] then one transpose at the end: XLA:CPU runs "btv,btd->vd" ~1.5x slower.
        dwt = dwt + jnp.einsum("btd,btv->dv", xc, dlogits, preferred_element_type=jnp.float32)
        return (total + jnp.sum(nll * wc), constrain(dwt, OUT_AXES[::-1])), dxc

    dwt0 = constrain(jnp.zeros(w_out.shape[::-1], jnp.float32), OUT_AXES[::-1])
    (total, dwt), dx = jax.lax.scan(body, (jnp.zeros((), jnp.float32), dwt0),
                                    _chunked(x, targets, weights, chunk))
    return total, (_unchunk(dx).astype(x.dtype), dwt.T.astype(w_out.dtype))


def _bwd(chunk: int, res: tuple[jax.Array, jax.Array], g: jax.Array
         ) -> tuple[jax.Array, jax.Array, None, None]:
    del chunk
    dx, dw = res
    return g.astype(dx.dtype) * dx, g.astype(dw.dtype) * dw, None, None


nll_sum.defvjp(_fwd, _bwd)
