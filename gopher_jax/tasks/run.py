"""Score a trained workdir's newest checkpoint on tasks: <workdir>/tasks.json and tasks.md."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from gopher_jax import storage
from gopher_jax.tasks import scoring
from gopher_jax.tasks.score import MAIN_METRIC, score
from gopher_jax.tasks.spec import Task


def model_logits_fn(c: ml_collections.ConfigDict, params: Any) -> scoring.LogitsFn:
    from gopher_jax.model import gopher

    graphdef, _ = gopher.abstract(c.model)
    forward = jax.jit(lambda p, tokens: gopher.apply(graphdef, p, tokens).astype(np.float32))
    return lambda tokens: np.asarray(forward(params, tokens))


def summarize(tasks: Sequence[Task], scored: Sequence[dict[str, Any]], step: int
              ) -> dict[str, Any]:
    """Per task: metrics, n, chance, group, main metric; per group: mean of the main metric."""
    out: dict[str, Any] = {"step": step, "tasks": {}, "groups": {}}
    for task, s in zip(tasks, scored, strict=True):
        main = MAIN_METRIC[task.kind]
        out["tasks"][task.name] = {"group": task.group, "kind": task.kind,
                                   "n": len(task.examples), "chance": task.chance,
                                   "main_metric": main, "metrics": s["metrics"]}
        out["groups"].setdefault(task.group, []).append(s["metrics"][main])
    out["groups"] = {g: {"mean": float(np.mean(v)), "tasks": len(v)}
                     for g, v in out["groups"].items()}
    return out


def markdown(results: dict[str, Any]) -> str:
    rows = ["| task | group | kind | n | metrics | chance |", "|---|---|---|---:|---|---:|"]
    for name, t in results["tasks"].items():
        values = ", ".join(f"{k} {v:.3f}" for k, v in t["metrics"].items())
        rows.append(f"| {name} | {t['group']} | {t['kind']} | {t['n']} | {values} | "
                    f"{t['chance']:.3f} |")
    rows += ["", "| group | tasks | mean of main metric |", "|---|---:|---:|"]
    rows += [f"| {g} | {v['tasks']} | {v['mean']:.3f} |" for g, v in results["groups"].items()]
    return "\n".join(rows) + "\n"


def run(c: ml_collections.ConfigDict, workdir: str | os.PathLike, tasks: Sequence[Task],
        batch_size: int = 8, max_new_tokens: int = 32) -> dict[str, Any]:
    """The tasks scored with the workdir's newest checkpoint; written to <workdir>/tasks.json
    and tasks.md, and returned with "markdown" added."""
    from gopher_jax.data import pipeline
    from gopher_jax.evaluate import restore_params
    from gopher_jax.parallel import mesh as mesh_lib

    params, step = restore_params(c, workdir, mesh_lib.make_mesh(c))
    logits_fn = model_logits_fn(c, jax.device_get(params))
    tok = pipeline.load_tokenizer(c)
    scored = [score(t, tok, logits_fn, c.data.seq_len, batch_size, max_new_tokens)
              for t in tasks]
    results = summarize(tasks, scored, step)
    table = markdown(results)
    out = storage.path(workdir)
    (out / "tasks.json").write_text(json.dumps(results, indent=2))
    (out / "tasks.md").write_text(table)
    return {**results, "markdown": table}
