"""Training-step throughput against this machine's matmul peak, measured in the same run.

    python benchmarks/train_step.py                      # gopher_44m shapes, L=512, 1 device
    python benchmarks/train_step.py --devices 8 --rules fsdp

Prints and writes JSON (benchmarks/results/train_step_<devices>dev.json): step time (median
of >= 10 steady-state steps), tokens/s, model FLOP/s, MFU against the measured matmul peak
(model FLOPs in PaLM's convention, and counting only the causal half of attention), the
compiler's FLOPs per step against the model formula, and with `--profile DIR` a jax.profiler
trace of two steps (open it in Perfetto or TensorBoard) summarised as time per model part
(the named scopes in the model), pass and kind of op (matmul or not).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import sys
import time

SCOPES = ("attention", "mlp", "embed", "logits", "cross_entropy", "optimizer")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, bool]]:
    """Instruction name -> (op_name metadata, whether it is or calls a dot)."""
    dot_comps, ops = set(), {}
    comp = None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) ", line)
        if head:
            comp = head.group(1)
        elif " dot(" in line and comp:
            dot_comps.add(comp)
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
        if not m:
            continue
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        is_dot = " dot(" in line or bool(calls and calls.group(1) in dot_comps)
        ops[m.group(1)] = (op_name.group(1) if op_name else "", is_dot)
    return ops


def profile_breakdown(trace_dir: pathlib.Path, hlo_text: str, steps: int) -> dict:
    """Milliseconds per step by (model part, pass, matmul or not), from the trace's XLA ops."""
    trace = sorted(trace_dir.glob("plugins/profile/*/perfetto_trace.json.gz"))[-1]
    events = json.load(gzip.open(trace))["traceEvents"]
    ops = hlo_ops(hlo_text)
    us, per_op = collections.Counter(), collections.Counter()
    for e in events:
        name = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") != "X" or not name:
            continue
        op_name, is_dot = ops.get(name, ("", False))
        part = next((sc for sc in SCOPES if sc in op_name), "other")
        pas = "backward" if "transpose(" in op_name else "forward"
        if part == "optimizer":
            pas = "update"
        us[(part, pas, "matmul" if is_dot else "other")] += e["dur"]
        per_op[(name, op_name)] += e["dur"]
    total = sum(us.values())
    top = [{"op": k[0], "op_name": k[1], "ms_per_step": v / steps / 1e3}
           for k, v in per_op.most_common(25)]
    rows = [{"part": k[0], "pass": k[1], "kind": k[2], "ms_per_step": v / steps / 1e3,
             "share": v / total} for k, v in us.most_common()]
    return {"trace": str(trace), "op_ms_per_step": total / steps / 1e3, "rows": rows,
            "top_ops": top}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="experiments/gopher_44m.py")
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--rules", default="fsdp")
    p.add_argument("--remat", default="none")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block_q", type=int, default=None, help="model.attention_block_q override")
    p.add_argument("--scan", type=int, default=None, help="model.scan_layers override (0/1)")
    p.add_argument("--attention_impl", default=None, help="model.attention_impl override")
    p.add_argument("--out", default="")
    p.add_argument("--profile", default="", help="trace two steps into this directory")
    a = p.parse_args()
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + f" --xla_force_host_platform_device_count={a.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np

    from gopher_jax import config as config_lib
    from gopher_jax import hardware
    from gopher_jax.layout import Layout
    from gopher_jax.model import sizes
    from gopher_jax.parallel import mesh as mesh_lib
    from gopher_jax.train import state as state_lib
    from gopher_jax.train import step as step_lib

    c = config_lib.load(a.config)
    c.data.seq_len = a.seq_len
    c.train.batch_size = a.batch
    c.train.microbatches = 1
    c.model.update(remat_policy=a.remat, dtype=a.dtype, param_dtype="float32")
    if a.block_q is not None:
        c.model.attention_block_q = a.block_q
    if a.scan is not None:
        c.model.scan_layers = bool(a.scan)
    if a.attention_impl is not None:
        c.model.attention_impl = a.attention_impl
    c.train.master_fp32 = False
    c.mesh.update(rules=a.rules, data=1, fsdp=-1, tensor=1)
    if a.rules == "data-only":
        c.mesh.update(data=-1, fsdp=1)
    mesh = mesh_lib.make_mesh(c)
    layout = Layout.build(c, mesh)

    load_before = os.getloadavg()[0]
    peak_total = hardware.measure_matmul_peak(a.dtype, n=4096, reps=3)

    state = state_lib.create_state(c, layout)
    train_step = step_lib.make_train_step(c, layout)
    rng = np.random.default_rng(0)
    b, t = a.batch, a.seq_len
    shapes = {k: v.shape for k, v in layout.batch.items()}
    batch = jax.device_put({
        "tokens": rng.integers(0, c.model.vocab_size, shapes["tokens"], dtype=np.int32),
        "segment_ids": np.ones(shapes["segment_ids"], np.int32),
        "num_bytes": np.full(shapes["num_bytes"], 4 * t, np.int32),
    }, layout.batch_sharding)

    # The compiler's count, on the unscanned model (XLA counts a scanned body once).
    cu = c.copy_and_resolve_references()
    cu.model.scan_layers = False
    unscanned = Layout.build(cu, mesh)
    with jax.set_mesh(mesh):
        lowered = step_lib.make_train_step(cu, unscanned).lower(unscanned.state,
                                                                 unscanned.batch)
        cost = lowered.compile().cost_analysis()
        compiler_flops = float(cost.get("flops", float("nan")))

        t0 = time.perf_counter()
        state, m = train_step(state, batch)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        for _ in range(2):  # warm-up
            state, m = train_step(state, batch)
        jax.block_until_ready(m)
        times = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            state, m = train_step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t0)
        profile = None
        if a.profile:
            hlo_text = train_step.lower(state, batch).compile().as_text()
            with jax.profiler.trace(a.profile, create_perfetto_trace=True):
                for _ in range(2):
                    state, m = train_step(state, batch)
                    jax.block_until_ready(m)
            profile = profile_breakdown(pathlib.Path(a.profile), hlo_text, 2)
    step_s = float(np.median(times))
    tokens = b * t
    model_flops = sizes.flops_per_token(c.model, t)["train"] * tokens
    causal_flops = sizes.flops_per_token(c.model, t, causal=True)["train"] * tokens
    peak_after = hardware.measure_matmul_peak(a.dtype, n=4096, reps=3)
    peak = max(peak_total, peak_after)
    res = {
        "config": a.config, "seq_len": t, "batch": b, "devices": a.devices, "rules": a.rules,
        "remat": a.remat, "dtype": a.dtype, "attention_block_q": c.model.attention_block_q,
        "scan_layers": c.model.scan_layers, "attention_impl": c.model.attention_impl,
        "step_time_s_median": step_s, "step_times_s": times, "compile_s": compile_s,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_step": model_flops,
        "model_flops_per_s": model_flops / step_s,
        "matmul_peak_flops_per_s": peak,
        "matmul_peak_before_after": [peak_total, peak_after],
        "matmul_n": 4096,
        "mfu": model_flops / step_s / peak,
        "model_flops_per_step_causal": causal_flops,
        "mfu_causal": causal_flops / step_s / peak,
        # The compiler's count is per device; the peak is the whole machine's.
        "hfu_compiler": compiler_flops * a.devices / step_s / peak,
        "compiler_flops_per_step": compiler_flops,
        "compiler_over_model_flops": compiler_flops / model_flops,
        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        "cpu_count": os.cpu_count(),
        "loss_finite": bool(jnp.isfinite(m["loss"])),
        "profile": profile,
    }
    for k in ("step_time_s_median", "tokens_per_s", "model_flops_per_s",
              "matmul_peak_flops_per_s", "mfu", "mfu_causal", "hfu_compiler",
              "compiler_over_model_flops",
              "loadavg_1min_before_after"):
        print(f"{k:>28}: {res[k]}")
    if profile:
        print(f"profile: {profile['op_ms_per_step']:.0f} ms of XLA ops per step "
              f"(step {1e3 * step_s:.0f} ms); trace {profile['trace']}")
        for r in profile["rows"]:
            print(f"  {r['part']:>14} {r['pass']:>8} {r['kind']:>6}: {r['ms_per_step']:8.1f} ms "
                  f"{100 * r['share']:5.1f}%")
    out = pathlib.Path(a.out or f"benchmarks/results/train_step_{a.devices}dev.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
