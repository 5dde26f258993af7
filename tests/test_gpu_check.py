"""benchmarks/gpu_check.sh on this CPU: its summary arithmetic (fast), and the whole script
at tiny shapes (slow: GPU_CHECK_SMOKE=1, JAX_PLATFORMS=cpu, the kernel in interpret mode)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_summary_mfu_against_the_given_and_the_datasheet_peak(tmp_path):
    (tmp_path / "status.tsv").write_text("tests\t0\t31\nattention\t124\t100\n")
    (tmp_path / "attention.json").write_text(json.dumps({"device": "NVIDIA H200", "rows": []}))
    step = {"config": "experiments/gopher_44m.py", "seq_len": 2048, "batch": 16,
            "dtype": "bfloat16", "step_time_s_median": 0.5, "tokens_per_s": 65536.0,
            "model_flops_per_s": 395e12, "model_flops_per_step_causal": 150e12,
            "loss_finite": True}
    (tmp_path / "train_step_gopher_44m.json").write_text(json.dumps(step))
    out = gpu_check.summary(argparse.Namespace(dir=str(tmp_path), peak_tflops=790.0))
    assert out["parts"] == {"tests": {"rc": 0, "seconds": 31},
                            "attention": {"rc": 124, "seconds": 100}}
    s = out["train_step"]["gopher_44m"]
    assert s["mfu_given_peak"] == pytest.approx(0.5)
    assert s["mfu_datasheet"] == pytest.approx(395 / 989)  # hardware.GPU_PEAK_BF16's H200
    assert s["mfu_causal_given_peak"] == pytest.approx(300 / 790)


@pytest.mark.slow
def test_the_whole_check_at_tiny_shapes_on_cpu(tmp_path):
    """Every part runs and exits 0 on CPU at tiny shapes, and gpu_check.json holds the
    kernel's errors within tolerance, three training steps and the default-run row."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPU_CHECK_SMOKE": "1",
           "GOPHER_JAX_DATA": str(tmp_path / "data"),  # `python` and `pip`: this interpreter's
           "PATH": f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("XLA_FLAGS", None)
    p = subprocess.run(["bash", str(ROOT / "benchmarks/gpu_check.sh"), str(tmp_path / "w"),
                        str(tmp_path / "out")], env=env, capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {k: v["rc"] for k, v in out["parts"].items()} == {
        "install": 0, "xla_flags": 0, "tests": 0, "attention": 0, "train_step_gopher_44m": 0,
        "train_step_gopher_44m_pallas_gpu": 0, "train_step_gopher_417m": 0,
        "train_step_gopher_417m_pallas_gpu": 0, "default_run": 0}
    assert [r["seq_len"] for r in out["attention"]["rows"]] == [32, 40]
    assert all(r["within_tolerance"] for r in out["attention"]["rows"])
    assert [(e["block"], e["stages"]) for e in out["attention"]["sweep"]] == [(16, 1), (16, 2)]
    assert all("fwd_bwd_ms" in e for e in out["attention"]["sweep"])
    assert set(out["train_step"]) == {"gopher_44m", "gopher_44m_pallas_gpu", "gopher_417m",
                                      "gopher_417m_pallas_gpu"}
    assert out["default_run"]["step"] == 2
