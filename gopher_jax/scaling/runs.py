"""The finished members as the compute-optimal fits see them: parameters N (all of them, as
Hoffmann et al. count), tokens D, training FLOPs C, the final loss and the loss curve."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    n: float  # parameters, embeddings included
    d: float  # training tokens
    flops_per_token: float  # this project's training FLOPs per token (model/sizes.py)
    loss: float  # final held-out bits per byte
    budget: str = ""  # the grid budget it trained on ("" outside a grid)
    budget_flops: float = 0.0  # that budget's C (0 for a token budget)
    budget_tokens: float = 0.0  # that budget's D (0 for a FLOP budget)
    curve_flops: tuple[float, ...] = ()  # FLOPs spent at each point of the loss curve
    curve_loss: tuple[float, ...] = ()  # held-out bits per byte there (a fixed subset)

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.d


def from_results(results: dict[str, Any], split: str) -> list[Run]:
    """The members of results.json with status ok, measured on `split`."""
    out = []
    for m in results["members"]:
        if m.get("status") != "ok":
            continue
        curve = m.get("curve") or []
        kind, value = m.get("budget_kind"), float(m.get("budget_value") or 0.0)
        out.append(Run(
            name=m["member"], n=float(m["params_total"]), d=float(m["train_tokens"]),
            flops_per_token=float(m.get("flops_per_token")
                                  or m["train_flops"] / m["train_tokens"]),
            loss=float(m[split]["bits_per_byte"]), budget=m.get("budget") or "",
            budget_flops=value if kind == "flops" else 0.0,
            budget_tokens=value if kind == "tokens" else 0.0,
            curve_flops=tuple(float(p["flops"]) for p in curve),
            curve_loss=tuple(float(p["bits_per_byte"]) for p in curve)))
    return out


def flops_per_token_law(runs: list[Run]) -> tuple[float, float]:
    """(slope, intercept) of log FLOPs-per-token against log N over the runs: how this
    project's FLOP count grows with size (about 6-7 N here), for N between the members."""
    n = np.log([r.n for r in runs])
    f = np.log([r.flops_per_token for r in runs])
    if len(set(n.tolist())) < 2:
        return 1.0, float(np.mean(f - n))
    slope, icpt = np.polyfit(n, f, 1)
    return float(slope), float(icpt)


def tokens_for(flops: float, n: float, law: tuple[float, float]) -> float:
    """D = C / (FLOPs per token of a model of N parameters)."""
    slope, icpt = law
    return flops / float(np.exp(icpt + slope * np.log(n)))
