"""Scaling ladders: train models of several sizes on the same tokens, measure bits per byte on
held-out splits, fit L(N) = a * N^(-alpha) + c on non-embedding parameters, and plot it.

A ladder config is a full run config (shared model settings, data, train, mesh, seed) plus
`members` (name -> {"model": {...}, "train": {...}} overrides: shape and learning-rate schedule
only) and `scaling.eval_batches`. Each member trains in <workdir>/<name>/ and leaves a
`result.json` there; the ladder's results.{json,csv,md} are rebuilt from those files after
every run, so members run as separate processes or hosts (`--member i`) share one workdir.

The package:
  ladder.py    the ladder config: members in size order, each member's run config, sizes
  runner.py    `scaling run`: trains and evaluates the unfinished members
  results.py   the files in the workdir: result.json per member, results.{json,csv,md}
  powerlaw.py  the law L(N) = a N^-alpha + c: least-squares fit, leave-one-out prediction
  fitting.py   `scaling fit`: fits each split of results.json, writes fit.json and fit.png
  plot.py      the figure of the members and the fitted laws

The names below are re-exported for callers; code that replaces one of them (a test stand-in)
must patch the module that looks it up, e.g. `runner.evaluate_member`.
"""

from gopher_jax.scaling.fitting import fit
from gopher_jax.scaling.ladder import (
    MEMBER_KEYS,
    c_split,
    describe,
    member_config,
    member_names,
    resolve_member,
)
from gopher_jax.scaling.powerlaw import fit_power_law, fit_split, power_law, predict
from gopher_jax.scaling.results import (
    CSV_FIELDS,
    RESULT,
    is_finished,
    markdown_table,
    read_result,
    unigram_baseline,
    write_results,
)
from gopher_jax.scaling.runner import SPLIT_KEYS, evaluate_member, run, run_member

__all__ = [
    "CSV_FIELDS", "MEMBER_KEYS", "RESULT", "SPLIT_KEYS", "c_split", "describe",
    "evaluate_member", "fit", "fit_power_law", "fit_split", "is_finished", "markdown_table",
    "member_config", "member_names", "power_law", "predict", "read_result", "resolve_member",
    "run", "run_member", "unigram_baseline", "write_results",
]
