"""`scaling fit` on a grid ladder: the compute-optimal fits of its finished members
(optimal.py), the L(N) law per token budget, the loss -> task laws when `scaling tasks` has
run (task_law.py), written to optimal.json with isoflop.png, contours.png and
tasks_compute.png beside it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath

from gopher_jax import storage
from gopher_jax.scaling import optimal, plot_optimal, task_law
from gopher_jax.scaling.powerlaw import fit_split, require_members
from gopher_jax.scaling.runs import flops_per_token_law, from_results
from gopher_jax.scaling.task_scaling import OUT as TASKS_OUT

OUT = "optimal.json"


def _interval(f: dict[str, Any], key: str, digits: int = 3) -> str:
    v = f[key]
    iv = v["interval"]
    span = f" [{iv[0]:.{digits}g}, {iv[1]:.{digits}g}]" if iv else ""
    return f"{key} {v['value']:.{digits}g}{span}"


def _fixed_d(results: dict[str, Any], split: str) -> dict[str, Any]:
    """L(N) = a N^-alpha + c on each token budget's members (all on the same D)."""
    out = {}
    groups: dict[str, list[dict]] = {}
    for m in results["members"]:
        if m.get("status") == "ok" and m.get("budget_kind") == "tokens":
            groups.setdefault(m["budget"], []).append(m)
    for b, ms in groups.items():
        if len(ms) < 3:
            continue
        n = np.array([m["params_non_embedding"] for m in ms], np.float64)
        y = np.array([m[split]["bits_per_byte"] for m in ms], np.float64)
        try:
            out[b] = fit_split(n, y)
        except (RuntimeError, ValueError) as e:
            out[b] = {"error": str(e)}
    return out


def fit(workdir: epath.Path, results: dict[str, Any], log: Callable[[str], None],
        replicates: int) -> dict[str, Any]:
    split = results["splits"][0]
    runs = from_results(results, split)
    require_members(len(runs), workdir)
    out: dict[str, Any] = {
        "ladder": results["ladder"], "split": split, "unit": "bits per byte",
        "N": "all parameters (embeddings included), as Hoffmann et al. count",
        "C": "this project's training FLOPs (model/sizes.py) for approaches 1 and 2; "
             "C = 6ND in approach 3's allocation",
        "flops_per_token_vs_n": dict(zip(("slope", "intercept"), flops_per_token_law(runs),
                                         strict=True)),
        "runs": [{"member": r.name, "n": r.n, "d": r.d, "flops": r.flops, "loss": r.loss,
                  "budget": r.budget} for r in runs],
        **optimal.fit_all(runs, replicates),
        "fixed_d": _fixed_d(results, split),
    }
    tasks_path = workdir / f"{TASKS_OUT}.json"
    tasks = json.loads(tasks_path.read_text()) if tasks_path.is_file() else None
    if tasks is not None and tasks.get("members"):
        out["tasks"] = task_law.fit_tasks(tasks, results, split, replicates)
    storage.write_atomic(workdir / OUT, json.dumps(out, indent=2))
    title = results["ladder"]
    plot_optimal.isoflop(runs, out, title, workdir / "isoflop.png")
    plot_optimal.contours(runs, out, title, workdir / "contours.png")
    if tasks is not None and tasks.get("members"):
        plot_optimal.tasks_vs_compute(tasks, results, workdir / "tasks_compute.png")
    for line in summary(out):
        log(line)
    log(f"[scaling] wrote {workdir / OUT} and its figures")
    return out


def summary(out: dict[str, Any]) -> list[str]:
    lines = [f"[scaling] {out['members']} members, {out['split']} bits per byte"]
    for name in ("approach1", "approach2"):
        f = out[name]
        lines.append(f"[scaling] {name}: " + (f["error"] if "error" in f else
                     f"N_opt ~ C^a, {_interval(f, 'a')}; D_opt ~ C^b, {_interval(f, 'b')}"))
    f = out["approach3"]
    lines.append("[scaling] approach3: " + (f["error"] if "error" in f else ", ".join(
        _interval(f, k) for k in ("E", "A", "B", "alpha", "beta", "a", "b"))))
    h = out["held_out"]
    if "error" in h:
        lines.append(f"[scaling] held out: {h['error']}")
    else:
        lines.append(f"[scaling] held out {h['budget']} (fitted on the other budgets): mean "
                     f"|relative error| {h['mean_abs_relative_error']:.2%}, "
                     f"{h['inside']}/{len(h['members'])} measured losses inside the "
                     f"{h['bootstrap']['level']:.0%} intervals")
        for m in h["members"]:
            iv = m["interval"]
            lines.append(f"[scaling]   {m['member']}: predicted {m['predicted']:.4f} "
                         f"[{iv[0]:.4f}, {iv[1]:.4f}], measured {m['actual']:.4f} "
                         f"({m['relative_error']:+.2%})")
    for name, g in out.get("tasks", {}).get("groups", {}).items():
        if "error" in g:
            lines.append(f"[scaling] tasks {name}: {g['error']}")
            continue
        held = g["held_out"]
        tail = (f"; held out {held['budget']}: mean |error| {held['mean_abs_error']:.3f}, "
                f"{held['inside']}/{len(held['members'])} inside" if "members" in held else "")
        lines.append(f"[scaling] tasks {name}: sigmoid top {g['top']['value']:.3f}, "
                     f"k {g['k']['value']:.3g}, x0 {g['x0']['value']:.3f}, "
                     f"rmse {g['rmse']:.3f}; line: {g['per_bit']['value']:+.3f} +- "
                     f"{g['per_bit']['stderr']:.3f} per bit per byte lost{tail}")
    return lines
