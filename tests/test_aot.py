"""AOT compilation of the real train step for TPU topologies (needs libtpu: `.[tpu]`)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ROOT, experiment, run_cli

from gopher_jax import aot
from gopher_jax.model import sizes

needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed: pip install -e '.[tpu]' to run the AOT tests")


def test_parse_topology():
    assert aot.parse_topology("v5p:16x16x16") == ("v5p", (16, 16, 16))
    assert aot.parse_topology("v3:32x32") == ("v3", (32, 32))
    with pytest.raises(aot.AotError, match="3-D torus"):
        aot.parse_topology("v5p:16x16")
    with pytest.raises(aot.AotError, match="expected GEN"):
        aot.parse_topology("tpu-v5p-8")
    with pytest.raises(aot.AotError, match="expected GEN"):
        aot.parse_topology("v9:2x2")


def test_auto_dtype_resolves_for_tpu():
    c = experiment("tiny")
    assert c.model.dtype == "auto"
    assert aot.for_platform(c, "tpu").model.dtype == "bfloat16"
    assert aot.for_platform(c, "cpu").model.dtype == "float32"
    assert c.model.dtype == "auto"  # a copy


def test_missing_libtpu_is_a_clear_error(monkeypatch, capsys):
    from gopher_jax.cli import main

    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    assert main(["aot", "--config", str(ROOT / "experiments/tiny.py"),
                 "--topology=v5p:2x2x1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: libtpu is not installed") and "pip install -e '.[tpu]'" in err


@needs_libtpu
def test_multislice_mesh_puts_slices_on_the_data_axis():
    from gopher_jax.parallel import mesh as mesh_lib

    c = experiment("tiny")
    c.train.batch_size = 128
    c.mesh.update(data=4, fsdp=-1, tensor=2, rules="fsdp+tensor", num_slices=4)
    devices = aot.topology_devices("v3:4x4", 4)  # 4 slices x 16 chips x 2 cores
    assert len(devices) == 128 and {d.slice_index for d in devices} == {0, 1, 2, 3}
    mesh = mesh_lib.make_mesh(c, devices)
    assert dict(mesh.shape) == {"data": 4, "fsdp": 16, "tensor": 2}
    slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    # Each data row lies in one slice: only the data-parallel reduction crosses DCN.
    for i in range(4):
        assert set(slices[i].ravel()) == {i}


@needs_libtpu
@pytest.mark.slow
def test_tiny_compiles_and_compiler_flops_match_the_formula():
    c = experiment("tiny")
    # No loops (their bodies are counted once) and no remat: the compiler's count is the
    # whole step, comparable to the formula.
    # XLA attention: the Pallas kernel pads T=64 to its 128-row tiles and scores a window
    # of block_q + block_k distances per tile, more than the formula's causal attention.
    c.model.update(scan_layers=False, remat_policy="none", attention_impl="xla")
    c.train.batch_size = 64
    devices = aot.topology_devices("v5p:2x2x1")
    r, compiled = aot.compile_train_step(c, devices, "v5p:2x2x1")
    assert r.num_devices == 4 and r.device_kind.startswith("TPU v5")
    assert r.hbm_bytes == 95 * 2**30 and r.fits
    assert 0 < r.argument_bytes < r.total_bytes < r.hbm_bytes
    assert "bf16" in compiled.as_text()  # compute dtype 'auto' became bf16 for TPU
    ratio = r.compiler_flops_per_device / r.formula_flops_per_device
    # The formula counts matmuls only; norms, softmax and Adam add a little.
    assert 0.95 < ratio < 1.5, ratio


@needs_libtpu
@pytest.mark.slow
def test_cli_exits_nonzero_when_it_does_not_fit(tmp_path):
    out = tmp_path / "r.json"
    # 16 GiB v5e chips cannot hold the logits of 4,096 x 512 tokens over a 32k vocabulary.
    p = run_cli("aot", "--config", ROOT / "experiments/tiny.py", "--topology=v5e:2x2",
                f"--aot_json={out}", "--config.model.vocab_size=32768",
                "--config.data.seq_len=512", "--config.train.batch_size=4096")
    assert p.returncode == 1, p.stdout + p.stderr[-2000:]
    assert "DOES NOT FIT" in p.stdout
    assert not json.loads(out.read_text())["fits"]


@needs_libtpu
def test_bad_topology_cli():
    p = run_cli("aot", "--config", ROOT / "experiments/tiny.py", "--topology=v5p:4x4")
    assert p.returncode == 2
    assert "3-D torus" in p.stderr


def _check_table1(name: str, topology: str, slices: int = 1) -> aot.Report:
    r = aot.aot_compile(experiment(name), topology, slices)
    print(aot.format_report(r))
    assert r.fits, aot.format_report(r)
    assert r.params == sizes.param_counts(experiment(name).model)["total"]
    return r


@needs_libtpu
@pytest.mark.slow  # ~1.5 min of compiling: AOT compiles belong to the slow tier
def test_44m_compiles_and_fits_on_a_small_slice():
    r = _check_table1("gopher_44m", "v5p:2x2x1")
    assert r.compiler_flops_per_device > 0


@needs_libtpu
@pytest.mark.slow
def test_280b_on_four_tpu_v3_pods():
    r = _check_table1("gopher_280b", "v3:32x32", 4)
    assert r.num_devices == 4 * 1024 * 2
    assert r.mesh["data"] == 4  # data parallel across the pods


@needs_libtpu
@pytest.mark.slow
def test_280b_on_a_v5p_pod():
    r = _check_table1("gopher_280b", "v5p:16x16x16")
    assert r.num_devices == 4096


def _check_attention_impl(name: str, topology: str, impl: str) -> aot.Report:
    c = experiment(name)
    c.model.attention_impl = impl
    r = aot.aot_compile(c, topology)
    print(aot.format_report(r))
    assert r.fits, aot.format_report(r)
    return r


@needs_libtpu
@pytest.mark.slow
def test_44m_compiles_with_the_pallas_kernel():
    """Mosaic lowers the flash kernels (forward, dq+dr, dk+dv) inside the real train step."""
    c = experiment("gopher_44m")
    c.model.attention_impl = "pallas"
    devices = aot.topology_devices("v5p:2x2x1")
    r, compiled = aot.compile_train_step(c, devices, "v5p:2x2x1")
    assert r.fits, aot.format_report(r)
    hlo = compiled.as_text()
    assert hlo.count('custom_call_target="tpu_custom_call"') >= 3
    for kernel in ("relative_flash_fwd", "relative_flash_dq_dr", "relative_flash_dkv"):
        assert kernel in hlo, kernel


@needs_libtpu
@pytest.mark.slow
def test_280b_on_a_v5p_pod_with_the_pallas_kernel():
    r = _check_attention_impl("gopher_280b", "v5p:16x16x16", "pallas")
    assert r.num_devices == 4096
