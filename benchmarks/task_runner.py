"""Throughput of the task runner (gopher_jax/tasks): packed vs unpacked batches, KV cache vs
re-running the window, on the gopher_44m shapes.

    python benchmarks/task_runner.py [--seq_len 256] [--batch 8] [--repeats 2]

Random-init gopher_44m (8 layers, d_model 512, vocab 32,000; random weights: only the speed
is measured), float32, data.seq_len overridden (default 256, to keep the run short on CPU),
params on a mesh of --devices CPU devices through `tasks.run.ShardedModel`. The requests are
synthetic and seeded: contexts of log-uniform length from 4 to seq_len tokens (the spread of
few-shot prompts), log-likelihood continuations of 1-8 tokens (answer choices), greedy
generation of --new_tokens tokens per context with no early stop.

Modes, each timed warm (compiled by a first call), interleaved over --repeats rounds:
- loglikelihood, packed: requests sorted into buckets of 16, 32, ... seq_len tokens;
- loglikelihood, unpacked: batches in request order, each padded to seq_len (the runner
  before packing);
- greedy, cached packed / cached unpacked: prefill then one cached step per token;
- greedy, uncached unpacked: the model re-run over each row's whole (padded) sequence for
  every token (the runner before the cache; it slid a seq_len window, here the window grows,
  as the cached path does, so both give the same tokens).
requests/s counts requests; tokens/s counts real tokens (log-likelihood: each window's
tokens; greedy: generated tokens). Prints a table and writes benchmarks/results/task_runner.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import numpy as np
from common import ROOT, git_commit, write_results
from flax import nnx

from gopher_jax import config as config_lib
from gopher_jax.model import gopher
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.tasks import model_queries, run


def requests(seq_len: int, vocab: int, n_ll: int, n_gen: int, seed: int = 0):
    rng = np.random.default_rng(seed)

    def context() -> list[int]:
        n = int(np.exp(rng.uniform(np.log(4), np.log(seq_len))))
        return [1] + rng.integers(2, vocab, n - 1).tolist()

    ll = [(context(), rng.integers(2, vocab, int(rng.integers(1, 9))).tolist())
          for _ in range(n_ll)]
    return ll, [context() for _ in range(n_gen)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "experiments" / "gopher_44m.py"))
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--ll_requests", type=int, default=48)
    p.add_argument("--gen_requests", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "task_runner.json"))
    args = p.parse_args()

    c = config_lib.load(args.config, ["model.dtype=float32", f"data.seq_len={args.seq_len}"])
    c.mesh.update(rules="fsdp", data=1, fsdp=-1, tensor=1)
    mesh = mesh_lib.make_mesh(c, jax.devices()[:args.devices])
    params = nnx.to_pure_dict(nnx.state(gopher.create(c.model, 0)))
    cached, _ = run.load(c, params, mesh)
    uncached = run.ShardedModel(c, cached.params, cached.layout, cached=False)
    rows = cached.rows(args.batch)
    ll_reqs, contexts = requests(args.seq_len, c.model.vocab_size, args.ll_requests,
                                 args.gen_requests)
    never = lambda ids: False  # noqa: E731

    modes = {
        "loglikelihood packed": lambda: model_queries.loglikelihoods(
            cached, ll_reqs, args.seq_len, rows, packed=True),
        "loglikelihood unpacked": lambda: model_queries.loglikelihoods(
            cached, ll_reqs, args.seq_len, rows, packed=False),
        "greedy cached packed": lambda: model_queries.greedy(
            cached, contexts, args.new_tokens, args.seq_len, rows, never, packed=True),
        "greedy cached unpacked": lambda: model_queries.greedy(
            cached, contexts, args.new_tokens, args.seq_len, rows, never, packed=False),
        "greedy uncached unpacked": lambda: model_queries.greedy(
            uncached, contexts, args.new_tokens, args.seq_len, rows, never, packed=False),
    }
    load_before = os.getloadavg()[0]
    outputs, compile_s = {}, {}
    for name, fn in modes.items():
        t0 = time.perf_counter()
        outputs[name] = fn()
        compile_s[name] = time.perf_counter() - t0
        print(f"first call (compiles) {name}: {compile_s[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, fn in modes.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)

    ll_tokens = sum(min(len(a) + len(b), args.seq_len + 1) - 1 for a, b in ll_reqs)
    gen_tokens = len(contexts) * args.new_tokens
    rows_out = {}
    print(f"{'mode':<26} {'median s':>9} {'spread s':>9} {'requests/s':>11} {'tokens/s':>9}")
    for name, ts in times.items():
        med = statistics.median(ts)
        n, tokens = (len(ll_reqs), ll_tokens) if name.startswith("log") else (len(contexts),
                                                                            gen_tokens)
        rows_out[name] = {"seconds": ts, "first_call_seconds": compile_s[name],
                          "requests_per_s": n / med, "tokens_per_s": tokens / med}
        print(f"{name:<26} {med:>9.2f} {max(ts) - min(ts):>9.2f} {n / med:>11.2f} "
              f"{tokens / med:>9.1f}", flush=True)

    def ratio(a: str, b: str) -> float:
        return statistics.median(times[b]) / statistics.median(times[a])

    speedups = {"loglikelihood packed / unpacked": ratio("loglikelihood packed",
                                                         "loglikelihood unpacked"),
                "greedy cached packed / uncached unpacked": ratio("greedy cached packed",
                                                                  "greedy uncached unpacked"),
                "greedy cached unpacked / uncached unpacked": ratio(
                    "greedy cached unpacked", "greedy uncached unpacked"),
                "greedy cached packed / cached unpacked": ratio("greedy cached packed",
                                                                "greedy cached unpacked")}
    for k, v in speedups.items():
        print(f"speed-up {k}: {v:.2f}x")
    ll_p, ll_u = (np.asarray(outputs[k]) for k in ("loglikelihood packed",
                                                    "loglikelihood unpacked"))
    same = {"loglikelihood max abs diff packed vs unpacked": float(np.abs(ll_p - ll_u).max()),
            "greedy tokens equal, cached packed vs uncached unpacked":
                outputs["greedy cached packed"] == outputs["greedy uncached unpacked"],
            "greedy tokens equal, cached packed vs cached unpacked":
                outputs["greedy cached packed"] == outputs["greedy cached unpacked"]}
    print(same)
    out = {
        "config": os.path.relpath(args.config, ROOT), "random_init": True, "dtype": "float32",
        "seq_len": args.seq_len, "batch": args.batch, "rows_per_batch": rows,
        "devices": args.devices, "ll_requests": len(ll_reqs), "ll_tokens": ll_tokens,
        "gen_requests": len(contexts), "new_tokens": args.new_tokens,
        "context_lengths": sorted(len(c_) for c_ in contexts),
        "commit": git_commit(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
        "results": rows_out, "speedups": speedups, "checks": same,
    }
    write_results(args.out, out)


if __name__ == "__main__":
    main()
