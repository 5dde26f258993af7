"""Multi-node GPU launch on SLURM, as far as a CPU machine can check it: the XLA GPU flags
(known to this XLA, merged with the caller's), what launch/slurm/train.sbatch hands srun in
both process layouts, and the distributed start-up JAX derives from a SLURM step."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT, cpu_env

from gopher_jax.parallel import distributed

FLAGS_SH = ROOT / "launch/xla_gpu_flags.sh"
SBATCH = ROOT / "launch/slurm/train.sbatch"


def gpu_xla_flags(xla_flags: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    p = subprocess.run(["bash", "-c", f'. "{FLAGS_SH}" && gpu_xla_flags'], env=env,
                       capture_output=True, text=True, check=True)
    return p.stdout.split()


def test_every_gpu_flag_is_known_to_this_xla():
    """XLA parses every flag in XLA_FLAGS at start-up, GPU ones on CPU too, and aborts on an
    unknown one: catches a flag a JAX upgrade removed (e.g. --xla_gpu_graph_level)."""
    flags = gpu_xla_flags(None)
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags
    assert "--xla_gpu_enable_pipelined_all_gather=true" in flags
    env = cpu_env(1)
    env["XLA_FLAGS"] = " ".join(flags)
    p = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; jnp.ones(2).sum()"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]


def test_callers_flags_keep_their_values():
    flags = gpu_xla_flags("--xla_gpu_enable_pipelined_all_gather=false --xla_dump_to=/tmp/d")
    assert flags.count("--xla_gpu_enable_pipelined_all_gather=false") == 1
    assert "--xla_gpu_enable_pipelined_all_gather=true" not in flags
    assert "--xla_dump_to=/tmp/d" in flags and "--xla_gpu_enable_triton_gemm=false" in flags


def _run_sbatch(tmp_path, **env_extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    """The batch script with a fake srun that records its arguments and environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "srun.json"
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, open({str(log)!r}, 'w'))\n")
    (bin_dir / "srun").chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "XLA_FLAGS", "JAX_LOCAL", "PER_NODE"))}
    env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", **env_extra)
    r = subprocess.run(["bash", str(SBATCH), "experiments/gopher_1_4b.py", "/runs/1b"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    return r, (json.loads(log.read_text()) if log.exists() else {})


def test_sbatch_one_process_per_gpu(tmp_path):
    """Default layout: no SLURM GPU binding (JAX takes GPU SLURM_LOCALID of all visible) and
    the GPU flags in XLA_FLAGS, the caller's own flags kept."""
    r, call = _run_sbatch(tmp_path, SLURM_SUBMIT_DIR=str(ROOT), XLA_FLAGS="--xla_dump_to=/d")
    assert r.returncode == 0, r.stderr
    assert "--gpu-bind=none" in call["argv"]
    flags = call["env"]["XLA_FLAGS"].split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and "--xla_dump_to=/d" in flags
    assert "JAX_LOCAL_DEVICE_IDS" not in call["env"]


def test_sbatch_one_process_per_node(tmp_path):
    """PER_NODE=1: the one process per node is given all of its GPUs (JAX's default under a
    SLURM step would be GPU SLURM_LOCALID = 0 only)."""
    r, call = _run_sbatch(tmp_path, SLURM_SUBMIT_DIR=str(ROOT), PER_NODE="1",
                          SLURM_GPUS_PER_NODE="h100:8")
    assert r.returncode == 0, r.stderr
    assert call["env"]["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
    r, call = _run_sbatch(tmp_path / "none", SLURM_SUBMIT_DIR=str(ROOT), PER_NODE="1")
    assert r.returncode == 2 and r.stderr.startswith("error: PER_NODE=1") and not call


def test_sbatch_refuses_a_submit_dir_outside_the_repository(tmp_path):
    r, call = _run_sbatch(tmp_path, SLURM_SUBMIT_DIR=str(tmp_path))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and not call


SLURM_STEP = {  # task 9 of 16: 2 nodes x 8 GPUs, on the second node as its local task 1
    "SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "16",
    "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2",
}


def test_jax_reads_the_slurm_step(monkeypatch):
    """What `jax.distributed.initialize()` (no arguments, as gopher_jax calls it) derives
    from a SLURM step: coordinator on the first node, 16 processes, id 9, device [1]. Asks
    JAX's SLURM detector by name, so that no other cluster probe (GCE metadata) runs."""
    from jax._src.clusters import ClusterEnv

    for k, v in SLURM_STEP.items():
        monkeypatch.setenv(k, v)
    assert distributed.env_setting() == {"mode": "auto"}
    coordinator, n, pid, devices = ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, "slurm", None)
    assert coordinator.startswith("gpu003:") and (n, pid, list(devices)) == (16, 9, [1])


@pytest.mark.parametrize("ntasks, want", [("1", None), ("8", {"mode": "auto"})])
def test_single_task_jobs_start_no_distributed_runtime(ntasks, want):
    env = {**SLURM_STEP, "SLURM_NTASKS": ntasks}
    assert distributed.env_setting(env) == want
