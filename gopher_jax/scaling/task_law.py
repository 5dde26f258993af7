"""Loss -> task score: the second step of Bhagia et al. 2024's two-step prediction. Each task's
(and group's) score is fitted against the members' held-out bits per byte x with a sigmoid

    score(x) = chance + (top - chance) / (1 + exp(k (x - x0))),   k > 0, chance <= top <= 1,

(lower bits per byte, higher score), with bootstrap intervals over members, and the same
held-out check as the loss laws: fitted without the largest FLOP budget, how well does it
predict that budget's scores? No files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gopher_jax.scaling import bootstrap


def sigmoid(x: Any, chance: float, top: float, k: float, x0: float) -> np.ndarray:
    z = np.clip(k * (np.asarray(x, np.float64) - x0), -50.0, 50.0)
    return chance + (top - chance) / (1.0 + np.exp(z))


def fit(x: Any, y: Any, chance: float) -> dict[str, float]:
    """Least squares with bounds, from a few starting midpoints; the best is kept."""
    from scipy.optimize import least_squares

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(set(x.tolist())) < 3:
        raise ValueError(f"a sigmoid needs three distinct losses, got {len(set(x.tolist()))}")
    span = max(float(np.ptp(x)), 1e-6)
    best = None
    for mid in np.quantile(x, [0.1, 0.5, 0.9]):
        for k0 in (1.0 / span, 10.0 / span):
            p0 = (max(min(float(y.max()), 1.0), chance + 1e-3), k0, float(mid))
            r = least_squares(lambda p: sigmoid(x, chance, *p) - y, p0,
                              bounds=([chance, 1e-6, x.min() - 10 * span],
                                      [1.0, 1e4 / span, x.max() + 10 * span]))
            if best is None or r.cost < best.cost:
                best = r
    top, k, x0 = (float(v) for v in best.x)
    resid = sigmoid(x, chance, top, k, x0) - y
    return {"top": top, "k": k, "x0": x0, "rmse": float(np.sqrt(np.mean(resid ** 2)))}


def fit_scores(names: list[str], bpb: list[float], scores: list[float], chance: float,
               budgets: list[str], budget_flops: dict[str, float],
               replicates: int = bootstrap.DEFAULT_REPLICATES, seed: int = 0) -> dict[str, Any]:
    """The sigmoid with intervals, and the held-out prediction of the largest budget."""
    rows = list(zip(names, bpb, scores, budgets, strict=True))
    strata = budgets if any(budgets) else None

    def one(draw: list[tuple]) -> dict[str, float]:
        return fit([r[1] for r in draw], [r[2] for r in draw], chance)

    point = one(rows)
    values, failed = bootstrap.replicates(rows, one, replicates, seed, strata)
    # The least-squares line as a plain check of the sigmoid: score gained per bit per byte
    # of loss lost, with its standard error.
    (slope, _), cov = np.polyfit(np.asarray(bpb), np.asarray(scores), 1, cov=True)
    out: dict[str, Any] = {"chance": chance,
                           **bootstrap.intervals({k: point[k] for k in ("top", "k", "x0")},
                                                 values, failed),
                           "rmse": point["rmse"],
                           "per_bit": {"value": float(-slope),
                                       "stderr": float(np.sqrt(cov[0, 0]))}}
    order = sorted({b for b in budgets if b}, key=lambda b: budget_flops.get(b, 0.0))
    if len(order) < 2:
        out["held_out"] = {"error": "needs two or more budgets"}
        return out
    last = order[-1]
    rest = [r for r in rows if r[3] != last]
    test = [r for r in rows if r[3] == last]
    try:
        f = one(rest)
    except ValueError as e:
        out["held_out"] = {"error": str(e)}
        return out

    def pred(draw: list[tuple]) -> dict[str, float]:
        g = one(draw)
        return {r[0]: float(sigmoid(r[1], chance, g["top"], g["k"], g["x0"])) for r in test}

    rest_strata = [r[3] for r in rest]
    pv, pfailed = bootstrap.replicates(rest, pred, replicates, seed, rest_strata)
    members = []
    for r in test:
        p = float(sigmoid(r[1], chance, f["top"], f["k"], f["x0"]))
        iv = bootstrap.interval(pv.get(r[0], []))
        members.append({"member": r[0], "bits_per_byte": r[1], "actual": r[2], "predicted": p,
                        "interval": iv, "error": p - r[2],
                        "inside": bool(iv is not None and iv[0] <= r[2] <= iv[1])})
    out["held_out"] = {"budget": last, "members": members,
                       "mean_abs_error": float(np.mean([abs(m["error"]) for m in members])),
                       "inside": int(sum(m["inside"] for m in members)),
                       "bootstrap_failed": pfailed}
    return out


def fit_tasks(tasks_scaling: dict[str, Any], results: dict[str, Any], split: str,
              replicates: int = bootstrap.DEFAULT_REPLICATES) -> dict[str, Any]:
    """Every task and group of a `scaling tasks` result whose metric has a chance level."""
    by_name = {m["member"]: m for m in results["members"] if m.get("status") == "ok"}
    names = [m["member"] for m in tasks_scaling["members"]]
    known = [n for n in names if n in by_name]
    bpb = [by_name[n][split]["bits_per_byte"] for n in known]
    budgets = [by_name[n].get("budget") or "" for n in known]
    flops = {by_name[n].get("budget") or "": float(by_name[n].get("budget_value") or 0.0)
             for n in known}
    out: dict[str, Any] = {"x": f"{split} bits per byte", "members": known, "tasks": {},
                           "groups": {}}
    for kind in ("tasks", "groups"):
        for name, e in tasks_scaling[kind].items():
            if not e.get("scores") or e.get("chance") is None or \
                    e.get("main_metric") == "bits_per_byte":
                continue
            scores = [s for n, s in zip(names, e["scores"], strict=True) if n in by_name]
            try:
                with bootstrap.one_blas_thread():
                    out[kind][name] = fit_scores(known, bpb, scores, float(e["chance"]),
                                                 budgets, flops, replicates)
            except ValueError as err:
                out[kind][name] = {"error": str(err)}
    return out

