"""`scaling tasks`: every finished member of a ladder scored on a task suite, and which tasks
and groups gain from scale (the paper's per-task figure, on our ladder).

Each member's scores go to <workdir>/<member>/tasks.json (what `tasks --workdir <member>`
writes) plus <member>/tasks_suite.json, the suite's fingerprint and the step scored. A member
whose fingerprint and step match is not scored again, so the step resumes like `scaling run`.
The ladder's tasks_scaling.{json,md,png} are rebuilt from the members' files every time.

Gain is the largest member's score minus the smallest's, signed so that positive is better
(bits per byte fall as models improve). Its standard error comes from the binomial error of
each accuracy, sqrt(p (1 - p) / n); a task "gains" only when the gain exceeds twice that.
The trend is the least-squares slope of the score against log10(parameters) over every
scored member, in score units per tenfold increase in size, signed like the gain. Tasks scored
in bits per byte have no chance level (their baseline is a unigram model: `eval`).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.scaling.ladder import describe, member_config, member_names
from gopher_jax.scaling.results import is_finished, read_result
from gopher_jax.tasks.records import TaskResults
from gopher_jax.tasks.spec import LOWER_IS_BETTER, Task

SUITE_FILE = "tasks_suite.json"
TASKS_FILE = workdir_lib.TASKS_JSON
OUT = "tasks_scaling"
BINOMIAL_METRICS = frozenset({"acc", "acc_norm", "exact_match"})

Scorer = Callable[[ml_collections.ConfigDict, epath.Path, Sequence[Task]], TaskResults]


def _quiet(msg: str) -> None:
    """The default `log`: progress goes nowhere."""


def suite_fingerprint(tasks: Sequence[Task], options: dict[str, Any]) -> str:
    """sha256 of the tasks (every example, template and setting) and the scoring options."""
    blob = json.dumps({"tasks": [t.to_json() for t in tasks], "options": options},
                      sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _scored(mdir: epath.Path, fingerprint: str, step: int) -> bool:
    marker = mdir / SUITE_FILE
    if not (marker.is_file() and (mdir / TASKS_FILE).is_file()):
        return False
    m = json.loads(marker.read_text())
    return m.get("fingerprint") == fingerprint and m.get("step") == step


def run(ladder: ml_collections.ConfigDict, workdir: str | os.PathLike, tasks: Sequence[Task],
        score: Scorer, options: dict[str, Any] | None = None,
        log: Callable[[str], None] = _quiet) -> dict[str, Any]:
    """Scores every finished member not yet scored on this suite, then rewrites the ladder's
    tasks_scaling files. `score(member_config, member_dir, tasks)` writes the member's
    tasks.json and returns its results (tasks.run.run with the options bound).

    Returns {"scored": [...], "skipped": [...], "pending": [...], "results": ...}.
    """
    workdir = storage.path(workdir)
    fingerprint = suite_fingerprint(tasks, options or {})
    scored, skipped, pending = [], [], []
    for name in member_names(ladder):
        if not is_finished(ladder, workdir, name):
            pending.append(name)
            log(f"[scaling tasks] {name}: not trained to the end yet; skipped (`scaling run`)")
            continue
        mdir = workdir / name
        step = read_result(workdir, name)["step"]
        if _scored(mdir, fingerprint, step):
            skipped.append(name)
            log(f"[scaling tasks] {name}: scored earlier on this suite; skipped")
            continue
        results = score(member_config(ladder, name), mdir, tasks)
        if results.step != step:
            raise RuntimeError(f"{name}: scored step {results.step}, trained {step}")
        storage.write_atomic(mdir / SUITE_FILE, json.dumps(
            {"fingerprint": fingerprint, "step": step, "options": options or {}}, indent=2))
        scored.append(name)
        mains = ", ".join(f"{n} {t.main:.3f}" for n, t in results.tasks.items())
        log(f"[scaling tasks] {name}: {mains}")
    results = collect(ladder, workdir, fingerprint)
    write(results, workdir)
    return {"scored": scored, "skipped": skipped, "pending": pending, "results": results}


def _stderr(metric: str, value: float, n: int) -> float | None:
    if metric not in BINOMIAL_METRICS or n <= 0:
        return None
    return math.sqrt(max(value * (1.0 - value), 0.0) / n)


def _sign(metric: str) -> float:
    return -1.0 if metric in LOWER_IS_BETTER else 1.0


def _trend(metric: str, params: Sequence[float], scores: Sequence[float]) -> float | None:
    """Least-squares slope of score against log10(params), positive is better."""
    if len(params) < 2:
        return None
    return _sign(metric) * float(np.polyfit(np.log10(np.asarray(params, np.float64)),
                                            np.asarray(scores, np.float64), 1)[0])


def _gain(metric: str, scores: Sequence[float], errors: Sequence[float | None]
          ) -> dict[str, Any]:
    sign = _sign(metric)
    if len(scores) < 2:
        return {"gain": None, "gain_stderr": None, "gains": None}
    gain = sign * (scores[-1] - scores[0])
    se = None
    if errors[0] is not None and errors[-1] is not None:
        se = math.sqrt(errors[0] ** 2 + errors[-1] ** 2)
    return {"gain": gain, "gain_stderr": se,
            "gains": None if se is None else bool(gain > 2 * se)}


def collect(ladder: ml_collections.ConfigDict, workdir: epath.Path,
            fingerprint: str) -> dict[str, Any]:
    """Per task and per group: the main metric of every member scored on this suite (smallest
    first), its standard error, chance, the gain smallest -> largest and the trend."""
    members = []
    for name in member_names(ladder):
        mdir = workdir / name
        marker = mdir / SUITE_FILE
        if not marker.is_file() or json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            continue
        d = describe(ladder, name)
        members.append({"member": name, "params_non_embedding": d["params_non_embedding"],
                        "params_total": d["params_total"],
                        "results": json.loads((mdir / TASKS_FILE).read_text())})
    params = [m["params_non_embedding"] for m in members]
    tasks: dict[str, Any] = {}
    for m in members:
        for name, t in m["results"]["tasks"].items():
            entry = tasks.setdefault(name, {k: t[k] for k in ("group", "kind", "n", "chance",
                                                               "main_metric")})
            metric = t["main_metric"]
            value = float(t["metrics"][metric])
            entry.setdefault("scores", []).append(value)
            entry.setdefault("stderr", []).append(_stderr(metric, value, t["n"]))
    for entry in tasks.values():
        entry.update(_gain(entry["main_metric"], entry["scores"], entry["stderr"]))
        entry["trend_per_decade"] = _trend(entry["main_metric"], params, entry["scores"])
    groups: dict[str, Any] = {}
    for name, entry in tasks.items():
        g = groups.setdefault(entry["group"], {"tasks": [], "metrics": set()})
        g["tasks"].append(name)
        g["metrics"].add(entry["main_metric"])
    for g in groups.values():
        metric = sorted(g.pop("metrics"))
        # A group mixing "higher is better" with "lower is better" metrics has no mean.
        mixed = len({x in LOWER_IS_BETTER for x in metric}) > 1
        g["main_metric"] = "/".join(metric)
        if mixed:
            g.update(scores=None, stderr=None, gain=None, gain_stderr=None, gains=None,
                     trend_per_decade=None, chance=None)
            continue
        per_task = np.array([tasks[t]["scores"] for t in g["tasks"]], np.float64)
        g["scores"] = per_task.mean(axis=0).tolist()
        g["chance"] = float(np.mean([tasks[t]["chance"] for t in g["tasks"]]))
        errs = [tasks[t]["stderr"] for t in g["tasks"]]
        if all(e is not None for row in errs for e in row):
            g["stderr"] = (np.sqrt((np.array(errs) ** 2).sum(axis=0)) / len(errs)).tolist()
        else:
            g["stderr"] = [None] * len(members)
        g.update(_gain(metric[0], g["scores"], g["stderr"]))
        g["trend_per_decade"] = _trend(metric[0], params, g["scores"])
    return {
        "ladder": ladder.name, "suite_fingerprint": fingerprint,
        "members": [{k: m[k] for k in ("member", "params_non_embedding", "params_total")}
                    | {"step": m["results"]["step"]} for m in members],
        "tasks": tasks, "groups": groups,
    }


def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def markdown(results: dict[str, Any]) -> str:
    members = results["members"]
    if not members:
        return "No member of the ladder has been scored on this suite yet.\n"
    from gopher_jax.model.sizes import human

    head = " | ".join(f"{m['member']} ({human(m['params_non_embedding'])})" for m in members)
    cols = "|".join(["---"] * 3 + ["---:"] * (len(members) + 4))
    lines = [f"Ladder `{results['ladder']}`, suite {results['suite_fingerprint']}: the main "
             "metric of each task per member (non-embedding parameters), smallest first. "
             "Gain = largest - smallest and trend = slope per tenfold size, both signed so "
             "that positive is better; +- one standard error.", "",
             f"| task | group | metric | {head} | chance | gain | trend / decade | gains? |",
             f"|{cols}|"]

    def row(name: str, e: dict[str, Any], group: str) -> str:
        if e["scores"] is None:
            return f"| {name} | {group} | {e['main_metric']} | " + " | ".join(
                ["n/a"] * len(members)) + " | n/a | n/a | n/a | mixed metrics |"
        scores = " | ".join(_fmt(s) for s in e["scores"])
        gain = _fmt(e["gain"], signed=True)
        if e["gain_stderr"] is not None:
            gain += f" +- {e['gain_stderr']:.3f}"
        verdict = {True: "yes", False: "no", None: "n/a"}[e["gains"]]
        chance = "n/a" if e["chance"] is None or e["main_metric"] in LOWER_IS_BETTER \
            else _fmt(e["chance"])
        return (f"| {name} | {group} | {e['main_metric']} | {scores} | {chance} | {gain} | "
                f"{_fmt(e['trend_per_decade'], signed=True)} | {verdict} |")

    for name, e in results["tasks"].items():
        lines.append(row(name, e, e["group"]))
    lines += ["", f"| group | tasks | metric | {head} | chance | gain | trend / decade | "
                  "gains? |", f"|{cols}|"]
    for name, g in results["groups"].items():
        lines.append(row(name, g, str(len(g["tasks"]))))
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: epath.Path) -> None:
    """One panel per group and per task: score against parameters, +- one standard error,
    chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = np.array([m["params_non_embedding"] for m in results["members"]], np.float64)
    panels = [(f"group: {n}", g) for n, g in results["groups"].items() if g["scores"]]
    panels += [(n, t) for n, t in results["tasks"].items()]
    cols = min(4, max(1, len(panels)))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, e) in zip(axes.flat, panels, strict=False):
        y = np.array(e["scores"], np.float64)
        err = [0.0 if s is None else s for s in e["stderr"]]
        ax.errorbar(params, y, yerr=err, marker="o", capsize=3, color="C0")
        if e.get("chance") is not None and e["main_metric"] not in LOWER_IS_BETTER:
            ax.axhline(e["chance"], color="C3", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_xscale("log")
        gain = "" if e["gain"] is None else f" (gain {e['gain']:+.3f})"
        ax.set_title(f"{title}{gain}", fontsize=8)
        ax.set_xlabel("non-embedding parameters", fontsize=7)
        ax.set_ylabel(e["main_metric"], fontsize=7)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(f"{results['ladder']}: task scores against model size", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    path.write_bytes(buf.getvalue())
    plt.close(fig)


def write(results: dict[str, Any], workdir: epath.Path) -> None:
    storage.write_atomic(workdir / f"{OUT}.json", json.dumps(results, indent=2))
    storage.write_atomic(workdir / f"{OUT}.md", markdown(results))
    if results["members"]:
        plot(results, workdir / f"{OUT}.png")
