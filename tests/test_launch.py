"""The cloud launchers' plans: TPU VM (--dry-run), GKE JobSet filling, the SLURM script."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
from helpers import ROOT

from launch import tpu_vm
from launch.gke import fill as gke

COMMON = ["--name", "gopher", "--zone", "us-east5-a", "--project", "proj"]
TRAIN = ["--", "--config", "experiments/gopher_7_1b.py", "--workdir", "gs://b/run"]


def dry_run(*args: str) -> list[list[str]]:
    """Runs the real script with --dry-run; returns the commands it printed, parsed."""
    out = subprocess.run([sys.executable, "-m", "launch.tpu_vm", "--dry-run", *args],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = [ln for ln in out.splitlines() if ln.startswith("+ ")]
    assert len(lines) == len(out.splitlines()), out
    return [shlex.split(ln[2:]) for ln in lines]


def test_single_slice_plan():
    cmds = dry_run("all", "--accelerator", "v5p-32", *COMMON, *TRAIN)
    create = cmds[0]
    assert create[:7] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "create",
                          "gopher"]
    assert "--accelerator-type=v5p-32" in create and "--node-id=gopher" in create
    assert "--zone=us-east5-a" in create and "--project=proj" in create
    assert not any(a.startswith("--node-count") for a in create)
    assert cmds[1][0] == "bash" and "ACTIVE" in cmds[1][2]  # waits for the slice
    assert cmds[2][:2] == ["git", "-C"] and "archive" in cmds[2]
    scp, install, run, delete = cmds[3:]
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "gopher:/tmp/gopher_jax_src.tar.gz" in scp and "--worker=all" in scp
    assert install[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "gopher"]
    assert "--worker=all" in install and any("pip install" in a and ".[tpu]" in a
                                             for a in install)
    cmd = next(a for a in run if a.startswith("--command="))
    assert "--worker=all" in run
    assert "GOPHER_DISTRIBUTED=auto python3 -m gopher_jax train" in cmd
    assert "--config experiments/gopher_7_1b.py --workdir gs://b/run" in cmd
    assert "num_slices" not in cmd
    assert delete[:7] == ["gcloud", "alpha", "compute", "tpus", "queued-resources", "delete",
                          "gopher"]


def test_two_slice_plan():
    cmds = dry_run("all", "--accelerator", "v5p-128", "--num_slices", "2", *COMMON, *TRAIN)
    create = cmds[0]
    assert "--node-count=2" in create and "--node-prefix=gopher" in create
    assert not any(a.startswith("--node-id") for a in create)
    flat = [" ".join(c) for c in cmds]
    for node in ("gopher-0", "gopher-1"):
        assert any("scp" in f and f"{node}:/tmp/gopher_jax_src.tar.gz" in f for f in flat)
        assert any(f" ssh {node} --worker=all" in f and "pip install" in f for f in flat)
    # Both slices start training side by side, with the mesh told about the slices.
    run = cmds[-2]
    assert run[:2] == ["bash", "-c"] and run[2].endswith("& wait")
    assert run[2].count("gopher_jax train") == 2
    assert run[2].count("--config.mesh.num_slices=2 --config.mesh.data=2") == 2
    assert "ssh gopher-0 --worker=all" in run[2] and "ssh gopher-1 --worker=all" in run[2]
    assert cmds[-1][5] == "delete"


def test_detached_run_and_logs():
    run = dry_run("run", "--accelerator", "v3-32", *COMMON, *TRAIN)
    assert len(run) == 1
    cmd = next(a for a in run[0] if a.startswith("--command="))
    assert "nohup" in cmd and cmd.endswith("&")
    logs = dry_run("logs", *COMMON)
    assert "--worker=0" in logs[0] and any("tail" in a for a in logs[0])


def test_tpu_vm_bad_input():
    assert tpu_vm.main(["run", "--accelerator", "v5p-8", *COMMON, "--dry-run"]) == 2
    assert tpu_vm.main(["create", "--accelerator", "x9-8", *COMMON, "--dry-run"]) == 2
    assert tpu_vm.main(["create", "--num_slices", "0", *COMMON, "--dry-run"]) == 2


def test_gke_manifest():
    text = gke.fill("g7b", "v5p", "4x4x8", 2, "img:1", "experiments/gopher_7_1b.py",
                    "gs://b/run", "gs://b/data", ["--config.train.steps=10"])
    assert "$" not in text  # every placeholder filled
    assert "replicas: 2" in text
    assert "parallelism: 32" in text and "completions: 32" in text  # 128 chips / 4 per host
    assert "cloud.google.com/gke-tpu-accelerator: tpu-v5p-slice" in text
    assert "cloud.google.com/gke-tpu-topology: 4x4x8" in text
    assert "google.com/tpu: 4" in text
    assert "--config.train.steps=10 --config.mesh.num_slices=2 --config.mesh.data=2" in text
    assert 'value: "auto"' in text and 'value: "gs://b/data"' in text
    yaml = pytest.importorskip("yaml")
    doc = yaml.safe_load(text)
    assert doc["kind"] == "JobSet"
    job = doc["spec"]["replicatedJobs"][0]
    assert job["replicas"] == 2


def test_launchers_read_the_tpu_table():
    from gopher_jax import hardware

    assert tpu_vm.runtime_for("v5litepod-16") == "v2-alpha-tpuv5-lite"
    assert tpu_vm.runtime_for("v3-2048") == "tpu-ubuntu2204-base"
    assert sorted(gke.GKE) == ["v4", "v5e", "v5p", "v6e"]  # no GKE node pools for v2/v3
    assert hardware.hbm_bytes("TPU v3") == 16 * 2**30  # per TensorCore
    assert hardware.hbm_bytes("TPU v5 lite") == 16 * 2**30
    assert hardware.peak_bf16("TPU v5p") == 459e12
    assert hardware.peak_bf16("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.hbm_bytes("cpu") is None


def test_gke_bad_input():
    with pytest.raises(ValueError, match="3 dimensions"):
        gke.fill("g", "v5p", "4x4", 1, "i", "c", "w")
    with pytest.raises(ValueError, match="GKE TPU node pools"):
        gke.fill("g", "v9", "4x4", 1, "i", "c", "w")


def test_slurm_script():
    text = (ROOT / "launch/slurm/train.sbatch").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "launch/slurm/train.sbatch")]).returncode == 0
    assert "srun" in text and "python -m gopher_jax train" in text
    assert "#SBATCH --ntasks-per-node=8" in text  # one process per GPU by default
