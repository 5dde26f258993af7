"""The Gopher model, its attention, layouts, sharding rules and configs."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import ROOT, run_cli
from jax.sharding import NamedSharding, PartitionSpec

from gopher_jax import config as config_lib
from gopher_jax.errors import ConfigError
from gopher_jax.layout import Layout
from gopher_jax.model import attention, cross_entropy, gopher, layers, sizes
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.parallel import rules as rules_lib
from gopher_jax.train import state as state_lib


def load_config(name: str):
    """The config of experiments/<name>.py, unlocked: a test may add keys."""
    c = config_lib.load(ROOT / "experiments" / f"{name}.py")
    c.unlock()
    return c


def small_config(**model):
    c = config_lib.base_config()
    c.model.update(vocab_size=96, num_layers=2, num_heads=4, head_dim=8, d_model=32,
                   dtype="float32", remat_policy="none")
    c.model.update(**model)
    c.data.seq_len = 16
    c.train.batch_size = 8
    return c


def randomize(params, seed=0):
    """Nonzero u, v and norm scales, so the reference test sees every term."""
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    out = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
           for k, x in zip(keys, leaves, strict=True)]
    return jax.tree.unflatten(tree, out)


def tokens_for(c, batch=2, length=None, seed=1):
    length = length or c.data.seq_len
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, c.model.vocab_size)


# ---------------------------------------------------------------- attention vs reference


def reference_attention(x, p, segment_ids, max_wavelength):
    """Dai et al. (2019) eq. in section 3.3, written plainly with loops, in float64."""
    x = np.asarray(x, np.float64)
    wq, wk, wv, wr, wo, u, v = (np.asarray(p[n], np.float64)
                                for n in ("wq", "wk", "wv", "wr", "wo", "u", "v"))
    b, t, d = x.shape
    h, k = u.shape
    out = np.zeros((b, t, d))
    inv_freq = 1.0 / max_wavelength ** (np.arange(0, d, 2) / d)
    for bi in range(b):
        q = np.einsum("td,dhk->thk", x[bi], wq)
        kk = np.einsum("td,dhk->thk", x[bi], wk)
        vv = np.einsum("td,dhk->thk", x[bi], wv)
        for head in range(h):
            for i in range(t):
                scores = np.full(t, -np.inf)
                for j in range(i + 1):
                    if segment_ids[bi, i] != segment_ids[bi, j]:
                        continue
                    dist = i - j
                    r = np.concatenate([np.sin(dist * inv_freq), np.cos(dist * inv_freq)])
                    rk = r @ wr[:, head, :]
                    scores[j] = ((q[i, head] + u[head]) @ kk[j, head]
                                 + (q[i, head] + v[head]) @ rk) / np.sqrt(k)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, i] += (w @ vv[:, head, :]) @ wo[head]
    return out


# 7 and 8 (one block of the 7 positions, like 0) in the slow tier.
@pytest.mark.parametrize("block_q", [0, 1, 3, pytest.param(7, marks=pytest.mark.slow),
                                     pytest.param(8, marks=pytest.mark.slow)])
def test_relative_attention_matches_reference(block_q):
    d, h, k, t = 16, 2, 8, 7
    attn = attention.RelativeAttention(d, h, k, 1.0, jnp.float32, jnp.float32, nnx.Rngs(0),
                                       block_q=block_q)
    nnx.update(attn, randomize(nnx.state(attn)))
    x = jax.random.normal(jax.random.key(3), (2, t, d))
    seg = np.array([[1] * t, [1, 1, 1, 2, 2, 2, 2]])
    got = attn(x, attention.relative_sinusoids(t, d, 10_000.0), jnp.asarray(seg))
    p = {n: getattr(attn, n)[...] for n in ("wq", "wk", "wv", "wr", "wo", "u", "v")}
    want = reference_attention(x, p, seg, 10_000.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-5)


@pytest.mark.slow  # the fast tier has test_attention_xla.py::test_gradients_match_full_softmax
def test_blocked_attention_gradients_match_one_block():
    d, h, k, t = 16, 2, 8, 10
    x = jax.random.normal(jax.random.key(3), (2, t, d))
    rel = attention.relative_sinusoids(t, d, 10_000.0)
    seg = jnp.asarray([[1] * t, [1] * 4 + [2] * 6])
    grads = []
    for block_q in (0, 4):
        attn = attention.RelativeAttention(d, h, k, 1.0, jnp.float32, jnp.float32,
                                           nnx.Rngs(0), block_q=block_q)
        nnx.update(attn, randomize(nnx.state(attn)))
        grads.append(nnx.grad(lambda a, x: jnp.sum(jnp.sin(a(x, rel, seg))),
                              argnums=(0, 1))(attn, x))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 2, 4, 3, 8])
def test_chunked_cross_entropy_matches_optax(chunk):
    b, t, d, v = 3, 8, 16, 50
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (b, t, d))
    w = jax.random.normal(ks[1], (v, d))
    targets = jax.random.randint(ks[2], (b, t), 0, v)
    weights = (jax.random.uniform(ks[3], (b, t)) > 0.3).astype(jnp.float32)

    def reference(x, w):
        logits = jnp.einsum("btd,vd->btv", x, w)
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, targets) * weights)

    def ours(x, w):
        return cross_entropy.nll_sum(x, w, targets, weights, chunk)

    want, want_g = jax.value_and_grad(reference, argnums=(0, 1))(x, w)
    got, got_g = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(jax.jit(ours)(x, w)), float(want), rtol=1e-5)
    for a, e in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5)
    # A cotangent other than 1 scales both gradients.
    g2 = jax.grad(lambda x, w: 3.0 * ours(x, w), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(g2[1]), 3.0 * np.asarray(want_g[1]), rtol=1e-4,
                               atol=1e-5)


def test_gelu_gradient_matches_autodiff_of_jax_gelu():
    x = jnp.linspace(-8.0, 8.0, 2001)
    np.testing.assert_array_equal(np.asarray(layers.gelu(x)), np.asarray(jax.nn.gelu(x)))
    ours = jax.vmap(jax.grad(layers.gelu))(x)
    theirs = jax.vmap(jax.grad(jax.nn.gelu))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(theirs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("q", [5, 3, 1])
def test_rel_shift_lines_up_distances(q):
    k = 5  # q queries at positions k-q, ..., k-1; column m holds distance k-1-m
    raw = jnp.broadcast_to(jnp.arange(k - 1, -1, -1.0), (q, k))
    shifted = np.asarray(attention.rel_shift(raw))
    for i in range(q):
        for j in range(k - q + i + 1):
            assert shifted[i, j] == (k - q + i) - j, (i, j)


# ---------------------------------------------------------------- causality and packing


def test_causality():
    c = small_config()
    graphdef, _ = gopher.abstract(c.model)
    params = randomize(nnx.to_pure_dict(nnx.state(gopher.create(c.model, 0))))
    forward = jax.jit(lambda t: gopher.apply(graphdef, params, t))  # one program, run twice
    toks = tokens_for(c, 1)
    base = forward(toks)
    t = 9
    changed = forward(toks.at[0, t].set((toks[0, t] + 1) % c.model.vocab_size))
    np.testing.assert_array_equal(np.asarray(base[0, :t]), np.asarray(changed[0, :t]))
    assert not np.allclose(base[0, t:], changed[0, t:])


def test_packed_documents_match_separate_runs():
    c = small_config()
    model = gopher.create(c.model, 0)
    a, b = tokens_for(c, 1, 6, seed=5), tokens_for(c, 1, 10, seed=6)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 6 + [2] * 10])
    out = model(packed, seg)
    np.testing.assert_allclose(out[:, :6], model(a), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[:, 6:], model(b), rtol=1e-5, atol=1e-5)


def test_longer_than_training_length():
    c = small_config()
    model = gopher.create(c.model, 0)
    logits = model(tokens_for(c, 1, 2 * c.data.seq_len))
    assert logits.shape == (1, 2 * c.data.seq_len, c.model.vocab_size)
    assert bool(jnp.all(jnp.isfinite(logits)))


# ---------------------------------------------------------------- layouts


def unstack(params):
    """Scanned params -> the unscanned layout ({'blocks': {0: ..., 1: ...}})."""
    n = jax.tree.leaves(params["blocks"])[0].shape[0]
    out = dict(params)
    out["blocks"] = {i: jax.tree.map(lambda x, i=i: x[i], params["blocks"]) for i in range(n)}
    return out


def loss_and_grads(c, params, toks):
    graphdef, _ = gopher.abstract(c.model)

    def f(p):
        return jnp.mean(gopher.apply(graphdef, p, toks) ** 2)

    return jax.value_and_grad(f)(params)


def test_scanned_equals_unscanned():
    c = small_config(scan_layers=True)
    params = randomize(nnx.to_pure_dict(nnx.state(gopher.create(c.model, 0))))
    cu = small_config(scan_layers=False)
    toks = tokens_for(c)
    l1, g1 = jax.jit(lambda p: loss_and_grads(c, p, toks))(params)
    l2, g2 = jax.jit(lambda p: loss_and_grads(cu, p, toks))(unstack(params))
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                 unstack(g1), g2)


# The default (scanned, nothing_saveable) in the fast tier; the other three in the slow one.
@pytest.mark.parametrize("scan,policy", [
    (True, "nothing_saveable"),
    pytest.param(True, "dots", marks=pytest.mark.slow),
    pytest.param(False, "nothing_saveable", marks=pytest.mark.slow),
    pytest.param(False, "dots", marks=pytest.mark.slow),
])
def test_remat_equals_no_remat(scan, policy):
    c0 = small_config(scan_layers=scan, remat_policy="none")
    c1 = small_config(scan_layers=scan, remat_policy=policy)
    params = randomize(nnx.to_pure_dict(nnx.state(gopher.create(c0.model, 0))))
    toks = tokens_for(c0)
    l0, g0 = jax.jit(lambda p: loss_and_grads(c0, p, toks))(params)
    l1, g1 = jax.jit(lambda p: loss_and_grads(c1, p, toks))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7), g0, g1)


# ---------------------------------------------------------------- sharding


RULE_SETS = ("data-only", "fsdp", "tensor", "fsdp+tensor")
F, T = "fsdp", "tensor"
_ATTN_IN = ((None,) * 4, (None, F, None, None), (None, None, T, None), (None, F, T, None))
_TABLE = ((None, None), (None, F), (T, None), (T, F))
# Every param's spec under each rule set (in RULE_SETS' order), written out by hand: fsdp
# splits d_model; tensor splits heads, the MLP hidden size and the vocabulary; the head_dim
# (kv) axis, norm scales and the scanned blocks' leading layer axis are never split.
EXPECTED_SPECS = {
    "embed/table": _TABLE,  # [vocab, d_model]
    "unembed": _TABLE,  # untied only: [vocab, d_model]
    "final_norm/scale": ((None,),) * 4,  # [d_model]
    "blocks/attn_norm/scale": ((None, None),) * 4,  # [layer, d_model]
    "blocks/mlp_norm/scale": ((None, None),) * 4,
    "blocks/attn/wq": _ATTN_IN,  # [layer, d_model, heads, kv]
    "blocks/attn/wk": _ATTN_IN,
    "blocks/attn/wv": _ATTN_IN,
    "blocks/attn/wr": _ATTN_IN,
    # [layer, heads, kv, d_model]
    "blocks/attn/wo": ((None,) * 4, (None, None, None, F), (None, T, None, None),
                       (None, T, None, F)),
    "blocks/attn/u": ((None,) * 3, (None,) * 3, (None, T, None), (None, T, None)),  # [l, h, kv]
    "blocks/attn/v": ((None,) * 3, (None,) * 3, (None, T, None), (None, T, None)),
    "blocks/mlp/wi": ((None,) * 3, (None, F, None), (None, None, T), (None, F, T)),  # [l, d, ff]
    "blocks/mlp/wo": ((None,) * 3, (None, None, F), (None, T, None), (None, T, F)),  # [l, ff, d]
}
MESHES = {"data-only": (8, 1, 1), "fsdp": (2, 4, 1), "tensor": (2, 1, 4), "fsdp+tensor": (2, 2, 2)}


def assert_param_specs(params, rule_set: str, tied: bool) -> None:
    """Every param (and no other) has its EXPECTED_SPECS entry for `rule_set`."""
    got = {"/".join(str(k.key) for k in path): x for path, x
           in jax.tree_util.tree_leaves_with_path(params)}
    assert set(got) == set(EXPECTED_SPECS) - ({"unembed"} if tied else set())
    for name, x in got.items():
        spec = tuple(x.sharding.spec)
        spec += (None,) * (x.ndim - len(spec))  # a spec may leave trailing axes out
        assert spec == EXPECTED_SPECS[name][RULE_SETS.index(rule_set)], (rule_set, name, spec)


def sharded_small_config(rule_set: str, **model):
    c = small_config(**model)
    c.mesh.rules = rule_set
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = MESHES[rule_set]
    return c


@pytest.mark.parametrize("rule_set", RULE_SETS)
def test_untied_params_specs(rule_set):
    c = sharded_small_config(rule_set, tie_embeddings=False)
    mesh = mesh_lib.make_mesh(c)
    params = state_lib.create_state(c, Layout.build(c, mesh))["params"]
    assert_param_specs(params, rule_set, tied=False)


# fsdp+tensor (both axes at once) in the fast tier; every rule set's specs are checked there
# by test_untied_params_specs.
@pytest.mark.parametrize("rule_set", [r if r == "fsdp+tensor" else
                                      pytest.param(r, marks=pytest.mark.slow)
                                      for r in RULE_SETS])
def test_sharded_params_forward_and_grads(rule_set):
    assert jax.device_count() == 8
    c = sharded_small_config(rule_set)
    mesh = mesh_lib.make_mesh(c)
    assert dict(mesh.shape) == dict(zip(("data", "fsdp", "tensor"), MESHES[rule_set], strict=True))
    st = state_lib.create_state(c, Layout.build(c, mesh))
    params = st["params"]
    assert_param_specs(params, rule_set, tied=True)
    sharded_shard = params["blocks"]["mlp"]["wi"].addressable_shards[0].data.shape
    full = params["blocks"]["mlp"]["wi"].shape
    n = {"data-only": 1, "fsdp": 4, "tensor": 4, "fsdp+tensor": 4}[rule_set]
    assert np.prod(sharded_shard) * n == np.prod(full)

    toks = tokens_for(c, 8)
    host = jax.device_get(params)
    want_l, want_g = jax.jit(lambda p: loss_and_grads(c, p, toks))(host)
    batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    rules = rules_lib.get_rules(rule_set)

    def f(p, t):
        with rules_lib.use_rules(rules):
            return loss_and_grads(c, p, t)

    with jax.set_mesh(mesh):
        got_l, got_g = jax.jit(f)(params, jax.device_put(toks, batch_sh))
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 jax.device_get(got_g), want_g)


@pytest.mark.parametrize("rule_set,d_split", [pytest.param("tensor", 4, marks=pytest.mark.slow),
                                              ("fsdp+tensor", 2)])
def test_scan_saves_the_residual_stream_split_over_tensor(rule_set, d_split):
    """With remat, the layer scan keeps each layer's input x [L, B, T, D] for the backward
    pass; under the tensor rule sets its d_model is split over the tensor axis (act_embed),
    so the compiled step holds [L, B / (data*fsdp), T, D / tensor] per device, never full D."""
    c = sharded_small_config(rule_set, remat_policy="nothing_saveable", num_layers=3)
    mesh = mesh_lib.make_mesh(c)
    params = state_lib.create_state(c, Layout.build(c, mesh))["params"]
    toks = jax.device_put(tokens_for(c, 8), NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    rules = rules_lib.get_rules(rule_set)

    def f(p, t):
        with rules_lib.use_rules(rules):
            return loss_and_grads(c, p, t)

    with jax.set_mesh(mesh):
        hlo = jax.jit(f).lower(params, toks).compile().as_text()
    layers_, rows, t, d = 3, 8 // (mesh.shape["data"] * mesh.shape["fsdp"]), 16, 32
    assert f"f32[{layers_},{rows},{t},{d // d_split}]" in hlo
    assert f"f32[{layers_},{rows},{t},{d}]" not in hlo


# ---------------------------------------------------------------- configs


NOMINAL = {"gopher_44m": 44e6, "gopher_117m": 117e6, "gopher_417m": 417e6,
           "gopher_1_4b": 1.4e9, "gopher_7_1b": 7.1e9, "gopher_280b": 280e9}


@pytest.mark.parametrize("name", sorted(NOMINAL))
def test_table1_param_counts(name):
    c = load_config(name)
    counts = sizes.count_params(c)
    assert counts == sizes.param_counts(c.model)  # the formula counts every param
    assert abs(counts["total"] / NOMINAL[name] - 1) < 0.10, counts


def test_params_command_prints_counts():
    p = run_cli("params", "--config", ROOT / "experiments" / "gopher_280b.py")
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    total = sizes.param_counts(load_config("gopher_280b").model)["total"]
    assert f"{total:,}" in out and "non-embedding" in out
    assert 279e9 < total < 281e9


def test_untied_embeddings_add_a_matrix():
    c = load_config("gopher_44m")
    tied = sizes.count_params(c)["total"]
    c.model.tie_embeddings = False
    assert sizes.count_params(c)["total"] == tied + c.model.vocab_size * c.model.d_model


@pytest.mark.parametrize("case,match", [
    (dict(rules="tensor", tensor=8, data=1, fsdp=1, heads=12), "num_heads = 12 .*tensor=8"),
    (dict(rules="fsdp", fsdp=8, data=1, batch=12), "batch 12 .* data\\*fsdp = 1\\*8"),
    (dict(rules="tensor", tensor=8, data=1, fsdp=1, vocab=1001), "vocab_size = 1001 .*tensor=8"),
    (dict(rules="zero3"), "unknown rule set mesh.rules='zero3'"),
    (dict(rules="fsdp", data=1, fsdp=4, tensor=2), "does not use the tensor axis"),
    (dict(data=3, fsdp=-1), "8 devices cannot be split"),
    (dict(rules="fsdp", data=1, fsdp=8, microbatches=3, batch=16), "not divisible by train.micro"),
    (dict(block_q=-1), "attention_block_q = -1 must be a non-negative number"),
    (dict(loss_chunk=300), "loss_chunk = 300 must divide data.seq_len = 2048"),
])
def test_bad_configs_are_rejected(case, match):
    c = load_config("gopher_117m")  # 12 heads, vocab 32,000, d_model 768
    c.train.batch_size = case.pop("batch", 64)
    c.train.microbatches = case.pop("microbatches", 1)
    if "heads" in case:
        c.model.num_heads, c.model.head_dim = case.pop("heads"), 64
    c.model.attention_block_q = case.pop("block_q", 128)
    c.model.loss_chunk = case.pop("loss_chunk", 512)
    if "vocab" in case:
        c.model.vocab_size = case.pop("vocab")
        c.model.num_heads, c.model.head_dim = 16, 48
    c.mesh.update(case)
    with pytest.raises(ConfigError, match=match):
        mesh_lib.validate(c, 8)


def test_heads_times_kv_must_equal_d_model():
    c = small_config(head_dim=4)
    with pytest.raises(ConfigError, match="must equal d_model"):
        mesh_lib.validate(c, 1)
