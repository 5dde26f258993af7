"""The Pallas GPU (Triton) relative-attention kernels against `xla_attention`, in interpret
mode on CPU: outputs and the gradients of qu, qv, k, v and r, alone and under shard_map on 8
devices; and their lowering to Triton IR for CUDA (no GPU needed to lower)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_flash_attention import _assert_close, _inputs, _value_and_grads

from gopher_jax import hardware
from gopher_jax.model import gpu_attention as ga
from gopher_jax.model.attention import resolve_impl, xla_attention
from gopher_jax.parallel import rules as rules_lib


def _compare(batch, length, heads, head_dim, dtype, segments, block, seed=0) -> None:
    arrays, seg, ct = _inputs(batch, length, heads, head_dim, dtype, segments, seed)
    kernel = jax.jit(functools.partial(ga.gpu_flash_attention, block=block, interpret=True))
    xla = jax.jit(functools.partial(xla_attention, block_q=block))
    _assert_close(_value_and_grads(kernel, arrays, seg, ct),
                  _value_and_grads(xla, arrays, seg, ct), dtype)


def test_ragged_length_packed_segments_fp32():
    # T=37 with 16-position tiles: padded to 48, 3 query blocks (diagonal, below-diagonal and
    # skipped tiles, 3 diagonals for d(r)); 3 documents per row; head_dim 12 padded to 16.
    _compare(batch=2, length=37, heads=2, head_dim=12, dtype="float32", segments=3, block=16)


def _compare_sharded(rule_set: str, length: int, heads: int, dtype: str, seed: int = 0
                     ) -> tuple[list[jax.Array], tuple, str]:
    """The shard_map wrapper on a (2, 2, 2) mesh under `rule_set` against XLA attention
    unsharded: its outputs and gradients, the specs, and the traced program."""
    arrays, seg, ct = _inputs(4, length, heads, 16, dtype, 3, seed)
    want = _value_and_grads(jax.jit(functools.partial(xla_attention, block_q=16)),
                            arrays, seg, ct)
    mesh = jax.make_mesh((2, 2, 2), rules_lib.MESH_AXES)
    rules = rules_lib.RULE_SETS[rule_set]
    specs = ga.flash_attention.attention_specs(rules)
    heads_spec, rel, seg_spec = specs

    def put(x, spec):
        return jax.device_put(x, jax.NamedSharding(mesh, spec))

    xs = [put(x, heads_spec) for x in arrays[:4]] + [put(arrays[4], rel)]
    with jax.set_mesh(mesh), rules_lib.use_rules(rules):
        attend = jax.jit(functools.partial(ga.sharded_gpu_flash_attention, block=16))
        jaxpr = str(jax.make_jaxpr(attend)(*xs, put(seg, seg_spec)))
        got = _value_and_grads(attend, xs, put(seg, seg_spec), put(ct, heads_spec))
    _assert_close(got, want, dtype)
    return got, specs, jaxpr


def test_kernel_under_x64_matches_xla():
    """jax_enable_x64 on: Python ints in the loop bounds and index arithmetic become int64
    beside int32 program ids; the kernels must still trace and agree with XLA."""
    with jax.enable_x64(True):  # restores the caller's setting, whatever it was
        _compare(batch=1, length=32, heads=1, head_dim=16, dtype="float32", segments=2,
                 block=16)


def test_sharded_on_8_devices():
    """The shard_map wrapper over a (2, 2, 2) mesh with the fsdp+tensor rules (batch over
    data and fsdp, heads over tensor): d(r) comes back summed over the batch shards."""
    got, (heads, rel, _), jaxpr = _compare_sharded("fsdp+tensor", 21, 2, "float32")
    assert "shard_map" in jaxpr
    assert got[0].sharding.spec == heads and got[5].sharding.spec == rel


@pytest.mark.parametrize("dtype, head_dim", [("bfloat16", 32), ("float32", 128)])
def test_lowers_to_triton_for_cuda(dtype, head_dim):
    """jax.export for CUDA on this CPU host runs the Pallas Triton lowering of all four
    kernels (forward, d(k)d(v), d(q), d(r)) at a 64-position tile: catches an operation
    Triton has no lowering for, or a non-power-of-two tensor. Compiling the Triton IR to PTX
    happens only on a GPU."""
    from jax import export

    x = jax.ShapeDtypeStruct((2, 100, 2, head_dim), dtype)
    r = jax.ShapeDtypeStruct((100, 2, head_dim), dtype)
    seg = jax.ShapeDtypeStruct((2, 100), jnp.int32)

    def grads(*a):
        def loss(*xs):
            out = ga.gpu_flash_attention(*xs, a[-1], interpret=False)
            return jnp.sum(out.astype(jnp.float32))
        return jax.grad(loss, argnums=tuple(range(5)))(*a[:-1])

    target = "__gpu$xla.gpu.triton"
    exported = export.export(jax.jit(grads), platforms=["cuda"], disabled_checks=[
        export.DisabledSafetyCheck.custom_call(target)])(x, x, x, x, r, seg)
    text = exported.mlir_module()
    for kernel in ("fwd", "dkv", "dq", "dr"):
        assert f'name = "relative_flash_gpu_{kernel}"' in text, kernel


def test_auto_picks_it_only_on_a_gpu_with_a_recorded_run():
    assert hardware.gpu_attention_kernel_runs("NVIDIA H200")
    assert not hardware.gpu_attention_kernel_runs("NVIDIA H100 80GB HBM3")  # never run there
    assert not hardware.gpu_attention_kernel_runs("NVIDIA A100-SXM4-80GB")
    assert resolve_impl("auto") == "xla"  # on this CPU
    assert resolve_impl("pallas_gpu") == "pallas_gpu"


def test_tiles_are_powers_of_two_covering_the_sequence():
    t = ga.tiles_for(37, 12, 64, interpret=True)  # a tile no larger than the sequence needs
    assert (t.block, t.length, t.head_dim) == (64, 64, 16)
    t = ga.tiles_for(300, 128, 64, interpret=False)
    assert (t.block, t.length, t.head_dim, t.blocks) == (64, 320, 128, 5)
    assert ga.tiles_for(5, 8, 64, interpret=True).block == ga.MIN_SIDE


# ----------------------------------------------------- on a GPU (benchmarks/gpu_check.sh)

ON_GPU = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU")


@pytest.mark.gpu
@ON_GPU
@pytest.mark.parametrize("dtype, head_dim", [("float32", 64), ("bfloat16", 128)])
def test_compiled_kernel_equals_xla_on_the_gpu(dtype, head_dim):
    """The Triton-compiled kernels (interpret=False), ragged T, packed rows, 64-wide tiles."""
    arrays, seg, ct = _inputs(2, 300, 4, head_dim, dtype, 3, seed=3)
    kernel = jax.jit(functools.partial(ga.gpu_flash_attention, interpret=False))
    xla = jax.jit(functools.partial(xla_attention, block_q=128))
    with jax.default_matmul_precision("highest"):  # XLA's fp32 matmuls without TF32
        want = _value_and_grads(xla, arrays, seg, ct)
    _assert_close(_value_and_grads(kernel, arrays, seg, ct), want, dtype)


@pytest.mark.gpu
@ON_GPU
def test_auto_on_this_gpu_follows_the_recorded_runs():
    want = "pallas_gpu" if hardware.gpu_attention_kernel_runs(
        jax.devices()[0].device_kind) else "xla"
    assert resolve_impl("auto") == want


# ------------------------------------------------------------------------------ slow tier


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_several_blocks_packed_segments(dtype):
    # T=100 with 16-position tiles: 7 blocks, 7 diagonals; 4 documents per row.
    _compare(batch=2, length=100, heads=3, head_dim=32, dtype=dtype, segments=4, block=16,
             seed=1)


@pytest.mark.slow
def test_ragged_length_packed_segments_bf16():
    _compare(batch=2, length=37, heads=2, head_dim=16, dtype="bfloat16", segments=3, block=16)


@pytest.mark.slow
def test_one_position_and_one_block():
    _compare(batch=2, length=1, heads=2, head_dim=16, dtype="float32", segments=1, block=16)
    _compare(batch=1, length=64, heads=1, head_dim=64, dtype="float32", segments=2, block=64)


@pytest.mark.slow
@pytest.mark.parametrize("rule_set", sorted(rules_lib.RULE_SETS))
def test_sharded_under_every_rule_set(rule_set):
    _compare_sharded(rule_set, 40, 4, "bfloat16", seed=2)


@pytest.mark.slow
def test_tiny_model_loss_and_grads_match_with_the_kernel():
    """model.attention_impl=pallas_gpu through RelativeAttention's dispatch."""
    from flax import nnx
    from helpers import experiment

    from gopher_jax.model import gopher

    results = {}
    for impl in ("xla", "pallas_gpu"):
        m = experiment("tiny").model
        m.update(attention_impl=impl, dtype="float32")
        graphdef, params = nnx.split(gopher.create(m, seed=0))
        tokens = jax.random.randint(jax.random.key(1), (2, 40), 0, m.vocab_size)
        seg = jnp.concatenate([jnp.zeros((2, 25), jnp.int32), jnp.ones((2, 15), jnp.int32)], 1)
        weights = jnp.ones(tokens.shape, jnp.float32)

        def loss(p, graphdef=graphdef, tokens=tokens, seg=seg, weights=weights):
            return nnx.merge(graphdef, p).nll_sum(tokens, seg, tokens, weights)
        results[impl] = jax.value_and_grad(loss)(params)
    (lx, gx), (lp, gp) = results["xla"], results["pallas_gpu"]
    np.testing.assert_allclose(float(lp), float(lx), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                                   atol=1e-5 * float(np.max(np.abs(b)) + 1e-30))
