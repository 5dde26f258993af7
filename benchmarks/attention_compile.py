"""Compile time of the XLA attention path against the sequence length: the unrolled query
blocks (`model/attention.py` `unrolled_attention`, one block of 128 queries per 128 tokens)
against the tiled loop (`tiled_attention`, one loop body whatever T). `xla_attention` runs
the first up to `UNROLLED_MAX_BLOCKS` blocks (T <= 512 at blocks of 128), the second beyond.

    python benchmarks/attention_compile.py                       # T = 512 ... 8192, both
    python benchmarks/attention_compile.py --seq_lens 512 2048 --impls tiled

Two programs per (implementation, T), each jit-lowered and compiled for 1 CPU device, nothing
run: "layer", the forward + backward of one attention call (batch 1, gopher_44m's 16 heads of
32, blocks of 128); "step", the whole gopher_44m training step (8 scanned layers, the
config's remat policy, float32, batch 1, Adam). Prints a table and merges the rows into
benchmarks/results/attention_compile.json (so the lengths may be run in separate calls).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from common import ROOT, git_commit, write_results  # noqa: E402

from gopher_jax import config as config_lib  # noqa: E402
from gopher_jax.layout import Layout  # noqa: E402
from gopher_jax.model import attention  # noqa: E402
from gopher_jax.parallel import mesh as mesh_lib  # noqa: E402
from gopher_jax.train import step as step_lib  # noqa: E402

OUT = ROOT / "benchmarks/results/attention_compile.json"


IMPLS = {"unrolled": attention.unrolled_attention, "tiled": attention.tiled_attention}


def timed_compile(fn, *args) -> dict[str, float]:
    t0 = time.perf_counter()
    lowered = fn.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {"lower_s": t1 - t0, "compile_s": t2 - t1,
            "hlo_ops": compiled.as_text().count("\n  ")}


def layer_program(impl, t: int, block: int):
    shape = jax.ShapeDtypeStruct((1, t, 16, 32), jnp.float32)
    r = jax.ShapeDtypeStruct((t, 16, 32), jnp.float32)
    seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(qu, qv, k, v, r, seg):
        return jnp.sum(impl(qu, qv, k, v, r, seg, block_q=block))

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))), (shape,) * 4 + (r, seg)


def step_program(config: str, t: int):
    c = config_lib.load(str(ROOT / config))
    c.data.seq_len = t
    c.train.update(batch_size=1, microbatches=1, master_fp32=False)
    c.model.update(dtype="float32", param_dtype="float32")
    c.mesh.update(rules="fsdp", data=1, fsdp=-1, tensor=1)
    mesh = mesh_lib.make_mesh(c)
    layout = Layout.build(c, mesh)
    return mesh, step_lib.make_train_step(c, layout), (layout.state, layout.batch), c


def markdown_table(rows: list[dict]) -> str:
    """Lower + compile seconds per T, one column per (program, implementation)."""
    cols = [(p, i) for p in ("layer", "step") for i in IMPLS]
    got = {(r["program"], r["impl"], r["seq_len"]): r["lower_s"] + r["compile_s"] for r in rows}
    lines = ["| T | " + " | ".join(f"{p}, {i}" for p, i in cols) + " |",
             "|---:|" + "---:|" * len(cols)]
    for t in sorted({r["seq_len"] for r in rows}):
        cells = [f"{got[(p, i, t)]:.1f} s" if (p, i, t) in got else "" for p, i in cols]
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="experiments/gopher_44m.py")
    p.add_argument("--seq_lens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--impls", nargs="+", default=["unrolled", "tiled"], choices=list(IMPLS))
    p.add_argument("--programs", nargs="+", default=["layer", "step"],
                   choices=["layer", "step"])
    a = p.parse_args()
    results = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    rows = {(r["program"], r["impl"], r["seq_len"]): r for r in results["rows"]}
    block = config_lib.load(str(ROOT / a.config)).model.attention_block_q
    for t in a.seq_lens:
        for impl in a.impls:  # alternated per length: the machine's load drifts
            for program in a.programs:
                saved = attention.ATTENTION_IMPLS["xla"]
                attention.ATTENTION_IMPLS["xla"] = IMPLS[impl]  # what the model calls
                try:
                    if program == "layer":
                        fn, args = layer_program(IMPLS[impl], t, block)
                        row = timed_compile(fn, *args)
                    else:
                        mesh, fn, args, _ = step_program(a.config, t)
                        with jax.set_mesh(mesh):
                            row = timed_compile(fn, *args)
                finally:
                    attention.ATTENTION_IMPLS["xla"] = saved
                row.update(program=program, impl=impl, seq_len=t, block_q=block,
                           loadavg_1min=os.getloadavg()[0], commit=git_commit())
                rows[(program, impl, t)] = row
                print(f"{program:>5} {impl:>8} T={t:>5}: lower {row['lower_s']:6.2f} s, "
                      f"compile {row['compile_s']:6.2f} s, {row['hlo_ops']} HLO lines",
                      flush=True)
    results = {"config": a.config, "device": "1 CPU device",
               "rows": sorted(rows.values(),
                              key=lambda r: (r["program"], r["impl"], r["seq_len"]))}
    write_results(OUT, results)
    print(markdown_table(results["rows"]))

if __name__ == "__main__":
    main()
