"""The Pallas relative-attention kernels (interpret mode on CPU) against `xla_attention`:
outputs and the gradients of qu, qv, k, v and r, alone and through the shard_map wrapper on
8 devices under every rule set."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, cpu_env, experiment

from gopher_jax import config as config_lib
from gopher_jax.errors import ConfigError, UserError
from gopher_jax.model import flash_attention as fa
from gopher_jax.model.attention import xla_attention
from gopher_jax.parallel.rules import RULE_SETS

# float32: the kernel and XLA differ only in summation order. bfloat16: both round p and dS
# to bf16 before their products, at different points (per tile vs per query block), so
# differences are a few bf16 ulps of the largest entry.
TOL = {"float32": 2e-5, "bfloat16": 3e-2}


def _inputs(batch: int, length: int, heads: int, head_dim: int, dtype: str, segments: int,
            seed: int = 0) -> tuple[list[jax.Array], jax.Array, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 7)
    shape = (batch, length, heads, head_dim)
    arrays = [jax.random.normal(keys[i], shape, dtype) for i in range(4)]
    arrays.append(jax.random.normal(keys[4], (length, heads, head_dim), dtype))
    # Packed documents: sorted ids, so every row has several contiguous segments.
    seg = jnp.sort(jax.random.randint(keys[5], (batch, length), 0, segments), axis=1)
    cotangent = jax.random.normal(keys[6], shape, jnp.float32)
    return arrays, seg.astype(jnp.int32), cotangent


def _value_and_grads(attend, arrays, seg, cotangent):
    def loss(*xs):
        out = attend(*xs, seg)
        return jnp.sum(out.astype(jnp.float32) * cotangent), out
    (_, out), grads = jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)(*arrays)
    return [out, *grads]


def _assert_close(got, want, dtype: str) -> None:
    """Each of out, d(qu), d(qv), d(k), d(v), d(r) within TOL of its largest |entry| (or of 1
    where all are smaller: one position has zero gradients but for v)."""
    for name, g, w in zip(("out", "dqu", "dqv", "dk", "dv", "dr"), got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        err = np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1.0)
        assert err <= TOL[dtype], f"{name}: max error {err:.2e} of max |{name}|"


def _compare(batch, length, heads, head_dim, dtype, segments, block_q, block_k) -> None:
    arrays, seg, ct = _inputs(batch, length, heads, head_dim, dtype, segments)
    kernel = jax.jit(lambda *a: fa.flash_attention(*a, block_q=block_q, block_k=block_k,
                                                   interpret=True))
    xla = jax.jit(lambda *a: xla_attention(*a, block_q=block_q))
    _assert_close(_value_and_grads(kernel, arrays, seg, ct),
                  _value_and_grads(xla, arrays, seg, ct), dtype)


def test_ragged_length_packed_segments_fp32():
    # T=37: not a multiple of either block (padded to 48); 3 documents per row; several key
    # blocks per query block and the reverse, so tiles are skipped, partial and full.
    _compare(batch=2, length=37, heads=2, head_dim=16, dtype="float32", segments=3,
             block_q=8, block_k=16)


def test_one_position():
    _compare(batch=2, length=1, heads=2, head_dim=8, dtype="float32", segments=1,
             block_q=8, block_k=8)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_twice_the_training_length(dtype):
    # experiments/tiny.py trains at 64 positions: 128, several query and key blocks.
    length = 2 * experiment("tiny").data.seq_len
    _compare(batch=2, length=length, heads=2, head_dim=16, dtype=dtype, segments=4,
             block_q=16, block_k=32)


@pytest.mark.slow
def test_ragged_length_packed_segments_bf16():
    _compare(batch=2, length=37, heads=2, head_dim=16, dtype="bfloat16", segments=3,
             block_q=8, block_k=16)


def test_tiles_computed_are_those_below_the_diagonal():
    """The grid skips exactly the tiles with no key at or before any of their queries."""
    for length, bq, bk in [(100, 8, 16), (64, 16, 16), (40, 8, 40), (1, 8, 8)]:
        t = fa.tiles_for(length, 16, bq, bk, interpret=True)
        for i, j in itertools.product(range(t.length // t.block_q), range(t.length // t.block_k)):
            rows = np.arange(i * t.block_q, (i + 1) * t.block_q)
            cols = np.arange(j * t.block_k, (j + 1) * t.block_k)
            causal = bool((rows[:, None] >= cols[None, :]).any())
            assert bool(fa._needed(i, j, t)) == causal, (length, bq, bk, i, j)


def test_config_refuses_an_unknown_attention_impl():
    c = config_lib.base_config()
    c.model.attention_impl = "triton"
    with pytest.raises(UserError, match="attention_impl.*'auto', 'xla', 'pallas'"):
        config_lib.check(c)


def test_auto_is_xla_on_cpu_and_pallas_for_a_tpu_mesh():
    from gopher_jax.model.attention import resolve_impl

    assert resolve_impl("auto") == "xla"
    assert resolve_impl("pallas") == "pallas"
    assert fa.target_platform() == "cpu"


# ------------------------------------------------------------------- 8 devices, shard_map

_SHARDED = """
import json, sys
import jax, jax.numpy as jnp
import numpy as np
sys.path.insert(0, "tests")
import test_flash_attention as t
from gopher_jax.model import flash_attention as fa
from gopher_jax.model.attention import xla_attention
from gopher_jax.parallel import rules as rules_lib

arrays, seg, ct = t._inputs(4, 21, 4, 8, "float32", 3)
want = t._value_and_grads(jax.jit(lambda *a: xla_attention(*a, block_q=8)), arrays, seg, ct)
mesh = jax.make_mesh((2, 2, 2), rules_lib.MESH_AXES)
report = {}
for name, rules in rules_lib.RULE_SETS.items():
    heads, rel, seg_spec = fa.attention_specs(rules)
    put = lambda x, spec: jax.device_put(x, jax.NamedSharding(mesh, spec))
    xs = [put(x, heads) for x in arrays[:4]] + [put(arrays[4], rel)]
    with jax.set_mesh(mesh), rules_lib.use_rules(rules):
        attend = jax.jit(lambda *a: fa.sharded_flash_attention(*a, block_q=8, block_k=8))
        jaxpr = str(jax.make_jaxpr(attend)(*xs, put(seg, seg_spec)))
        got = t._value_and_grads(attend, xs, put(seg, seg_spec), put(ct, heads))
    t._assert_close(got, want, "float32")
    report[name] = {"specs": [str(heads), str(rel), str(seg_spec)],
                    "shard_map": "shard_map" in jaxpr,
                    "out_sharding": str(got[0].sharding.spec),
                    "dr_sharding": str(got[5].sharding.spec)}
print(json.dumps(report))
"""


@pytest.mark.slow
def test_shard_map_wrapper_on_8_devices_under_every_rule_set():
    p = subprocess.run([sys.executable, "-c", _SHARDED], cwd=ROOT, env=cpu_env(8),
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout.strip().splitlines()[-1])
    assert set(report) == set(RULE_SETS)
    for name, r in report.items():
        assert r["shard_map"], name
        # batch over data+fsdp everywhere; heads over tensor only where the rules say so.
        heads = "'tensor'" if "tensor" in name else "None"
        assert r["specs"][0] == f"P(('data', 'fsdp'), None, {heads}, None)", r
        assert r["specs"][1] == f"P(None, {heads}, None)", r
        assert r["out_sharding"] == r["specs"][0] and r["dr_sharding"] == r["specs"][1], r


def test_wrapper_without_a_mesh_is_the_kernel():
    arrays, seg, _ = _inputs(1, 9, 2, 8, "float32", 2)
    a = fa.sharded_flash_attention(*arrays, seg, block_q=8, block_k=8, interpret=True)
    b = fa.flash_attention(*arrays, seg, block_q=8, block_k=8, interpret=True)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_tiny_model_loss_and_grads_match_with_the_kernel():
    """model.attention_impl=pallas through RelativeAttention's dispatch: the tiny model's
    loss and parameter gradients equal XLA attention's."""
    from flax import nnx

    from gopher_jax.model import gopher

    results = {}
    for impl in ("xla", "pallas"):
        m = experiment("tiny").model
        m.update(attention_impl=impl, dtype="float32", attention_block_q=16)
        graphdef, params = nnx.split(gopher.create(m, seed=0))
        tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, m.vocab_size)
        seg = jnp.concatenate([jnp.zeros((2, 25), jnp.int32), jnp.ones((2, 15), jnp.int32)], 1)
        weights = jnp.ones(tokens.shape, jnp.float32)

        def loss(p, graphdef=graphdef, tokens=tokens, seg=seg, weights=weights):
            return nnx.merge(graphdef, p).nll_sum(tokens, seg, tokens, weights)
        results[impl] = jax.value_and_grad(loss)(params)
    (lx, gx), (lp, gp) = results["xla"], results["pallas"]
    np.testing.assert_allclose(float(lp), float(lx), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                                   atol=1e-5 * float(np.max(np.abs(b)) + 1e-30))


@pytest.mark.skipif(not __import__("gopher_jax.aot", fromlist=["aot"]).libtpu_available(),
                    reason="libtpu is not installed: pip install -e '.[tpu]'")
@pytest.mark.parametrize("topology, want", [("v3:2x2", "xla"), ("v5p:2x2x1", "pallas"),
                                            ("v5e:2x2", "pallas")])
def test_auto_picks_the_kernel_only_on_tpus_mosaic_lowers_it_for(topology, want):
    """Mosaic lowers the kernel's strided roll on v5 and later only: auto falls back to XLA
    on v3, and an explicit pallas there is one config error, not a compiler traceback."""
    import numpy as np
    from jax.sharding import Mesh

    from gopher_jax import aot
    from gopher_jax.model.attention import resolve_impl

    devices = aot.topology_devices(topology)
    mesh = Mesh(np.array(devices).reshape(len(devices), 1, 1), ("data", "fsdp", "tensor"))
    with jax.set_mesh(mesh):
        assert resolve_impl("auto") == want
        if want == "xla":
            with pytest.raises(ConfigError, match="needs TPU v5 or later"):
                fa.check_supported()
        else:
            fa.check_supported()


def test_kernel_under_x64_matches_xla():
    """jax_enable_x64 on: Python ints in the index maps become int64 against the int32 grid
    indices (lax.div does not promote); the kernel must still trace and agree with XLA."""
    with jax.enable_x64(True):  # restores the caller's setting, whatever it was
        _compare(1, 32, 2, 16, "float32", 2, 8, 8)
