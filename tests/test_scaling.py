"""Scaling ladders (members on the same tokens), results files, resume-skip, failed
members, and the power-law fit."""

import csv
import json
import os
import pathlib
import shutil

import ml_collections
import numpy as np
import pytest
from helpers import experiment, run_cli, tiny

from gopher_jax import scaling
from gopher_jax.errors import ConfigError, UserError
from gopher_jax.model import sizes
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.scaling import runner


def mini_ladder(data_dir: str, steps: int = 3, with_nan: bool = True
                ) -> ml_collections.ConfigDict:
    """Three tiny Gopher shapes on the tiny corpus, plus one member that must diverge."""
    c = tiny(data_dir, steps=steps, warmup_steps=1, eval_every=0, log_every=steps,
             checkpoint_every=steps)
    c.name = "mini"
    c.unlock()  # a ladder adds the members and scaling sections
    c.members = ml_collections.ConfigDict()
    for layers, d_model in ((1, 16), (1, 32), (2, 48)):
        c.members[f"L{layers}_d{d_model}"] = {
            "model": {"num_layers": layers, "d_model": d_model, "num_heads": d_model // 16,
                      "head_dim": 16},
            "train": {"learning_rate": 3e-3}}
    if with_nan:
        c.members["diverge"] = {
            "model": {"num_layers": 1, "d_model": 16, "num_heads": 1, "head_dim": 16},
            "train": {"learning_rate": 1e38, "init_learning_rate": 1e38, "warmup_steps": 0}}
    c.scaling = ml_collections.ConfigDict({"eval_batches": 2})
    c.lock()  # as config_flags hands it over
    return c


# ---------------------------------------------------------------- the ladder config


def test_real_ladder_follows_gopher_rules_on_shared_tokens():
    ladder = experiment("scaling_ladder")
    names = scaling.member_names(ladder)
    assert len(names) >= 6
    rows = [scaling.describe(ladder, n) for n in names]
    for n in names:
        c = scaling.member_config(ladder, n)
        assert c.model.mlp_ratio == 4
        assert c.model.num_heads * c.model.head_dim == c.model.d_model
        mesh_lib.validate(c, 1)
        assert "members" not in c and "scaling" not in c
    widths = [r["d_model"] for r in rows]
    depths = [r["num_layers"] for r in rows]
    lrs = [r["learning_rate"] for r in rows]
    assert widths == sorted(set(widths)), "one width per member, growing"
    assert depths == sorted(depths) and depths[-1] > depths[0], "depth grows with width"
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > lrs[-1], "smaller models, larger lr"
    assert len({r["train_tokens"] for r in rows}) == 1, "every member sees the same tokens"
    # Sized for ~30 min on 2 CPU cores at ~50 GFLOP/s.
    total = sum(r["train_flops"] for r in rows)
    print(f"ladder: {total:.3g} train FLOPs over {len(rows)} members")
    assert total < 1.2e14


def test_member_may_not_change_the_tokens():
    ladder = experiment("scaling_ladder")
    ladder.unlock()  # a member sets only some keys: the test adds one
    name = scaling.member_names(ladder)[0]
    ladder.members[name].train.steps = 10
    with pytest.raises(ConfigError, match="shared by the ladder"):
        scaling.member_config(ladder, name)
    ladder = experiment("scaling_ladder")
    ladder.unlock()
    ladder.members[name].data = {"seq_len": 64}
    with pytest.raises(ConfigError, match="same tokens"):
        scaling.member_config(ladder, name)


def test_member_flag_takes_index_or_name():
    ladder = experiment("scaling_ladder")
    names = scaling.member_names(ladder)
    assert scaling.resolve_member(ladder, "0") == names[0]
    assert scaling.resolve_member(ladder, names[-1]) == names[-1]
    with pytest.raises(ConfigError, match="give an index"):
        scaling.resolve_member(ladder, str(len(names)))


def test_not_a_ladder_is_refused():
    with pytest.raises(ConfigError, match="scaling_ladder.py"):
        scaling.member_names(experiment("tiny"))


# ---------------------------------------------------------------- the fit


def test_fit_recovers_a_known_power_law_and_predicts_the_largest():
    n = np.geomspace(1e5, 7e6, 6)
    a, alpha, c = 40.0, 0.3, 1.1
    rng = np.random.default_rng(0)
    y = a * n ** -alpha + c
    f = scaling.fit_split(n, y)
    assert f["alpha"] == pytest.approx(alpha, rel=1e-3)
    assert f["c"] == pytest.approx(c, rel=1e-3)
    assert f["a"] == pytest.approx(a, rel=1e-2)
    assert f["rmse"] < 1e-6 and f["monotonic"]
    loo = f["loo_largest"]
    assert loo["actual"] == pytest.approx(y[-1])
    assert abs(loo["error"]) < 1e-4
    # With noise the fit stays close, and c never goes negative.
    noisy = y * (1 + 0.005 * rng.standard_normal(len(y)))
    g = scaling.fit_split(n, noisy)
    assert g["c"] >= 0 and abs(g["alpha"] - alpha) < 0.15
    assert g["rmse"] > 0
    # A flat curve has no power law: the bounds keep it sane (c at most the smallest loss).
    h = scaling.fit_split(n, np.full(6, 2.0) + 1e-3 * rng.standard_normal(6))
    assert 0 <= h["c"] <= 2.01


def test_fit_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        scaling.fit_power_law(np.array([1e5, 1e6]), np.array([2.0, 1.5]))
    f = scaling.fit_split(np.array([1e5, 1e6, 1e7]), np.array([3.0, 2.0, 1.6]))
    assert "needs at least 4" in f["loo_largest"]["error"]


# ---------------------------------------------------------------- the orchestration


def test_run_skip_fail_and_fit_with_stand_in_training(data_dir, tmp_path, monkeypatch):
    """run() and fit() with loop.train and the evaluation replaced by stand-ins whose bits
    per byte follow a known law of the non-embedding parameters (the real ones: slow tier)."""
    from gopher_jax.train import loop

    calls: list[str] = []

    def fake_train(c, workdir):
        calls.append(pathlib.Path(workdir).name)
        if c.train.learning_rate > 1:
            raise loop.NonFiniteLossError("non-finite loss nan (grad norm nan) at step 1")
        return {"start_step": 0, "step": c.train.steps, "train": {"loss": 1.0}}

    def law(c):
        return 1.0 + 30.0 * sizes.param_counts(c.model)["non_embedding"] ** -0.3

    def fake_eval(c, mdir, max_batches=-1):
        r = {"bits_per_byte": law(c), "loss": 1.0, "tokens": 10.0, "bytes": 30.0}
        return {"step": c.train.steps, "validation": r, "test": dict(r)}

    monkeypatch.setattr(loop, "train", fake_train)
    monkeypatch.setattr(runner, "evaluate_member", fake_eval)  # where run_member looks it up
    ladder = mini_ladder(data_dir)
    ladder.unlock()
    ladder.members["L2_d64"] = {"model": {"num_layers": 2, "d_model": 64, "num_heads": 4,
                                          "head_dim": 16}, "train": {"learning_rate": 2e-3}}
    ladder.lock()
    wd = tmp_path / "ladder"
    out = scaling.run(ladder, wd, log=lambda s: None)
    good = ["L1_d16", "L1_d32", "L2_d48", "L2_d64"]
    assert sorted(out["trained"]) == good and out["failed"] == ["diverge"]
    by = {m["member"]: m for m in json.loads((wd / "results.json").read_text())["members"]}
    assert by["diverge"]["status"] == "failed"
    assert by["diverge"]["error"] == ("NonFiniteLossError: non-finite loss nan (grad norm nan) "
                                      "at step 1")
    assert "failed: NonFiniteLossError" in (wd / "results.md").read_text()

    calls.clear()
    mtimes = {n: (wd / n / scaling.RESULT).stat().st_mtime_ns for n in good}
    again = scaling.run(ladder, wd, log=lambda s: None)
    assert sorted(again["skipped"]) == good and calls == ["diverge"]
    assert {n: (wd / n / scaling.RESULT).stat().st_mtime_ns for n in good} == mtimes

    # A longer ladder makes the finished members stale: out of the fit until trained on.
    ladder.train.steps = 4
    calls.clear()
    index = scaling.member_names(ladder).index("L2_d64")
    scaling.run(ladder, wd, member=str(index), log=lambda s: None)
    assert calls == ["L2_d64"]
    by = {m["member"]: m for m in json.loads((wd / "results.json").read_text())["members"]}
    assert by["L2_d64"]["status"] == "ok"
    assert [by[n]["status"] for n in good[:3]] == ["stale"] * 3
    with pytest.raises(UserError, match="1 finished member"):
        scaling.fit(wd, log=lambda s: None)
    calls.clear()
    scaling.run(ladder, wd, log=lambda s: None)
    assert sorted(calls) == sorted([*good[:3], "diverge"])

    fit = scaling.fit(wd, log=lambda s: None)
    for split in ("validation", "test"):
        f = fit["splits"][split]
        assert f["alpha"] == pytest.approx(0.3, rel=1e-3)
        assert f["c"] == pytest.approx(1.0, rel=1e-3)
        assert abs(f["loo_largest"]["error"]) < 1e-4
    assert (wd / "fit.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- a miniature ladder


@pytest.mark.slow
def test_miniature_ladder_runs_records_failure_skips_and_fits(data_dir, tmp_path):
    ladder = mini_ladder(data_dir)
    wd = tmp_path / "ladder"
    logs: list[str] = []
    out = scaling.run(ladder, wd, log=logs.append)
    good = ["L1_d16", "L1_d32", "L2_d48"]
    assert sorted(out["trained"]) == good and out["failed"] == ["diverge"]

    # The failed member is recorded with its error; the ones after it still trained.
    res = json.loads((wd / "results.json").read_text())
    by = {m["member"]: m for m in res["members"]}
    assert by["diverge"]["status"] == "failed"
    assert by["diverge"]["error"].startswith("NonFiniteLossError: non-finite loss")
    assert (wd / "diverge" / "error.txt").read_text().count("NonFiniteLossError")
    for n in good:
        m = by[n]
        assert m["status"] == "ok" and m["step"] == 3
        for split in ("validation", "test"):
            assert 0 < m[split]["bits_per_byte"] < 20 and m[split]["bytes"] > 0
        assert m["params_non_embedding"] == sizes.param_counts(
            scaling.member_config(ladder, n).model)["non_embedding"]
    assert [m["member"] for m in res["members"] if m["status"] == "ok"] == good  # size order
    rows = list(csv.DictReader(io_text(wd / "results.csv")))
    assert {r["member"]: r["status"] for r in rows} == {**dict.fromkeys(good, "ok"),
                                                          "diverge": "failed"}
    assert float(rows[0]["validation_bits_per_byte"]) == pytest.approx(
        by[rows[0]["member"]]["validation"]["bits_per_byte"])
    md = (wd / "results.md").read_text()
    assert md.count("\n| ") == 1 + 4 and "failed: NonFiniteLossError" in md

    # A second run skips the finished members (their files are untouched) and retries the
    # failed one.
    mtimes = {n: (wd / n / scaling.RESULT).stat().st_mtime_ns for n in good}
    again = scaling.run(ladder, wd, log=logs.append)
    assert sorted(again["skipped"]) == good and again["trained"] == []
    assert again["failed"] == ["diverge"]
    assert {n: (wd / n / scaling.RESULT).stat().st_mtime_ns for n in good} == mtimes

    # The fit, through the real CLI.
    p = run_cli("scaling", "fit", "--workdir", wd,
                env=dict(os.environ, GOPHER_JAX_DATA=data_dir), timeout=120)
    assert p.returncode == 0, p.stderr
    fit = json.loads((wd / "fit.json").read_text())
    assert fit["members"] == good
    for split in ("validation", "test"):
        f = fit["splits"][split]
        assert f["alpha"] >= 0 and f["c"] >= 0 and np.isfinite(f["rmse"])
        assert "needs at least 4" in f["loo_largest"]["error"]
        assert f"[scaling] {split}: alpha" in p.stdout
    assert (wd / "fit.png").read_bytes()[:4] == b"\x89PNG"


def io_text(path: pathlib.Path):
    return path.read_text().splitlines()


@pytest.mark.slow
def test_killed_member_resumes_from_its_checkpoint(data_dir, tmp_path):
    ladder = mini_ladder(data_dir, steps=4, with_nan=False)
    ladder.train.checkpoint_every = 2
    wd = tmp_path / "ladder"
    out = scaling.run(ladder, wd, member="0", log=lambda s: None)
    assert out["trained"] == ["L1_d16"]
    assert scaling.read_result(wd, "L1_d32") is None  # --member ran only one
    res = json.loads((wd / "results.json").read_text())
    assert [m["status"] for m in res["members"]] == ["ok", "pending", "pending"]
    first = scaling.read_result(wd, "L1_d16")
    # What a kill after the step-2 save leaves: no result and no step-4 checkpoint.
    (wd / "L1_d16" / scaling.RESULT).unlink()
    shutil.rmtree(wd / "L1_d16" / "checkpoints" / "4")
    out = scaling.run(ladder, wd, member="L1_d16", log=lambda s: None)
    second = scaling.read_result(wd, "L1_d16")
    assert out["trained"] == ["L1_d16"] and second["start_step"] == 2
    assert second["step"] == 4
    # Same data order and state from step 2: the same model at step 4.
    assert second["validation"]["bits_per_byte"] == pytest.approx(
        first["validation"]["bits_per_byte"], rel=1e-6)
