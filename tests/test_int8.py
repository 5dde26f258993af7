"""Weight-only int8 (model/int8.py): the int8 matmul's error is within the per-channel bound,
cached decoding with int8 weights equals the int8 forward pass, and int8 logits stay near the
float ones."""

import jax
import jax.numpy as jnp
import numpy as np
from test_decode import cached_logits, config, forward, random_params, random_tokens

from gopher_jax.model import int8


def test_int8_matmul_error_is_within_half_a_step_of_each_output_channel():
    """|x W - x W_q|_j <= sum|x| * max_i |W_ij| / 254 for every output channel j, on a kernel
    whose channels differ 100x in scale (one scale per tensor would round the small ones
    to zero and fail)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    w = jax.random.normal(k1, (64, 32)) * jnp.logspace(-2, 0, 32)[None, :]
    x = jax.random.normal(k2, (16, 64))
    q = int8.quantize_array(w, int8.contraction_axes(("embed", "mlp")))
    assert q.q.dtype == jnp.int8 and q.scale.shape == (1, 32)
    err = jnp.abs(x @ w - x @ q[...])
    bound = jnp.sum(jnp.abs(x), axis=1, keepdims=True) * jnp.max(jnp.abs(w), axis=0) / 254
    assert bool(jnp.all(err <= bound * (1 + 1e-5) + 1e-7))
    assert float(jnp.max(err / bound)) > 0.01  # the bound is not vacuous


def test_cached_int8_decoding_equals_the_int8_forward_pass():
    c = config()
    params = int8.quantize(c.model, random_params(c))
    kinds = {type(v).__name__ for v in jax.tree.leaves(
        params, is_leaf=lambda v: isinstance(v, int8.Int8Weight))}
    assert "Int8Weight" in kinds
    tokens = random_tokens(c, 2, c.data.seq_len)
    want = forward(c)(params, tokens)
    got = cached_logits(c, params, tokens, prompt=20)
    np.testing.assert_allclose(got, want[:, 19:], atol=1e-4, rtol=1e-5)


def test_int8_logits_near_float_and_weights_smaller():
    c = config()
    params = random_params(c)
    q = int8.quantize(c.model, params)
    tokens = random_tokens(c, 2, 32)
    f, g = forward(c)(params, tokens), forward(c)(q, tokens)
    assert float(jnp.linalg.norm(f - g) / jnp.linalg.norm(f)) < 0.05
    assert not np.allclose(f, g)  # the int8 weights are used
    assert int8.nbytes(q) < 0.4 * int8.nbytes(params)
    errors = int8.kernel_errors(c.model, params, q)
    assert errors and max(errors.values()) < 0.02
