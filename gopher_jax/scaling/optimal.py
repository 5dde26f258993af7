"""The compute-optimal fits of a ladder's finished members (Hoffmann et al. 2022's three
approaches), each with bootstrap intervals over members, and the held-out test of the laws:
fitted without the largest FLOP budget, how well do they predict it? No files.

  approach 1  the envelope of the loss curves -> N_opt(C), D_opt(C)      (isoflop.py)
  approach 2  per-budget parabolas in log N -> N_opt(C), D_opt(C)        (isoflop.py)
  approach 3  L(N, D) = E + A/N^alpha + B/D^beta (Huber on log L)        (lnd.py)
              and its allocation N_opt = G (C/6)^a, a = beta/(alpha+beta)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gopher_jax.scaling import bootstrap, isoflop, lnd
from gopher_jax.scaling.runs import Run

# Fewer L-BFGS starts inside each replicate, plus the fit on all members as one more start.
REPLICATE_STARTS = 2


def fit_lnd(runs: list[Run], starts: int = lnd.DEFAULT_STARTS,
            extra: list[np.ndarray] | None = None) -> dict[str, Any]:
    f = lnd.fit([r.n for r in runs], [r.d for r in runs], [r.loss for r in runs], starts,
                extra_starts=extra)
    alloc = lnd.allocation(f, 1.0)
    return f | {"a": alloc["a"], "b": alloc["b"], "G": alloc["G"]}


def _strata(runs: list[Run]) -> list[str] | None:
    return [r.budget for r in runs] if any(r.budget for r in runs) else None


def approach3(runs: list[Run], replicates: int = bootstrap.DEFAULT_REPLICATES,
              seed: int = 0) -> dict[str, Any]:
    point = fit_lnd(runs)
    theta = np.array(point["theta"])
    keys = (*lnd.LAW_KEYS, "a", "b", "G")

    def one(draw: list[Run]) -> dict[str, float]:
        f = fit_lnd(draw, REPLICATE_STARTS, [theta])
        return {k: f[k] for k in keys}

    values, failed = bootstrap.replicates(runs, one, replicates, seed, _strata(runs))
    out = bootstrap.intervals({k: point[k] for k in keys}, values, failed)
    out["objective"] = point["objective"]
    out["members"] = len(runs)
    out["replicates"] = {k: values.get(k, []) for k in lnd.LAW_KEYS}  # for `scaling plan`
    return out


def _bootstrapped(fit: Any, runs: list[Run], replicates: int, seed: int,
                  skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """`fit` on the members, with intervals from `fit` on redraws of them."""
    point = fit(runs)
    values, failed = bootstrap.replicates(runs, fit, replicates, seed, _strata(runs))
    return bootstrap.intervals({k: v for k, v in point.items() if k not in skip}, values,
                               failed)


def approach1(runs: list[Run], replicates: int = bootstrap.DEFAULT_REPLICATES,
              seed: int = 0) -> dict[str, Any]:
    out = _bootstrapped(isoflop.approach1, runs, replicates, seed, skip=("points",))
    out["envelope"] = {k: v.tolist() for k, v in isoflop.envelope(runs).items()}
    return out


def approach2(runs: list[Run], replicates: int = bootstrap.DEFAULT_REPLICATES,
              seed: int = 0) -> dict[str, Any]:
    out = _bootstrapped(isoflop.approach2, runs, replicates, seed)
    out["profiles"] = isoflop.profiles(runs)
    return out


def held_out(runs: list[Run], replicates: int = bootstrap.DEFAULT_REPLICATES,
             seed: int = 0) -> dict[str, Any]:
    """The laws fitted on every budget but the largest, predicting that budget's members."""
    budgets = isoflop.by_budget(runs)
    if len(budgets) < 3:
        return {"error": f"needs three or more FLOP budgets (two to fit), has {len(budgets)}"}
    last = list(budgets)[-1]
    rest = [r for r in runs if r.budget != last]
    test = budgets[last]
    point = fit_lnd(rest)
    theta = np.array(point["theta"])

    def predict(draw: list[Run]) -> dict[str, float]:
        f = point if draw is rest else fit_lnd(draw, REPLICATE_STARTS, [theta])
        pred = lnd.predict(f, [r.n for r in test], [r.d for r in test])
        out = {r.name: float(p) for r, p in zip(test, pred, strict=True)}
        try:
            out["n_opt"] = isoflop.predict_n_opt(isoflop.approach2(draw), test[0].budget_flops)
        except ValueError:  # a draw whose profiles have no minimum: no N_opt, losses still
            out["n_opt"] = float("nan")
        return out

    est = predict(rest)
    values, failed = bootstrap.replicates(rest, predict, replicates, seed, _strata(rest))
    members = []
    for r in test:
        iv = bootstrap.interval(values.get(r.name, []))
        err = est[r.name] - r.loss
        members.append({"member": r.name, "params": r.n, "tokens": r.d, "actual": r.loss,
                        "predicted": est[r.name], "interval": iv, "error": err,
                        "relative_error": err / r.loss,
                        "inside": bool(iv is not None and iv[0] <= r.loss <= iv[1])})
    rel = np.array([m["relative_error"] for m in members])
    out: dict[str, Any] = {
        "budget": last, "flops": test[0].budget_flops, "fitted_on": [r.name for r in rest],
        "law": {k: point[k] for k in lnd.LAW_KEYS}, "members": members,
        "mean_relative_error": float(rel.mean()),
        "mean_abs_relative_error": float(np.abs(rel).mean()),
        "inside": int(sum(m["inside"] for m in members)),
        "bootstrap": {"replicates": replicates - failed, "failed": failed,
                      "level": bootstrap.LEVEL, "resampled": "members"}}
    try:
        own = isoflop.parabola(test)["n_opt"]
        out["n_opt"] = {"predicted": est["n_opt"],
                        "interval": bootstrap.interval(values.get("n_opt", [])),
                        "measured": own, "relative_error": est["n_opt"] / own - 1.0}
    except ValueError as e:
        out["n_opt"] = {"predicted": est["n_opt"], "error": str(e)}
    return out


def _attempt(f: Any, *args: Any) -> dict[str, Any]:
    try:
        return f(*args)
    except ValueError as e:
        return {"error": str(e)}


def fit_all(runs: list[Run], replicates: int = bootstrap.DEFAULT_REPLICATES,
            seed: int = 0) -> dict[str, Any]:
    """Every approach that the members allow; one that cannot fit says why."""
    with bootstrap.one_blas_thread():
        return {
            "members": len(runs),
            "approach1": _attempt(approach1, runs, replicates, seed),
            "approach2": _attempt(approach2, runs, replicates, seed),
            "approach3": _attempt(approach3, runs, replicates, seed),
            "held_out": _attempt(held_out, runs, replicates, seed),
        }
