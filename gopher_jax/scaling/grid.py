"""Two-dimensional ladders: sizes x budgets expanded into members.

A grid ladder declares `scaling.sizes` (name -> {"model": {...}, "train": {...}}: a shape and
its learning rate, as a member of a one-dimensional ladder does) and `scaling.budgets`
(name -> {"flops": C} or {"tokens": D}, with an optional "sizes": "a,b,c" naming which sizes
train on it; default all). A FLOP budget C trains size N on D = C / (FLOPs per token of N)
tokens, with this project's own count (model/sizes.py), not 6N; a token budget trains every
named size on D tokens. Every member reads a prefix of the same token stream: the data order
is a function of (seed, step) only and the batch and sequence length are the ladder's, so a
member's steps (D / tokens per step, rounded) decide how much of the stream it reads.

Each member's learning-rate schedule spans its own steps (warmup `scaling.warmup_fraction`
of them, then the cosine to the end), as Hoffmann et al. matched the cosine to the horizon,
and it is evaluated `scaling.curve_points` times along the way (train.eval_batches of the
validation split) for the loss-vs-FLOPs envelope.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from gopher_jax.errors import ConfigError
from gopher_jax.model import sizes

SEP = "-"  # member name: <size>-<budget>
TRAIN_KEYS = {"steps", "warmup_steps", "eval_every"}  # set by the grid, per member
DEFAULT_WARMUP_FRACTION = 0.1
DEFAULT_CURVE_POINTS = 8


def is_grid(ladder: ml_collections.ConfigDict) -> bool:
    return "scaling" in ladder and "budgets" in ladder.scaling


def _size_names(ladder: ml_collections.ConfigDict, budget: str, spec: Any) -> list[str]:
    known = list(ladder.scaling.sizes.keys())
    given = spec.get("sizes", "") if hasattr(spec, "get") else ""
    if not given:
        return known
    names = [s.strip() for s in str(given).split(",") if s.strip()]
    bad = [s for s in names if s not in known]
    if bad:
        raise ConfigError(f"scaling.budgets.{budget}.sizes names {bad}, not in scaling.sizes",
                          f"choose from {known}")
    return names


def _budget(name: str, spec: Any) -> tuple[str, float]:
    keys = set(spec.keys()) - {"sizes"} if hasattr(spec, "keys") else set()
    if keys not in ({"flops"}, {"tokens"}):
        raise ConfigError(f"scaling.budgets.{name} = {spec!r} must set exactly one of "
                          "'flops' or 'tokens' (and optionally 'sizes')",
                          "e.g. {'flops': 1e12} or {'tokens': 2e6}")
    kind = keys.pop()
    value = float(spec[kind])
    if not value > 0:
        raise ConfigError(f"scaling.budgets.{name}.{kind} = {value} must be > 0",
                          "give a positive budget")
    return kind, value


def members(ladder: ml_collections.ConfigDict) -> tuple[dict[str, dict], dict[str, dict]]:
    """({member: overrides}, {member: {"size", "budget", "budget_kind", "budget_value"}})."""
    s = ladder.scaling
    if "members" in ladder and len(ladder.members):
        raise ConfigError("the ladder sets both `members` and `scaling.budgets`",
                          "declare members one by one or as sizes x budgets, not both")
    if "sizes" not in s or not len(s.sizes):
        raise ConfigError("scaling.budgets needs scaling.sizes (name -> model shape)",
                          "see experiments/isoflop_ladder.py")
    if not len(s.budgets):
        raise ConfigError("scaling.budgets is empty", "declare at least one budget")
    frac = float(s.get("warmup_fraction", DEFAULT_WARMUP_FRACTION))
    points = int(s.get("curve_points", DEFAULT_CURVE_POINTS))
    tokens_per_step = ladder.train.batch_size * ladder.data.seq_len
    out: dict[str, dict] = {}
    meta: dict[str, dict] = {}
    for budget, spec in s.budgets.items():
        kind, value = _budget(budget, spec)
        for size in _size_names(ladder, budget, spec):
            over = s.sizes[size].to_dict() if hasattr(s.sizes[size], "to_dict") \
                else dict(s.sizes[size])
            model = ladder.model.to_dict() | over.get("model", {})
            if kind == "flops":
                fpt = sizes.flops_per_token(ml_collections.ConfigDict(model),
                                            ladder.data.seq_len)["train"]
                tokens = value / fpt
            else:
                tokens = value
            steps = max(1, round(tokens / tokens_per_step))
            if steps < 4:
                raise ConfigError(
                    f"size {size} on budget {budget} gets {steps} step(s) of "
                    f"{tokens_per_step} tokens", "raise the budget or lower train.batch_size")
            train = dict(over.get("train", {}))
            train.update(steps=steps, warmup_steps=max(1, round(frac * steps)),
                         eval_every=max(1, steps // points) if points > 0 else 0)
            name = f"{size}{SEP}{budget}"
            out[name] = {"model": over.get("model", {}), "train": train}
            meta[name] = {"size": size, "budget": budget, "budget_kind": kind,
                          "budget_value": value}
    return out, meta
