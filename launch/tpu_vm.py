"""Train on Cloud TPU VMs: create a slice (or a multislice) with queued resources, copy the
code, run on every worker, tail the logs, delete.

    python -m launch.tpu_vm create --name gopher --accelerator v5p-128 --zone us-east5-a \
        --project P [--num_slices 2] [--spot] [--dry-run]
    python -m launch.tpu_vm setup  --name gopher ...   # copy this checkout, pip install -e .[tpu]
    python -m launch.tpu_vm run    --name gopher ... -- --config experiments/gopher_7_1b.py \
        --workdir gs://BUCKET/runs/7b          # detached: nohup on every worker
    python -m launch.tpu_vm logs   --name gopher ...   # tail -f process 0's log
    python -m launch.tpu_vm delete --name gopher ...
    python -m launch.tpu_vm all    --name gopher ... -- --config ...
        # create, setup, run in the foreground (output streams back), delete; when a step
        # fails: delete, and exit with its code (training's own code, via pipefail)

Every command it runs is printed first; --dry-run prints them and runs nothing. Each worker
runs `python -m gopher_jax train` with GOPHER_DISTRIBUTED=auto: jax.distributed.initialize()
finds the coordinator from the TPU metadata, and with several slices libtpu connects the
slices over DCN through the MEGASCALE_* variables that queued resources set. A multislice
job gets --config.mesh.num_slices=N and --config.mesh.data=N unless they are given.
"""

from __future__ import annotations

import argparse
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence

from gopher_jax.hardware import TPU_GENERATIONS

ROOT = pathlib.Path(__file__).resolve().parents[1]
REMOTE_DIR = "gopher_jax"
LOG = "/tmp/gopher_jax_train.log"


def runtime_for(accelerator: str) -> str:
    """The default runtime image for an accelerator type such as v5litepod-16."""
    runtimes = {g.tpu_vm_type: g.tpu_vm_runtime for g in TPU_GENERATIONS.values()}
    gen = accelerator.rsplit("-", 1)[0]
    if gen not in runtimes:
        raise ValueError(f"--accelerator={accelerator!r}: expected GEN-N with GEN one of "
                         f"{sorted(runtimes)}, e.g. v5p-128 or v3-2048; or pass --runtime")
    return runtimes[gen]


def slice_names(a: argparse.Namespace) -> list[str]:
    """Queued resources name multislice nodes <node-prefix>-0, -1, ..."""
    if a.num_slices == 1:
        return [a.name]
    return [f"{a.name}-{i}" for i in range(a.num_slices)]


def _gcloud(a: argparse.Namespace, *args: str) -> list[str]:
    return ["gcloud", *args, f"--zone={a.zone}", f"--project={a.project}"]


def create_cmds(a: argparse.Namespace) -> list[list[str]]:
    cmd = _gcloud(a, "alpha", "compute", "tpus", "queued-resources", "create", a.name,
                  f"--accelerator-type={a.accelerator}",
                  f"--runtime-version={a.runtime or runtime_for(a.accelerator)}")
    if a.num_slices == 1:
        cmd.append(f"--node-id={a.name}")
    else:
        cmd += [f"--node-count={a.num_slices}", f"--node-prefix={a.name}"]
    if a.spot:
        cmd.append("--spot")
    # Blocks until the slices are ACTIVE (queued resources may wait for capacity); a failed
    # describe or a request that can no longer become ACTIVE stops the wait with an error.
    wait = _gcloud(a, "alpha", "compute", "tpus", "queued-resources", "describe", a.name,
                   "--format=value(state.state)")
    return [cmd, ["bash", "-c", f"until s=$({shlex.join(wait)}) || exit; [ \"$s\" = ACTIVE ]; "
                                 "do case $s in FAILED|SUSPENDED|SUSPENDING|DELETING) echo "
                                 f"\"queued resource {a.name} is $s\" >&2; exit 1;; esac; "
                                 "sleep 30; done"]]


def _ssh(a: argparse.Namespace, node: str, command: str) -> list[str]:
    return _gcloud(a, "compute", "tpus", "tpu-vm", "ssh", node, "--worker=all",
                   f"--command={command}")


def setup_cmds(a: argparse.Namespace) -> list[list[str]]:
    archive = "/tmp/gopher_jax_src.tar.gz"
    cmds = [["git", "-C", str(ROOT), "archive", "--format=tar.gz", f"--output={archive}",
             "HEAD"]]
    install = (f"rm -rf {REMOTE_DIR} && mkdir -p {REMOTE_DIR} && "
               f"tar -xzf /tmp/gopher_jax_src.tar.gz -C {REMOTE_DIR} && "
               f"cd {REMOTE_DIR} && python3 -m pip install -q -e '.[tpu]'")
    for node in slice_names(a):
        cmds.append(_gcloud(a, "compute", "tpus", "tpu-vm", "scp", archive,
                            f"{node}:/tmp/gopher_jax_src.tar.gz", "--worker=all"))
        cmds.append(_ssh(a, node, install))
    return cmds


def slice_flags(num_slices: int, args: Sequence[str]) -> list[str]:
    """Config flags for a multislice run: the data axis spans the slices (unless given)."""
    if num_slices == 1:
        return []
    out = []
    if not any(x.startswith("--config.mesh.num_slices") for x in args):
        out.append(f"--config.mesh.num_slices={num_slices}")
    if not any(x.startswith("--config.mesh.data") for x in args):
        out.append(f"--config.mesh.data={num_slices}")
    return out


def train_command(a: argparse.Namespace, train_args: Sequence[str], detach: bool) -> str:
    args = list(train_args)
    args += slice_flags(a.num_slices, args)
    env = "GOPHER_DISTRIBUTED=auto"
    train = f"{env} python3 -m gopher_jax train {shlex.join(args)}"
    if detach:
        return f"cd {REMOTE_DIR} && nohup {train} > {LOG} 2>&1 &"
    # pipefail: the session's exit code is training's, not tee's.
    return f"set -o pipefail; cd {REMOTE_DIR} && {train} 2>&1 | tee {LOG}"


def run_cmds(a: argparse.Namespace, train_args: Sequence[str], detach: bool = True
             ) -> list[list[str]]:
    if not train_args:
        raise ValueError("run: give the train flags after '--', e.g. -- --config "
                         "experiments/gopher_44m.py --workdir gs://BUCKET/run")
    cmds = [_ssh(a, node, train_command(a, train_args, detach)) for node in slice_names(a)]
    if not detach and len(cmds) > 1:
        return [side_by_side(cmds)]
    return cmds


def side_by_side(cmds: Sequence[Sequence[str]]) -> list[str]:
    """One bash command running `cmds` concurrently (every slice must start before any can
    finish); it waits on each and exits with the first non-zero code, in the order given."""
    starts = "; ".join(f"{shlex.join(c)} & p{i}=$!" for i, c in enumerate(cmds))
    pids = " ".join(f"$p{i}" for i in range(len(cmds)))
    return ["bash", "-c", f"{starts}; rc=0; for p in {pids}; do wait $p; r=$?; "
                          "if [ $rc = 0 ]; then rc=$r; fi; done; exit $rc"]


def logs_cmds(a: argparse.Namespace) -> list[list[str]]:
    # Worker 0 of slice 0 is process 0: the one that prints progress and metrics.
    node = slice_names(a)[0]
    return [_gcloud(a, "compute", "tpus", "tpu-vm", "ssh", node, "--worker=0",
                    f"--command=tail -n 100 -f {LOG}")]


def delete_cmds(a: argparse.Namespace) -> list[list[str]]:
    return [_gcloud(a, "alpha", "compute", "tpus", "queued-resources", "delete", a.name,
                    "--force", "--quiet", "--async")]


def plan(a: argparse.Namespace, train_args: Sequence[str]) -> list[list[str]]:
    steps = {"create": lambda: create_cmds(a), "setup": lambda: setup_cmds(a),
             "run": lambda: run_cmds(a, train_args), "logs": lambda: logs_cmds(a),
             "delete": lambda: delete_cmds(a)}
    if a.action == "all":
        # Training runs in the foreground (its output streams back), then the slices go.
        return create_cmds(a) + setup_cmds(a) + run_cmds(a, train_args, detach=False) + \
            delete_cmds(a)
    return steps[a.action]()


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["create", "setup", "run", "logs", "delete", "all"])
    ap.add_argument("--name", required=True, help="queued resource / TPU VM name")
    ap.add_argument("--accelerator", default="v5p-8", help="e.g. v5p-128, v3-2048, v6e-256")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project", required=True)
    ap.add_argument("--num_slices", type=int, default=1)
    ap.add_argument("--runtime", default="", help="TPU runtime version (default by generation)")
    ap.add_argument("--spot", action="store_true")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true",
                    help="print the commands without running them")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, train_args = argv[:cut], argv[cut + 1:]
    a = parser().parse_args(argv)
    if a.num_slices < 1:
        print("tpu_vm.py: --num_slices must be >= 1", file=sys.stderr)
        return 2
    try:
        cmds = plan(a, train_args)
    except ValueError as e:
        print(f"tpu_vm.py: {e}", file=sys.stderr)
        return 2
    deletes = delete_cmds(a)
    for cmd in cmds:
        if a.dry_run:
            print("+ " + shlex.join(cmd), flush=True)
            continue
        rc = _call(cmd)
        if rc == 0:
            continue
        if cmd in deletes:
            print(f"tpu_vm.py: deleting {a.name} failed with code {rc}: it may still be "
                  "running (and billed); check with `gcloud alpha compute tpus queued-resources "
                  "list`", file=sys.stderr)
        else:
            print(f"tpu_vm.py: command failed with code {rc}", file=sys.stderr)
            if a.action == "all":  # never leave a slice running after a failure
                for d in deletes:
                    if _call(d) != 0:
                        print(f"tpu_vm.py: deleting {a.name} failed too: delete it by hand: "
                              f"{shlex.join(d)}", file=sys.stderr)
        return rc
    return 0


def _call(cmd: list[str]) -> int:
    """Prints and runs `cmd`; its exit code (127: not found, 130: interrupted)."""
    print("+ " + shlex.join(cmd), flush=True)
    try:
        return subprocess.call(cmd)
    except FileNotFoundError:
        hint = ": install the Google Cloud SDK" if cmd[0] == "gcloud" else ""
        print(f"tpu_vm.py: {cmd[0]} not found{hint}", file=sys.stderr)
        return 127
    except KeyboardInterrupt:
        return 130

if __name__ == "__main__":
    sys.exit(main())
