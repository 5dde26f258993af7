"""Evaluation's bits per byte and the unigram baseline against computations written here:
every chunk of the split once, the data format's target weights, UTF-8 bytes of the split;
and the result does not depend on the evaluation batch size or the device count."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny

from gopher_jax import evaluate
from gopher_jax.data import pipeline
from gopher_jax.layout import Layout
from gopher_jax.model import gopher
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.train import state as state_lib

MAX_CHUNKS = 48  # the first chunks of the validation split keep the test short


def _weights(tokens: np.ndarray, seg: np.ndarray, eos: int) -> np.ndarray:
    # Target j counts when it is in its input's document or is the EOS opening the next one;
    # padding (segment 0) never counts.
    return ((seg[:, 1:] == seg[:, :-1]) | (tokens[:, 1:] == eos)) & (seg[:, 1:] != 0)


@pytest.fixture(scope="module")
def setup(data_dir):
    c = tiny(data_dir)
    c.mesh.update(rules="fsdp", data=1, fsdp=-1, tensor=1)
    c.train.batch_size = 8
    layout = Layout.build(c, mesh_lib.make_mesh(c))
    params = jax.device_get(state_lib.create_state(c, layout)["params"])
    return c, params


def test_bits_per_byte_equals_an_independent_sum_over_the_split(setup):
    c, params = setup
    chunks = pipeline.open_chunks(c, c.data.eval_split)
    rows = chunks.read(np.arange(MAX_CHUNKS))
    tokens, seg = rows["tokens"], rows["segment_ids"]
    eos = pipeline.load_tokenizer(c).eos_id
    graphdef, _ = gopher.abstract(c.model)
    logits = jax.jit(lambda p, t, s: gopher.apply(graphdef, p, t, s))(
        params, tokens[:, :-1], seg[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    w = _weights(tokens, seg, eos)
    want = float(np.sum(nll * w)) / math.log(2) / float(rows["num_bytes"].sum())

    results = []
    for batch_size, devices in ((8, 8), (3, 1), (1, 1)):
        c.train.batch_size = 8 if devices == 8 else batch_size
        layout = Layout.build(c, mesh_lib.make_mesh(c, jax.devices()[:devices]))
        got = evaluate.evaluate_split(
            c, layout, jax.device_put(params, layout.param_shardings), c.data.eval_split,
            max_batches=MAX_CHUNKS // c.train.batch_size)
        assert got["tokens"] == w.sum() and got["bytes"] == rows["num_bytes"].sum()
        results.append(got["bits_per_byte"])
    assert results[0] == pytest.approx(want, rel=1e-5)
    # Batch size 8 on 8 devices, 3 and 1 on one device: the same number (summation order).
    assert results[1] == pytest.approx(results[0], rel=1e-5)
    assert results[2] == pytest.approx(results[0], rel=1e-5)


def test_unigram_baseline_equals_counts_done_here(setup):
    c, _ = setup
    eos = pipeline.load_tokenizer(c).eos_id

    def split_arrays(split: str) -> dict[str, np.ndarray]:
        chunks = pipeline.open_chunks(c, split)
        return chunks.read(np.arange(len(chunks)))

    train = split_arrays(c.data.train_split)
    w = _weights(train["tokens"], train["segment_ids"], eos)
    counts = np.bincount(train["tokens"][:, 1:][w], minlength=c.model.vocab_size) + 1.0
    logp = np.log(counts / counts.sum())
    val = split_arrays(c.data.eval_split)
    wv = _weights(val["tokens"], val["segment_ids"], eos)
    want = -float(np.sum(logp[val["tokens"][:, 1:]] * wv)) / math.log(2) / float(
        val["num_bytes"].sum())
    assert evaluate.unigram_bits_per_byte(c, c.data.eval_split) == pytest.approx(want, rel=1e-9)
