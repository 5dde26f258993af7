"""The ladder's files in its workdir: each member's result.json, the cached unigram baseline,
and results.{json,csv,md} rebuilt from the members' files (pending ones included)."""

from __future__ import annotations

import csv
import io
import json
import os
from typing import Any

import ml_collections
from etils import epath

from gopher_jax import storage
from gopher_jax import workdir as workdir_lib
from gopher_jax.scaling import grid
from gopher_jax.scaling.ladder import c_split, describe, member_config, member_names

RESULT = "result.json"
CSV_FIELDS = ("member", "status", "num_layers", "d_model", "num_heads", "head_dim",
              "learning_rate", "params_non_embedding", "params_total", "train_tokens",
              "train_flops", "step", "wall_s", "eval_wall_s", "error")


def read_result(workdir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    path = storage.path(workdir) / name / RESULT
    return json.loads(path.read_text()) if path.is_file() else None


def is_finished(ladder: ml_collections.ConfigDict, workdir: str | os.PathLike,
                name: str) -> bool:
    r = read_result(workdir, name)
    return r is not None and r["status"] == "ok" and r["step"] == _steps(ladder, name)


def _steps(ladder: ml_collections.ConfigDict, name: str) -> int:
    """The member's own steps (a grid member's budget sets them; else the ladder's)."""
    return member_config(ladder, name).train.steps


def unigram_baseline(ladder: ml_collections.ConfigDict, workdir: epath.Path
                     ) -> dict[str, float]:
    """The unigram model's bits per byte on the whole splits, the same for every member
    (same data); cached."""
    path = workdir / workdir_lib.UNIGRAM_JSON
    if path.is_file():
        return json.loads(path.read_text())
    from gopher_jax import evaluate

    c = member_config(ladder, member_names(ladder)[0])
    out = {s: evaluate.unigram_bits_per_byte(c, s) for s in (c.data.eval_split,
                                                             c.data.test_split)}
    storage.write_atomic(path, json.dumps(out, indent=2))
    return out


def write_results(ladder: ml_collections.ConfigDict, workdir: str | os.PathLike
                  ) -> dict[str, Any]:
    """results.json / .csv / .md from every member's result.json (pending ones included)."""
    workdir = storage.path(workdir)
    eval_split, test_split = c_split(ladder)
    members = []
    for name in member_names(ladder):
        r = read_result(workdir, name)
        if r is None:
            r = dict(describe(ladder, name), status="pending")
        elif r["status"] == "ok" and r["step"] != _steps(ladder, name):
            # Trained for another ladder length: not on the same tokens, so not in the fit.
            r["status"] = "stale"
            r["error"] = (f"trained {r['step']} steps, the ladder has {_steps(ladder, name)}; "
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
        "grid": grid.is_grid(ladder),
        "members": members,
    }
    storage.write_atomic(workdir / workdir_lib.RESULTS_JSON, json.dumps(results, indent=2))
    storage.write_atomic(workdir / "results.csv", _csv(members, (eval_split, test_split)))
    storage.write_atomic(workdir / workdir_lib.RESULTS_MD, markdown_table(results))
    return results


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
    from gopher_jax.model.sizes import human

    ev, te = results["splits"]
    if results.get("grid"):
        head = (f"Ladder `{results['ladder']}`: sizes x budgets, every member reading a prefix "
                f"of the same token stream ({results['batch_size']} x {results['seq_len']} "
                f"tokens per step, seed {results['seed']}) of {results['dataset']}, "
                f"vocabulary {results['vocab_size']}.")
    else:
        head = (f"Ladder `{results['ladder']}`: every member trained on the same "
                f"{results['train_tokens']:,} tokens ({results['steps']} steps x "
                f"{results['batch_size']} x {results['seq_len']}, seed {results['seed']}) of "
                f"{results['dataset']}, vocabulary {results['vocab_size']}.")
    lines = [
        head, "",
        f"| member | shape (layers x d_model) | lr | params non-emb | params total | tokens "
        f"| train FLOPs | {ev} bpb | {te} bpb | wall time | status |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
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
            f"| {human(m['train_tokens'])} | {m['train_flops']:.3g} | {bpb[0]} | {bpb[1]} "
            f"| {wall} | {status} |")
    uni = results.get("unigram_bits_per_byte")
    if uni and "error" not in uni:
        lines += ["", f"Unigram baseline: {ev} {uni[ev]:.4f}, {te} {uni[te]:.4f} bits/byte."]
    lines += ["", f"Total train FLOPs {results['total_train_flops']:.3g}; wall time of the "
                  f"finished members {results['total_wall_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"
