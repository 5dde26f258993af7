"""Weight-only int8 (model/int8.py): the int8 matmul's error is within the per-channel bound,
cached decoding with int8 weights equals the int8 forward pass, and int8 logits stay near the
float ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_decode import cached_logits, config, forward, random_params, random_tokens, randomize

from gopher_jax.layout import Layout
from gopher_jax.model import int8
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.tasks.run import ShardedModel
from gopher_jax.train import state as state_lib
from gopher_jax.train import step as step_lib


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



def _sharded(c, devices):
    """c's layout on the first `devices` devices (mesh axes as c.mesh gives them)."""
    return Layout.build(c, mesh_lib.make_mesh(c, jax.devices()[:devices]))


# Both axes in the fast tier; each rule set alone in the slow tier.
@pytest.mark.parametrize("rules,fsdp,tensor", [
    pytest.param("fsdp+tensor", 2, 4, marks=pytest.mark.slow),
    pytest.param("fsdp", 8, 1, marks=pytest.mark.slow),
    pytest.param("tensor", 2, 4, marks=pytest.mark.slow)])
def test_sharded_int8_equals_single_device_int8(rules, fsdp, tensor):
    """Kernels placed by the rules, then quantized: each int8 kernel stays split as its float
    kernel was (its scales unsplit on the contraction axes), and the evaluation step's loss
    sums and the task scorer's log-probabilities equal the single-device int8 model's."""
    c1 = config(rules=rules, data=1, fsdp=1, tensor=1)
    c1.train.batch_size = 8
    c8 = config(rules=rules, data=8 // (fsdp * tensor), fsdp=fsdp, tensor=tensor)
    c8.train.batch_size = 8
    params = randomize(jax.device_get(state_lib.create_state(c1, _sharded(c1, 1))["params"]))
    tokens = np.asarray(random_tokens(c1, 8, c1.data.seq_len + 1))
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens),
             "num_bytes": np.full(8, 100, np.int32)}

    def measure(c, layout):
        q = int8.quantize(c.model, jax.device_put(params, layout.param_shardings))
        with jax.set_mesh(layout.mesh):
            sums = step_lib.make_eval_step(c, layout.with_params(q))(
                q, jax.device_put(batch, layout.batch_sharding))
        logp, _ = ShardedModel(c, q, layout).score(tokens[:, :-1], tokens[:, 1:])
        return q, np.array(sums), logp

    _, want_sums, want_logp = measure(c1, _sharded(c1, 1))
    layout = _sharded(c8, 8)
    q, sums, logp = measure(c8, layout)
    np.testing.assert_allclose(sums, want_sums, rtol=1e-5)
    np.testing.assert_allclose(logp, want_logp, atol=1e-4, rtol=1e-5)
    split = 0
    for w, s in zip(jax.tree.leaves(q, is_leaf=lambda x: isinstance(x, int8.Int8Weight)),
                    jax.tree.leaves(layout.param_shardings), strict=True):
        if isinstance(w, int8.Int8Weight):
            assert w.q.dtype == jnp.int8 and w.q.sharding.spec == s.spec
            split += any(s.spec)
            for axis, n in enumerate(w.scale.shape):
                assert n > 1 or w.scale.sharding.spec[axis:axis + 1] in ((), (None,))
    assert split  # some kernels are split over the mesh


@pytest.mark.slow  # ~8 s: two CLI evaluations
def test_int8_eval_writes_its_own_file_beside_the_float_one(trained, tmp_path):
    """eval --int8 keeps the float eval.json: its results go to eval_int8.json (marked int8,
    and different: the int8 weights were used)."""
    import json
    import shutil

    from gopher_jax import evaluate
    from gopher_jax.cli.common import stored_config

    work = tmp_path / "work"
    shutil.copytree(trained / "work", work)
    c = stored_config(work / "config.json")
    c.data.eval_split = c.data.test_split = "validation"
    evaluate.run(c, work)
    evaluate.run(c, work, int8=True)
    f, q = (json.loads((work / n).read_text()) for n in ("eval.json", "eval_int8.json"))
    assert (f["int8"], q["int8"]) == (False, True)
    a, b = f["splits"]["validation"], q["splits"]["validation"]
    assert a["bytes"] == b["bytes"] and a["bits_per_byte"] != b["bits_per_byte"]
    assert abs(a["bits_per_byte"] - b["bits_per_byte"]) < 0.01
