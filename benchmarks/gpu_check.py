"""The parts of benchmarks/gpu_check.sh that are Python: the attention comparison and the
summary. Runs on CPU too (the kernel in interpret mode; tiny shapes), which is how the
tests check it.

    python benchmarks/gpu_check.py attention --out A.json [--lengths 512 ... 8192]
    python benchmarks/gpu_check.py summary --dir OUT --peak-tflops 790

`attention`: a sweep of the kernel's tile and pipelining depth at one T (which compile,
how fast); then, with the fastest, the Pallas GPU kernel (model/gpu_attention.py) against
`xla_attention` at each T: the output and the gradients of qu, qv, k, v, r (errors as a
share of the largest |value| of XLA's, the tests' measure) and the time of forward +
backward (median of `--reps`), with tokens/s. Batch: `--batch-tokens` // T rows (at least
1); 12 heads of 128
(gopher_417m's). `summary`: one gpu_check.json from the parts' JSON in DIR (status.tsv: each
part's exit status and seconds; train_step_*.json from benchmarks/train_step.py; the default
run's metrics.jsonl),
with MFU against the given bf16 peak and against the datasheet peak in gopher_jax.hardware.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import statistics
import time

from common import git_commit, write_results

TOL = {"float32": 2e-5, "bfloat16": 3e-2}
GRADS = ("out", "dqu", "dqv", "dk", "dv", "dr")


def _timed(fn, args, reps: int) -> tuple[list, float]:
    """fn's (blocked) result and the median seconds of `reps` calls after the first."""
    import jax

    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def attention(a: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from gopher_jax.model import gpu_attention
    from gopher_jax.model.attention import xla_attention

    def value_and_grads(attend, seg, ct):
        def loss(*xs):
            out = attend(*xs, seg)
            return jnp.sum(out.astype(jnp.float32) * ct), out
        grad = jax.value_and_grad(loss, argnums=tuple(range(5)), has_aux=True)
        return jax.jit(lambda *xs: (lambda r: [r[0][1], *r[1]])(grad(*xs)))

    def inputs(length):
        batch = max(1, a.batch_tokens // length)
        keys = jax.random.split(jax.random.key(length), 7)
        shape = (batch, length, a.heads, a.head_dim)
        xs = [jax.random.normal(k, shape, a.dtype) for k in keys[:4]]
        xs.append(jax.random.normal(keys[4], (length, a.heads, a.head_dim), a.dtype))
        seg = jnp.sort(jax.random.randint(keys[5], (batch, length), 0, a.segments), axis=1)
        return batch, xs, seg, jax.random.normal(keys[6], shape, jnp.float32)

    def kernel(block, stages):
        return functools.partial(gpu_attention.gpu_flash_attention, block=block, stages=stages)

    dev = jax.devices()[0]
    rows, sweep = [], []
    out = {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
           "dtype": a.dtype, "heads": a.heads, "head_dim": a.head_dim, "block": a.block,
           "stages": gpu_attention.DEFAULT_STAGES if a.stages is None else a.stages,
           "xla_block_q": a.block_q, "tolerance": TOL[a.dtype], "sweep": sweep, "rows": rows}
    # Tile side x pipelining depth at one length: which compile (shared memory) and how fast.
    _, xs, seg, ct = inputs(a.sweep_length)
    for spec in a.sweep:
        block, stages = (int(x) for x in spec.split(":"))
        entry = {"block": block, "stages": stages, "seq_len": a.sweep_length}
        try:
            entry["fwd_bwd_ms"] = 1e3 * _timed(
                value_and_grads(kernel(block, stages), seg, ct), xs, max(1, a.reps // 2))[1]
        except Exception as e:  # noqa: BLE001 -- a config this GPU cannot compile is a result
            entry["error"] = str(e).splitlines()[0][:300]
        print(f"sweep T={a.sweep_length} block {block} stages {stages}: "
              f"{entry.get('fwd_bwd_ms', entry.get('error'))}", flush=True)
        sweep.append(entry)
        write_results(a.out, out)
    ok = [e for e in sweep if "fwd_bwd_ms" in e]
    if ok:
        best = min(ok, key=lambda e: e["fwd_bwd_ms"])
        out.update(block=best["block"], stages=best["stages"])
    impls = {"pallas_gpu": kernel(out["block"], out["stages"]),
             "xla": functools.partial(xla_attention, block_q=a.block_q)}
    for length in a.lengths:
        batch, xs, seg, ct = inputs(length)
        got, row = {}, {"seq_len": length, "batch": batch}
        for name, fn in impls.items():
            got[name], seconds = _timed(value_and_grads(fn, seg, ct), xs, a.reps)
            row[f"{name}_fwd_bwd_ms"] = 1e3 * seconds
            row[f"{name}_tokens_per_s"] = batch * length / seconds
        errs = {}
        for name, g, w in zip(GRADS, got["pallas_gpu"], got["xla"], strict=True):
            g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
            errs[name] = float(np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), 1.0))
        row.update(max_error=errs, within_tolerance=max(errs.values()) <= TOL[a.dtype],
                   speedup=row["xla_fwd_bwd_ms"] / row["pallas_gpu_fwd_bwd_ms"])
        print(f"T={length:5d} B={batch:3d}: kernel {row['pallas_gpu_fwd_bwd_ms']:9.2f} ms, "
              f"xla {row['xla_fwd_bwd_ms']:9.2f} ms ({row['speedup']:.2f}x), "
              f"max error {max(errs.values()):.1e}", flush=True)
        rows.append(row)
        write_results(a.out, out)  # after each length: a part cut at its cap keeps its rows
    return out


def _read(path: pathlib.Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def summary(a: argparse.Namespace) -> dict:
    from gopher_jax import hardware

    d = pathlib.Path(a.dir)
    status = {}
    if (d / "status.tsv").exists():  # part, exit status (124: timed out), seconds
        for line in (d / "status.tsv").read_text().splitlines():
            name, rc, seconds = line.split("\t")
            status[name] = {"rc": int(rc), "seconds": int(seconds)}
    out = {"commit": git_commit(), "parts": status, "attention": _read(d / "attention.json")}
    device = (out["attention"] or {}).get("device")
    datasheet = hardware.peak_bf16(device) if device else None
    out["peaks_bf16_flops_per_s"] = {"given": a.peak_tflops * 1e12, "datasheet": datasheet}
    steps = {}
    for path in sorted(d.glob("train_step_*.json")):
        r = json.loads(path.read_text())
        rate = r["model_flops_per_s"]
        steps[path.stem.removeprefix("train_step_")] = {
            "config": r["config"], "seq_len": r["seq_len"], "batch": r["batch"],
            "dtype": r["dtype"], "step_time_s": r["step_time_s_median"],
            "tokens_per_s": r["tokens_per_s"], "model_flops_per_s": rate,
            "mfu_given_peak": rate / (a.peak_tflops * 1e12),
            "mfu_datasheet": rate / datasheet if datasheet else None,
            "mfu_causal_given_peak": r["model_flops_per_step_causal"]
            / r["step_time_s_median"] / (a.peak_tflops * 1e12),
            "loss_finite": r["loss_finite"]}
    out["train_step"] = steps
    metrics = d / "default_run" / "metrics.jsonl"
    if metrics.exists():
        rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()]
        train = [r for r in rows if r.get("split", "train") == "train" and "loss" in r]
        out["default_run"] = train[-1] if train else None
    for name, s in steps.items():
        print(f"{name:>24}: {s['tokens_per_s']:10.0f} tokens/s, "
              f"MFU {s['mfu_given_peak']:.3f} of {a.peak_tflops:.0f} TFLOP/s")
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="part", required=True)
    at = sub.add_parser("attention")
    at.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    at.add_argument("--batch-tokens", type=int, default=16384)
    at.add_argument("--heads", type=int, default=12)
    at.add_argument("--head-dim", type=int, default=128)
    at.add_argument("--dtype", default="bfloat16", choices=sorted(TOL))
    at.add_argument("--segments", type=int, default=4, help="documents per row")
    at.add_argument("--block", type=int, default=64, help="the kernel's tile")
    at.add_argument("--stages", type=int, default=None,
                    help="Triton num_stages (default: the kernel's DEFAULT_STAGES)")
    at.add_argument("--sweep", nargs="*", default=["32:1", "64:1", "64:2"],
                    help="block:stages tried first; the fastest that compiles is used")
    at.add_argument("--sweep-length", type=int, default=2048)
    at.add_argument("--block-q", type=int, default=128, help="the XLA path's query block")
    at.add_argument("--reps", type=int, default=5)
    at.add_argument("--out", required=True)
    sm = sub.add_parser("summary")
    sm.add_argument("--dir", required=True)
    sm.add_argument("--peak-tflops", type=float, required=True)
    a = p.parse_args()
    if a.part == "attention":
        write_results(a.out, attention(a))
    else:
        write_results(pathlib.Path(a.dir) / "gpu_check.json", summary(a))


if __name__ == "__main__":
    main()
