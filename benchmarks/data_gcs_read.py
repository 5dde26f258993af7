"""Reading training batches straight from a gs:// data dir, against what a training step
consumes.

    python benchmarks/data_gcs_read.py [--configs tiny,default] [--seconds 5] [--train_steps 12]

Cloud Storage here is fake-gcs-server on 127.0.0.1 (the tests' emulator, `tests/helpers.py`),
on the same 2 cores as the reader: the numbers are this client's cost and the emulator's
latency, not a real bucket's (expect tens of ms per object request on GCS; ArrayRecord keeps
one reader per chunk file and reads a record per request). For each config: the corpus is
prepared into the bucket (`data prepare`'s route), then random training batches
(`TrainData.local_rows`, the rows a process reads per step) are timed from the bucket and
from a local data dir; a short `train` run on the local dir gives the tokens/s a step
consumes. Writes benchmarks/results/data_gcs_read.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from common import ROOT, git_commit, write_results

sys.path.insert(0, str(ROOT / "tests"))


def read_rate(cfg, seconds: float) -> dict:
    """Random training batches (steps drawn far apart: no two share a cache block)."""
    from gopher_jax.data import pipeline

    t0 = time.perf_counter()
    data = pipeline.TrainData(cfg)
    open_s = time.perf_counter() - t0
    B, L = cfg.train.batch_size, cfg.data.seq_len
    record_bytes = (2 * (L + 1) + 1) * 4
    t0 = time.perf_counter()
    data.local_rows(0)
    first_s = time.perf_counter() - t0
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        data.local_rows(1 + 7919 * n)
        n += 1
    dt = time.perf_counter() - t0
    return {"open_s": open_s, "first_batch_s": first_s, "batches": n,
            "batches_per_s": n / dt, "tokens_per_s": n * B * L / dt,
            "MB_per_s": n * B * record_bytes / dt / 1e6}


def train_rate(config: str, data_dir: str, steps: int, env: dict) -> float:
    """Median tokens/s of a short `train` run's logged steps (the first, compiling, left out)."""
    import json

    with tempfile.TemporaryDirectory() as work:
        p = subprocess.run([sys.executable, "-m", "gopher_jax", "train", "--config", config,
                            f"--workdir={work}", f"--config.data.data_dir={data_dir}",
                            f"--config.train.steps={steps}", "--config.train.log_every=2",
                            "--config.train.eval_every=0", f"--config.train.checkpoint_every="
                            f"{steps}", "--config.train.warmup_steps=1"],
                           cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode:
            raise RuntimeError(p.stderr[-2000:])
        rows = [json.loads(x) for x in open(os.path.join(work, "metrics.jsonl"))]
    rates = [r["tokens_per_s"] for r in rows if r.get("split") == "train"
             and "tokens_per_s" in r][1:]
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="tiny,default")
    p.add_argument("--seconds", type=float, default=5.0, help="time per read measurement")
    p.add_argument("--train_steps", type=int, default=12)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" /
                                        "data_gcs_read.json"))
    args = p.parse_args()

    import helpers

    from gopher_jax import config as config_lib
    from gopher_jax import storage
    from gopher_jax.data import pipeline

    root = tempfile.mkdtemp(prefix="gcs_bench")
    proc, url = helpers.start_fake_gcs(os.path.join(root, "gcs"))
    try:
        os.environ["STORAGE_EMULATOR_HOST"] = url
        storage.configure()
        helpers.create_bucket(url, "bench")
        env = helpers.cpu_env(1)
        results = {}
        for name in args.configs.split(","):
            path = str(ROOT / "experiments" / f"{name}.py")
            local = config_lib.load(path)
            local.data.data_dir = os.path.join(root, f"{name}_data")
            remote = config_lib.load(path)
            remote.data.data_dir = f"gs://bench/{name}_data"
            t0 = time.perf_counter()
            pipeline.prepare(local)
            local_prepare_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            info = pipeline.prepare(remote)
            remote_prepare_s = time.perf_counter() - t0
            r = {"batch_size": remote.train.batch_size, "seq_len": remote.data.seq_len,
                 "train_chunks": info.splits[remote.data.train_split].num_chunks,
                 "prepare_local_s": local_prepare_s, "prepare_gs_s": remote_prepare_s,
                 "gs": read_rate(remote, args.seconds),
                 "local": read_rate(local, args.seconds),
                 "train_tokens_per_s": train_rate(path, local.data.data_dir,
                                                  args.train_steps, env)}
            r["gs_over_train"] = r["gs"]["tokens_per_s"] / r["train_tokens_per_s"]
            results[name] = r
            print(f"{name}: gs:// {r['gs']['tokens_per_s']:,.0f} tokens/s "
                  f"({r['gs']['MB_per_s']:.2f} MB/s, first batch {r['gs']['first_batch_s']:.2f}"
                  f" s), local {r['local']['tokens_per_s']:,.0f} tokens/s; a training step "
                  f"consumes {r['train_tokens_per_s']:,.0f} tokens/s: gs:// reads "
                  f"{r['gs_over_train']:,.0f}x that", flush=True)
    finally:
        proc.terminate()
        proc.wait()
    write_results(args.out, {
        "commit": git_commit(), "storage": "fake-gcs-server on 127.0.0.1 (not a real bucket)",
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0], "read_seconds": args.seconds, "configs": results})


if __name__ == "__main__":
    main()
