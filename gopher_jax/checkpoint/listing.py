"""`checkpoint info`: one row per step directory of a workdir (complete, an incomplete save,
or set aside as broken) with its size, layout, mesh, topology and stored metrics, and the
table printed from those rows."""

from __future__ import annotations

import json
import os
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.checkpoint.errors import CheckpointError
from gopher_jax.checkpoint.manager import CORRUPT_DIR
from gopher_jax.checkpoint.meta import CheckpointMeta, meta_path


def _step_metrics(step_dir: epath.Path) -> dict[str, Any] | None:
    """What Orbax stored with the step (validation bits per byte with keep_best)."""
    try:
        return json.loads((step_dir / "metrics" / "metrics").read_text()) or None
    except (OSError, ValueError):
        return None


def _dir_bytes(path: epath.Path) -> int:
    return storage.tree_bytes(path)


def info(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per step directory (complete, incomplete save, or set aside as broken)."""
    workdir = storage.path(workdir)
    directory = workdir / workdir_lib.CHECKPOINTS
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {workdir}: {directory} does not exist",
                              "pass the --workdir of a training run")
    rows = []
    complete = set(ocp.utils.checkpoint_steps(directory))
    entries = [(p, "complete" if p.name.isdigit() and int(p.name) in complete else "incomplete")
               for p in directory.iterdir() if p.is_dir()]
    corrupt = workdir / CORRUPT_DIR
    if corrupt.is_dir():
        entries += [(p, "set aside (broken)") for p in corrupt.iterdir() if p.is_dir()]
    for path, status in entries:
        step_str = path.name.split(".")[0]
        row: dict[str, Any] = {"step": int(step_str) if step_str.isdigit() else None,
                               "status": status, "path": str(path), "bytes": _dir_bytes(path)}
        try:
            meta = CheckpointMeta.from_json(json.loads(meta_path(path).read_text()))
            row.update(layout=meta.layout, mesh=meta.mesh, rules=meta.rules,
                       processes=meta.process_count, devices=meta.device_count,
                       data_step=meta.data_step)
            goodput = meta.goodput
            if goodput.get("wall"):
                row["goodput"] = goodput["step"] / goodput["wall"]
        except (OSError, ValueError, KeyError, TypeError):
            row["layout"] = None
        metrics = _step_metrics(path)
        if metrics:
            row["metrics"] = metrics
        rows.append(row)
    return sorted(rows, key=lambda r: (r["step"] is None, r["step"] or 0, r["status"]))


def format_info(workdir: str | os.PathLike) -> str:
    rows = info(workdir)
    if not rows:
        return f"{workdir}: no checkpoints yet"
    lines = [f"{'step':>8}  {'size':>11}  {'layout':<9}  {'mesh (data,fsdp,tensor)':<23}  "
             f"{'rules':<11}  {'procs x devices':<15}  status"]
    for r in rows:
        mesh = r.get("mesh") or {}
        mesh_s = ",".join(str(mesh.get(a, "?")) for a in ("data", "fsdp", "tensor"))
        topo = f"{r['processes']} x {r['devices'] // r['processes']}" if "processes" in r else "?"
        extra = "".join(f"  {k}={v:.4f}" for k, v in (r.get("metrics") or {}).items())
        if "goodput" in r:
            extra += f"  goodput={r['goodput']:.1%}"
        lines.append(f"{r['step'] if r['step'] is not None else '?':>8}  "
                     f"{r['bytes'] / 2**20:>7.2f} MiB  {r['layout'] or '?':<9}  {mesh_s:<23}  "
                     f"{r.get('rules', '?'):<11}  {topo:<15}  {r['status']}{extra}")
    return "\n".join(lines)
