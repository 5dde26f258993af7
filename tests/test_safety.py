"""A save that fails (a full disk) stops training at once with one error line; the previous
checkpoint stays complete and restorable, and no temporary checkpoint directory is left."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from helpers import ROOT, cpu_env, run_cli

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax.metrics import read_jsonl


@contextlib.contextmanager
def small_tmpfs(path: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    path.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {p.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_full_disk_stops_at_the_failed_save_and_keeps_the_previous_checkpoint(data_dir,
                                                                               tmp_path):
    # The tiny model's state (params + Adam moments) takes ~1.7 MB a checkpoint: the first
    # save fits in 3 MB, the second cannot.
    with small_tmpfs(tmp_path / "disk", "3m") as disk:
        workdir = disk / "run"
        p = run_cli("train", "--config", ROOT / "experiments" / "tiny.py", "--workdir", workdir,
                    f"--config.data.data_dir={data_dir}", "--config.train.steps=40",
                    "--config.train.checkpoint_every=10", "--config.train.log_every=1",
                    "--config.train.eval_every=0", env=cpu_env(1))
        errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 1, (p.stdout + p.stderr)[-3000:]
        # Orbax's background threads log the failure too; ours is the one error line, last.
        assert len(errors) == 1 and p.stderr.strip().splitlines()[-1] == errors[0], \
            p.stderr[-3000:]
        assert "saving step 20" in errors[0] and str(workdir / "checkpoints") in errors[0]
        assert "No space left" in errors[0], errors[0]
        assert "resumes from step 10" in errors[0], errors[0]
        leftovers = [q.name for q in (workdir / "checkpoints").iterdir()
                     if "tmp" in q.name]
        assert not leftovers, leftovers
        # Training stopped at the failure, at the latest when the next save was due.
        logged = max(r["step"] for r in read_jsonl(workdir / "metrics.jsonl"))
        assert logged <= 30, logged
        steps = ckpt_lib.Checkpointer(workdir, read_only=True).steps()
        assert steps == [10], steps
        info = run_cli("checkpoint", "info", "--workdir", workdir, env=cpu_env(1))
        assert info.returncode == 0 and "complete" in info.stdout, info.stdout + info.stderr


def _corpus(d: pathlib.Path, files: dict[str, str]) -> str:
    d.mkdir(exist_ok=True)
    for name, text in files.items():
        (d / name).write_text(text)
    return str(d / "*.txt")


def _words(seed: int, n: int) -> str:
    import random

    rng = random.Random(seed)
    vocab = "the king queen sword crown night day love death sea storm fool lord lady".split()
    return "\n".join(" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(n))


def test_resume_onto_changed_corpus_is_refused_unless_accepted(tmp_path, capsys):
    from gopher_jax.cli import main

    pattern = _corpus(tmp_path / "txt", {f"f{i}.txt": _words(i, 400) for i in range(4)})
    argv = ["train", "--config", str(ROOT / "experiments" / "tiny.py"),
            f"--workdir={tmp_path}/run", f"--config.data.data_dir={tmp_path}/data",
            "--config.data.dataset=text_files", f"--config.data.text_files={pattern}",
            "--config.model.vocab_size=300", "--config.train.warmup_steps=1",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=0",
            "--config.train.log_every=1"]
    assert main([*argv, "--config.train.steps=2"]) == 0
    capsys.readouterr()
    (tmp_path / "txt" / "f9.txt").write_text(_words(9, 400))  # the corpus gains a file
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main([*argv, "--config.train.steps=4"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "training data changed since the checkpoint at step 2" in lines[0]
    assert "tokenizer" in lines[0] and "--accept_new_data" in lines[0]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics, "no step may run"
    assert main([*argv, "--config.train.steps=4", "--accept_new_data"]) == 0
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl", split="data")
    assert rows and rows[0]["step"] == 2 and rows[0]["changed_tokenizer"] == 1.0
    steps = [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_corpora_with_equal_names_sizes_and_mtimes_get_separate_prepared_data(tmp_path):
    from helpers import tiny

    from gopher_jax.data import pipeline

    texts = {f"f{i}.txt": _words(i, 300) for i in range(3)}
    # b holds a's lines in reverse order: same names and sizes, other content.
    reverse = {k: "\n".join(reversed(v.split("\n"))) for k, v in texts.items()}
    infos = []
    for d, files in (("a", texts), ("b", reverse)):
        pattern = _corpus(tmp_path / d, files)
        for f in (tmp_path / d).iterdir():
            os.utime(f, ns=(1_000_000_000, 1_000_000_000))
        c = tiny(tmp_path / "data")
        c.data.update(dataset="text_files", text_files=pattern)
        c.model.vocab_size = 300
        infos.append(pipeline.prepare(c))
    a, b = infos
    sizes = [sorted(f.stat().st_size for f in (tmp_path / d).iterdir()) for d in "ab"]
    assert sizes[0] == sizes[1], "the two corpora must look alike but for their content"
    assert a.chunks_dir != b.chunks_dir and a.tokenizer != b.tokenizer


# One writer per workdir


def _train_cmd(workdir: pathlib.Path, data_dir: str, steps: int) -> list[str]:
    from helpers import cli_command

    return cli_command("train", "--config", ROOT / "experiments" / "tiny.py",
                       "--workdir", workdir, f"--config.data.data_dir={data_dir}",
                       f"--config.train.steps={steps}", "--config.train.eval_every=0",
                       "--config.train.checkpoint_every=10", "--config.train.log_every=1")


def test_train_on_a_workdir_a_live_process_holds_is_refused_before_any_work(data_dir,
                                                                           tmp_path):
    """This process holds the workdir's lock: `train` there stops with one error line naming
    it, and writes nothing. (The slow test below holds it by a training run.)"""
    from gopher_jax.checkpoint.lock import WorkdirLock

    workdir = tmp_path / "run"
    with WorkdirLock(workdir):
        second = run_cli(*_train_cmd(workdir, data_dir, 400)[3:], env=cpu_env(1))
        assert (workdir / "LOCK").exists()
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert second.returncode == 1 and len(errors) == 1, second.stderr[-3000:]
    assert f"pid {os.getpid()}" in errors[0] and "in use by another run" in errors[0]
    assert sorted(p.name for p in workdir.iterdir()) == [], "no work before the lock"


@pytest.mark.slow
def test_second_train_on_a_live_workdir_is_refused_naming_the_holder(data_dir, tmp_path):
    import time

    workdir = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(workdir, data_dir, 400), cwd=ROOT, env=cpu_env(1),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 300
        while not (workdir / "LOCK").exists() and first.poll() is None:
            assert time.time() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        second = run_cli(*_train_cmd(workdir, data_dir, 400)[3:], env=cpu_env(1))
        errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
        assert second.returncode == 1 and len(errors) == 1, second.stderr[-3000:]
        assert f"pid {first.pid}" in errors[0] and "in use by another run" in errors[0]
        assert first.poll() is None, "the first run must go on"
        lines = []
        for line in first.stdout:  # SIGTERM once it trains, so that it saves and exits 0
            lines.append(line)
            if line.startswith("step "):
                break
    finally:
        first.terminate()
        out = "".join(lines) + first.communicate(timeout=300)[0]
    assert first.returncode == 0, out[-3000:]
    assert not (workdir / "LOCK").exists(), "the lock is released at the end of a run"


@pytest.mark.slow
def test_lock_of_a_killed_run_is_taken_over(data_dir, tmp_path):
    import signal
    import time

    workdir = tmp_path / "run"
    first = subprocess.Popen(_train_cmd(workdir, data_dir, 400), cwd=ROOT, env=cpu_env(1),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (workdir / "LOCK").exists():
        assert time.time() < deadline and first.poll() is None
        time.sleep(0.2)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert (workdir / "LOCK").exists(), "a SIGKILLed run cannot release its lock"
    p = run_cli(*_train_cmd(workdir, data_dir, 12)[3:], env=cpu_env(1))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "taking over the lock" in p.stderr


def test_stale_lease_from_another_host_is_taken_over_and_a_live_one_is_not(tmp_path):
    import json
    import time

    from gopher_jax.checkpoint.lock import WorkdirLock, WorkdirLockedError

    lock_file = tmp_path / "LOCK"
    other = {"host": "elsewhere", "pid": 1, "start": time.time() - 100, "token": "x"}
    lock_file.write_text(json.dumps({**other, "renewed": time.time() - 5}))
    with pytest.raises(WorkdirLockedError, match="host elsewhere, pid 1"):
        WorkdirLock(tmp_path, lease_s=60).acquire()
    lock_file.write_text(json.dumps({**other, "renewed": time.time() - 61}))
    lock = WorkdirLock(tmp_path, lease_s=60).acquire()
    assert json.loads(lock_file.read_text())["token"] == lock.me.token
    lock.release()
    assert not lock_file.exists()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None,
                    reason="mounting a small tmpfs needs root")
def test_data_prepare_on_a_full_disk_leaves_no_temporary_files_and_reruns(tmp_path, capsys):
    from gopher_jax.cli import main

    pattern = _corpus(tmp_path / "txt", {f"f{i}.txt": _words(i, 2500) for i in range(4)})
    # ~0.6 MB of text: the dataset copy fits in 1.5 MB, the token chunks (~1.4 MB) do not.
    with small_tmpfs(tmp_path / "disk", "1500k") as disk:
        argv = ["data", "prepare", "--config", str(ROOT / "experiments" / "tiny.py"),
                f"--config.data.data_dir={disk}/data", "--config.data.dataset=text_files",
                f"--config.data.text_files={pattern}", "--config.model.vocab_size=300"]
        assert main(argv) == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "No space left" in lines[0], err
        assert "Traceback" not in err
        temporary = [str(p) for p in disk.rglob("*") if "tmp" in p.name]
        assert not temporary, temporary
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        assert main(argv) == 0, capsys.readouterr().err
