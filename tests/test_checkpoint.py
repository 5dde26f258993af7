"""Checkpoints: exact resume after SIGKILL and SIGTERM, restore onto other meshes and
process counts, fallback from a truncated checkpoint, config refusal, keep-best, `info`.

Also a worker for the multi-process tests: `python tests/test_checkpoint.py save|restore
WORKDIR DATA_DIR RULES FSDP TENSOR` (run under launch/local.py for several processes).
"""

from __future__ import annotations

import pathlib
import random
import re
import signal
import subprocess
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, bare_meta, cli_command, cpu_env, run_cli
from helpers import tiny as tiny_config
from jax.experimental import multihost_utils

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax.data import pipeline
from gopher_jax.layout import Layout
from gopher_jax.metrics import read_jsonl
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.train import state as state_lib
from gopher_jax.train import step as step_lib


def tiny(data_dir: str, rules: str = "fsdp", fsdp: int = -1, tensor: int = 1):
    return tiny_config(data_dir, mesh=dict(rules=rules, fsdp=fsdp, tensor=tensor))


# ---------------------------------------------------------------------------------------
# Write on one topology, restore on another (in-process and in the worker below)


def _host(x: jax.Array) -> np.ndarray:
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _host_tree(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): _host(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def write_checkpoint(c, mesh, workdir, steps: int = 2) -> dict[str, np.ndarray]:
    """Trains `steps` steps on `mesh`, saves, and returns the state and the next batch on the
    host (the reference a restore must reproduce bit for bit)."""
    data = pipeline.TrainData(c)
    layout = Layout.build(c, mesh)
    sharding = layout.batch_sharding
    state = state_lib.create_state(c, layout)
    train_step = step_lib.make_train_step(c, layout)
    with jax.set_mesh(mesh):
        for s in range(steps):
            state, _ = train_step(state, data.batch(s, sharding))
    ck = ckpt_lib.Checkpointer(workdir)
    ck.save(steps, state, ckpt_lib.meta_for(c, steps, mesh))
    ck.close()
    ref = _host_tree(state)
    ref.update({f"batch/{k}": _host(v) for k, v in data.batch(steps, sharding).items()})
    return ref


def check_restore(c, mesh, workdir, ref: dict[str, np.ndarray], train: bool = True) -> float:
    """Restores onto `mesh`; asserts shardings, bit-identical values and the next batch;
    with `train`, trains one more step and returns its loss."""
    ck = ckpt_lib.Checkpointer(workdir)
    layout = Layout.build(c, mesh)
    target = layout.state
    state, meta = ck.restore_latest(target, check=lambda m: ckpt_lib.check_config(m, c))
    ck.close()
    for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(target), strict=True):
        assert x.sharding == t.sharding
    got = _host_tree(state)
    assert got.keys() == {k for k in ref if not k.startswith("batch/")}
    for k, v in got.items():
        assert v.dtype == ref[k].dtype and v.shape == ref[k].shape, k
        assert v.tobytes() == ref[k].tobytes(), f"{k} differs after restore"
    step = meta.data_step
    assert step == int(_host(state["step"])) == meta.step
    batch = pipeline.TrainData(c).batch(step, layout.batch_sharding)
    for k, v in batch.items():
        assert _host(v).tobytes() == ref[f"batch/{k}"].tobytes(), f"next batch {k} differs"
    if not train:
        return float("nan")
    with jax.set_mesh(mesh):
        state, m = step_lib.make_train_step(c, layout)(state, batch)
    assert int(_host(state["step"])) == step + 1
    loss = float(_host(m["loss"]))
    assert np.isfinite(loss)
    return loss


def test_restore_8_devices_fsdp_tensor_onto_4_and_1(data_dir, tmp_path):
    assert jax.device_count() == 8
    c8 = tiny(data_dir, "fsdp+tensor", fsdp=4, tensor=2)
    mesh8 = mesh_lib.make_mesh(c8)
    assert dict(mesh8.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    ref = write_checkpoint(c8, mesh8, tmp_path)
    c4 = tiny(data_dir, "fsdp")
    mesh4 = mesh_lib.make_mesh(c4, jax.devices()[4:])
    assert dict(mesh4.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
    check_restore(c4, mesh4, tmp_path, ref)  # and training continues there
    c1 = tiny(data_dir, "data-only", fsdp=1)
    check_restore(c1, mesh_lib.make_mesh(c1, jax.devices()[:1]), tmp_path, ref, train=False)
    meta = ckpt_lib.read_meta(tmp_path / "checkpoints", 2)
    assert meta.mesh == {"data": 1, "fsdp": 4, "tensor": 2} and meta.device_count == 8


def _worker(argv: list[str]) -> None:
    from gopher_jax.parallel import distributed

    mode, workdir, data, rules, fsdp, tensor = argv
    distributed.initialize_from_env()
    c = tiny(data, rules, int(fsdp), int(tensor))
    mesh = mesh_lib.make_mesh(c)
    where = f"{jax.process_count()} process(es) x {jax.local_device_count()} devices"
    ref_path = pathlib.Path(workdir) / "ref.npz"
    if mode == "save":
        ref = write_checkpoint(c, mesh, workdir)
        if jax.process_index() == 0:
            np.savez(ref_path, **ref)
        print(f"SAVED on {where}", flush=True)
    else:
        with np.load(ref_path, allow_pickle=False) as z:
            ref = dict(z)
        loss = check_restore(c, mesh, workdir, ref)
        print(f"RESTORED bit-identically on {where}; next step loss {loss:.4f}", flush=True)


def _run_worker(args: list[str], processes: int, devices: int) -> str:
    worker = [sys.executable, str(pathlib.Path(__file__).resolve()), *args]
    cmd = worker
    if processes > 1:
        cmd = [sys.executable, "-m", "launch.local", "--num_processes", str(processes),
               "--devices_per_process", str(devices), "--timeout_s", "300", "--", *worker]
    p = subprocess.run(cmd, cwd=ROOT, env=cpu_env(devices), capture_output=True, text=True,
                       timeout=360)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


@pytest.mark.slow
def test_two_processes_to_one_and_back(data_dir, tmp_path):
    a, b = tmp_path / "from_2", tmp_path / "from_1"
    out = _run_worker(["save", str(a), data_dir, "fsdp+tensor", "4", "2"], 2, 4)
    assert out.count("SAVED on 2 process(es) x 4 devices") == 2
    out = _run_worker(["restore", str(a), data_dir, "fsdp", "-1", "1"], 1, 4)
    assert "RESTORED bit-identically on 1 process(es) x 4 devices" in out
    assert ckpt_lib.read_meta(a / "checkpoints", 2).process_count == 2

    out = _run_worker(["save", str(b), data_dir, "fsdp+tensor", "4", "2"], 1, 8)
    assert "SAVED on 1 process(es) x 8 devices" in out
    out = _run_worker(["restore", str(b), data_dir, "fsdp", "-1", "1"], 2, 4)
    assert out.count("RESTORED bit-identically on 2 process(es) x 4 devices") == 2


# ---------------------------------------------------------------------------------------
# Broken checkpoints, config changes, keep-best, info


@pytest.fixture(scope="module")
def small(data_dir):
    """(config, 1-device mesh, fresh state), made once."""
    c = tiny(data_dir)
    mesh = mesh_lib.make_mesh(c, jax.devices()[:1])
    return c, mesh, state_lib.create_state(c, Layout.build(c, mesh))


def test_truncated_newest_falls_back_to_previous(small, tmp_path, caplog):
    c, mesh, s1 = small
    s2 = jax.tree.map(lambda x: x + 1, s1)
    ck = ckpt_lib.Checkpointer(tmp_path)
    ck.save(1, s1, ckpt_lib.meta_for(c, 1, mesh))
    ck.save(2, s2, ckpt_lib.meta_for(c, 2, mesh))
    ck.close()
    files = sorted((tmp_path / "checkpoints" / "2").rglob("*/d/*"), key=lambda f: f.stat().st_size)
    with open(files[-1], "r+b") as f:  # the biggest array data file, cut in half
        f.truncate(files[-1].stat().st_size // 2)
    # An interrupted save (Orbax's temporary directory) is never a step.
    (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir()

    ck = ckpt_lib.Checkpointer(tmp_path)
    assert ck.steps() == [1, 2]
    with caplog.at_level("WARNING"):
        state, meta = ck.restore_latest(Layout.build(c, mesh).state)
    assert meta.step == 1
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(s1), strict=True):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "checkpoint step 2 " in warned and "unreadable" in warned
    # The good one stays; the bad one is kept aside for inspection and no longer listed.
    assert ck.steps() == [1] and (tmp_path / "checkpoints" / "1").is_dir()
    assert (tmp_path / "checkpoints_corrupt" / "2" / "state").is_dir()
    ck.save(2, s2, ckpt_lib.meta_for(c, 2, mesh))  # the step can be written again
    ck.close()
    rows = {(r.step, r.status) for r in ckpt_lib.info(tmp_path)}
    assert rows == {(1, "complete"), (2, "complete"), (2, "set aside (broken)"),
                    (3, "incomplete")}


def test_all_broken_is_a_clear_error(small, tmp_path):
    c, mesh, s1 = small
    ck = ckpt_lib.Checkpointer(tmp_path)
    ck.save(1, s1, ckpt_lib.meta_for(c, 1, mesh))
    ck.close()
    (tmp_path / "checkpoints" / "1" / "meta" / "metadata").write_text("{not json")
    with pytest.raises(ckpt_lib.CheckpointError,
                       match=r"step 1 .*unreadable(.|\n)*another --workdir"):
        ckpt_lib.Checkpointer(tmp_path).restore_latest(Layout.build(c, mesh).state)
    assert (tmp_path / "checkpoints" / "1").is_dir()


def test_shape_change_refused_with_keys_named_before_restore(small, data_dir, tmp_path):
    c, mesh, s1 = small
    ck = ckpt_lib.Checkpointer(tmp_path)
    ck.save(5, s1, ckpt_lib.meta_for(c, 5, mesh))
    ck.close()
    c2 = tiny(data_dir)
    c2.model.update(num_layers=3, mlp_ratio=2)
    c2.train.steps = 99
    with pytest.raises(ckpt_lib.ConfigMismatchError,
                       match=r"model\.mlp_ratio: 4 .* vs 2 now, model\.num_layers: 2 .* vs 3"):
        ckpt_lib.Checkpointer(tmp_path).restore_latest(
            Layout.build(c2, mesh).state, check=lambda m: ckpt_lib.check_config(m, c2))
    assert (tmp_path / "checkpoints" / "5").is_dir()  # a refusal touches nothing
    # a change of data order (seed, batch) is refused too: the resume would not be exact
    c3 = tiny(data_dir)
    c3.seed, c3.train.batch_size = 7, 32
    with pytest.raises(ckpt_lib.ConfigMismatchError, match=r"seed: 0 .* vs 7 now"):
        ckpt_lib.check_config(ckpt_lib.read_meta(tmp_path / "checkpoints", 5), c3)
    c3 = tiny(data_dir)
    c3.train.update(steps=99, eval_every=7)
    c3.mesh.rules = "data-only"
    assert ckpt_lib.check_config(ckpt_lib.read_meta(tmp_path / "checkpoints", 5), c3) == [
        "mesh.rules", "train.eval_every", "train.steps"]


@pytest.mark.parametrize("keep_best, kept", [(0, [4, 5]), (1, [2, 4, 5])])
def test_keep_best_by_validation_bits_per_byte(tmp_path, keep_best, kept):
    ck = ckpt_lib.Checkpointer(tmp_path, keep=2, keep_best=keep_best)
    state = {"w": jnp.arange(8.0)}
    for step, bpb in zip(range(1, 6), [3.0, 1.0, 2.0, None, None], strict=True):
        metrics = None if bpb is None else {ckpt_lib.BEST_METRIC: bpb}
        ck.save(step, state, bare_meta(step, "unscanned"), metrics=metrics)
        ck.wait()
    assert ck.steps() == kept
    assert ck.best_step() == (2 if keep_best else None)
    ck.close()


def test_checkpoint_info_command(data_dir, tmp_path):
    c = tiny(data_dir, "fsdp+tensor", fsdp=4, tensor=2)
    c.model.scan_layers = False
    mesh = mesh_lib.make_mesh(c)
    state = state_lib.create_state(c, Layout.build(c, mesh))
    ck = ckpt_lib.Checkpointer(tmp_path, keep_best=1)
    for step in (10, 20):
        ck.save(step, state, ckpt_lib.meta_for(c, step, mesh, goodput={"step": 1.0, "wall": 4.0}),
                metrics={ckpt_lib.BEST_METRIC: 4.5})
    ck.close()
    p = run_cli("checkpoint", "info", "--workdir", tmp_path, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.strip().splitlines()
    assert "size" in lines[0] and "mesh" in lines[0] and len(lines) == 3
    for line, step in zip(lines[1:], (10, 20), strict=True):
        nbytes = sum(f.stat().st_size for f in (tmp_path / "checkpoints" / str(step)).rglob("*")
                     if f.is_file())
        assert re.match(rf"\s*{step}\s+{nbytes / 2**20:.2f} MiB\s+unscanned\s+1,4,2\s+"
                        r"fsdp\+tensor\s+1 x 8\s+complete\s+eval_bits_per_byte=4\.5000\s+"
                        r"goodput=25\.0%$", line), line
    with pytest.raises(ckpt_lib.CheckpointError, match="nothing/checkpoints does not exist"):
        ckpt_lib.info(tmp_path / "nothing")


# ---------------------------------------------------------------------------------------
# The real `train` command in subprocesses: SIGKILL, SIGTERM, exact resume

STEPS, EVERY = 16, 4


def _train_args(workdir, data_dir) -> list[str]:
    return ["train", "--config", str(ROOT / "experiments" / "tiny.py"), "--workdir",
            str(workdir), f"--config.data.data_dir={data_dir}", f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", f"--config.train.checkpoint_every={EVERY}",
            "--config.train.eval_every=0"]


def _env() -> dict[str, str]:
    return cpu_env(2, PYTHONUNBUFFERED="1")


def _run(workdir, data_dir) -> str:
    p = run_cli(*_train_args(workdir, data_dir), env=_env())
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    return p.stdout


def _interrupt(workdir, data_dir, sig: int, at_step: int) -> tuple[int, str]:
    """Starts `train`, sends `sig` once step `at_step` is logged and a checkpoint is
    complete; returns (exit code, output)."""
    p = subprocess.Popen(cli_command(*_train_args(workdir, data_dir)), cwd=ROOT, env=_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(600, p.kill)
    watchdog.start()
    out, sent = [], False
    ckdir = pathlib.Path(workdir) / "checkpoints"
    for line in p.stdout:
        out.append(line)
        m = re.match(r"step (\d+): loss", line)
        if (not sent and m and int(m.group(1)) >= at_step
                and any(d.name.isdigit() for d in ckdir.iterdir())):
            p.send_signal(sig)
            sent = True
    rc = p.wait()
    watchdog.cancel()
    assert sent, "".join(out)[-3000:]
    return rc, "".join(out)


def _losses(workdir) -> dict[int, list[tuple]]:
    rows: dict[int, list[tuple]] = {}
    for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl"):
        rows.setdefault(r["step"], []).append(
            (r["loss"], r["grad_norm"], r["bits_per_byte"], r["learning_rate"]))
    return rows


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory) -> dict[int, tuple]:
    """An uninterrupted run: step -> (loss, grad norm, bits/byte, learning rate)."""
    workdir = tmp_path_factory.mktemp("reference")
    _run(workdir, data_dir)
    rows = _losses(workdir)
    assert sorted(rows) == list(range(1, STEPS + 1))
    return {s: v[0] for s, v in rows.items()}


def _assert_same_as_reference(workdir, reference, resumed_from: int, context: str) -> None:
    rows = _losses(workdir)
    assert sorted(rows) == list(range(1, STEPS + 1)), context
    for step, values in rows.items():
        # Rows the interrupted run wrote after its last checkpoint are dropped on resume.
        assert len(values) == 1, (context, step, resumed_from, values)
        assert values[0] == reference[step], f"{context}: step {step}: {values[0]} != " \
            f"{reference[step]}"


# The step at which the signal is sent is drawn from a fixed seed (so a failure reproduces)
# and named in every assertion message.
SIGNAL_STEP_SEED = 5


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(data_dir, tmp_path, reference):
    kill_at = random.Random(SIGNAL_STEP_SEED).randrange(EVERY + 1, STEPS - 1)
    context = f"SIGKILL once step {kill_at} was logged (seed {SIGNAL_STEP_SEED})"
    rc, out = _interrupt(tmp_path, data_dir, signal.SIGKILL, kill_at)
    assert rc == -signal.SIGKILL, (context, out[-2000:])
    saved = ckpt_lib.Checkpointer(tmp_path).steps()
    assert saved and max(saved) <= kill_at + 1, (context, saved)
    out = _run(tmp_path, data_dir)
    m = re.search(r"resumed from step (\d+)", out)
    assert m and int(m.group(1)) == max(saved), (context, saved, out[-2000:])
    _assert_same_as_reference(tmp_path, reference, int(m.group(1)), context)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_exits_zero_and_resumes_bit_identically(data_dir, tmp_path, reference,
                                                             sig):
    term_at = random.Random(SIGNAL_STEP_SEED).randrange(EVERY + 1, STEPS - 4)
    context = f"{sig.name} once step {term_at} was logged (seed {SIGNAL_STEP_SEED})"
    rc, out = _interrupt(tmp_path, data_dir, sig, term_at)
    assert rc == 0, (context, out[-2000:])
    m = re.search(rf"{sig.name}: saved step (\d+); exiting", out)
    assert m, (context, out[-2000:])
    reached = int(m.group(1))
    logged = max(r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl"))
    assert term_at <= reached == logged < STEPS, (context, reached, logged)
    assert max(ckpt_lib.Checkpointer(tmp_path).steps()) == reached, context
    out = _run(tmp_path, data_dir)
    assert f"resumed from step {reached} " in out, (context, out[-2000:])
    _assert_same_as_reference(tmp_path, reference, reached, context)


if __name__ == "__main__":
    _worker(sys.argv[1:])
