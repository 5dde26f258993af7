"""`checkpoint info`: a workdir's checkpoints, one line each."""

from __future__ import annotations

import argparse

from gopher_jax.cli import common, console


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    common.add_workdir(p, default=None)


def run(args: argparse.Namespace) -> int:
    from gopher_jax import checkpoint

    common.existing_workdir(args.workdir)
    rows = checkpoint.info(args.workdir)
    if not rows:
        console.out(f"{args.workdir}: no checkpoints yet")
        return 0
    console.out(f"{'step':>8}  {'size':>11}  {'layout':<9}  {'mesh (data,fsdp,tensor)':<23}  "
                f"{'rules':<11}  {'procs x devices':<15}  status")
    for r in rows:
        m = r.meta
        mesh_s = ",".join(str((m.mesh if m else {}).get(a, "?"))
                          for a in ("data", "fsdp", "tensor"))
        topo = f"{m.process_count} x {m.device_count // m.process_count}" if m else "?"
        extra = "".join(f"  {k}={v:.4f}" for k, v in (r.metrics or {}).items())
        if r.goodput is not None:
            extra += f"  goodput={r.goodput:.1%}"
        console.out(f"{r.step if r.step is not None else '?':>8}  "
                    f"{r.bytes / 2**20:>7.2f} MiB  {m.layout if m else '?':<9}  {mesh_s:<23}  "
                    f"{m.rules if m else '?':<11}  {topo:<15}  {r.status}{extra}")
    return 0
