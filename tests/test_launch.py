"""The cloud launchers' plans: TPU VM (--dry-run), GKE JobSet filling, the SLURM script."""

from __future__ import annotations

import json
import os
import pathlib
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
    assert run[:2] == ["bash", "-c"] and "wait $p" in run[2]
    assert run[2].count("gopher_jax train") == 2
    assert run[2].count("--config.mesh.num_slices=2 --config.mesh.data=2") == 2
    assert "ssh gopher-0 --worker=all" in run[2] and "ssh gopher-1 --worker=all" in run[2]
    assert cmds[-1][5] == "delete"


# A stand-in for gcloud: it appends each call's arguments (JSON) to $FAKE_LOG, says ACTIVE (or
# $QR_STATE) when asked for the queued resource's state, exits $DELETE_RC on delete, and runs
# a training session's --command in a directory per node, where `python3` is a fake training
# that exits 3 on node $FAIL_NODE.
FAKE_GCLOUD = """#!{python}
import json, os, pathlib, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\\n")
if "describe" in args:
    print(os.environ.get("QR_STATE", "ACTIVE"))
if "delete" in args:
    sys.exit(int(os.environ.get("DELETE_RC", "0")))
command = next((a[len("--command="):] for a in args if a.startswith("--command=")), "")
if "gopher_jax train" in command:
    node = args[args.index("ssh") + 1]
    home = pathlib.Path(os.environ["FAKE_HOME"]) / node
    (home / "gopher_jax").mkdir(parents=True, exist_ok=True)
    command = command.replace("{log}", str(home / "train.log"))
    env = {{**os.environ, "FAKE_NODE": node,
           "PATH": os.environ["FAKE_REMOTE_BIN"] + os.pathsep + os.environ["PATH"]}}
    sys.exit(subprocess.call(["bash", "-c", command], cwd=home, env=env))
"""
FAKE_TRAIN = """#!/bin/bash
echo "training on $FAKE_NODE"
if [ "$FAKE_NODE" = "$FAIL_NODE" ]; then echo "training failed" >&2; exit 3; fi
"""


def run_with_fake_gcloud(tmp_path, *args: str, **env: str
                         ) -> tuple[subprocess.CompletedProcess, list[tuple[str, ...]]]:
    """Runs `python -m launch.tpu_vm ARGS` for real against fake gcloud and git; returns the
    result and the calls, each as (what, node or resource)."""
    bin_dir, remote_bin = tmp_path / "bin", tmp_path / "remote_bin"
    bin_dir.mkdir()
    remote_bin.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable, log=tpu_vm.LOG))
    (bin_dir / "git").write_text('#!/bin/bash\necho "[\\"git\\"]" >> "$FAKE_LOG"\n')
    (remote_bin / "python3").write_text(FAKE_TRAIN)
    for f in [*bin_dir.iterdir(), *remote_bin.iterdir()]:
        f.chmod(0o755)
    log = tmp_path / "calls.jsonl"
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
                "FAKE_LOG": str(log), "FAKE_HOME": str(tmp_path / "workers"),
                "FAKE_REMOTE_BIN": str(remote_bin), **env}
    r = subprocess.run([sys.executable, "-m", "launch.tpu_vm", *args], cwd=ROOT, env=full_env,
                       capture_output=True, text=True, timeout=60)
    return r, [_call_kind(json.loads(x)) for x in log.read_text().splitlines()]


def _call_kind(argv: list[str]) -> tuple[str, ...]:
    if argv == ["git"]:
        return ("archive",)
    if "queued-resources" in argv:
        verb = argv[argv.index("queued-resources") + 1]
        return (verb, argv[argv.index(verb) + 1])
    command = next((a for a in argv if a.startswith("--command=")), "")
    if "ssh" in argv:
        node = argv[argv.index("ssh") + 1]
        return ("train" if "gopher_jax train" in command else "install", node)
    return ("scp", next(a.split(":")[0] for a in argv if ":/tmp/" in a))


SETUP_ONE = [("create", "gopher"), ("describe", "gopher"), ("archive",), ("scp", "gopher"),
             ("install", "gopher")]


def test_all_single_slice_training_failure_exits_with_its_code_and_deletes(tmp_path):
    """Catches a training session that exits 0 when training fails (`train | tee` without
    pipefail) and an `all` that then skips deleting the slice."""
    r, calls = run_with_fake_gcloud(tmp_path, "all", *COMMON, *TRAIN, FAIL_NODE="gopher")
    assert r.returncode == 3, r.stderr
    assert calls == [*SETUP_ONE, ("train", "gopher"), ("delete", "gopher")]
    assert "training on gopher" in r.stdout and "command failed with code 3" in r.stderr
    assert "training on gopher" in (tmp_path / "workers/gopher/train.log").read_text()


def test_all_multislice_second_slice_failure_deletes_every_slice(tmp_path):
    """Catches `ssh slice0 & ssh slice1 & wait`, whose bare `wait` exits 0 whatever the
    slices' training returned, so the failed slice's code is lost and nothing is deleted."""
    r, calls = run_with_fake_gcloud(tmp_path, "all", *COMMON, "--num_slices", "2", *TRAIN,
                                    FAIL_NODE="gopher-1")
    assert r.returncode == 3, r.stderr
    setup = [("create", "gopher"), ("describe", "gopher"), ("archive",)]
    for node in ("gopher-0", "gopher-1"):
        setup += [("scp", node), ("install", node)]
    assert calls[:len(setup)] == setup
    # The two training sessions run side by side, in either order.
    assert sorted(calls[len(setup):-1]) == [("train", "gopher-0"), ("train", "gopher-1")]
    # One queued resource holds both slices: deleting it (--force) deletes every node.
    assert calls[-1] == ("delete", "gopher")
    assert "training on gopher-0" in r.stdout and "training on gopher-1" in r.stdout


def test_all_succeeds_then_deletes(tmp_path):
    """Catches a plan that leaves the slice running after a successful run."""
    r, calls = run_with_fake_gcloud(tmp_path, "all", *COMMON, *TRAIN)
    assert r.returncode == 0, r.stderr
    assert calls == [*SETUP_ONE, ("train", "gopher"), ("delete", "gopher")]


def test_failed_queued_resource_stops_the_wait_and_deletes(tmp_path):
    """Catches a wait for ACTIVE that loops forever on a queued resource that FAILED."""
    r, calls = run_with_fake_gcloud(tmp_path, "all", *COMMON, *TRAIN, QR_STATE="FAILED")
    assert r.returncode == 1, r.stderr
    assert "queued resource gopher is FAILED" in r.stderr
    assert calls == [("create", "gopher"), ("describe", "gopher"), ("delete", "gopher")]


def test_failed_delete_is_reported(tmp_path):
    """Catches a launcher that ignores the delete command's exit code, which reported success
    while the slice kept running."""
    r, _ = run_with_fake_gcloud(tmp_path, "delete", *COMMON, DELETE_RC="5")
    assert r.returncode == 5
    assert "deleting gopher failed with code 5" in r.stderr


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


def test_gke_bucket_mount():
    """Catches a manifest whose --data_dir under /mnt/BUCKET names nothing in the pod (no
    volume), or a mount the CSI driver refuses for a host-network pod."""
    yaml = pytest.importorskip("yaml")
    args = ("g", "v5p", "2x2x1", 1, "img:1", "experiments/tiny.py", "gs://b/runs/x")

    def pod(**kw):
        return yaml.safe_load(gke.fill(*args, **kw))["spec"]["replicatedJobs"][0][
            "template"]["spec"]["template"]

    plain = pod(data_dir="/data")
    assert "volumes" not in plain["spec"] and "metadata" not in plain
    mounted = pod(data_dir="/mnt/b/data", bucket="b")
    assert mounted["metadata"]["annotations"]["gke-gcsfuse/volumes"] == "true"
    (container,) = mounted["spec"]["containers"]
    assert container["volumeMounts"] == [{"name": "bucket", "mountPath": "/mnt/b"}]
    assert {"name": "GOPHER_JAX_DATA", "value": "/mnt/b/data"} in container["env"]
    (volume,) = mounted["spec"]["volumes"]
    assert volume["csi"]["driver"] == "gcsfuse.csi.storage.gke.io"
    assert volume["csi"]["volumeAttributes"]["bucketName"] == "b"
    assert mounted["spec"]["hostNetwork"] is True
    assert volume["csi"]["volumeAttributes"]["hostNetworkPodKSA"] == "true"
    with pytest.raises(ValueError, match="bare bucket name"):
        gke.fill(*args, bucket="gs://b")


def test_gke_bad_input():
    with pytest.raises(ValueError, match="3 dimensions"):
        gke.fill("g", "v5p", "4x4", 1, "i", "c", "w")
    with pytest.raises(ValueError, match="GKE TPU node pools"):
        gke.fill("g", "v9", "4x4", 1, "i", "c", "w")


SBATCH = ROOT / "launch/slurm/train.sbatch"


def sbatch_directives(text: str) -> list[str]:
    """The #SBATCH options sbatch reads: those before the first command line."""
    out = []
    for line in text.splitlines():
        if line.startswith("#SBATCH"):
            out.append(line.split(None, 1)[1])
        elif line.strip() and not line.startswith("#"):
            break
    return out


def test_slurm_script():
    text = SBATCH.read_text()
    assert subprocess.run(["bash", "-n", str(SBATCH)]).returncode == 0
    assert "srun" in text and "python -m gopher_jax train" in text
    assert "--ntasks-per-node=8" in sbatch_directives(text)  # one process per GPU by default


def test_slurm_sigterm_reaches_training_before_the_time_limit():
    """A static check of the preemption path. Catches `--signal=B:TERM@300` (only the batch
    shell is signalled, and it does not pass it on) and #SBATCH lines after a command (sbatch
    ignores them)."""
    opts = sbatch_directives(SBATCH.read_text())
    # Without `B:` SLURM signals every job step, i.e. the tasks srun runs, 300 s early.
    assert "--signal=TERM@300" in opts
    assert any(o.startswith("--time=") for o in opts)


def test_slurm_training_runs_under_srun(tmp_path):
    """Runs the batch script with a fake srun (and a python that must not be called outside
    it). Catches training started by the batch shell itself, which the job-step signal never
    reaches, or under a wrapper shell."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    record = (f"#!{sys.executable}\nimport json, sys\n"
              f"open({str(log)!r}, 'a').write(json.dumps(sys.argv) + '\\n')\n")
    for name in ("srun", "python"):
        (bin_dir / name).write_text(record)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(SBATCH), "experiments/gopher_1_4b.py", "/shared/runs/1b",
                        "--config.train.steps=10"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(calls) == 1 and pathlib.Path(calls[0][0]).name == "srun", calls
    cmd = calls[0][1:]
    start = cmd.index("python")  # srun runs training directly: no shell in between
    assert all(a.startswith("-") for a in cmd[:start])
    assert cmd[start:] == ["python", "-m", "gopher_jax", "train", "--config",
                           "experiments/gopher_1_4b.py", "--workdir", "/shared/runs/1b",
                           "--config.train.steps=10"]
