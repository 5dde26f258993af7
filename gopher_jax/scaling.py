"""Scaling ladders: train models of several sizes on the same tokens, measure bits per byte on
held-out splits, fit L(N) = a * N^(-alpha) + c on non-embedding parameters, and plot it.

A ladder config is a full run config (shared model settings, data, train, mesh, seed) plus
`members` (name -> {"model": {...}, "train": {...}} overrides: shape and learning-rate schedule
only) and `scaling.eval_batches`. Each member trains in <workdir>/<name>/ and leaves a
`result.json` there; the ladder's results.{json,csv,md} are rebuilt from those files after
every run, so members run as separate processes or hosts (`--member i`) share one workdir.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import pathlib
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from gopher_jax import config as config_lib

RESULT = "result.json"
SPLIT_KEYS = ("bits_per_byte", "loss", "tokens", "bytes")
# A member may change its shape and its learning-rate schedule, nothing that changes which
# tokens it sees.
MEMBER_KEYS = {
    "model": {"num_layers", "num_heads", "head_dim", "d_model", "mlp_ratio"},
    "train": {"learning_rate", "init_learning_rate", "warmup_steps", "lr_decay_factor",
              "grad_clip", "b1", "b2", "eps", "microbatches", "optimizer", "weight_decay"},
}


# ---------------------------------------------------------------------------- the ladder


def member_names(ladder: ml_collections.ConfigDict) -> list[str]:
    """Members from smallest to largest (non-embedding parameters, then name)."""
    if "members" not in ladder or not len(ladder.members):
        raise config_lib.ConfigError(
            "this config has no `members`: `scaling` needs a ladder config such as "
            "experiments/scaling_ladder.py.")
    return sorted(ladder.members.keys(), key=lambda n: (
        config_lib.param_counts(member_config(ladder, n).model)["non_embedding"], n))


def member_config(ladder: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The full run config of one member: the shared settings plus its overrides."""
    if name not in ladder.members:
        raise config_lib.ConfigError(f"no member {name!r} in the ladder; it has "
                                     f"{sorted(ladder.members.keys())}.")
    c = copy.deepcopy(ladder)
    c.unlock()  # config_flags hands over a locked ladder
    del c["members"]
    if "scaling" in c:
        del c["scaling"]
    for section, values in ladder.members[name].items():
        allowed = MEMBER_KEYS.get(section)
        if allowed is None:
            raise config_lib.ConfigError(
                f"member {name!r} overrides section {section!r}; members may only set "
                f"{sorted(MEMBER_KEYS)} so that all see the same tokens.")
        bad = sorted(set(values.keys()) - allowed)
        if bad:
            raise config_lib.ConfigError(
                f"member {name!r} sets {section}.{bad}; a member may only set {section}."
                f"{sorted(allowed)} (data, seed, steps and batch are shared by the ladder).")
        c[section].update(values.to_dict())
    c.name = f"{ladder.name}/{name}"
    return c


def resolve_member(ladder: ml_collections.ConfigDict, member: str) -> str:
    """`--member` as an index into the size order or as a name."""
    names = member_names(ladder)
    if member in names:
        return member
    try:
        i = int(member)
    except ValueError:
        i = None
    if i is None or not 0 <= i < len(names):
        raise config_lib.ConfigError(
            f"--member={member!r}: give an index 0..{len(names) - 1} (smallest first) or one "
            f"of {names}.")
    return names[i]


def describe(ladder: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """Sizes and compute of a member, from its config (nothing allocated)."""
    c = member_config(ladder, name)
    m, t = c.model, c.train
    counts = config_lib.param_counts(m)
    tokens = t.steps * t.batch_size * c.data.seq_len
    fl = config_lib.flops_per_token(m, c.data.seq_len)["train"]
    return {
        "member": name, "num_layers": m.num_layers, "d_model": m.d_model,
        "num_heads": m.num_heads, "head_dim": m.head_dim, "learning_rate": t.learning_rate,
        "params_non_embedding": counts["non_embedding"], "params_total": counts["total"],
        "train_tokens": tokens, "train_flops": fl * tokens, "steps": t.steps,
    }


# ---------------------------------------------------------------------------- running


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_result(workdir: str | pathlib.Path, name: str) -> dict[str, Any] | None:
    path = pathlib.Path(workdir) / name / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(ladder: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                name: str) -> bool:
    r = read_result(workdir, name)
    return r is not None and r["status"] == "ok" and r["step"] == ladder.train.steps


def run_member(ladder: ml_collections.ConfigDict, workdir: str | pathlib.Path, name: str,
               log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Trains (resuming) and evaluates one member; a failure is recorded, not raised."""
    from gopher_jax.train import loop

    mdir = pathlib.Path(workdir) / name
    mdir.mkdir(parents=True, exist_ok=True)
    entry = describe(ladder, name)
    c = member_config(ladder, name)
    t0 = time.perf_counter()
    stage = "train"
    try:
        summary = loop.train(c, mdir)
        entry["wall_s"] = time.perf_counter() - t0
        entry["start_step"] = summary["start_step"]
        train = summary.get("train", {})
        entry["train_loss"] = train.get("loss")
        entry["tokens_per_s"] = train.get("tokens_per_s")
        if summary["step"] < c.train.steps:  # preempted (SIGTERM): resume on the next run
            raise InterruptedError(f"stopped at step {summary['step']} of {c.train.steps}")
        stage = "eval"
        t1 = time.perf_counter()
        entry.update(evaluate_member(c, mdir, ladder.scaling.get("eval_batches", -1)))
        entry["eval_wall_s"] = time.perf_counter() - t1
        entry["status"] = "ok"
    except Exception as e:  # noqa: BLE001 - the ladder goes on; the error is recorded
        entry.update(status="failed", stage=stage, error=f"{type(e).__name__}: {e}",
                     wall_s=time.perf_counter() - t0)
        entry.setdefault("step", None)
        (mdir / "error.txt").write_text(traceback.format_exc())
        log(f"[scaling] {name} FAILED in {stage}: {entry['error']}")
    _write_atomic(mdir / RESULT, json.dumps(entry, indent=2))
    return entry


def evaluate_member(c: ml_collections.ConfigDict, mdir: pathlib.Path,
                    max_batches: int = -1) -> dict[str, Any]:
    """Bits per byte of the member's last checkpoint on the validation and test splits."""
    from gopher_jax import evaluate
    from gopher_jax.parallel import mesh as mesh_lib
    from gopher_jax.train import step as step_lib

    mesh = mesh_lib.make_mesh(c)
    params, step = evaluate.restore_params(c, mdir, mesh)
    eval_step = step_lib.make_eval_step(c, mesh)
    out: dict[str, Any] = {"step": step}
    for split in (c.data.eval_split, c.data.test_split):
        r = evaluate.evaluate_split(c, mesh, params, split, eval_step, max_batches)
        out[split] = {k: float(r[k]) for k in SPLIT_KEYS}
    return out


def unigram_baseline(ladder: ml_collections.ConfigDict, workdir: pathlib.Path
                     ) -> dict[str, float]:
    """The unigram model's bits per byte on the whole splits, the same for every member
    (same data); cached."""
    path = workdir / "unigram.json"
    if path.is_file():
        return json.loads(path.read_text())
    from gopher_jax import evaluate

    c = member_config(ladder, member_names(ladder)[0])
    out = {s: evaluate.unigram_bits_per_byte(c, s) for s in (c.data.eval_split,
                                                             c.data.test_split)}
    _write_atomic(path, json.dumps(out, indent=2))
    return out


def run(ladder: ml_collections.ConfigDict, workdir: str | pathlib.Path,
        member: str | None = None, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """Runs every unfinished member (or only `member`), then rewrites the results files.

    Returns {"trained": [...], "skipped": [...], "failed": [...], "results": <results.json>}.
    """
    from gopher_jax.data import pipeline

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = member_names(ladder)
    todo = [resolve_member(ladder, member)] if member not in (None, "") else names
    for n in names:  # a bad member is refused before anything trains
        config_lib.validate(member_config(ladder, n), _device_count())
    from gopher_jax.parallel import distributed

    first = member_config(ladder, names[0])
    distributed.run_on_process_zero_first(lambda: pipeline.prepare(first))
    _write_atomic(workdir / "ladder.json", ladder.to_json(indent=2))
    trained, skipped, failed = [], [], []
    for name in todo:
        d = describe(ladder, name)
        if is_finished(ladder, workdir, name):
            log(f"[scaling] {name}: finished earlier; skipped")
            skipped.append(name)
            continue
        log(f"[scaling] {name}: {d['params_non_embedding']:,} non-embedding params, "
            f"{d['train_tokens']:,} tokens, {d['train_flops']:.3g} FLOPs, "
            f"lr {d['learning_rate']:g}")
        entry = run_member(ladder, workdir, name, log)
        (failed if entry["status"] == "failed" else trained).append(name)
        if entry["status"] == "ok":
            bpb = ", ".join(f"{s} {entry[s]['bits_per_byte']:.4f}" for s in c_split(ladder))
            log(f"[scaling] {name}: bits/byte {bpb} ({entry['wall_s']:.0f}s train, "
                f"{entry['eval_wall_s']:.0f}s eval)")
    results = write_results(ladder, workdir)
    return {"trained": trained, "skipped": skipped, "failed": failed, "results": results}


def c_split(ladder: ml_collections.ConfigDict) -> tuple[str, str]:
    return ladder.data.eval_split, ladder.data.test_split


def _device_count() -> int:
    import jax

    return jax.device_count()


# ---------------------------------------------------------------------------- results files


def write_results(ladder: ml_collections.ConfigDict, workdir: str | pathlib.Path
                  ) -> dict[str, Any]:
    """results.json / .csv / .md from every member's result.json (pending ones included)."""
    workdir = pathlib.Path(workdir)
    eval_split, test_split = c_split(ladder)
    members = []
    for name in member_names(ladder):
        r = read_result(workdir, name)
        if r is None:
            r = dict(describe(ladder, name), status="pending")
        elif r["status"] == "ok" and r["step"] != ladder.train.steps:
            # Trained for another ladder length: not on the same tokens, so not in the fit.
            r["status"] = "stale"
            r["error"] = (f"trained {r['step']} steps, the ladder has {ladder.train.steps}; "
                          "train the ladder in a new --workdir")
        members.append(r)
    finished = [m for m in members if m["status"] == "ok"]
    try:
        unigram = unigram_baseline(ladder, workdir)
    except Exception as e:  # noqa: BLE001 - a baseline is not worth losing the results over
        unigram = {"error": f"{type(e).__name__}: {e}"}
    results = {
        "ladder": ladder.name, "splits": [eval_split, test_split],
        "steps": ladder.train.steps, "batch_size": ladder.train.batch_size,
        "seq_len": ladder.data.seq_len,
        "train_tokens": ladder.train.steps * ladder.train.batch_size * ladder.data.seq_len,
        "seed": ladder.seed, "dataset": ladder.data.dataset,
        "vocab_size": ladder.model.vocab_size,
        "total_train_flops": sum(m["train_flops"] for m in members),
        "total_wall_s": sum(m.get("wall_s", 0) + m.get("eval_wall_s", 0) for m in finished),
        "unigram_bits_per_byte": unigram,
        "members": members,
    }
    _write_atomic(workdir / "results.json", json.dumps(results, indent=2))
    _write_atomic(workdir / "results.csv", _csv(members, (eval_split, test_split)))
    _write_atomic(workdir / "results.md", markdown_table(results))
    return results


CSV_FIELDS = ("member", "status", "num_layers", "d_model", "num_heads", "head_dim",
              "learning_rate", "params_non_embedding", "params_total", "train_tokens",
              "train_flops", "step", "wall_s", "eval_wall_s", "error")


def _csv(members: list[dict[str, Any]], splits: tuple[str, str]) -> str:
    buf = io.StringIO()
    fields = [*CSV_FIELDS[:-1], *(f"{s}_bits_per_byte" for s in splits), "error"]
    w = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    w.writeheader()
    for m in members:
        row = dict(m)
        for s in splits:
            row[f"{s}_bits_per_byte"] = m[s]["bits_per_byte"] if s in m else ""
        w.writerow(row)
    return buf.getvalue()


def markdown_table(results: dict[str, Any]) -> str:
    from gopher_jax.report import human

    ev, te = results["splits"]
    lines = [
        f"Ladder `{results['ladder']}`: every member trained on the same "
        f"{results['train_tokens']:,} tokens ({results['steps']} steps x "
        f"{results['batch_size']} x {results['seq_len']}, seed {results['seed']}) of "
        f"{results['dataset']}, vocabulary {results['vocab_size']}.",
        "",
        f"| member | shape (layers x d_model) | lr | params non-emb | params total | train FLOPs "
        f"| {ev} bpb | {te} bpb | wall time | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for m in results["members"]:
        bpb = [f"{m[s]['bits_per_byte']:.4f}" if s in m else "" for s in (ev, te)]
        wall = ""
        if "wall_s" in m:
            wall = f"{m['wall_s'] + m.get('eval_wall_s', 0):.0f} s"
            if m.get("start_step"):
                wall += f" (resumed at step {m['start_step']})"
        status = m["status"]
        if status in ("failed", "stale"):
            status += f": {m['error']}".replace("|", "/").replace("\n", " ")[:200]
        lines.append(
            f"| {m['member']} | {m['num_layers']} x {m['d_model']} | {m['learning_rate']:g} "
            f"| {human(m['params_non_embedding'])} | {human(m['params_total'])} "
            f"| {m['train_flops']:.3g} | {bpb[0]} | {bpb[1]} | {wall} | {status} |")
    uni = results.get("unigram_bits_per_byte")
    if uni and "error" not in uni:
        lines += ["", f"Unigram baseline: {ev} {uni[ev]:.4f}, {te} {uni[te]:.4f} bits/byte."]
    lines += ["", f"Total train FLOPs {results['total_train_flops']:.3g}; wall time of the "
                  f"finished members {results['total_wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the fit


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


def fit(workdir: str | pathlib.Path, log: Callable[[str], None] = lambda msg: None) -> dict[str, Any]:
    """`scaling fit`: fits each split of results.json; writes fit.json and fit.png."""
    workdir = pathlib.Path(workdir)
    path = workdir / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"no {path}: run `python -m gopher_jax scaling run --config "
                                f"experiments/scaling_ladder.py --workdir {workdir}` first.")
    results = json.loads(path.read_text())
    ok = [m for m in results["members"] if m["status"] == "ok"]
    if len(ok) < 3:
        raise ValueError(f"{len(ok)} finished member(s) in {path}; the fit needs at least 3. "
                         "Run the remaining members with `scaling run` first.")
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
    _write_atomic(workdir / "fit.json", json.dumps(out, indent=2))
    plot(results, out, workdir / "fit.png")
    log(f"[scaling] wrote {workdir / 'fit.json'} and {workdir / 'fit.png'}")
    return out


def plot(results: dict[str, Any], fits: dict[str, Any], path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    ok = [m for m in results["members"] if m["status"] == "ok"]
    n = np.array([m["params_non_embedding"] for m in ok], np.float64)
    splits = results["splits"]
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4.2), squeeze=False)
    grid = np.geomspace(n.min() / 1.5, n.max() * 1.5, 200)
    for ax, split in zip(axes[0], splits, strict=True):
        y = np.array([m[split]["bits_per_byte"] for m in ok])
        ax.scatter(n, y, color="C0", zorder=3, label="members")
        for m, xi, yi in zip(ok, n, y, strict=True):
            ax.annotate(m["member"], (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        f = fits["splits"].get(split, {})
        if "alpha" in f:
            ax.plot(grid, predict(f, grid), color="C1",
                    label=f"{f['a']:.3g} N^-{f['alpha']:.3f} + {f['c']:.3f}")
            loo = f["loo_largest"]
            if "predicted" in loo:
                ax.plot(grid, predict(loo["fit_without_largest"], grid), color="C2",
                        linestyle="--", label="fit without the largest")
                ax.scatter([loo["params_non_embedding"]], [loo["predicted"]], marker="x",
                           color="C2", zorder=4,
                           label=f"predicted largest ({loo['relative_error']:+.1%})")
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%.2f"))  # a narrow log range: plain numbers read better
        ax.set_xlabel("non-embedding parameters")
        ax.set_ylabel(f"{split} bits per byte")
        ax.set_title(f"{results['ladder']}: {split}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
