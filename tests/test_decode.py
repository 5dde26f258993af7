"""Cached decoding (model/decode.py) against the uncached forward pass, and sampling with it.

Tolerance: cached logits equal `model(tokens)` logits within atol 1e-4 + rtol 1e-5 in
float32 (measured: at most ~4e-5 on logits of magnitude up to ~13).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import experiment

from gopher_jax import sample
from gopher_jax.layout import Layout
from gopher_jax.model import decode, gopher
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.train import state as state_lib

ATOL, RTOL = 1e-4, 1e-5


def config(scan_layers: bool = True, **mesh):
    """experiments/tiny.py in float32 (seq_len 64), attention in query blocks of 32."""
    c = experiment("tiny")
    c.model.update(dtype="float32", scan_layers=scan_layers, attention_block_q=32)
    c.mesh.update(mesh)
    return c


def randomize(params, seed: int = 0):
    """Every param perturbed: u, v (zero at init) and the norm scales take part too."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                     for k, x in zip(keys, leaves, strict=True)])


def random_params(c):
    return randomize(nnx.to_pure_dict(nnx.state(gopher.create(c.model, 0))))


def random_tokens(c, batch: int, length: int, seed: int = 1) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, c.model.vocab_size)


def forward(c):
    graphdef, _ = gopher.abstract(c.model)
    return jax.jit(lambda params, tokens, segment_ids=None:
                   gopher.apply(graphdef, params, tokens, segment_ids))


def cached_logits(c, params, tokens, prompt: int, segment_ids=None) -> np.ndarray:
    """Logits [B, T - prompt + 1, V] of positions prompt-1, ..., T-1: a prefill of the first
    `prompt` tokens (a cache of T), then one step per remaining token."""
    graphdef, _ = gopher.abstract(c.model)
    t = tokens.shape[1]
    seg = None if segment_ids is None else segment_ids[:, :prompt]
    logits, cache = jax.jit(lambda p: decode.prefill(
        nnx.merge(graphdef, p), tokens[:, :prompt], t, seg))(params)
    step = jax.jit(lambda p, cache, tok: decode.step(nnx.merge(graphdef, p), cache, tok))
    out = [logits]
    for i in range(prompt, t):
        logits, cache = step(params, cache, tokens[:, i])
        out.append(logits)
    assert int(cache.length) == t
    return np.stack(out, axis=1)


# The scanned layout (the default) in the fast tier, the unscanned one in the slow tier.
@pytest.mark.parametrize("scan_layers", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_cached_steps_equal_the_forward_pass_past_the_training_length(scan_layers):
    c = config(scan_layers)
    params = random_params(c)
    t = 2 * c.data.seq_len
    tokens = random_tokens(c, 2, t)
    want = forward(c)(params, tokens)
    got = cached_logits(c, params, tokens, prompt=20)
    np.testing.assert_allclose(got, want[:, 19:], atol=ATOL, rtol=RTOL)


def test_left_padded_rows_see_none_of_their_padding():
    c = config()
    params = random_params(c)
    pad, t, prompt = 10, 48, 30
    tokens = random_tokens(c, 2, t)
    segment_ids = jnp.ones_like(tokens).at[1, :pad].set(0)
    got = cached_logits(c, params, tokens, prompt, segment_ids)
    fwd = forward(c)
    np.testing.assert_allclose(got[0], fwd(params, tokens[:1])[0, prompt - 1:],
                               atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(got[1], fwd(params, tokens[1:, pad:])[0, prompt - pad - 1:],
                               atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(got, fwd(params, tokens, segment_ids)[:, prompt - 1:],
                               atol=ATOL, rtol=RTOL)


def test_prompt_longer_than_the_cache_is_refused():
    c = config()
    with pytest.raises(ValueError, match="does not fit"):
        decode.prefill(gopher.create(c.model), random_tokens(c, 1, 8), max_len=4)


def uncached_greedy(c, params, prompt: list[int], n: int, eos_id: int = -1) -> list[int]:
    """The model re-run over the whole context for each token (right-padded to one width)."""
    width = len(prompt) + n
    fwd = forward(c)
    ids = list(prompt)
    for _ in range(n):
        toks = jnp.asarray(np.pad(np.array(ids, np.int32), (0, width - len(ids))))[None]
        nxt = int(jnp.argmax(fwd(params, toks)[0, len(ids) - 1]))
        if nxt == eos_id:
            break
        ids.append(nxt)
    return ids[len(prompt):]


def greedy(c, params, prompt: list[int], n: int, eos_id: int = -1, **kw) -> list[int]:
    options = {"temperature": 0.0, "top_k": 0, "seed": 0} | kw
    return sample.generate(c, params, prompt, n, eos_id=eos_id, **options)


@pytest.mark.parametrize("prompt_len", [10, 100])
def test_greedy_generation_equals_uncached_greedy(prompt_len):
    """To 2 x seq_len tokens of context; a prompt longer than seq_len keeps its last seq_len."""
    c = config()
    params = random_params(c)
    prompt = [int(t) for t in random_tokens(c, 1, prompt_len, seed=2)[0]]
    window = prompt[-c.data.seq_len:]
    n = 2 * c.data.seq_len - len(window)
    got = greedy(c, params, prompt, n)
    assert len(got) == n
    assert got == uncached_greedy(c, params, window, n)


def test_eos_stops_generation_before_it():
    c = config()
    params = random_params(c)
    prompt = [1, 2, 3]
    free = greedy(c, params, prompt, 12)
    eos = free[5]
    assert greedy(c, params, prompt, 12, eos_id=eos) == free[:free.index(eos)]
    assert greedy(c, params, prompt, 12, eos_id=free[0]) == []


def test_temperature_zero_and_top_k_one_are_greedy():
    c = config()
    params = random_params(c)
    prompt = [5, 6, 7, 8]
    want = uncached_greedy(c, params, prompt, 20)
    assert greedy(c, params, prompt, 20, top_k=7, seed=3) == want
    assert sample.generate(c, params, prompt, 20, 1.0, 1, 4, -1) == want


def test_seed_determinism():
    c = config()
    params = random_params(c)
    prompt = [5, 6, 7, 8]
    a, b, other = (sample.generate(c, params, prompt, 30, 1.0, 0, seed, -1) for seed in (0, 0, 1))
    assert a == b
    assert a != other


def test_top_k_never_draws_outside_the_top_k():
    """Every drawn token is among the k most likely of the forward pass at its position."""
    c = config()
    params = random_params(c)
    prompt, n, k = [5, 6, 7, 8], 60, 3
    fwd = forward(c)
    ranks = []
    for seed in range(5):  # 300 draws
        new = sample.generate(c, params, prompt, n, 1.5, k, seed, -1)
        assert len(new) == n
        logits = np.asarray(fwd(params, jnp.asarray([prompt + new]))[0, len(prompt) - 1:-1])
        drawn = logits[np.arange(n), new]
        ranks += list((logits > drawn[:, None] + ATOL).sum(axis=1))
    assert max(ranks) < k
    assert set(ranks) == set(range(k))  # it samples: every allowed rank is drawn


@pytest.mark.parametrize("rule_set,mesh", [
    pytest.param("fsdp", {"fsdp": -1}, marks=pytest.mark.slow),  # fsdp+tensor covers fsdp
    ("fsdp+tensor", {"data": 2, "fsdp": 2, "tensor": 2})])
def test_sharded_cached_decoding_equals_the_forward_pass(rule_set, mesh):
    assert jax.device_count() == 8
    c = config(rules=rule_set, **mesh)
    m = mesh_lib.make_mesh(c)
    params = state_lib.create_state(c, Layout.build(c, m))["params"]
    shardings = jax.tree.map(lambda x: x.sharding, params)
    params = jax.jit(randomize, out_shardings=shardings)(params)
    assert not params["blocks"]["attn"]["wq"].sharding.is_fully_replicated
    host = jax.device_get(params)
    tokens = random_tokens(c, 8, c.data.seq_len + 16)
    want = forward(c)(host, tokens)
    with jax.set_mesh(m), rules_lib.use_rules(rules_lib.get_rules(rule_set)):
        got = cached_logits(c, params, tokens, prompt=40)
    np.testing.assert_allclose(got, want[:, 39:], atol=ATOL, rtol=RTOL)
    prompt = [int(t) for t in tokens[0, :12]]
    assert greedy(c, params, prompt, 30) == uncached_greedy(c, host, prompt, 30)
