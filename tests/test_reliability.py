"""Long runs that keep going: a failed save stops at once, loss spikes rewind and skip the
same batches across a kill and resume, a hung host is ended by the watchdog and the rerun
resumes, goodput is recorded, and damaged config or run files are one error line."""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import signal
import subprocess
import threading
import time

import jax
import pytest
from helpers import ROOT, bare_meta, cli_command, cpu_env, run_cli, tiny
from test_safety import small_tmpfs

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax.data import pipeline
from gopher_jax.metrics import read_jsonl
from gopher_jax.train import step as step_lib
from gopher_jax.train.spikes import SpikeGuard
from gopher_jax.train.watchdog import EXIT_CODE
from launch import local

TINY = ROOT / "experiments" / "tiny.py"


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------------ a failed save


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_failed_save_stops_within_a_step_on_the_default_schedule(data_dir, tmp_path):
    """The default schedule (a save every 200 steps, logs every 10): the save of step 400
    cannot fit. Catches a background failure noticed only when the next save is due (the
    run would train on to step 600)."""
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        workdir = disk / "run"
        p = run_cli("train", "--config", TINY, "--workdir", workdir,
                    f"--config.data.data_dir={data_dir}", "--config.train.steps=600",
                    "--config.train.checkpoint_every=200", "--config.train.log_every=10",
                    "--config.train.eval_every=0", env=cpu_env(1))
        errors = _error_lines(p.stderr)
        assert p.returncode == 1 and len(errors) == 1, p.stderr[-3000:]
        assert "saving step 400" in errors[0] and "No space left" in errors[0], errors[0]
        stopped = int(errors[0].split("training stopped at step ")[1].split(" ")[0])
        print(f"save of step 400 failed; training stopped at step {stopped}")
        # The first step after the background write failed (the tiny model runs a few steps
        # while the write goes on); the old check let it run to the next save, step 600.
        assert 400 < stopped < 450, errors[0]
        assert "resumes from step 200" in errors[0]
        assert ckpt_lib.Checkpointer(workdir, read_only=True).steps() == [200]
        assert not [q for q in (workdir / "checkpoints").iterdir() if "tmp" in q.name]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_a_failed_background_save_is_raised_by_the_first_check_after_it(tmp_path):
    """Catches a check that only asks Orbax's check_for_errors: its finalize thread has taken
    the error by then, so nothing is raised until the next save waits for it."""
    with small_tmpfs(tmp_path / "disk", "256k") as disk:
        ck = ckpt_lib.Checkpointer(disk / "run")
        w = jax.random.normal(jax.random.key(0), (512, 1024))  # 2 MiB that do not compress
        ck.save(1, {"w": w}, bare_meta(1))  # the write fails in the background
        ck.check(1)  # while it is written: no wait, no error yet
        deadline = time.time() + 60
        while ck.manager.is_saving_in_progress():
            assert time.time() < deadline
            time.sleep(0.01)
        with pytest.raises(ckpt_lib.CheckpointError, match="training stopped at step 2"):
            ck.check(2)
        assert ck.steps() == [] and not list((disk / "run" / "checkpoints").iterdir())
        ck.close(raise_errors=False)


# ------------------------------------------------------------------ loss spikes


def _guard(**train) -> SpikeGuard:
    c = tiny("/unused")
    c.train.update(train)
    return SpikeGuard(c.train)


def test_spike_guard_judges_against_the_recent_median_and_maps_steps_past_skips():
    g = _guard(spike_policy="rewind", spike_factor=2.0, spike_window=4, spike_skip_batches=3)
    for s, loss in enumerate([5.0, 4.0, 4.0, 3.0]):
        assert g.judge(s, s, loss, 1.0) is None
    assert g.judge(4, 4, 7.9, 1.0) is None  # under 2 x median(5, 4, 4, 3) = 8
    spike = g.judge(5, 5, 9.0, 1.0)  # over 2 x median(4, 4, 3, 7.9) = 8
    assert spike is not None and spike.median == 4.0
    assert g.judge(6, 6, float("nan"), 1.0) is not None
    assert _guard().judge(9, 9, 1e9, 1.0) is None  # policy off: only non-finite losses
    assert g.skip_around(spike, rewound_to=4) == (4, 6)  # not before what step 4 reads
    assert [g.index_of(s) for s in range(6)] == [0, 1, 2, 3, 6, 7]
    assert g.skip_around(spike, rewound_to=0) == (3, 6) and g.skips == [[3, 6]]
    g.skips = [[2, 3], [5, 8]]
    assert [g.index_of(s) for s in range(6)] == [0, 1, 3, 4, 8, 9]


_BATCH, _MAKE_STEP = pipeline.TrainData.batch, step_lib.make_train_step


class _Killed(BaseException):
    """The process dies at a known step (only the `finally` blocks run, as after a kill the
    files on disk are what remains)."""


def _plant(monkeypatch, bad_index: int, kill_at_call: int | None = None) -> list[int]:
    """The batch of data index `bad_index` makes an update that blows the params up (x1e30:
    an overflowing update), so the next loss is not finite. Returns the data indices read."""
    read: list[int] = []
    batch, make = _BATCH, _MAKE_STEP

    def recorded(self, index, sharding):
        read.append(index)
        return batch(self, index, sharding)

    def planted(c, layout):
        train_step = make(c, layout)
        blow_up = jax.jit(lambda p: jax.tree.map(lambda x: x * 1e30, p))

        def step(state, b):
            if kill_at_call is not None and len(read) > kill_at_call:
                raise _Killed
            state, m = train_step(state, b)
            if read[-1] == bad_index:
                state = {**state, "params": blow_up(state["params"])}
            return state, m

        return step

    monkeypatch.setattr(pipeline.TrainData, "batch", recorded)
    monkeypatch.setattr(step_lib, "make_train_step", planted)
    return read


def _spike_argv(data_dir: str, workdir: pathlib.Path, policy: str = "rewind") -> list[str]:
    return ["train", "--config", str(TINY), f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", "--config.train.steps=40",
            "--config.train.log_every=5", "--config.train.checkpoint_every=5",
            "--config.train.eval_every=0", f"--config.train.spike_policy={policy}",
            "--config.train.spike_skip_batches=3", "--config.train.checkpoint_keep=10"]


@pytest.mark.slow
def test_non_finite_loss_stop_names_the_checkpoint_before_the_bad_update(data_dir, tmp_path,
                                                                          monkeypatch, capsys):
    """Data index 24's update blows the params up; step 25's checkpoint holds them, step 26's
    loss is not finite. Catches advice to resume from step 25 (it diverges again)."""
    from gopher_jax.cli import main

    _plant(monkeypatch, bad_index=24)
    workdir = tmp_path / "run"
    argv = _spike_argv(data_dir, workdir, policy="off")
    argv[argv.index("--config.train.steps=40")] = "--config.train.steps=30"
    assert main(argv) == 1
    err = capsys.readouterr().err
    errors = _error_lines(err)
    assert len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "non-finite loss" in errors[0] and "at step 26" in errors[0], errors[0]
    assert "the newest checkpoint from before it is step 20" in errors[0], errors[0]
    assert "a rerun resumes from step 20" in errors[0]
    assert ckpt_lib.Checkpointer(workdir, read_only=True).steps() == [5, 10, 15, 20]
    assert (workdir / ckpt_lib.CORRUPT_DIR / "25").is_dir()  # set aside, not deleted


def _run_record(workdir: pathlib.Path) -> dict:
    final = ckpt_lib.Checkpointer(workdir, read_only=True)
    meta = final.read_meta(max(final.steps()))
    return {"train": [(r["step"], r["loss"]) for r in read_jsonl(workdir / "metrics.jsonl")],
            "spike": [(r["step"], r["skip_start"], r["skip_end"], r["rewound_to"])
                      for r in read_jsonl(workdir / "metrics.jsonl", split="spike")],
            "skips": meta.spikes["skips"], "step": meta.step,
            "data_step": meta.data_step}


@pytest.mark.slow
def test_spike_rewinds_before_the_bad_update_and_skips_the_same_batches_across_a_kill(
        data_dir, tmp_path, monkeypatch, capsys):
    """Data index 24's update blows the params up (step 25's checkpoint holds them); the loss
    of step 26 is not finite. The run goes back to step 20 (not 25) and skips data [23, 26).
    Killed after the rewind's next save (25) or before it, the resumed runs read and skip the
    same batches and log the same losses. Catches a skip list forgotten on resume (the
    resumed run reads 25.. again) and a rewind to the newest checkpoint (25)."""
    from gopher_jax.cli import main

    def run(name: str, kill_at_call: int | None = None) -> list[int]:
        monkeypatch.undo()
        read = _plant(monkeypatch, bad_index=24, kill_at_call=kill_at_call)
        if kill_at_call is None:
            assert main(_spike_argv(data_dir, tmp_path / name)) == 0, capsys.readouterr().err
        else:
            with pytest.raises(_Killed):
                main(_spike_argv(data_dir, tmp_path / name))
        return read

    reads = run("a")
    assert reads == [*range(30), 20, 21, 22, *range(26, 43)]
    out = capsys.readouterr().out
    assert "back to step 20, skipping data batches [23, 26)" in out, out[-2000:]
    a = _run_record(tmp_path / "a")
    assert a["skips"] == [[23, 26]] and a["spike"] == [(26, 23, 26, 20)]
    assert a["step"] == 40 and a["data_step"] == 43
    assert (tmp_path / "a" / ckpt_lib.CORRUPT_DIR / "25").is_dir()

    # Killed at step 27 after the rewind, after its save of step 25 (which holds the skips).
    run("b", kill_at_call=37)
    assert run("b") == list(range(28, 43))  # resumed from 25: step 25 reads data index 28
    assert _run_record(tmp_path / "b") == a
    # Killed at step 22 after the rewind, before any save: the rerun meets the spike again.
    run("c", kill_at_call=32)
    assert run("c") == [*range(20, 30), 20, 21, 22, *range(26, 43)]
    assert _run_record(tmp_path / "c") == a


# ------------------------------------------------------------------ the watchdog


def _two_process_train(workdir: pathlib.Path, data_dir: str, steps: int) -> list[str]:
    return cli_command("train", "--config", TINY, "--workdir", workdir,
                       f"--config.data.data_dir={data_dir}", f"--config.train.steps={steps}",
                       "--config.train.log_every=1", "--config.train.eval_every=0",
                       "--config.train.checkpoint_every=10", "--config.train.watchdog_s=10")


@pytest.mark.slow
def test_watchdog_ends_a_host_left_waiting_by_a_stopped_one_and_the_rerun_resumes(
        data_dir, tmp_path):
    """Process 1 is stopped (SIGSTOP) mid-run: process 0 waits in the step's collective for
    ever. Its watchdog logs every thread's stack and exits 3, the launcher stops the job and
    fails with that code; the rerun resumes from the newest checkpoint. Catches a watchdog
    that never fires (the launcher then times out: 124), and, process 1 being stopped only
    after process 0 logged a step past the checkpoint of step 10, redone work not booked or
    its steps miscounted."""
    workdir = tmp_path / "run"
    lines: list[str] = []
    result: dict[str, int] = {}
    t = threading.Thread(target=lambda: result.update(rc=local.launch(
        _two_process_train(workdir, data_dir, 100_000), num_processes=2,
        devices_per_process=2, grace_s=3, timeout_s=150, out=io.StringIO(),
        capture=lines)), daemon=True)
    t.start()
    deadline = time.time() + 120

    def logged() -> list[int]:
        path = workdir / "metrics.jsonl"
        return [r["step"] for r in read_jsonl(path)] if path.exists() else []

    # Each step is a collective with process 1 and is logged (log_every=1), so process 0
    # gets at most a step or two further once process 1 stops: nowhere near step 20.
    while not (workdir / "checkpoints" / "10").is_dir() or max(logged(), default=0) <= 10:
        assert time.time() < deadline and t.is_alive(), "".join(lines)[-3000:]
        time.sleep(0.02)
    pid1 = int(next(x for x in lines if x.startswith("[launch] pids:")).split("p1=")[1])
    os.kill(pid1, signal.SIGSTOP)
    t.join(170)
    out = "".join(lines)
    assert not t.is_alive() and result["rc"] == EXIT_CODE, out[-3000:]
    fired = [x for x in lines if x.startswith("[p0] error:") and "made no progress" in x]
    assert len(fired) == 1 and "for 1" in fired[0], out[-3000:]  # after 10-19 s
    assert any(x.startswith("[p0] Thread 0x") for x in lines), out[-3000:]  # the stacks
    assert "[launch] process 0 exited with code 3" in out
    newest = max(ckpt_lib.Checkpointer(workdir, read_only=True).steps())
    last = max(logged())
    assert newest == 10 and last > newest, (newest, last)

    rc, out = _launch(_two_process_train(workdir, data_dir, newest + 5))
    assert rc == 0, out[-3000:]
    assert f"resumed from step {newest}" in out
    steps = [r["step"] for r in read_jsonl(workdir / "metrics.jsonl")]
    assert steps == list(range(1, newest + 6)), steps
    # Goodput: the rerun books its start-up, its compile, and the hung run's steps after its
    # checkpoint as redone (exactly those process 0 logged).
    g = read_jsonl(workdir / "metrics.jsonl", split="goodput")[-1]
    assert g["redone_steps"] == last - newest and g["redone_s"] > 0, g
    assert g["startup_s"] > 0 and g["compile_s"] > 0, g
    parts = sum(g[f"{k}_s"] for k in ("step", "startup", "compile", "eval", "save", "rewound",
                                      "redone"))
    assert 0 < g["goodput"] < 1 and parts <= g["wall_s"] * 1.01, g
    assert g["total_wall_s"] > g["wall_s"] and 0 < g["total_goodput"] < 1, g
    meta = ckpt_lib.Checkpointer(workdir, read_only=True).read_meta(newest + 5)
    assert meta.goodput["redone"] == pytest.approx(g["total_redone_s"], rel=0.01)
    info = run_cli("checkpoint", "info", "--workdir", workdir, env=cpu_env(1))
    assert info.returncode == 0 and "goodput=" in info.stdout, info.stdout + info.stderr


def _launch(cmd: list[str]) -> tuple[int, str]:
    lines: list[str] = []
    rc = local.launch(cmd, num_processes=2, devices_per_process=2, grace_s=3, timeout_s=150,
                      out=io.StringIO(), capture=lines)
    return rc, "".join(lines)


# ------------------------------------------------------------------ damaged inputs


def _one_error(capsys, code: int, rc: int) -> str:
    err = capsys.readouterr().err
    errors = _error_lines(err)
    assert rc == code and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_a_config_file_that_does_not_run_is_one_error_line(tmp_path, capsys):
    """A syntax error or a get_config() that raises: the file and line, not a traceback;
    --verbose keeps it."""
    from gopher_jax.cli import main

    bad = tmp_path / "bad.py"
    bad.write_text("from gopher_jax.config import base_config\n\ndef get_config(:\n")
    argv = ["train", "--config", str(bad), f"--workdir={tmp_path}/run"]
    line = _one_error(capsys, 2, main(argv))
    assert f"config file {bad} line 3" in line and "fix the syntax" in line, line
    raising = tmp_path / "raising.py"
    raising.write_text("from gopher_jax.config import base_config\n\n\ndef get_config():\n"
                       "    c = base_config()\n    return c.no_such_section.x\n")
    line = _one_error(capsys, 2, main(["train", "--config", str(raising),
                                       f"--workdir={tmp_path}/run"]))
    assert f"config file {raising} line 6 raised AttributeError" in line, line
    assert main(["train", "--config", str(raising), f"--workdir={tmp_path}/run",
                 "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error:")
    assert not (tmp_path / "run").exists()


def test_damaged_files_of_a_workdir_and_a_data_dir_are_one_error_line(trained, tmp_path,
                                                                      capsys):
    """config.json half-written or hand-edited into another shape, a metrics row mangled in
    the middle, a prepared split's meta torn: each is one line naming the file and line."""
    from gopher_jax.cli import main

    root = tmp_path / "copy"
    shutil.copytree(trained, root)
    work, data = root / "work", root / "data"
    config = work / "config.json"
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    line = _one_error(capsys, 1, main(["eval", f"--workdir={work}"]))
    assert f"{config} line " in line and "is not valid JSON" in line, line
    config.write_text(text.replace('"num_layers": 2', '"num_layers": "two"'))
    line = _one_error(capsys, 1, main(["eval", f"--workdir={work}"]))
    assert f"{config} does not hold a config" in line, line
    config.write_text(text)

    metrics = work / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join([rows[0][:-9], *rows[1:]]) + "\n")
    argv = ["train", "--config", str(TINY), f"--workdir={work}",
            f"--config.data.data_dir={data}", "--config.train.steps=6",
            "--config.train.warmup_steps=1", "--config.train.eval_every=0"]
    line = _one_error(capsys, 1, main(argv))
    assert f"{metrics} line 1 is not a metrics row" in line, line
    metrics.write_text("\n".join(rows) + "\n")

    meta = next(data.glob("chunks/*/*/train.json"))
    meta.write_text(meta.read_text()[:40])
    line = _one_error(capsys, 1, main(argv))
    assert f"{meta} line " in line and "data prepare" in line, line


# ------------------------------------------------------------------ read-only prepared data


@pytest.mark.slow  # ~11 s: a training and an evaluation from a read-only mount
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a read-only tmpfs needs root")
def test_train_and_eval_run_from_a_read_only_prepared_data_dir(data_dir, tmp_path, capsys):
    """The prepared data on a file system remounted read-only (EROFS: refused to root too,
    as a read-only NFS export or bucket mount is). Catches a train/eval that insists on
    writing there; a piece that is missing (chunks for another seq_len) is named."""
    from gopher_jax.cli import main

    with small_tmpfs(tmp_path / "ro", "64m") as ro:
        shutil.copytree(data_dir, ro / "data")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        argv = ["train", "--config", str(TINY), f"--workdir={tmp_path}/run",
                f"--config.data.data_dir={ro}/data", "--config.train.steps=4",
                "--config.train.warmup_steps=1", "--config.train.eval_every=0",
                "--config.train.checkpoint_every=4"]
        assert main(argv) == 0, capsys.readouterr().err[-3000:]
        assert main(["eval", f"--workdir={tmp_path}/run",
                     "--config.train.eval_batches=2"]) == 0, capsys.readouterr().err[-3000:]
        capsys.readouterr()
        line = _one_error(capsys, 1, main([*argv[:3], f"--workdir={tmp_path}/run32",
                                           *argv[4:], "--config.data.seq_len=32"]))
        assert "the 'train' chunks for seq_len 32 is not prepared" in line, line
        assert f"cannot be written to {ro}/data/chunks/" in line and "Read-only" in line


# ------------------------------------------------------------------ corpus files


def test_corpus_glob_reads_each_real_file_once_and_skips_files_that_are_not_text(tmp_path,
                                                                                 capsys):
    """A directory symlink loop and a symlinked file lead ** to the same files again; a
    binary file and a mostly-invalid-UTF-8 one match the glob too. Catches symlinks
    followed twice (more documents than files) and binaries fed to the tokenizer."""
    from test_safety import _words

    from gopher_jax.cli import main

    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    for i in range(8):
        (corpus / ("sub" if i % 2 else ".") / f"f{i}.txt").write_text(_words(i, 300))
    (corpus / "sub" / "loop").symlink_to(corpus)  # corpus/sub/loop/sub/loop/...
    (corpus / "again.txt").symlink_to(corpus / "f0.txt")
    (corpus / "blob.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    (corpus / "latin.txt").write_bytes(bytes(range(128, 256)) * 16)
    argv = ["data", "prepare", "--config", str(TINY), f"--config.data.data_dir={tmp_path}/d",
            "--config.data.dataset=text_files", f"--config.data.text_files={corpus}/**/*.txt",
            "--config.model.vocab_size=300"]
    assert main(argv) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr()
    report = out.out + out.err
    assert (f"2 file(s) of data.text_files skipped as not text (NUL bytes or mostly invalid "
            f"UTF-8): {corpus}/blob.txt, {corpus}/latin.txt") in report, report[-3000:]
    c = tiny(tmp_path / "d")
    c.data.update(dataset="text_files", text_files=f"{corpus}/**/*.txt")
    c.model.vocab_size = 300
    info = pipeline.prepare(c)
    assert sum(s.num_docs for s in info.splits.values()) == 8
