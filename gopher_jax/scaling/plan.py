"""`scaling plan`: for a FLOP budget, the compute-optimal N and D of a law L(N, D), the nearest
Gopher-shaped config, its tokens and steps at a batch, and (optionally) its per-chip memory
on a TPU topology through the AOT compile. No printing.

The shape follows Table 1 (experiments/gopher_*.py): feed-forward 4 x d_model, heads x
key/value size = d_model, key/value size d_model/16 rounded to a power of two within 16-128
(32 at 512, 64 at 768, 128 from 1,536 on, as in the table), and depth from the line through
the six rows in log(layers) vs log(d_model). Among those shapes the plan takes the one whose
parameter count (embeddings included, as the law counts N) is nearest N_opt in log. The
learning rate, batch, clipping and precision recipe come from the Table-1 row nearest in size.
"""

from __future__ import annotations

import copy
import math
import pathlib
from typing import Any

import ml_collections
import numpy as np

from gopher_jax import config as config_lib
from gopher_jax.model import sizes
from gopher_jax.scaling import lnd

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[2] / "experiments"
TABLE1 = ("gopher_44m", "gopher_117m", "gopher_417m", "gopher_1_4b", "gopher_7_1b",
          "gopher_280b")


def table1_rows() -> list[ml_collections.ConfigDict]:
    return [config_lib.load(EXPERIMENTS / f"{name}.py") for name in TABLE1]


def depth_rule(rows: list[ml_collections.ConfigDict]) -> tuple[float, float]:
    """(slope, intercept) of log(layers) against log(d_model) over Table 1."""
    x = np.log([r.model.d_model for r in rows])
    y = np.log([r.model.num_layers for r in rows])
    slope, icpt = np.polyfit(x, y, 1)
    return float(slope), float(icpt)


def head_dim(d_model: int) -> int:
    return int(min(128, max(16, 2 ** round(math.log2(d_model / 16)))))


def shapes(rule: tuple[float, float], vocab: int) -> list[dict[str, int]]:
    """Gopher-shaped candidates from d_model 32 to 32,768; from 4,096 on the head count is a
    multiple of 8 (the tensor-parallel degree of the large rows' recipe)."""
    widths = sorted({*range(32, 1024, 32), *range(1024, 4096, 256), *range(4096, 32769, 1024)})
    out = []
    for d in widths:
        hd = head_dim(d)
        if d % hd:
            continue
        layers = max(1, round(math.exp(rule[1]) * d ** rule[0]))
        m = ml_collections.ConfigDict({"vocab_size": vocab, "num_layers": layers,
                                       "num_heads": d // hd, "head_dim": hd, "d_model": d,
                                       "mlp_ratio": 4, "tie_embeddings": True})
        counts = sizes.param_counts(m)
        out.append({"num_layers": layers, "d_model": d, "num_heads": d // hd, "head_dim": hd,
                    "d_ff": 4 * d, "params": counts["total"],
                    "params_non_embedding": counts["non_embedding"]})
    return out


def nearest(candidates: list[dict[str, Any]], n: float) -> dict[str, Any]:
    return min(candidates, key=lambda s: abs(math.log(s["params"] / n)))


def plan(law: dict[str, float], flops: float, batch_tokens: int = 0, seq_len: int = 2048,
         vocab: int = 32_000, replicates: dict[str, list[float]] | None = None
         ) -> dict[str, Any]:
    """The plan, without the compile: {"law", "n_opt", "d_opt", "numeric_n_opt", "shape",
    "config" (a run config of the shape), "tokens", "steps", ...}."""
    alloc = lnd.allocation(law, flops)
    n_opt, d_opt = float(alloc["n_opt"]), float(alloc["d_opt"])
    rows = table1_rows()
    shape = nearest(shapes(depth_rule(rows), vocab), n_opt)
    row = min(rows, key=lambda r: abs(math.log(
        sizes.param_counts(r.model)["total"] / shape["params"])))
    c = copy.deepcopy(row)
    c.unlock()
    c.name = f"plan_{shape['num_layers']}x{shape['d_model']}"
    c.model.update(vocab_size=vocab, num_layers=shape["num_layers"], d_model=shape["d_model"],
                   num_heads=shape["num_heads"], head_dim=shape["head_dim"])
    c.data.seq_len = seq_len
    batch_tokens = batch_tokens or row.train.batch_size * row.data.seq_len
    c.train.batch_size = max(1, batch_tokens // seq_len)
    fpt = sizes.flops_per_token(c.model, seq_len)["train"]
    tokens = flops / fpt
    c.train.steps = max(1, math.ceil(tokens / (c.train.batch_size * seq_len)))
    c.train.warmup_steps = min(c.train.warmup_steps, max(0, c.train.steps - 1))
    c.lock()
    out: dict[str, Any] = {
        "flops": flops, "law": law, "n_opt": n_opt, "d_opt": d_opt,
        "tokens_per_param": d_opt / n_opt, "loss": float(alloc["loss"]),
        "numeric_n_opt": lnd.numeric_optimum(law, flops), "a": alloc["a"], "b": alloc["b"],
        "G": alloc["G"], "shape": shape, "table1_row": row.name,
        "flops_per_token": fpt, "tokens": tokens, "batch_tokens": c.train.batch_size * seq_len,
        "steps": c.train.steps, "seq_len": seq_len, "config": c,
        "loss_of_shape": float(lnd.predict(law, shape["params"], tokens)),
    }
    if replicates:
        from gopher_jax.scaling import bootstrap

        n_rep = [float(lnd.allocation(dict(zip(lnd.LAW_KEYS, v, strict=True)), flops)["n_opt"])
                 for v in zip(*(replicates[k] for k in lnd.LAW_KEYS), strict=True)]
        out["n_opt_interval"] = bootstrap.interval(n_rep)
    return out


def with_memory(p: dict[str, Any], topology: str, num_slices: int = 1) -> dict[str, Any]:
    """The plan's config compiled for `topology` (aot.py): per-chip bytes and whether it fits.
    The batch is raised to a multiple of the data-parallel devices when it does not divide."""
    from gopher_jax import aot

    c = copy.deepcopy(p["config"])
    gen, dims = aot.parse_topology(topology)
    from gopher_jax import hardware

    devices = math.prod(dims) * hardware.TPU_GENERATIONS[gen].devices_per_chip * num_slices
    parallel = max(1, devices // max(1, c.mesh.tensor))
    with c.unlocked():
        if c.train.batch_size % (parallel * c.train.microbatches):
            c.train.batch_size = math.ceil(c.train.batch_size / (parallel * c.train.microbatches)) \
                * parallel * c.train.microbatches
    try:
        r = aot.aot_compile(c, topology, num_slices)
    except aot.DoesNotFit as e:
        return {"topology": topology, "fits": False, "error": str(e),
                "batch_size": c.train.batch_size}
    return {"topology": topology, "fits": r.fits, "total_bytes": r.total_bytes,
            "hbm_bytes": r.hbm_bytes, "compile_s": r.compile_s, "num_devices": r.num_devices,
            "mesh": r.mesh, "batch_size": c.train.batch_size, "report": aot.format_report(r)}
