"""The scaling law L(N) = a * N^(-alpha) + c: a bounded least-squares fit, its prediction, and
the fit of one split with the leave-one-out prediction of the largest member. No files."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from gopher_jax.errors import UserError

MIN_MEMBERS = 3  # the laws' fits have three parameters or more


def require_members(count: int, where: object) -> None:
    """Refuses a fit of fewer than MIN_MEMBERS finished members of the ladder at `where`."""
    if count < MIN_MEMBERS:
        raise UserError(f"{count} finished member(s) in {where}; the fit needs at least "
                        f"{MIN_MEMBERS}", "run the remaining members with `scaling run` first")


def power_law(n: np.ndarray, a: float, alpha: float, c: float) -> np.ndarray:
    return a * np.power(n, -alpha) + c


def fit_power_law(n: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Least-squares L(N) = a N^-alpha + c with a > 0, 0 <= alpha <= 3, 0 <= c <= min(L).

    N is scaled by its geometric mean inside the fit (conditioning); several starting
    values of c guard against a local minimum; the best fit by RMSE is returned.
    """
    from scipy.optimize import OptimizeWarning, curve_fit

    n, y = np.asarray(n, np.float64), np.asarray(y, np.float64)
    if len(n) < 3:
        raise ValueError(f"a 3-parameter fit needs at least 3 points, got {len(n)}")
    n0 = float(np.exp(np.mean(np.log(n))))
    x = n / n0
    y_min = float(np.min(y))
    best = None
    for frac in (0.0, 0.25, 0.5, 0.75, 0.9):
        c0 = frac * y_min
        # The log-log line through (N, L - c0) gives a and alpha for this c0.
        slope, icpt = np.polyfit(np.log(x), np.log(np.maximum(y - c0, 1e-12)), 1)
        p0 = (max(math.exp(icpt), 1e-9), min(max(-slope, 1e-3), 2.9), c0)
        try:
            with warnings.catch_warnings():  # the covariance is not used (3 points: none)
                warnings.simplefilter("ignore", OptimizeWarning)
                p, _ = curve_fit(power_law, x, y, p0=p0,
                                 bounds=((0, 0, 0), (np.inf, 3, y_min)), maxfev=20_000)
        except RuntimeError:
            continue
        rmse = float(np.sqrt(np.mean((power_law(x, *p) - y) ** 2)))
        if best is None or rmse < best[1]:
            best = (p, rmse)
    if best is None:
        raise RuntimeError("curve_fit did not converge from any starting point")
    (a_s, alpha, c), rmse = best
    return {"a": float(a_s * n0 ** alpha), "alpha": float(alpha), "c": float(c),
            "rmse": rmse, "n_points": len(n)}


def predict(f: dict[str, float], n: float | np.ndarray) -> float | np.ndarray:
    return power_law(np.asarray(n, np.float64), f["a"], f["alpha"], f["c"])


def fit_split(n: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    """The fit on all points and the leave-one-out prediction of the largest from the rest."""
    order = np.argsort(n)
    n, y = np.asarray(n, np.float64)[order], np.asarray(y, np.float64)[order]
    out: dict[str, Any] = fit_power_law(n, y)
    out["monotonic"] = bool(np.all(np.diff(y) < 0))
    if len(n) < 4:
        out["loo_largest"] = {"error": f"needs at least 4 finished members (3 to fit, 1 to "
                                       f"predict), have {len(n)}"}
        return out
    rest = fit_power_law(n[:-1], y[:-1])
    pred = float(predict(rest, n[-1]))
    out["loo_largest"] = {
        "params_non_embedding": int(n[-1]), "predicted": pred, "actual": float(y[-1]),
        "error": pred - float(y[-1]), "relative_error": (pred - float(y[-1])) / float(y[-1]),
        "fit_without_largest": rest}
    return out
