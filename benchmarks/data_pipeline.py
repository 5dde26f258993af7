"""Input pipeline throughput at the training batch shape of a config (default: default.py).

    python benchmarks/data_pipeline.py [--config experiments/default.py] [--data_dir DIR]

Prepares the corpus if needed (idempotent), then times host batches (numpy, the rows of one
process), global jax.Array batches on a mesh over all local devices, and the eval iterator.
Prints tokens/s and writes benchmarks/results/data_pipeline.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
from common import ROOT, git_commit, write_results

from gopher_jax import config as config_lib
from gopher_jax.data import pipeline
from gopher_jax.layout import Layout
from gopher_jax.parallel import mesh as mesh_lib


def timed(fn, min_seconds: float) -> tuple[int, float]:
    """Calls fn(i) for i = 0, 1, ... until min_seconds pass; returns (calls, seconds)."""
    fn(0)  # warm up (opens files, compiles nothing)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_seconds:
        fn(n + 1)
        n += 1
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "experiments" / "default.py"))
    p.add_argument("--data_dir", default="")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "data_pipeline.json"))
    args = p.parse_args()

    cfg = config_lib.load(args.config)
    if args.data_dir:
        cfg.data.data_dir = args.data_dir
    t0 = time.perf_counter()
    info = pipeline.prepare(cfg)
    prepare_s = time.perf_counter() - t0

    data = pipeline.TrainData(cfg)
    B, L = cfg.train.batch_size, cfg.data.seq_len
    tokens_per_batch = B * L  # the targets of one step

    def host_batch(step: int) -> None:
        data.local_rows(step)

    sharding = Layout.build(cfg, mesh_lib.make_mesh(cfg)).batch_sharding

    def global_batch(step: int) -> None:
        jax.block_until_ready(data.batch(step, sharding))

    def indices_only(step: int) -> None:
        data.global_indices(step)

    results = {}
    for name, fn in (("indices", indices_only), ("host_numpy", host_batch),
                     ("global_array", global_batch)):
        n, dt = timed(fn, args.seconds)
        results[name] = {"batches_per_s": n / dt, "tokens_per_s": n * tokens_per_batch / dt}
        print(f"{name:>13}: {n / dt:10,.1f} batches/s  {n * tokens_per_batch / dt:14,.0f} "
              "tokens/s", flush=True)

    t0 = time.perf_counter()
    n_eval = sum(int(b["segment_ids"][:, 1:].astype(bool).sum())
                 for b in pipeline.eval_batches(cfg, cfg.data.eval_split, B))
    eval_s = time.perf_counter() - t0
    results["eval_iterator"] = {"tokens_per_s": n_eval / eval_s, "seconds": eval_s}
    print(f"{'eval':>13}: {n_eval / eval_s:14,.0f} tokens/s over the whole "
          f"{cfg.data.eval_split} split ({eval_s:.2f}s)")

    splits = {s: {k: getattr(v, k) for k in ("num_chunks", "num_docs", "num_tokens",
                                             "num_bytes", "tokens_per_byte")}
              for s, v in info.splits.items()}
    for s, v in splits.items():
        print(f"{s:>13}: {v['num_chunks']:,} chunks, {v['num_tokens']:,} tokens, "
              f"{v['num_bytes']:,} bytes, {v['tokens_per_byte']:.4f} tokens/byte")
    out = {
        "config": os.path.relpath(args.config, ROOT) if args.config.startswith(str(ROOT))
        else args.config,
        "commit": git_commit(),
        "dataset": cfg.data.dataset, "vocab_size": cfg.model.vocab_size,
        "batch_size": B, "seq_len": L, "devices": jax.device_count(),
        "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "prepare_seconds": prepare_s,
        "prepare_reused": all(v.reused for v in info.splits.values()),
        "throughput": results, "splits": splits,
    }
    write_results(args.out, out)


if __name__ == "__main__":
    main()
