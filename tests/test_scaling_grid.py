"""Two-dimensional ladders (sizes x FLOP or token budgets): members, their prefixes of one token
stream, per-member locks, the compute-optimal fit of a grid's results, and `scaling plan`."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import time

import ml_collections
import numpy as np
import pytest
from helpers import ROOT, cli_command, cpu_env, experiment, run_cli, tiny

from gopher_jax import config as config_lib
from gopher_jax import scaling
from gopher_jax.cli.app import main
from gopher_jax.errors import ConfigError
from gopher_jax.model import sizes
from gopher_jax.scaling import lnd, runner

LAW = {"E": 1.5, "A": 40.0, "B": 60.0, "alpha": 0.35, "beta": 0.33}
TINY_SIZES = {"L1_d16": (1, 16), "L1_d32": (1, 32), "L2_d32": (2, 32), "L2_d48": (2, 48),
              "L3_d64": (3, 64)}


def tiny_grid(data_dir: str, budgets: dict[str, dict], sizes_: dict = TINY_SIZES,
              **train) -> ml_collections.ConfigDict:
    c = tiny(data_dir, warmup_steps=1, eval_every=0, log_every=5, checkpoint_every=5,
             **train)
    c.name = "tiny_grid"
    c.unlock()
    c.scaling = ml_collections.ConfigDict({"eval_batches": 2, "curve_points": 4})
    c.scaling.sizes = {n: {"model": {"num_layers": layers, "d_model": d, "num_heads": d // 16,
                                     "head_dim": 16}, "train": {"learning_rate": 3e-3}}
                       for n, (layers, d) in sizes_.items()}
    c.scaling.budgets = budgets
    c.lock()
    return c


def test_isoflop_ladder_members_follow_their_budgets():
    ladder = experiment("isoflop_ladder")
    names = scaling.member_names(ladder)
    assert len(names) == 17
    shared = None
    for n in names:
        d = scaling.describe(ladder, n)
        c = scaling.member_config(ladder, n)
        tokens_per_step = c.train.batch_size * c.data.seq_len
        fpt = sizes.flops_per_token(c.model, c.data.seq_len)["train"]
        # D = C / (this project's FLOPs per token of N), to the nearest step.
        assert abs(d["train_tokens"] - d["budget_value"] / fpt) <= tokens_per_step / 2
        assert d["train_flops"] == pytest.approx(d["budget_value"], rel=0.06)
        assert c.train.warmup_steps == max(1, round(0.1 * c.train.steps))
        assert c.train.eval_every == max(1, c.train.steps // 8)
        assert c.model.num_heads * c.model.head_dim == c.model.d_model
        assert c.model.mlp_ratio == 4
        # Every member reads a prefix of one stream: the data order is a function of
        # (seed, step) and everything that decides it is shared.
        key = (c.seed, c.data.to_json(), c.train.batch_size)
        assert shared in (None, key)
        shared = key
        assert "scaling" not in c and "members" not in c
    total = sum(scaling.describe(ladder, n)["train_flops"] for n in names)
    assert total < 2.5e13  # about 20 minutes on 2 CPU cores


@pytest.mark.parametrize("budgets,words", [
    ({"b": {"flops": 1e9, "tokens": 5}}, "exactly one of"),
    ({"b": {"flops": -1.0}}, "must be > 0"),
    ({"b": {"flops": 1e12, "sizes": "L1_d16,nope"}}, "not in scaling.sizes"),
    ({"b": {"tokens": 100.0}}, "step(s)"),
])
def test_grid_mistakes_are_config_errors(tmp_path, budgets, words):
    with pytest.raises(ConfigError) as e:
        scaling.member_names(tiny_grid(str(tmp_path), budgets))
    assert words in str(e.value)


def test_grid_and_members_together_are_refused(tmp_path):
    c = tiny_grid(str(tmp_path), {"b": {"tokens": 1e5}})
    c.unlock()
    c.members = {"x": {"model": {"num_layers": 1}}}
    with pytest.raises(ConfigError, match="both"):
        scaling.member_names(c)


def _law(c: ml_collections.ConfigDict, tokens: float) -> float:
    return float(lnd.predict(LAW, sizes.param_counts(c.model)["total"], tokens))


def _stand_ins(monkeypatch, calls: list[str]) -> None:
    """loop.train and the evaluation replaced by a known L(N, D): the train stand-in writes
    the periodic eval rows of metrics.jsonl that a real run writes."""
    from gopher_jax.train import loop

    def fake_train(c, workdir):
        calls.append(pathlib.Path(workdir).name)
        tokens_per_step = c.train.batch_size * c.data.seq_len
        rows = [s for s in range(1, c.train.steps + 1)
                if s % c.train.eval_every == 0 or s == c.train.steps]
        with open(pathlib.Path(workdir) / "metrics.jsonl", "w") as f:
            for s in rows:
                f.write(json.dumps({"step": s, "split": "eval",
                                    "bits_per_byte": _law(c, s * tokens_per_step)}) + "\n")
        return {"start_step": 0, "step": c.train.steps, "train": {"loss": 1.0}}

    def fake_eval(c, mdir, max_batches=-1):
        bpb = _law(c, c.train.steps * c.train.batch_size * c.data.seq_len)
        r = {"bits_per_byte": bpb, "loss": 1.0, "tokens": 10.0, "bytes": 30.0}
        return {"step": c.train.steps, "validation": r, "test": dict(r)}

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(runner, "evaluate_member", fake_eval)


def _isoflop_budgets() -> dict[str, dict]:
    return {f"C{c:.0e}": {"flops": c} for c in (2e10, 6e10, 2e11)}


def test_grid_run_and_fit_with_stand_in_training(data_dir, tmp_path, monkeypatch, capsys):
    calls: list[str] = []
    _stand_ins(monkeypatch, calls)
    ladder = tiny_grid(data_dir, _isoflop_budgets())
    wd = tmp_path / "grid"
    out = scaling.run(ladder, wd, log=lambda s: None)
    assert sorted(out["trained"]) == sorted(calls) and len(calls) == 15
    results = json.loads((wd / "results.json").read_text())
    assert results["grid"] and all(m["status"] == "ok" for m in results["members"])
    m = next(m for m in results["members"] if m["member"] == "L1_d16-C2e+10")
    assert m["budget"] == "C2e+10" and m["size"] == "L1_d16" and len(m["curve"]) >= 4
    assert m["curve"][-1]["tokens"] == m["train_tokens"]
    assert m["curve"][-1]["flops"] == pytest.approx(m["train_flops"])
    assert "sizes x budgets" in (wd / "results.md").read_text()

    calls.clear()
    again = scaling.run(ladder, wd, log=lambda s: None)
    assert calls == [] and len(again["skipped"]) == 15

    fit = scaling.fit(wd, log=lambda s: None, replicates=12)
    law3 = fit["approach3"]
    for key in ("alpha", "beta"):  # noiseless members: the law comes back
        assert law3[key]["value"] == pytest.approx(LAW[key], rel=1e-3)
    assert fit["held_out"]["budget"] == "C2e+11"
    assert fit["held_out"]["mean_abs_relative_error"] < 1e-3
    assert fit["approach2"]["a"]["interval"] is not None
    assert set(fit["approach2"]["profiles"]) == set(_isoflop_budgets())
    saved = json.loads((wd / "optimal.json").read_text())
    assert saved["approach3"]["alpha"] == law3["alpha"]
    for png in ("isoflop.png", "contours.png"):
        assert (wd / png).read_bytes()[:4] == b"\x89PNG"

    # `scaling plan` from the fitted workdir: its law and the bootstrap interval of N_opt.
    assert main(["scaling", "plan", "--flops", "1e12", "--workdir", str(wd), "--vocab", "512",
                 "--seq_len", "64"]) == 0
    out = capsys.readouterr().out
    printed = float(out.split("N_opt = ")[1].split()[0])
    assert printed == pytest.approx(float(lnd.allocation(LAW, 1e12)["n_opt"]), rel=0.01)
    assert "bootstrap 90% interval" in out


def test_a_member_another_live_process_holds_is_left_to_it(data_dir, tmp_path, monkeypatch):
    calls: list[str] = []
    _stand_ins(monkeypatch, calls)
    ladder = tiny_grid(data_dir, {"C2e+10": {"flops": 2e10, "sizes": "L1_d16,L1_d32"}})
    wd = tmp_path / "grid"
    held = wd / runner.LOCKS / "L1_d32-C2e+10"
    held.mkdir(parents=True)
    now = time.time()
    (held / "LOCK").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                           "start": now, "renewed": now, "token": "other"}))
    out = scaling.run(ladder, wd, log=lambda s: None)
    assert out["busy"] == ["L1_d32-C2e+10"] and calls == ["L1_d16-C2e+10"]
    (held / "LOCK").unlink()  # that run ended without finishing: the next run trains it
    out = scaling.run(ladder, wd, member="L1_d32-C2e+10,L1_d16-C2e+10", log=lambda s: None)
    assert out["trained"] == ["L1_d32-C2e+10"] and out["skipped"] == ["L1_d16-C2e+10"]


def test_plan_prints_hoffmann_closed_form_equal_to_numeric_minimum(capsys):
    """Hoffmann et al.'s approach-3 coefficients at Gopher's 5.76e23 FLOPs."""
    assert main(["scaling", "plan", "--flops", "5.76e23",
                 "--law", "E=1.69,A=406.4,B=410.7,alpha=0.34,beta=0.28"]) == 0
    stdout = capsys.readouterr().out
    g = (0.34 * 406.4 / (0.28 * 410.7)) ** (1 / (0.34 + 0.28))
    closed = g * (5.76e23 / 6) ** (0.28 / 0.62)
    line = next(x for x in stdout.splitlines() if "N_opt =" in x)
    printed = float(line.split("N_opt = ")[1].split()[0])
    assert printed == pytest.approx(closed, rel=1e-5)
    numeric = float(stdout.split("numeric argmin_N L(N, C/(6N)) = ")[1].split()[0])
    assert numeric == pytest.approx(lnd.numeric_optimum(lnd.HOFFMANN, 5.76e23), rel=1e-5)
    assert numeric == pytest.approx(closed, rel=1e-5)
    shape = stdout.split("nearest Gopher-shaped config: ")[1]
    layers, d_model = int(shape.split()[0]), int(shape.split("d_model ")[1].split(",")[0])
    heads, head_dim = (int(x) for x in shape.split(", ")[1].split(" heads x "))
    assert heads * head_dim == d_model and f"d_ff {4 * d_model}" in shape
    assert 30e9 < float(lnd.allocation(lnd.HOFFMANN, 5.76e23)["n_opt"]) < 35e9
    assert "steps" in stdout and layers > 32


@pytest.mark.parametrize("args,words", [
    (["--flops", "0"], "--flops"),
    (["--flops", "1e20", "--law", "E=1"], "missing"),
    (["--flops", "1e20", "--law", "E=1,A=1,B=1,alpha=1,beta=1", "--workdir", "."], "both"),
    (["--flops", "1e20", "--topology", "v5p:2x2"], "3-D torus"),
])
def test_plan_mistakes_are_one_error_line(capsys, args, words):
    assert main(["scaling", "plan", *args]) == 2
    out, err = capsys.readouterr()
    assert words in err and err.count("\n") == 1 and err.startswith("error:") and not out


# ---------------------------------------------------------------- real processes


def _grid_file(tmp_path: pathlib.Path, data_dir: str) -> pathlib.Path:
    """A grid ladder config file for the CLI: 2 FLOP budgets x 2 tiny sizes."""
    path = tmp_path / "grid_ladder.py"
    path.write_text(f'''
import ml_collections
from gopher_jax import config as config_lib


def get_config():
    c = config_lib.load({str(ROOT / "experiments" / "tiny.py")!r})
    c.unlock()
    c.name = "two_by_two"
    c.data.data_dir = {data_dir!r}
    c.train.update(warmup_steps=1, eval_every=0, log_every=5, checkpoint_every=5)
    c.scaling = ml_collections.ConfigDict({{"eval_batches": 2, "curve_points": 3}})
    c.scaling.sizes = {{"L1_d32": {{"model": {{"num_layers": 1, "d_model": 32, "num_heads": 2,
                                           "head_dim": 16}}}},
                       "L2_d64": {{"model": {{"num_layers": 2, "d_model": 64, "num_heads": 4,
                                           "head_dim": 16}}}}}}
    c.scaling.budgets = {{"C1": {{"flops": 2e10}}, "C2": {{"flops": 4e10}}}}
    return c
''')
    return path


@pytest.mark.slow
def test_two_processes_share_one_ladder_and_a_killed_member_resumes(data_dir, tmp_path):
    """Two `scaling run --member` processes at once, the same members in opposite orders:
    each member is trained by exactly one of them and results.json is complete. Then a member
    killed (SIGKILL) mid-training is taken over from its dead holder and resumes from its
    checkpoint."""
    cfg = _grid_file(tmp_path, data_dir)
    config = config_lib.load(cfg)
    ladder = scaling.member_names(config)
    wd = tmp_path / "wd"
    env = cpu_env(1)
    procs = [subprocess.Popen(cli_command("scaling", "run", "--config", cfg, "--workdir", wd,
                                          "--member", ",".join(order)), cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for order in (ladder, ladder[::-1])]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    for name in ladder:
        trained = [log for log in logs if f"[scaling] {name}: bits/byte" in log]
        assert len(trained) == 1, (name, logs)
        rows = [json.loads(x) for x in (wd / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r["step"] for r in rows if r["split"] == "train"]
        assert steps == sorted(set(steps)), "one run wrote each member's metrics"
    results = json.loads((wd / "results.json").read_text())
    assert sorted(m["member"] for m in results["members"] if m["status"] == "ok") == \
        sorted(ladder)

    # A fresh member killed after its first checkpoint: its lock names a dead pid.
    big = max(ladder, key=lambda n: scaling.describe(config, n)["steps"])
    shutil.rmtree(wd / big)
    p = subprocess.Popen(cli_command("scaling", "run", "--config", cfg, "--workdir", wd,
                                     "--member", big), cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    ckpt = wd / big / "checkpoints"
    while time.time() < deadline and not (ckpt.is_dir() and any(
            c.name.isdigit() for c in ckpt.iterdir())):
        time.sleep(0.2)
    p.kill()
    p.wait()
    assert (wd / runner.LOCKS / big / "LOCK").is_file(), "the killed run left its lock"
    r = run_cli("scaling", "run", "--config", cfg, "--workdir", wd, "--member", big, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    result = json.loads((wd / big / "result.json").read_text())
    assert result["status"] == "ok" and result["start_step"] > 0, result


@pytest.mark.slow
def test_plan_compiles_its_config_for_a_small_topology():
    pytest.importorskip("libtpu")
    r = run_cli("scaling", "plan", "--flops", "1e18", "--topology", "v5p:2x2x1",
                env=cpu_env(1), timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "per-device memory" in r.stdout and "FITS" in r.stdout
    assert np.isfinite(float(r.stdout.split("total ")[1].split()[0]))


def test_launch_fans_every_member_out_once(capsys):
    from launch import scaling_members

    cfg = str(ROOT / "experiments" / "isoflop_ladder.py")
    assert scaling_members.main(["--config", cfg, "--workdir", "gs://b/ladder", "--nodes",
                                 "vm-0,vm-1,vm-2", "--zone", "z", "--project", "p",
                                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    ssh = [x for x in out.splitlines() if x.startswith("+ gcloud compute tpus tpu-vm ssh")]
    assert [x.split()[6] for x in ssh] == ["vm-0", "vm-1", "vm-2"]
    members = [m for x in ssh for m in x.split("--member ")[1].split()[0].split(",")]
    names = scaling.member_names(experiment("isoflop_ladder"))
    assert sorted(members) == sorted(names)
    flops = scaling_members.member_flops(cfg, [])
    loads = [sum(flops[m] for m in x.split("--member ")[1].split()[0].split(",")) for x in ssh]
    assert max(loads) < 1.2 * min(loads)
    assert all("--workdir gs://b/ladder" in x and "nohup" in x for x in ssh)
