"""Checkpoint I/O: how long training is blocked per async save, against the full save time,
and save/restore throughput against the disk's sequential write speed, measured in one run.

    python benchmarks/checkpoint_io.py [--d_model 256 --num_layers 8 --vocab_size 32000]
        [--batch_size 4] [--saves 3] [--dir DIR]

The model is experiments/tiny.py resized by the flags (the state is params + Adam moments,
fp32), on a mesh over all local devices, trained on synthetic tokens. Per save it times
  blocked: Checkpointer.save() returning (device->host copy; the write goes on behind),
  full:    a save awaited to the end (files written and committed),
  steps:   train steps run while a save is being written, against steps without one.
Disk: a file of the checkpoint's size written in 8 MiB blocks, with and without fsync.
Restore reads files that were just written (page cache warm), as a resume on the same host
would. Writes benchmarks/results/checkpoint_io.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import config as config_lib
from gopher_jax.layout import Layout
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.train import state as state_lib
from gopher_jax.train import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
MB = 1e6


def disk_write_mb_s(directory: pathlib.Path, nbytes: int, fsync: bool) -> float:
    """Sequential write of `nbytes` in 8 MiB blocks (like dd bs=8M [conv=fsync])."""
    block = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    path = directory / "dd.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return nbytes / MB / seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d_model", type=int, default=256, help="heads of 64")
    p.add_argument("--num_layers", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=32_000)
    p.add_argument("--batch_size", type=int, default=4, help="sequences of 64 tokens")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--steps_per_save", type=int, default=3,
                   help="train steps timed while each save is written")
    p.add_argument("--dir", default="", help="where to write (default: a temporary dir)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "checkpoint_io.json"))
    args = p.parse_args()

    c = config_lib.load(ROOT / "experiments" / "tiny.py")
    c.model.update(d_model=args.d_model, num_heads=args.d_model // 64, head_dim=64,
                   num_layers=args.num_layers, vocab_size=args.vocab_size)
    c.train.batch_size = args.batch_size
    mesh = mesh_lib.make_mesh(c)
    layout = Layout.build(c, mesh)
    root = pathlib.Path(args.dir or tempfile.mkdtemp(prefix="ckpt_io_"))
    root.mkdir(parents=True, exist_ok=True)
    workdir = root / "run"
    shutil.rmtree(workdir, ignore_errors=True)

    state = state_lib.create_state(c, layout)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    train_step = step_lib.make_train_step(c, layout)
    rng = np.random.default_rng(0)
    shapes = {k: v.shape for k, v in layout.batch.items()}
    batch = jax.device_put({
        "tokens": rng.integers(0, c.model.vocab_size, shapes["tokens"], dtype=np.int32),
        "segment_ids": np.ones(shapes["segment_ids"], np.int32),
        "num_bytes": np.full(shapes["num_bytes"], 4 * c.data.seq_len, np.int32),
    }, layout.batch_sharding)

    def run_steps(n: int) -> list[float]:
        nonlocal state
        times = []
        with jax.set_mesh(mesh):
            for _ in range(n):
                t0 = time.perf_counter()
                state, m = train_step(state, batch)
                jax.block_until_ready(m)
                times.append(time.perf_counter() - t0)
        return times

    run_steps(2)  # compile
    base_steps = run_steps(args.saves * args.steps_per_save)

    ck = ckpt_lib.Checkpointer(workdir, keep=2)
    blocked, full, during = [], [], []
    for i in range(args.saves):
        step = int(state["step"])
        t0 = time.perf_counter()
        ck.save(step, state, ckpt_lib.meta_for(c, step, mesh), force=True)
        blocked.append(time.perf_counter() - t0)
        during += run_steps(args.steps_per_save)  # while the files are being written
        ck.wait()
        # The same again, awaited to the end: the full save time.
        run_steps(1)
        step = int(state["step"])
        t0 = time.perf_counter()
        ck.save(step, state, ckpt_lib.meta_for(c, step, mesh), force=True)
        ck.wait()
        full.append(time.perf_counter() - t0)
        run_steps(1)  # the next save is of a new step
        print(f"save {i}: blocked {blocked[-1]:.3f} s, full {full[-1]:.3f} s", flush=True)
    last = ck.steps()[-1]
    disk_bytes = sum(f.stat().st_size for f in (ck.directory / str(last)).rglob("*")
                     if f.is_file())

    target = layout.state
    restores = []
    for _ in range(args.saves):
        t0 = time.perf_counter()
        jax.block_until_ready(ck.restore(last, target))
        restores.append(time.perf_counter() - t0)
    ck.close()

    dd_fsync = [disk_write_mb_s(root, state_bytes, fsync=True) for _ in range(2)]
    dd_cache = [disk_write_mb_s(root, state_bytes, fsync=False) for _ in range(2)]
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    result = {
        "state_mb": state_bytes / MB,
        "checkpoint_on_disk_mb": disk_bytes / MB,
        "model": {k: c.model[k] for k in ("d_model", "num_layers", "vocab_size")},
        "batch": [c.train.batch_size, c.data.seq_len],
        "mesh": {k: int(v) for k, v in mesh.shape.items()},
        "saves": args.saves,
        "blocked_per_async_save_s": med(blocked),
        "full_save_s": med(full),
        "blocked_fraction_of_full_save": med(blocked) / med(full),
        "train_step_s": med(base_steps),
        "train_step_during_save_s": med(during),
        "train_step_during_save_max_s": max(during),
        "save_mb_s": state_bytes / MB / med(full),
        "restore_s": med(restores),
        "restore_mb_s": state_bytes / MB / med(restores),
        "disk_seq_write_fsync_mb_s": max(dd_fsync),
        "disk_seq_write_page_cache_mb_s": max(dd_cache),
        "save_fraction_of_disk_fsync_speed": state_bytes / MB / med(full) / max(dd_fsync),
        "raw": {"blocked_s": blocked, "full_s": full, "restore_s": restores,
                "dd_fsync_mb_s": dd_fsync, "dd_page_cache_mb_s": dd_cache},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "devices": jax.device_count(), "backend": jax.default_backend(),
                    "load_avg_at_end": os.getloadavg(), "jax": jax.__version__},
    }
    print(json.dumps({k: v for k, v in result.items() if k != "raw"}, indent=2))
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
