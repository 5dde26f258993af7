"""`python -m gopher_jax eval`: exact bits per byte of a trained workdir on held-out splits,
next to a unigram baseline computed by the same code on the same chunks."""

from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import storage
from gopher_jax.data import pipeline
from gopher_jax.layout import Layout
from gopher_jax.parallel import distributed
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.train import step as step_lib


def eval_batch_size(c: ml_collections.ConfigDict) -> int:
    """A training microbatch: what is known to fit in memory with this mesh."""
    return c.train.batch_size // c.train.microbatches


def evaluate_split(c: ml_collections.ConfigDict, layout: Layout | jax.sharding.Mesh,
                   params: Any, split: str, eval_step: Any = None, max_batches: int = -1
                   ) -> dict[str, float]:
    """Exact bits per byte: summed -log2 p over the summed UTF-8 bytes of the split."""
    layout = Layout.of(c, layout)
    eval_step = eval_step or step_lib.make_eval_step(c, layout)
    sharding = layout.batch_sharding
    sums = np.zeros(3)
    with jax.set_mesh(layout.mesh):
        for batch in pipeline.eval_batches(c, split, eval_batch_size(c), sharding,
                                           max_batches=max_batches):
            sums += np.array(jax.device_get(eval_step(params, batch)), dtype=np.float64)
    nll, tokens, nbytes = sums
    if tokens == 0:  # an empty split measures nothing: NaN, not a perfect 0 bits per byte
        return {"loss": math.nan, "bits_per_byte": math.nan, "tokens": 0.0, "bytes": nbytes}
    return {"loss": nll / tokens, "bits_per_byte": nll / math.log(2) / nbytes,
            "tokens": tokens, "bytes": nbytes}


def restore_params(c: ml_collections.ConfigDict, workdir: str | os.PathLike,
                   layout: Layout | jax.sharding.Mesh) -> tuple[Any, int]:
    directory = storage.path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise ckpt_lib.CheckpointError(
            f"no checkpoints in {workdir}", f"train first with `python -m gopher_jax train "
            f"--config ... --workdir {workdir}`, or pass the --workdir of a trained run")
    ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
    try:
        restored = ckpt.restore_latest(Layout.of(c, layout).state,
                                       check=lambda meta: ckpt_lib.check_config(
                                           meta, c, ckpt_lib.EVAL_KEYS))
    finally:
        ckpt.close()
    if restored is None:
        raise ckpt_lib.CheckpointError(
            f"no checkpoint in {directory}", "train first with `python -m gopher_jax train "
            f"--config ... --workdir {workdir}`")
    state, meta = restored
    return state["params"], meta["step"]


def unigram_bits_per_byte(c: ml_collections.ConfigDict, split: str) -> float:
    """Bits per byte of a unigram model fitted (add-one smoothed) on the train split's
    token counts, scored on `split` with the same target weights as the model."""
    counts = np.ones(c.model.vocab_size)
    for b in pipeline.eval_batches(c, c.data.train_split, 256):
        _, _, targets, w = step_lib.split_batch(b)
        np.add.at(counts, np.asarray(targets)[np.asarray(w) > 0], 1)
    logp = np.log(counts / counts.sum())
    nll = nbytes = 0.0
    for b in pipeline.eval_batches(c, split, 256):
        _, _, targets, w = step_lib.split_batch(b)
        nll -= float(np.sum(logp[np.asarray(targets)] * np.asarray(w)))
        nbytes += float(np.sum(b["num_bytes"]))
    return nll / math.log(2) / nbytes


def run(c: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Bits per byte of the workdir's newest checkpoint on the eval and test splits, each with
    its unigram baseline; written to <workdir>/eval.json (process 0) and returned."""
    distributed.initialize_from_env()
    layout = Layout.build(c, mesh_lib.make_mesh(c))
    # The checkpoint first: a workdir without one is refused before any data is built.
    params, step = restore_params(c, workdir, layout)
    info = distributed.run_on_process_zero_first(lambda: pipeline.prepare(c))
    eval_step = step_lib.make_eval_step(c, layout)
    results: dict[str, Any] = {"step": step, "warnings": info["warnings"], "splits": {}}
    for split in dict.fromkeys((c.data.eval_split, c.data.test_split)):
        if split not in info["splits"]:
            continue
        r = evaluate_split(c, layout, params, split, eval_step)
        r["unigram_bits_per_byte"] = unigram_bits_per_byte(c, split)
        results["splits"][split] = r
    if jax.process_index() == 0:
        (storage.path(workdir) / "eval.json").write_text(json.dumps(results, indent=2))
    return results
