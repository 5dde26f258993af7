"""The command line: one `error:` line for every user mistake, before any side effect; help per
command; only gopher_jax/cli/ prints or exits."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess

import pytest
from helpers import ROOT, cli_command

from gopher_jax.cli import main

TINY = str(ROOT / "experiments/tiny.py")


def tree(path: pathlib.Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


def cjk_corpus(d: pathlib.Path) -> str:
    """Three files over ~900 distinct CJK characters: more than 512 pieces can cover."""
    d.mkdir()
    for i in range(3):
        chars = [chr(0x4E00 + (j * 7 + i) % 900) for j in range(3000)]
        (d / f"ja{i}.txt").write_text("".join(chars), encoding="utf-8")
    return str(d / "*.txt")


def blank_validation_corpus(d: pathlib.Path) -> str:
    """Three files, one per split; the one that lands in validation holds only whitespace."""
    from gopher_jax.data import builders

    d.mkdir()
    names = ["a.txt", "b.txt", "c.txt"]
    blank = next(n for n in names if builders.assign_splits(names)[n] == "validation")
    for n in names:
        body = "  \n\n" if n == blank else "Shall I compare thee to a summer's day?\n" * 400
        (d / n).write_text(body)
    return str(d / "*.txt")


# (name, argv builder, exit code, words the error line must contain). `t` is tmp_path; every
# case runs with the data dir t/data and must leave t/data and t/work as they were.
def _cases():
    data = ["--config.data.data_dir={t}/data"]
    tiny = ["--config", TINY, *data]
    return [
        ("unknown key", ["train", *tiny, "--workdir={t}/work", "--config.train.stepz=3"], 2,
         ["train.stepz", "did you mean train.steps"]),
        ("bad value type", ["train", *tiny, "--workdir={t}/work", "--config.train.steps=ten"],
         2, ["train.steps", "int"]),
        ("batch size 0", ["train", *tiny, "--workdir={t}/work", "--config.train.batch_size=0"],
         2, ["train.batch_size"]),
        ("microbatches 0", ["data", "prepare", *tiny, "--config.train.microbatches=0"], 2,
         ["train.microbatches"]),
        ("seq_len 0", ["data", "prepare", *tiny, "--config.data.seq_len=0"], 2,
         ["data.seq_len"]),
        ("negative steps", ["train", *tiny, "--workdir={t}/work", "--config.train.steps=-5",
                            "--config.train.warmup_steps=-10"], 2, ["train.steps"]),
        ("negative warmup", ["train", *tiny, "--workdir={t}/work",
                             "--config.train.warmup_steps=-10"], 2, ["train.warmup_steps"]),
        ("unknown rules", ["train", *tiny, "--workdir={t}/work", "--config.mesh.rules=zero"], 2,
         ["mesh.rules"]),
        ("missing config file", ["train", "--config={t}/nope.py", "--workdir={t}/work"], 2,
         ["nope.py"]),
        ("flag of another command", ["train", *tiny, "--workdir={t}/work", "--topology=v4:2x2x1"],
         2, ["--topology"]),
        ("eval on a missing workdir", ["eval", "--workdir={t}/work"], 1, ["work", "not exist"]),
        ("eval on an empty workdir", ["eval", "--workdir={t}/empty"], 1, ["config.json"]),
        ("sample on an empty workdir", ["sample", "--workdir={t}/empty"], 1, ["config.json"]),
        ("eval without checkpoints", ["eval", *tiny, "--workdir={t}/empty"], 1,
         ["no checkpoints"]),
        ("top_k above the vocabulary", ["sample", *tiny, "--workdir={t}/empty", "--top_k=50000"],
         2, ["--top_k=50000", "512"]),
        ("negative temperature", ["sample", *tiny, "--workdir={t}/empty", "--temperature=-1"], 2,
         ["--temperature=-1"]),
        ("no new tokens", ["sample", *tiny, "--workdir={t}/empty", "--max_new_tokens=0"], 2,
         ["--max_new_tokens=0"]),
        ("checkpoint info on a missing workdir", ["checkpoint", "info", "--workdir={t}/work"], 1,
         ["work"]),
        ("aot topology typo", ["aot", *tiny, "--topology=v5p:4x4"], 2, ["3-D torus"]),
        ("unknown command", ["trian"], 2, ["trian"]),
    ]


CASES = _cases()


@pytest.mark.parametrize("argv,code,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_user_mistake_is_one_error_line_and_no_side_effect(tmp_path, capsys, argv, code, words):
    (tmp_path / "empty").mkdir()
    before = tree(tmp_path)
    rc = main([a.replace("{t}", str(tmp_path)) for a in argv])
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err + out, err
    for w in words:
        assert w in lines[0], lines[0]
    assert tree(tmp_path) == before, "the mistake left files behind"


def test_vocabulary_too_small_for_the_corpus_names_the_size_it_needs(tmp_path, capsys):
    pattern = cjk_corpus(tmp_path / "ja")
    rc = main(["data", "prepare", "--config", TINY, f"--config.data.data_dir={tmp_path}/data",
               "--config.data.dataset=text_files", f"--config.data.text_files={pattern}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1, err
    assert "model.vocab_size=512 is too small" in lines[0]
    assert "vocab_size >= " in lines[0]
    assert not list((tmp_path / "data").rglob("*.model")), "no tokenizer may be written"
    assert not list((tmp_path / "data").rglob("*tmp*"))


def test_split_smaller_than_a_batch_is_a_warning_naming_it(tmp_path, capsys):
    pattern = blank_validation_corpus(tmp_path / "txt")
    rc = main(["data", "prepare", "--config", TINY, f"--config.data.data_dir={tmp_path}/data",
               "--config.data.dataset=text_files", f"--config.data.text_files={pattern}",
               "--config.model.vocab_size=300"])
    out = capsys.readouterr().out
    assert rc == 0
    warnings = [line for line in out.splitlines() if "warning" in line]
    assert any("'validation'" in w and "fewer than one batch of 16" in w for w in warnings), out


def _run(args: list[str], env: dict[str, str] | None = None, user: bool = False
         ) -> subprocess.CompletedProcess:
    cmd = cli_command(*args)
    if user:  # root ignores permission bits: drop to an unprivileged user
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env=env or dict(os.environ))


def test_prompt_longer_than_the_context_keeps_its_end_with_a_notice(trained, capsys):
    prompt = "To be, or not to be, that is the question. " * 20  # > 64 tokens
    rc = main(["sample", f"--workdir={trained}/work", f"--prompt={prompt}",
               "--max_new_tokens=3", "--temperature=0"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "notice: the prompt is" in err and "longer than the model's context of 64" in err
    assert out.startswith(prompt)


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_read_only_workdir_is_refused_before_any_work(trained, tmp_path):
    ro = tmp_path / "ro"
    shutil.copytree(trained / "work", ro)
    for d in (tmp_path, *tmp_path.parents[:2]):  # pytest's base dirs are private (0700)
        os.chmod(d, 0o755)
    for p in [ro, *ro.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    data = tmp_path / "data"
    shutil.copytree(trained / "data", data)
    os.chmod(data, 0o777)
    for p in data.rglob("*"):
        os.chmod(p, 0o777 if p.is_dir() else 0o666)
    before = tree(ro)
    for cmd in (["train", "--config", TINY, f"--config.data.data_dir={data}"], ["eval"]):
        p = _run([*cmd, f"--workdir={ro}"], user=True)
        lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
        assert p.returncode == 1 and len(lines) == 1, p.stderr[-3000:]
        assert "not writable" in lines[0] and str(ro) in lines[0]
        assert "bits/byte" not in p.stdout, "eval must refuse before evaluating"
    assert tree(ro) == before


@pytest.mark.slow
def test_no_libtpu_start_up_noise_on_a_cpu_machine(trained):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    for args in (["eval"], ["sample", "--max_new_tokens=2"]):
        p = _run([*args, f"--workdir={trained}/work"], env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        for noise in ("host bounds", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle"):
            assert noise not in p.stderr, p.stderr[-3000:]


def test_each_command_shows_only_its_own_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    for cmd in ("train", "eval", "sample", "data prepare", "checkpoint info", "aot",
                "scaling run"):
        assert cmd in top
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    assert "--workdir" in train_help and "--topology" not in train_help
    assert "--top_k" not in train_help
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "--top_k" in capsys.readouterr().out


def test_only_the_cli_prints_or_exits():
    """print(), sys.exit() and `raise SystemExit` appear in gopher_jax/cli/ alone."""
    offenders = []
    for path in (ROOT / "gopher_jax").rglob("*.py"):
        if "cli" in path.relative_to(ROOT / "gopher_jax").parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            name = None
            if isinstance(node, ast.Call):
                f = node.func
                if isinstance(f, ast.Name) and f.id == "print":
                    name = "print"
                elif (isinstance(f, ast.Attribute) and f.attr in ("exit", "_exit")
                      and isinstance(f.value, ast.Name) and f.value.id == "sys"):
                    name = "sys.exit"
            elif isinstance(node, ast.Raise) and node.exc is not None:
                exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if isinstance(exc, ast.Name) and exc.id == "SystemExit":
                    name = "SystemExit"
            if name:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not offenders, offenders


@pytest.mark.slow
def test_eval_runs_at_longer_contexts_and_training_resume_still_refuses_them(trained, capsys):
    import math
    import re

    for seq_len in (128, 256):  # 2x and 4x the training context of 64
        rc = main(["eval", f"--workdir={trained}/work", f"--config.data.seq_len={seq_len}"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        bpb = [float(x) for x in re.findall(r"bits/byte (\S+) \(unigram", out)]
        assert len(bpb) == 2 and all(math.isfinite(b) and 0 < b < 20 for b in bpb), out
    rc = main(["train", "--config", TINY, f"--config.data.data_dir={trained}/data",
               f"--workdir={trained}/work", "--config.train.steps=8",
               "--config.train.warmup_steps=1", "--config.data.seq_len=128"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and len(lines) == 1 and "data.seq_len: 64 in the checkpoint vs 128" in lines[0]
