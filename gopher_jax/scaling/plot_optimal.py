"""The figures of a compute-optimal fit (matplotlib, Agg): IsoFLOP profiles with their fitted
minima and the frontier N_opt(C) of the three approaches; contours of the fitted L(N, D) with
the members and the efficient frontier; task score against compute per group."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from etils import epath

from gopher_jax.scaling import lnd
from gopher_jax.scaling.runs import Run


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: epath.Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path.write_bytes(buf.getvalue())  # a local path or gs://
    _pyplot().close(fig)


def isoflop(runs: list[Run], fits: dict[str, Any], title: str, path: epath.Path) -> None:
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4))
    profiles = fits.get("approach2", {}).get("profiles", {})
    budgets = sorted({r.budget for r in runs if r.budget_flops > 0},
                     key=lambda b: next(r.budget_flops for r in runs if r.budget == b))
    for i, b in enumerate(budgets):
        members = sorted((r for r in runs if r.budget == b), key=lambda r: r.n)
        n = np.array([r.n for r in members])
        left.scatter(n, [r.loss for r in members], color=f"C{i}", zorder=3,
                     label=f"C = {members[0].budget_flops:.2g}")
        p = profiles.get(b)
        if p:
            grid = np.geomspace(n.min() / 1.3, n.max() * 1.3, 100)
            x = np.log(grid)
            left.plot(grid, p["p2"] * x * x + p["p1"] * x + p["p0"], color=f"C{i}", lw=1)
            left.scatter([p["n_opt"]], [p["loss_min"]], marker="*", s=120, color=f"C{i}",
                         edgecolor="k", zorder=4)
    left.set_xscale("log")
    left.set_xlabel("parameters N")
    left.set_ylabel("validation bits per byte")
    left.set_title(f"{title}: IsoFLOP profiles (stars: fitted minima)", fontsize=9)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=7)

    c_all = [r.flops for r in runs]
    grid_c = np.geomspace(min(c_all) / 3, max(c_all) * 3, 50)
    a1 = fits.get("approach1", {})
    if "envelope" in a1:
        env = a1["envelope"]
        right.scatter(env["flops"], env["n"], s=8, color="C0", alpha=0.5,
                      label="approach 1: envelope winners")
        right.plot(grid_c, a1["k_n"]["value"] * grid_c ** a1["a"]["value"], color="C0",
                   label=f"approach 1: a = {a1['a']['value']:.2f}")
    a2 = fits.get("approach2", {})
    if profiles and "a" in a2:
        right.scatter([p["flops"] for p in profiles.values()],
                      [p["n_opt"] for p in profiles.values()], marker="*", s=120, color="C1",
                      edgecolor="k", zorder=4, label="approach 2: profile minima")
        right.plot(grid_c, a2["k_n"]["value"] * grid_c ** a2["a"]["value"], color="C1",
                   label=f"approach 2: a = {a2['a']['value']:.2f}")
    a3 = fits.get("approach3", {})
    if "alpha" in a3:
        law = {k: a3[k]["value"] for k in lnd.LAW_KEYS}
        right.plot(grid_c, lnd.allocation(law, grid_c)["n_opt"], color="C2", ls="--",
                   label=f"approach 3 (C = 6ND): a = {a3['a']['value']:.2f}")
    right.scatter([r.flops for r in runs], [r.n for r in runs], s=14, color="0.6",
                  marker="s", label="members")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training FLOPs C")
    right.set_ylabel("compute-optimal N")
    right.set_title("the frontier N_opt(C)", fontsize=9)
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def contours(runs: list[Run], fits: dict[str, Any], title: str, path: epath.Path) -> None:
    a3 = fits.get("approach3", {})
    if "alpha" not in a3:
        return
    plt = _pyplot()
    law = {k: a3[k]["value"] for k in lnd.LAW_KEYS}
    n = np.array([r.n for r in runs])
    d = np.array([r.d for r in runs])
    gn = np.geomspace(n.min() / 3, n.max() * 3, 120)
    gd = np.geomspace(d.min() / 3, d.max() * 3, 120)
    nn, dd = np.meshgrid(gn, gd)
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    cs = ax.contour(nn, dd, lnd.predict(law, nn, dd), levels=14, cmap="viridis",
                    linewidths=0.8)
    ax.clabel(cs, fontsize=6, fmt="%.2f")
    sc = ax.scatter(n, d, c=[r.loss for r in runs], cmap="viridis", edgecolor="k", zorder=3)
    fig.colorbar(sc, ax=ax, label="measured validation bits per byte")
    c = np.geomspace(6 * gn.min() * gd.min(), 6 * gn.max() * gd.max(), 60)
    alloc = lnd.allocation(law, c)
    ax.plot(alloc["n_opt"], alloc["d_opt"], color="C3", lw=2, label="efficient frontier")
    for cc in sorted({r.budget_flops for r in runs if r.budget_flops > 0}):
        ax.plot(gn, cc / (6 * gn), color="0.5", ls=":", lw=0.8)
    ax.set_xlim(gn.min(), gn.max())
    ax.set_ylim(gd.min(), gd.max())
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("training tokens D")
    ax.set_title(f"{title}: fitted L(N, D) (dotted: C = 6ND of each budget)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def tasks_vs_compute(tasks_scaling: dict[str, Any], results: dict[str, Any],
                     path: epath.Path) -> None:
    """Each group's score of every scored member against its training FLOPs, one colour per
    budget, +- one standard error, chance dashed."""
    plt = _pyplot()
    by_name = {m["member"]: m for m in results["members"]}
    names = [m["member"] for m in tasks_scaling["members"]]
    groups = {g: e for g, e in tasks_scaling["groups"].items() if e.get("scores")}
    if not groups or not names:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(4.6 * len(groups), 3.8), squeeze=False)
    budgets = sorted({by_name[n].get("budget") or "" for n in names},
                     key=lambda b: next(float(by_name[n].get("budget_value") or 0)
                                        for n in names if (by_name[n].get("budget") or "") == b))
    for ax, (g, e) in zip(axes[0], groups.items(), strict=True):
        for i, b in enumerate(budgets):
            idx = [j for j, n in enumerate(names) if (by_name[n].get("budget") or "") == b]
            x = [by_name[names[j]]["train_flops"] for j in idx]
            y = [e["scores"][j] for j in idx]
            err = [e["stderr"][j] or 0.0 for j in idx]
            ax.errorbar(x, y, yerr=err, fmt="o", color=f"C{i}", capsize=2, label=b or "members")
        if e.get("chance") is not None:
            ax.axhline(e["chance"], color="C3", ls="--", lw=1, label="chance")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel(e["main_metric"])
        ax.set_title(f"group {g} ({len(e['tasks'])} tasks)", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
