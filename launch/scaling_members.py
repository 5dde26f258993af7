"""Fan a ladder's members out over TPU VMs: one `scaling run --member a,b,...` job per VM, all
on one gs:// workdir.

    # one single-slice TPU VM per job, created and set up with launch/tpu_vm.py:
    python -m launch.tpu_vm create --name ladder-0 --accelerator v5p-8 --zone Z --project P
    python -m launch.tpu_vm setup  --name ladder-0 --zone Z --project P        # and ladder-1...
    python -m launch.scaling_members --config experiments/isoflop_ladder.py \
        --workdir gs://BUCKET/ladders/isoflop --nodes ladder-0,ladder-1 --zone Z --project P
    python -m gopher_jax scaling fit --workdir gs://BUCKET/ladders/isoflop       # when done

It splits the members by training FLOPs (largest first, each to the VM with the least work so
far), prints the split, then starts each VM's job detached (nohup, log in /tmp). Each member
trains under its own lock in the workdir, so a VM may be lost and its members started again
anywhere (they resume from their checkpoints; a member a live job holds is left to it), and
running the same command twice trains nothing twice. --dry-run prints the commands only.
What it does not do: create, set up, watch or delete the VMs (launch/tpu_vm.py does), nor
wait for the jobs to end.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence

from launch.tpu_vm import REMOTE_DIR, _ssh

LOG = "/tmp/gopher_jax_scaling.log"


def split(flops: dict[str, float], nodes: Sequence[str]) -> dict[str, list[str]]:
    """Longest-processing-time-first: each member, largest first, to the least-loaded node."""
    load = {n: 0.0 for n in nodes}
    out: dict[str, list[str]] = {n: [] for n in nodes}
    for name in sorted(flops, key=lambda m: (-flops[m], m)):
        node = min(nodes, key=lambda n: (load[n], list(nodes).index(n)))
        out[node].append(name)
        load[node] += flops[name]
    return out


def member_flops(config: str, overrides: Sequence[str]) -> dict[str, float]:
    from gopher_jax import config as config_lib
    from gopher_jax import scaling

    ladder = config_lib.load(config, overrides)
    return {n: scaling.describe(ladder, n)["train_flops"] for n in scaling.member_names(ladder)}


def job(config: str, workdir: str, members: Sequence[str], overrides: Sequence[str]) -> str:
    run = shlex.join(["python3", "-m", "gopher_jax", "scaling", "run", "--config", config,
                      "--workdir", workdir, "--member", ",".join(members), *overrides])
    return f"cd {REMOTE_DIR} && GOPHER_DISTRIBUTED=auto nohup {run} > {LOG} 2>&1 &"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the ladder config (a path in the checkout)")
    ap.add_argument("--workdir", required=True, help="the shared ladder workdir (gs://...)")
    ap.add_argument("--nodes", required=True, help="TPU VM names, comma-separated")
    ap.add_argument("--zone", required=True)
    ap.add_argument("--project", required=True)
    ap.add_argument("--dry-run", dest="dry_run", action="store_true",
                    help="print the split and the commands without running them")
    a, overrides = ap.parse_known_args(argv)
    bad = [x for x in overrides if not x.startswith("--config.")]
    if bad:
        print(f"scaling_members.py: unknown arguments {bad}", file=sys.stderr)
        return 2
    nodes = [n.strip() for n in a.nodes.split(",") if n.strip()]
    if not nodes:
        print("scaling_members.py: --nodes names no VM", file=sys.stderr)
        return 2
    flops = member_flops(a.config, overrides)
    plan = split(flops, nodes)
    for node in nodes:
        total = sum(flops[m] for m in plan[node])
        print(f"# {node}: {len(plan[node])} members, {total:.3g} training FLOPs: "
              f"{', '.join(plan[node]) or '(none)'}", flush=True)
    for node in nodes:
        if not plan[node]:
            continue
        cmd = _ssh(a, node, job(a.config, a.workdir, plan[node], overrides))
        print("+ " + shlex.join(cmd), flush=True)
        if not a.dry_run:
            rc = subprocess.call(cmd)
            if rc:
                print(f"scaling_members.py: starting the job on {node} failed with code {rc}",
                      file=sys.stderr)
                return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
