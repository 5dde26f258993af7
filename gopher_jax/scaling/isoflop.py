"""Hoffmann et al. 2022's approaches 1 and 2: the compute-optimal N and D as power laws of the
training FLOPs C, N_opt = k_N C^a and D_opt = k_D C^b. No files.

Approach 1 (the envelope): every member's loss curve is interpolated (linearly in log C) on a
grid of FLOP counts; at each grid point that two or more curves reach, the member with the
lowest loss gives N_opt(C) (its size) and D_opt(C) (the tokens it had read there); the power
laws are least-squares lines through those points in log-log.

Approach 2 (IsoFLOP profiles): for each FLOP budget, a parabola of the final loss in log N;
its minimum gives N_opt(C), D_opt(C) = C / (FLOPs per token at N_opt), and L_min(C); the power
laws are lines through the budgets' minima in log-log.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gopher_jax.scaling.runs import Run, flops_per_token_law, tokens_for

GRID_POINTS = 40


def power_law(c: Any, y: Any) -> dict[str, float]:
    """y = k C^slope by least squares in log-log: {"exponent", "coefficient"}."""
    x, v = np.log(np.asarray(c, np.float64)), np.log(np.asarray(y, np.float64))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError(f"a power law needs two distinct FLOP counts, got {len(set(x))}")
    slope, icpt = np.polyfit(x, v, 1)
    with np.errstate(over="ignore"):  # a wild bootstrap draw: inf, left out of intervals
        return {"exponent": float(slope), "coefficient": float(np.exp(icpt))}


def envelope(runs: list[Run], points: int = GRID_POINTS) -> dict[str, np.ndarray]:
    """The lowest loss over all curves at each of `points` FLOP counts (log-spaced)."""
    curves = [(np.log(np.asarray(r.curve_flops)), np.asarray(r.curve_loss), r) for r in runs
              if len(r.curve_flops) >= 2]
    if len(curves) < 2:
        raise ValueError(f"the envelope needs two or more loss curves, got {len(curves)}")
    lo = min(x[0] for x, _, _ in curves)
    hi = max(x[-1] for x, _, _ in curves)
    grid = np.linspace(lo, hi, points)
    out = {"flops": [], "loss": [], "n": [], "d": []}
    for g in grid:
        here = [(float(np.interp(g, x, y)), r) for x, y, r in curves if x[0] <= g <= x[-1]]
        if len(here) < 2:
            continue
        loss, best = min(here, key=lambda t: t[0])
        c = float(np.exp(g))
        out["flops"].append(c)
        out["loss"].append(loss)
        out["n"].append(best.n)
        out["d"].append(c / best.flops_per_token)
    return {k: np.asarray(v) for k, v in out.items()}


def approach1(runs: list[Run], points: int = GRID_POINTS) -> dict[str, float]:
    env = envelope(runs, points)
    n, d = power_law(env["flops"], env["n"]), power_law(env["flops"], env["d"])
    return {"a": n["exponent"], "k_n": n["coefficient"], "b": d["exponent"],
            "k_d": d["coefficient"], "points": float(len(env["flops"]))}


def parabola(runs: list[Run]) -> dict[str, float]:
    """The minimum of L = p2 (log N)^2 + p1 log N + p0 over one budget's members."""
    x = np.log([r.n for r in runs])
    y = np.asarray([r.loss for r in runs])
    if len(set(x.tolist())) < 3:
        raise ValueError(f"a parabola needs three distinct sizes, got {len(set(x.tolist()))}")
    p2, p1, p0 = np.polyfit(x, y, 2)
    if p2 <= 0:
        raise ValueError("the IsoFLOP profile curves downwards: no minimum")
    x_min = -p1 / (2 * p2)
    return {"n_opt": float(np.exp(x_min)), "loss_min": float(p0 - p1 * p1 / (4 * p2)),
            "p2": float(p2), "p1": float(p1), "p0": float(p0),
            "inside": float(x.min() <= x_min <= x.max())}


def by_budget(runs: list[Run]) -> dict[str, list[Run]]:
    out: dict[str, list[Run]] = {}
    for r in runs:
        if r.budget and r.budget_flops > 0:
            out.setdefault(r.budget, []).append(r)
    return dict(sorted(out.items(), key=lambda kv: kv[1][0].budget_flops))


def profiles(runs: list[Run]) -> dict[str, dict[str, float]]:
    """Each FLOP budget's parabola, with its C and D_opt."""
    fpt = flops_per_token_law(runs)
    out = {}
    for name, members in by_budget(runs).items():
        p = parabola(members)
        c = members[0].budget_flops
        p.update(flops=c, d_opt=tokens_for(c, p["n_opt"], fpt))
        out[name] = p
    return out


def approach2(runs: list[Run]) -> dict[str, float]:
    prof = profiles(runs)
    if len(prof) < 2:
        raise ValueError(f"approach 2 needs two or more FLOP budgets, got {len(prof)}")
    c = [p["flops"] for p in prof.values()]
    n = power_law(c, [p["n_opt"] for p in prof.values()])
    d = power_law(c, [p["d_opt"] for p in prof.values()])
    out = {"a": n["exponent"], "k_n": n["coefficient"], "b": d["exponent"],
           "k_d": d["coefficient"]}
    for name, p in prof.items():
        out[f"n_opt[{name}]"] = p["n_opt"]
        out[f"loss_min[{name}]"] = p["loss_min"]
    return out


def predict_n_opt(fit: dict[str, float], flops: float) -> float:
    """k_N C^a (inf where a wild replicate's exponent overflows)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return float(np.exp(np.log(fit["k_n"]) + fit["a"] * np.log(flops)))
