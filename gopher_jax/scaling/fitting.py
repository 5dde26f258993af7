"""`scaling fit`: reads a ladder's results.json, fits the power law to each held-out split of
the finished members, and writes fit.json and fit.png beside it."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.errors import UserError
from gopher_jax.scaling.plot import plot
from gopher_jax.scaling.powerlaw import fit_split, require_members


def _quiet(msg: str) -> None:
    """The default `log`: progress goes nowhere."""


def fit(workdir: str | os.PathLike, log: Callable[[str], None] = _quiet,
        replicates: int = 200) -> dict[str, Any]:
    """`scaling fit`: fits each split of results.json; writes fit.json and fit.png (a grid
    ladder: optimal.json and its figures, grid_fit.py, with `replicates` bootstrap draws)."""
    workdir = storage.path(workdir)
    path = workdir / workdir_lib.RESULTS_JSON
    if not path.is_file():
        raise UserError(f"no {path}", "run `python -m gopher_jax scaling run --config "
                        f"experiments/scaling_ladder.py --workdir {workdir}` first")
    results = json.loads(path.read_text())
    if results.get("grid"):
        from gopher_jax.scaling import grid_fit

        return grid_fit.fit(workdir, results, log, replicates)
    ok = [m for m in results["members"] if m["status"] == "ok"]
    require_members(len(ok), path)
    n = np.array([m["params_non_embedding"] for m in ok], np.float64)
    out: dict[str, Any] = {"ladder": results["ladder"], "model": "L(N) = a * N^(-alpha) + c",
                           "N": "non-embedding parameters", "unit": "bits per byte",
                           "members": [m["member"] for m in ok], "splits": {}}
    for split in results["splits"]:
        y = np.array([m[split]["bits_per_byte"] for m in ok], np.float64)
        try:
            out["splits"][split] = f = fit_split(n, y)
        except (RuntimeError, ValueError) as e:
            out["splits"][split] = {"error": f"{type(e).__name__}: {e}"}
            log(f"[scaling] {split}: fit failed: {e}")
            continue
        loo = f["loo_largest"]
        loo_s = (f"leave-one-out largest: predicted {loo['predicted']:.4f}, actual "
                 f"{loo['actual']:.4f}, error {loo['error']:+.4f} "
                 f"({loo['relative_error']:+.2%})" if "predicted" in loo
                 else f"leave-one-out: {loo['error']}")
        log(f"[scaling] {split}: alpha {f['alpha']:.4f}, a {f['a']:.4g}, c {f['c']:.4f} "
            f"bits/byte, RMSE {f['rmse']:.4f}; monotonic {f['monotonic']}; {loo_s}")
    storage.write_atomic(workdir / workdir_lib.FIT_JSON, json.dumps(out, indent=2))
    plot(results, out, workdir / "fit.png")
    log(f"[scaling] wrote {workdir / 'fit.json'} and {workdir / 'fit.png'}")
    return out
