"""Sampling speed with and without the KV cache, on the gopher_44m shapes.

    python benchmarks/sampling.py [--contexts 128 512 2048] [--new_tokens 16]

Random-init gopher_44m (8 layers, d_model 512, vocab 32,000), float32, one CPU device, batch
1, greedy. For each context C (data.seq_len = C) the prompt fills the context, then
--new_tokens tokens are generated:
- cached: `sample.generate` (one prefill of the prompt, then one cached step per token);
- uncached: the previous `sample.generate` (the model re-run over the last C tokens for every
  new token, padded to a power of two), kept here as the baseline.
Both are timed warm (compiled by a first call). Only the first new token has the same
context on both paths (then the uncached window slides; the cache keeps the whole prompt),
so only its equality is checked. Prints a table and writes benchmarks/results/sampling.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import ROOT, git_commit, write_results
from flax import nnx

from gopher_jax import config as config_lib
from gopher_jax import sample
from gopher_jax.model import decode, gopher


def uncached_generate(forward, window: int, prompt: list[int], n: int) -> list[int]:
    """Greedy, as sample.generate did before the cache: each token re-runs the model over the
    last `window` tokens."""
    ids = list(prompt)
    for _ in range(n):
        context = ids[-window:]
        width = max(16, 1 << (len(context) - 1).bit_length())
        toks = jnp.asarray(np.pad(np.array(context, np.int32), (0, width - len(context))))[None]
        ids.append(int(jnp.argmax(forward(toks, len(context)))))
    return ids[len(prompt):]


def timed(fn, repeats: int) -> tuple[list[float], object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def measure(c, graphdef: nnx.GraphDef, params, ctx: int, n: int, repeats: int) -> dict:
    """One context: both paths on the same prompt of `ctx` tokens."""
    c.data.seq_len = ctx
    prompt = [int(t) for t in np.random.default_rng(ctx).integers(0, c.model.vocab_size, ctx)]

    def cached() -> list[int]:
        return sample.generate(c, params, prompt, n, 0.0, 0, 0, -1)

    cached()  # compile
    cached_s, cached_out = timed(cached, repeats)

    prefill = jax.jit(lambda p, t: decode.prefill(nnx.merge(graphdef, p), t, ctx + n))
    toks = jnp.asarray(prompt, jnp.int32)[None]
    jax.block_until_ready(prefill(params, toks))
    prefill_s, _ = timed(lambda: jax.block_until_ready(prefill(params, toks)), repeats)

    @jax.jit
    def forward(params, tokens, length):
        logits = gopher.apply(graphdef, params, tokens)
        return jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=False)

    def run_forward(tokens: jax.Array, length: int) -> jax.Array:
        return forward(params, tokens, length)

    uncached_generate(run_forward, ctx, prompt, 1)  # compile
    t0 = time.perf_counter()
    uncached_out = uncached_generate(run_forward, ctx, prompt, n)
    uncached_s = time.perf_counter() - t0

    cs, ps = statistics.median(cached_s), statistics.median(prefill_s)
    return {
        "context": ctx, "new_tokens": n,
        "cached": {"seconds": cached_s, "tokens_per_s": n / cs, "prefill_seconds": prefill_s,
                   "step_ms": 1e3 * (cs - ps) / n},
        "uncached": {"seconds": uncached_s, "tokens_per_s": n / uncached_s,
                     "token_ms": 1e3 * uncached_s / n},
        "speedup": uncached_s / cs,
        # The first new token sees the same context on both paths; later ones do not (the
        # uncached path slides its window of C tokens, the cache keeps the whole prompt).
        "first_token_same": cached_out[:1] == uncached_out[:1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "experiments" / "gopher_44m.py"))
    p.add_argument("--contexts", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of the cached path")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sampling.json"))
    args = p.parse_args()

    c = config_lib.load(args.config, ["model.dtype=float32"])
    graphdef, state = nnx.split(gopher.create(c.model, 0))
    params = nnx.to_pure_dict(state)
    load_before = os.getloadavg()[0]
    rows = []
    print(f"{'context':>8} {'cached tok/s':>13} {'uncached tok/s':>15} {'speed-up':>9} "
          f"{'prefill s':>10} {'cached step ms':>15} {'uncached token ms':>18} {'1st same':>9}",
          flush=True)
    for ctx in args.contexts:
        r = measure(c, graphdef, params, ctx, args.new_tokens, args.repeats)
        rows.append(r)
        print(f"{ctx:>8} {r['cached']['tokens_per_s']:>13.2f} "
              f"{r['uncached']['tokens_per_s']:>15.2f} {r['speedup']:>8.1f}x "
              f"{statistics.median(r['cached']['prefill_seconds']):>10.3f} "
              f"{r['cached']['step_ms']:>15.1f} {r['uncached']['token_ms']:>18.1f} "
              f"{str(r['first_token_same']):>9}", flush=True)

    out = {
        "config": os.path.relpath(args.config, ROOT), "dtype": "float32", "batch": 1,
        "greedy": True,
        "commit": git_commit(),
        "devices": jax.device_count(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "load_avg_1m_before": load_before, "load_avg_1m_after": os.getloadavg()[0],
        "results": rows,
    }
    write_results(args.out, out)


if __name__ == "__main__":
    main()
