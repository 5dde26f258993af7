"""Per-task scaling over a ladder: scores per member, gain smallest -> largest with its
standard error, trend per decade of parameters, groups, resume, and the CLI step."""

import json
import math
import os

import numpy as np
import pytest
from helpers import run_cli
from test_scaling import mini_ladder

from gopher_jax import scaling
from gopher_jax.scaling import task_scaling
from gopher_jax.tasks.records import TaskResult, TaskResults
from gopher_jax.tasks.spec import Example, Task

N = 100  # examples per stand-in task


def _tasks(n: int = N) -> list[Task]:
    ex = Example(context="a", choices=(" b", " c"), answer=0)
    return [Task(name="grows", group="reading", kind="multiple_choice", examples=(ex,) * n,
                 chance=0.5),
            Task(name="flat", group="reading", kind="multiple_choice", examples=(ex,) * n,
                 chance=0.5),
            Task(name="prose", group="language_modelling", kind="multiple_choice",
                 examples=(ex,) * n)]


# Per member, smallest first: the stand-in scorer's main metrics.
GROWS = [0.5, 0.6, 0.9]
FLAT = [0.55, 0.5, 0.6]
BPB = [3.0, 2.6, 2.1]


def _finish(ladder, wd, names):
    for name in names:
        (wd / name).mkdir(parents=True, exist_ok=True)
        (wd / name / scaling.RESULT).write_text(json.dumps(
            {"status": "ok", "step": ladder.train.steps, "member": name}))


def _stand_in(names, calls):
    def score(c, mdir, tasks):
        i = names.index(mdir.name)
        calls.append(mdir.name)
        metrics = {"grows": ("acc", GROWS[i]), "flat": ("acc", FLAT[i]),
                   "prose": ("bits_per_byte", BPB[i])}
        results = {}
        for t in tasks:
            metric, value = metrics[t.name]
            results[t.name] = TaskResult(group=t.group, kind=t.kind, n=len(t.examples),
                                         chance=t.chance, main_metric=metric,
                                         metrics={metric: value})
        out = TaskResults(step=c.train.steps, tasks=results, groups={})
        (mdir / task_scaling.TASKS_FILE).write_text(json.dumps(out.to_json()))
        return out
    return score


def test_gain_stderr_trend_groups_and_resume(data_dir, tmp_path):
    ladder = mini_ladder(data_dir, with_nan=False)
    names = scaling.member_names(ladder)
    wd = tmp_path / "ladder"
    _finish(ladder, wd, names[:2])  # the largest member has not trained yet
    calls: list[str] = []
    out = task_scaling.run(ladder, wd, _tasks(), _stand_in(names, calls))
    assert out["scored"] == names[:2] and out["pending"] == [names[2]] and calls == names[:2]

    _finish(ladder, wd, names)
    calls.clear()
    out = task_scaling.run(ladder, wd, _tasks(), _stand_in(names, calls))
    assert calls == [names[2]] and out["skipped"] == names[:2]  # resumed: only the new one
    r = json.loads((wd / "tasks_scaling.json").read_text())
    assert [m["member"] for m in r["members"]] == names
    params = np.log10([scaling.describe(ladder, n)["params_non_embedding"] for n in names])

    grows = r["tasks"]["grows"]
    assert grows["scores"] == GROWS
    assert grows["gain"] == pytest.approx(0.4)
    se = math.hypot(math.sqrt(0.5 * 0.5 / N), math.sqrt(0.9 * 0.1 / N))
    assert grows["gain_stderr"] == pytest.approx(se)
    assert grows["gains"] is True
    slope = (np.mean(params * GROWS) - params.mean() * np.mean(GROWS)) / params.var()
    assert grows["trend_per_decade"] == pytest.approx(slope)
    assert r["tasks"]["flat"]["gain"] == pytest.approx(0.05)  # under two standard errors
    assert r["tasks"]["flat"]["gains"] is False

    # Bits per byte fall as models improve: a positive gain, no binomial error.
    prose = r["tasks"]["prose"]
    assert prose["gain"] == pytest.approx(0.9) and prose["gain_stderr"] is None
    assert prose["trend_per_decade"] > 0  # signed like the gain: falling bits per byte

    reading = r["groups"]["reading"]
    assert reading["tasks"] == ["grows", "flat"]
    means = [(g + f) / 2 for g, f in zip(GROWS, FLAT, strict=True)]
    assert reading["scores"] == pytest.approx(means)
    assert reading["gain"] == pytest.approx(0.225)
    md = (wd / "tasks_scaling.md").read_text()
    assert "| grows | reading | acc | 0.500 | 0.600 | 0.900 | 0.500 | +0.400 +- " in md
    assert (wd / "tasks_scaling.png").read_bytes()[:4] == b"\x89PNG"

    # Another suite (fewer examples) is scored again on every member.
    calls.clear()
    task_scaling.run(ladder, wd, _tasks(n=10), _stand_in(names, calls))
    assert calls == names


@pytest.mark.slow
def test_scaling_tasks_cli_on_a_trained_mini_ladder(data_dir, tmp_path):
    """`scaling tasks` after a real `scaling run` of two 3-step members: every member's
    tasks.json, the ladder's table and figure; a rerun scores nothing again."""
    ladder = mini_ladder(data_dir, with_nan=False)
    ladder.unlock()
    del ladder.members["L2_d48"]
    ladder.lock()
    wd = tmp_path / "ladder"
    scaling.run(ladder, wd)
    task = Task(name="pick", group="toy", kind="multiple_choice", chance=0.5,
                examples=(Example(context="to be or not to", choices=(" be", " see"),
                                  answer=0),) * 3)
    path = tmp_path / "pick.json"
    path.write_text(json.dumps(task.to_json()))
    env = dict(os.environ, GOPHER_JAX_DATA=data_dir)
    p = run_cli("scaling", "tasks", "--workdir", wd, "--tasks", path, env=env, timeout=600)
    assert p.returncode == 0, p.stderr
    r = json.loads((wd / "tasks_scaling.json").read_text())
    names = scaling.member_names(ladder)
    assert [m["member"] for m in r["members"]] == names
    for i, n in enumerate(names):
        member = json.loads((wd / n / "tasks.json").read_text())
        assert r["tasks"]["pick"]["scores"][i] == member["tasks"]["pick"]["metrics"]["acc"]
    assert (wd / "tasks_scaling.png").is_file()
    again = run_cli("scaling", "tasks", "--workdir", wd, "--tasks", path, env=env,
                    timeout=600)
    assert again.returncode == 0 and again.stdout.count("scored earlier") == len(names)


@pytest.mark.parametrize("args, words, code", [
    (["--workdir", "{tmp}/missing"], "does not exist", 1),
    (["--workdir", "{tmp}"], "has no ladder.json", 1),
    (["--workdir", "{tmp}", "--examples", "0"], "--examples=0 must be >= 1", 2),
])
def test_scaling_tasks_mistakes_are_one_error_line(tmp_path, args, words, code):
    p = run_cli("scaling", "tasks", *[a.format(tmp=tmp_path) for a in args], timeout=120)
    assert p.returncode == code and "Traceback" not in p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], p.stderr
