"""Bootstrap intervals over members: each replicate redraws whole training runs (with
replacement, within each budget when there are budgets), never single points, so that
whatever a run shares across its points (its seed, its learning rate, its data order) moves
together. No files."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")
DEFAULT_REPLICATES = 200
LEVEL = 0.9  # two-sided: the 5th and the 95th percentile


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """BLAS on one thread: L-BFGS-B's tiny matrix products run ~100x slower when OpenBLAS
    spreads them over busy cores."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        yield


def resample(members: Sequence[T], rng: np.random.Generator,
             strata: Sequence[Any] | None = None) -> list[T]:
    """A bootstrap draw of whole members (within each stratum: as many as it holds)."""
    if strata is None:
        idx = rng.integers(0, len(members), len(members))
        return [members[i] for i in idx]
    out: list[T] = []
    for s in dict.fromkeys(strata):
        pool = [m for m, k in zip(members, strata, strict=True) if k == s]
        out += [pool[i] for i in rng.integers(0, len(pool), len(pool))]
    return out


def replicates(members: Sequence[T], fit: Callable[[list[T]], dict[str, float]],
               n: int = DEFAULT_REPLICATES, seed: int = 0,
               strata: Sequence[Any] | None = None) -> tuple[dict[str, list[float]], int]:
    """`fit` on `n` redraws of the members: {key: values over the replicates whose fit
    succeeded} and how many failed (a draw too thin to fit raises ValueError)."""
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    failed = 0
    for _ in range(n):
        draw = resample(members, rng, strata)
        try:
            out = fit(draw)
        except (ValueError, RuntimeError, ArithmeticError, np.linalg.LinAlgError):
            failed += 1
            continue
        for k, v in out.items():
            values.setdefault(k, []).append(float(v))
    return values, failed


def interval(values: Sequence[float], level: float = LEVEL) -> list[float] | None:
    """The percentile interval [lo, hi] of the finite values (None without any)."""
    x = np.asarray([v for v in values if math.isfinite(v)], np.float64)
    if not len(x):
        return None
    tail = 100.0 * (1.0 - level) / 2.0
    return [float(np.percentile(x, tail)), float(np.percentile(x, 100.0 - tail))]


def intervals(point: dict[str, float], values: dict[str, list[float]], failed: int,
              level: float = LEVEL) -> dict[str, Any]:
    """The point estimates with their intervals: {key: {"value", "interval"}, ...}."""
    out: dict[str, Any] = {k: {"value": float(v), "interval": interval(values.get(k, []), level)}
                           for k, v in point.items()}
    out["bootstrap"] = {"replicates": len(next(iter(values.values()), [])), "failed": failed,
                        "level": level, "resampled": "members"}
    return out
