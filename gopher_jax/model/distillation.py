"""The distillation loss, chunked like the cross-entropy: (1 - lam) CE + lam T^2 KL(p_T || q_T).

p_T is the teacher's next-token distribution at temperature T, q_T the student's. Both sums
are weighted per position by the target weights (padding and segment-crossing positions
count for nothing, in the CE and the KL alike). As in cross_entropy.py, one scan over chunks
of positions computes the sums and the gradients together: per chunk the student's logits
and the teacher's (full vocabulary, or its stored top-k), then

    d loss / d logits = ((1 - lam) (softmax(z) - onehot(target)) + lam T (q_T - p_T)) * weight

(T^2 times the KL's 1/T), multiplied into the output embedding and the hidden states. So
memory stays one chunk's logits (the student's and the teacher's), never [B, T, vocab] for
the whole batch, and the student's logits are computed once for both terms.

Only the first output (the loss) is differentiable; the CE and KL sums beside it are metrics
and carry no gradient. Nothing reaches the teacher: its inputs get no cotangent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from gopher_jax.model.cross_entropy import OUT_AXES, _chunk_nll, _chunks, _unchunk
from gopher_jax.parallel.rules import constrain

# (student logits [B, c, V] float32, the chunk's teacher inputs, temperature)
#   -> (KL(p_T || q_T) per position [B, c], d KL / d student logits [B, c, V] * T)
KLChunk = Callable[[jax.Array, tuple[jax.Array, ...], float], tuple[jax.Array, jax.Array]]


def _kl_full(logits: jax.Array, teacher: tuple[jax.Array, ...], temperature: float
             ) -> tuple[jax.Array, jax.Array]:
    """Against the teacher's logits over the whole vocabulary."""
    (t_logits,) = teacher
    log_p = jax.nn.log_softmax(t_logits / temperature, axis=-1)
    log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
    p = jnp.exp(log_p)
    return jnp.sum(p * (log_p - log_q), axis=-1), jnp.exp(log_q) - p


def _kl_topk(logits: jax.Array, teacher: tuple[jax.Array, ...], temperature: float
             ) -> tuple[jax.Array, jax.Array]:
    """Against stored top-k (ids, log-probs). Both distributions are renormalised over the k
    stored ids (the teacher's tempered top-k is exact that way, since log p / T and the
    logits / T differ by a constant; a tail bucket would need the tail's tempered mass, which
    the stored T = 1 log-probs do not give). Other ids get no gradient from the KL."""
    ids, t_logp = teacher
    log_p = jax.nn.log_softmax(t_logp / temperature, axis=-1)
    picked, scatter = jax.vjp(lambda z: jnp.take_along_axis(z, ids, axis=-1), logits)
    log_q = jax.nn.log_softmax(picked / temperature, axis=-1)
    p = jnp.exp(log_p)
    (d,) = scatter(jnp.exp(log_q) - p)
    return jnp.sum(p * (log_p - log_q), axis=-1), d


def _chunk_losses(xc: jax.Array, w_out: jax.Array, tc: jax.Array, teacher_c: tuple,
                  teacher_fn: Callable[[tuple], tuple], kl_chunk: KLChunk, temperature: float
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """(logits, logsumexp, nll, kl, d kl / d logits * T) of one chunk."""
    logits, lse, nll = _chunk_nll(xc, w_out, tc)
    kl, dkl = kl_chunk(logits, jax.lax.stop_gradient(teacher_fn(teacher_c)), temperature)
    return logits, lse, nll, kl, dkl


def _scan_inputs(x: jax.Array, targets: jax.Array, weights: jax.Array, teacher: tuple,
                 chunk: int) -> tuple:
    t = x.shape[1]
    n = t // chunk if 0 < chunk < t and t % chunk == 0 else 1
    return _chunks(x, n), _chunks(targets, n), _chunks(weights, n), \
        tuple(_chunks(a, n) for a in teacher)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9, 10))
def _sums(x: jax.Array, w_out: jax.Array, targets: jax.Array, weights: jax.Array,
          teacher: tuple, teacher_const: tuple, teacher_fn: Callable, kl_chunk: KLChunk,
          chunk: int, kl_weight: float, temperature: float
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    return _fwd(x, w_out, targets, weights, teacher, teacher_const, teacher_fn, kl_chunk,
                chunk, kl_weight, temperature)[0]


def _fwd(x: jax.Array, w_out: jax.Array, targets: jax.Array, weights: jax.Array,
         teacher: tuple, teacher_const: tuple, teacher_fn: Callable, kl_chunk: KLChunk,
         chunk: int, kl_weight: float, temperature: float) -> tuple:
    vocab = w_out.shape[0]
    ce_scale, kl_scale = 1.0 - kl_weight, kl_weight * temperature

    def body(carry: tuple, xs: tuple) -> tuple[tuple, jax.Array]:
        nll_total, kl_total, dwt = carry
        xc, tc, wc, teacher_c = xs
        logits, lse, nll, kl, dkl = _chunk_losses(
            xc, w_out, tc, teacher_c, lambda tch: teacher_fn(tch, *teacher_const), kl_chunk,
            temperature)
        probs = jnp.exp(logits - lse[..., None])
        dce = probs - jax.nn.one_hot(tc, vocab, dtype=jnp.float32)
        dlogits = ((ce_scale * dce + kl_scale * dkl) * wc[..., None]).astype(x.dtype)
        dxc = jnp.einsum("btv,vd->btd", dlogits, w_out, preferred_element_type=jnp.float32)
        dwt = dwt + jnp.einsum("btd,btv->dv", xc, dlogits, preferred_element_type=jnp.float32)
        return (nll_total + jnp.sum(nll * wc), kl_total + jnp.sum(kl * wc),
                constrain(dwt, OUT_AXES[::-1])), dxc

    zero = jnp.zeros((), jnp.float32)
    dwt0 = constrain(jnp.zeros(w_out.shape[::-1], jnp.float32), OUT_AXES[::-1])
    (nll, kl, dwt), dx = jax.lax.scan(body, (zero, zero, dwt0),
                                      _scan_inputs(x, targets, weights, teacher, chunk))
    loss = ce_scale * nll + kl_weight * temperature ** 2 * kl
    return (loss, nll, kl), (_unchunk(dx).astype(x.dtype), dwt.T.astype(w_out.dtype))


def _bwd(teacher_fn: Callable, kl_chunk: KLChunk, chunk: int, kl_weight: float,
         temperature: float, res: tuple[jax.Array, jax.Array], g: tuple) -> tuple:
    dx, dw = res
    g_loss = g[0]  # the CE and KL sums are metrics: their cotangents are dropped
    return g_loss.astype(dx.dtype) * dx, g_loss.astype(dw.dtype) * dw, None, None, None, None


_sums.defvjp(_fwd, _bwd)


def _teacher_logits(t_x: jax.Array, t_w: jax.Array) -> tuple[jax.Array]:
    logits = jnp.einsum("btd,vd->btv", t_x, t_w, preferred_element_type=jnp.float32)
    return (constrain(logits, ("act_batch", "act_length", "act_vocab")),)


def online_sums(x: jax.Array, w_out: jax.Array, targets: jax.Array, weights: jax.Array,
                teacher_x: jax.Array, teacher_w: jax.Array, chunk: int, kl_weight: float,
                temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(summed loss, summed nll, summed KL), float32. x [B, T, D] and w_out [V, D]: the
    student's final hidden states and output embedding; teacher_x [B, T, D'] and teacher_w
    [V, D'] the teacher's (no gradient reaches them). Chunks of `chunk` positions."""
    return _sums(x, w_out, targets, weights, (teacher_x,), (teacher_w,),
                 lambda tch, t_w: _teacher_logits(tch[0], t_w), _kl_full, chunk,
                 float(kl_weight), float(temperature))


def _stored(tch: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
    ids, logp = tch
    return ids, logp.astype(jnp.float32)


def topk_sums(x: jax.Array, w_out: jax.Array, targets: jax.Array, weights: jax.Array,
              teacher_ids: jax.Array, teacher_logprobs: jax.Array, chunk: int,
              kl_weight: float, temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """As `online_sums`, against the teacher's stored top-k per position: ids [B, T, k] int
    and their log-probabilities [B, T, k] (at temperature 1)."""
    return _sums(x, w_out, targets, weights, (teacher_ids, teacher_logprobs), (), _stored,
                 _kl_topk, chunk, float(kl_weight), float(temperature))
