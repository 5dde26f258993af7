"""The parametric law L(N, D) = E + A / N^alpha + B / D^beta (Hoffmann et al. 2022, approach 3)
fitted as the paper did, and the compute-optimal allocation it implies. No files.

The fit minimises the Huber loss (delta 1e-3) between the predicted and the measured log L,
with the law written as log L = LSE(a - alpha log N, b - beta log D, e) (A = e^a, B = e^b,
E = e^e), by L-BFGS from a grid of starting points: alpha, beta in {0, 0.5, ..., 2}, e in
{-1, -0.5, ..., 1}, a, b in {0, 5, ..., 25} (4,500 starts). The objective is evaluated at every
start at once and L-BFGS runs from the `starts` best of them (all of them when starts=0); the
best optimum is kept. Written here rather than taken from a library: none ships Hoffmann et
al.'s objective, and it is a few lines of numpy around scipy's L-BFGS-B.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np

HUBER_DELTA = 1e-3
GRID = {"alpha": np.arange(0.0, 2.01, 0.5), "beta": np.arange(0.0, 2.01, 0.5),
        "e": np.arange(-1.0, 1.01, 0.5), "a": np.arange(0.0, 25.1, 5.0),
        "b": np.arange(0.0, 25.1, 5.0)}
DEFAULT_STARTS = 48
# Hoffmann et al. 2022 (approach 3, their eq. 10) and Besiroglu et al. 2024's refit of the
# same data; losses in nats per token, N all parameters, D tokens.
HOFFMANN = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}
BESIROGLU = {"E": 1.82, "A": 482.0, "B": 2085.4, "alpha": 0.3478, "beta": 0.3658}
LAW_KEYS = ("E", "A", "B", "alpha", "beta")


def predict(law: dict[str, float], n: Any, d: Any) -> np.ndarray:
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return law["E"] + law["A"] / n ** law["alpha"] + law["B"] / d ** law["beta"]


def huber(r: np.ndarray, delta: float = HUBER_DELTA) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _huber_grad(r: np.ndarray, delta: float) -> np.ndarray:
    return np.clip(r, -delta, delta)


def _terms(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """[..., points, 3]: a - alpha log N, b - beta log D, e (theta [..., 5] = a b e alpha beta)."""
    a, b, e, alpha, beta = (theta[..., i:i + 1] for i in range(5))
    return np.stack([a - alpha * log_n, b - beta * log_d, e + 0 * log_n], axis=-1)


def objective(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray,
              delta: float = HUBER_DELTA) -> tuple[float, np.ndarray]:
    """The summed Huber loss of log L and its gradient in (a, b, e, alpha, beta)."""
    t = _terms(theta, log_n, log_d)
    top = t.max(axis=-1, keepdims=True)
    w = np.exp(t - top)
    s = w.sum(axis=-1)
    pred = top[..., 0] + np.log(s)
    r = pred - log_l
    g = _huber_grad(r, delta)[:, None] * (w / s[:, None])
    grad = np.array([g[:, 0].sum(), g[:, 1].sum(), g[:, 2].sum(),
                     -(g[:, 0] * log_n).sum(), -(g[:, 1] * log_d).sum()])
    return float(huber(r, delta).sum()), grad


def _grid_values(log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    starts = np.array(list(itertools.product(GRID["a"], GRID["b"], GRID["e"], GRID["alpha"],
                                             GRID["beta"])))
    t = _terms(starts, log_n[None], log_d[None])
    pred = np.logaddexp.reduce(t, axis=-1)
    return starts, huber(pred - log_l[None], delta).sum(axis=-1)


def fit(n: Any, d: Any, loss: Any, starts: int = DEFAULT_STARTS, delta: float = HUBER_DELTA,
        extra_starts: list[np.ndarray] | None = None) -> dict[str, Any]:
    """The law fitted to measured losses; {"E", "A", "B", "alpha", "beta", "objective", ...}."""
    from scipy.optimize import minimize

    log_n = np.log(np.asarray(n, np.float64))
    log_d = np.log(np.asarray(d, np.float64))
    log_l = np.log(np.asarray(loss, np.float64))
    if len(log_l) < 5:
        raise ValueError(f"L(N, D) has 5 parameters; {len(log_l)} members cannot fix them")
    grid, values = _grid_values(log_n, log_d, log_l, delta)
    order = np.argsort(values, kind="stable")
    chosen = grid[order] if starts <= 0 else grid[order[:starts]]
    candidates = list(chosen) + list(extra_starts or [])
    best = None
    for x0 in candidates:
        r = minimize(objective, x0, args=(log_n, log_d, log_l, delta), jac=True,
                     method="L-BFGS-B", options={"maxiter": 5000, "ftol": 1e-15,
                                                 "gtol": 1e-12})
        if best is None or r.fun < best.fun:
            best = r
    a, b, e, alpha, beta = (float(x) for x in best.x)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha,
            "beta": beta, "objective": float(best.fun), "theta": [a, b, e, alpha, beta],
            "n_points": int(len(log_l)), "starts": len(candidates)}


def allocation(law: dict[str, float], flops: Any) -> dict[str, Any]:
    """The compute-optimal N and D under C = 6 N D (Hoffmann et al.'s eq. 4):
    N_opt = G (C/6)^a, D_opt = (C/6)^b / G, a = beta / (alpha + beta), b = alpha / (alpha +
    beta), G = (alpha A / (beta B))^(1 / (alpha + beta))."""
    alpha, beta = law["alpha"], law["beta"]
    g = (alpha * law["A"] / (beta * law["B"])) ** (1.0 / (alpha + beta))
    a, b = beta / (alpha + beta), alpha / (alpha + beta)
    c6 = np.asarray(flops, np.float64) / 6.0
    n_opt = g * c6 ** a
    d_opt = c6 ** b / g
    return {"G": g, "a": a, "b": b, "n_opt": n_opt, "d_opt": d_opt,
            "loss": predict(law, n_opt, d_opt)}


def numeric_optimum(law: dict[str, float], flops: float) -> float:
    """argmin over N of L(N, C / (6 N)), by a bounded scalar search in log N."""
    from scipy.optimize import minimize_scalar

    def f(log_n: float) -> float:
        n = math.exp(log_n)
        return float(predict(law, n, flops / (6.0 * n)))

    hi = math.log(flops / 6.0)
    r = minimize_scalar(f, bounds=(0.0, hi), method="bounded",
                        options={"xatol": 1e-10, "maxiter": 2000})
    return math.exp(r.x)


def parse(text: str) -> dict[str, float]:
    """'E=1.69,A=406.4,B=410.7,alpha=0.34,beta=0.28' -> the law (every key once)."""
    out: dict[str, float] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in LAW_KEYS or key in out:
            raise ValueError(f"{part.strip()!r}")
        out[key] = float(value)
    missing = [k for k in LAW_KEYS if k not in out]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    if out["alpha"] <= 0 or out["beta"] <= 0 or out["A"] <= 0 or out["B"] <= 0:
        raise ValueError("A, B, alpha and beta must be > 0")
    return out
