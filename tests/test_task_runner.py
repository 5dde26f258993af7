"""The task runner: packing by length (results in the requests' order, whatever the batch
size), params sharded on the mesh (the same results on 1 and 8 devices), greedy decoding
through the KV cache (token for token the uncached greedy), and the scaling step's entry
point that scores tasks without writing files.

Tolerance: log-likelihoods of the tiny model agree within rtol 1e-5 + atol 1e-4 across
batch sizes and meshes (float32 sums in another order: measured up to ~2e-5); tokens,
predictions and metrics are compared exactly.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import cpu_env, experiment, run_cli

from gopher_jax.model import gopher
from gopher_jax.parallel import mesh as mesh_lib
from gopher_jax.tasks import model_queries, run
from gopher_jax.tasks.grading import score

ATOL, RTOL = 1e-4, 1e-5
VOCAB = 40


def stub_logits_fn(tokens: np.ndarray) -> np.ndarray:
    """A causal model on the host: position t's logits depend on the row's tokens 0..t only
    (through their running sum), never on the width or the other rows."""
    s = np.cumsum(tokens.astype(np.float64), axis=1)[..., None]
    v = np.arange(VOCAB)[None, None]
    return (3 * np.cos(0.37 * (v + 1) * s + 0.1 * v)).astype(np.float32)


def stub_requests(n: int = 23, seed: int = 0, seq_len: int = 40):
    """Contexts of 1..60 tokens (some longer than seq_len) and continuations of 1..8."""
    rng = np.random.default_rng(seed)
    return [([1] + rng.integers(2, VOCAB, int(rng.integers(0, 60))).tolist(),
             rng.integers(2, VOCAB, int(rng.integers(1, 9))).tolist()) for _ in range(n)]


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max(-1, keepdims=True) - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(
        -1, keepdims=True))


def stub_by_hand(context, continuation, seq_len: int) -> float:
    ids = (list(context) + list(continuation))[-(seq_len + 1):]
    logp = log_softmax(stub_logits_fn(np.asarray([ids[:-1]]))[0])
    n = len(continuation)
    return float(sum(logp[len(ids) - 1 - n + j, t] for j, t in enumerate(continuation)))


def stub_greedy_by_hand(context, n: int, seq_len: int) -> list[int]:
    """The window grows: every new token sees the context's last seq_len tokens and all new
    tokens before it."""
    ids = list(context)[-seq_len:]
    start = len(ids)
    for _ in range(n):
        ids.append(int(np.argmax(stub_logits_fn(np.asarray([ids]))[0, -1])))
    return ids[start:]


def test_buckets_and_packing_by_length():
    assert model_queries.buckets(64) == [16, 32, 64]
    assert model_queries.buckets(100) == [16, 32, 64, 100]
    assert model_queries.buckets(16) == [16] and model_queries.buckets(5) == [5]
    lengths = [int(x) for x in np.random.default_rng(3).integers(1, 101, 50)]
    for batch_size in (1, 3, 8):
        batches = model_queries.pack(lengths, batch_size, 100)
        assert sorted(i for idx, _ in batches for i in idx) == list(range(50))
        for b, (idx, width) in enumerate(batches):
            assert 1 <= len(idx) <= batch_size
            assert all(model_queries.bucket(lengths[i], 100) == width for i in idx)
            if len(idx) < batch_size:  # only the last batch of a bucket is partial
                assert b == len(batches) - 1 or batches[b + 1][1] != width
        assert [w for _, w in batches] == sorted(w for _, w in batches)
        assert len({w for _, w in batches}) <= 4  # few shapes: few compiles
    unpacked = model_queries.pack(lengths, 8, 100, packed=False)
    assert [i for idx, _ in unpacked for i in idx] == list(range(50))
    assert {w for _, w in unpacked} == {100}


def test_packed_results_are_in_the_requests_order_for_any_batch_size():
    """Exactly the sums computed by hand, in order, for batch sizes 1, 3, 8, packed or not:
    catches a misordered unpacking and padding that moves a row (left padding)."""
    seq_len = 40
    reqs = stub_requests(seq_len=seq_len)
    want = [stub_by_hand(ctx, cont, seq_len) for ctx, cont in reqs]
    contexts = [ctx for ctx, _ in reqs]
    want_greedy = [stub_greedy_by_hand(ctx, 7, seq_len) for ctx in contexts]

    def done(ids: list[int]) -> bool:
        return len(ids) >= 1 + ids[0] % 7

    for batch_size in (1, 3, 8):
        for packed in (True, False):
            got = model_queries.scored(stub_logits_fn, reqs, seq_len, batch_size, packed)
            np.testing.assert_allclose([lp for lp, _ in got], want, rtol=1e-6, atol=1e-6)
            assert got == model_queries.scored(stub_logits_fn, reqs, seq_len, 1, packed=False)
            new = model_queries.greedy(stub_logits_fn, contexts, 7, seq_len, batch_size, done,
                                 packed)
            assert new == [w[:1 + w[0] % 7] for w in want_greedy]
    # "is greedy": every continuation token is the argmax
    i = next(i for i, ctx in enumerate(contexts) if 1 < len(ctx) < seq_len - 3)
    ctx, top = contexts[i], want_greedy[i]
    assert model_queries.scored(stub_logits_fn, [(ctx, top[:3])], seq_len, 2)[0][1]
    assert not model_queries.scored(stub_logits_fn, [(ctx, top[:2] + [top[2] % (VOCAB - 1) + 1])],
                              seq_len, 2)[0][1]


# -- the tiny model, sharded ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_params():
    """experiments/tiny.py's random params in float32, perturbed (numpy, no compiles)."""
    c = experiment("tiny")
    c.model.dtype = "float32"
    params = nnx.to_pure_dict(nnx.state(gopher.create(c.model, 0)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda x: np.asarray(x) + 0.3 * rng.standard_normal(
        x.shape).astype(np.float32), params)


def tiny(seq_len: int):
    """experiments/tiny.py in float32 with data.seq_len `seq_len`, params split over fsdp."""
    c = experiment("tiny")
    c.model.dtype = "float32"
    c.data.seq_len = seq_len
    c.mesh.update(rules="fsdp", fsdp=-1, data=1, tensor=1)
    return c


def test_sharded_runner_on_8_devices_equals_the_unsharded_forward(tiny_params):
    """Params split over fsdp on 8 devices, batch 3 rounded up to 8 rows: log-likelihoods as
    from the unsharded forward; cached greedy token for token the uncached greedy, through
    contexts longer than the window and generations past it, and the sliding-window greedy of
    the runner before the cache while a row stays inside the window. Catches a cache off by
    one position. (seq_len 16: one bucket, few compiles; the slow test below has more.)"""
    c = tiny(16)
    seq_len, n = 16, 6
    mesh = mesh_lib.make_mesh(c)
    assert mesh.shape["fsdp"] == 8
    model, step = run.load(c, tiny_params, mesh)
    assert step is None and model.rows(3) == 8
    assert not model.params["blocks"]["attn"]["wq"].sharding.is_fully_replicated
    logits_fn = run.model_logits_fn(c, tiny_params)
    reference = model_queries.LogitsModel(logits_fn)
    rng = np.random.default_rng(0)
    reqs = [([1] + rng.integers(4, 512, n_ctx - 1).tolist(),
             rng.integers(4, 512, n_cont).tolist())
            for n_ctx, n_cont in [(1, 1), (4, 3), (9, 6), (11, 2), (16, 1), (23, 4)]]
    np.testing.assert_allclose(model_queries.loglikelihoods(model, reqs, seq_len, 8),
                               model_queries.loglikelihoods(reference, reqs, seq_len, 8),
                               rtol=RTOL, atol=ATOL)
    contexts = [ctx for ctx, _ in reqs]
    cached = model_queries.greedy(model, contexts, n, seq_len, 8, lambda ids: False)
    assert cached == model_queries.greedy(reference, contexts, n, seq_len, 8, lambda ids: False)
    inside = 0
    for ctx, new in zip(contexts, cached, strict=True):
        if len(ctx) + n - 1 <= seq_len:  # the old runner's sliding window, [8, seq_len]
            inside += 1
            ids = list(ctx)
            for _ in range(n):
                logits = logits_fn(model_queries._padded([ids[-seq_len:]], 8, seq_len))
                ids.append(int(np.argmax(logits[0, len(ids[-seq_len:]) - 1])))
            assert new == ids[len(ctx):]
    assert inside == 4
    # each row stops at its first `stop` token (or after n): the same tokens up to there
    stop = cached[1][2]
    stopped = model_queries.greedy(model, contexts, n, seq_len, 8, lambda ids: ids[-1] == stop)
    for got, full in zip(stopped, cached, strict=True):
        assert got == (full[:full.index(stop) + 1] if stop in full else full)
    assert len(stopped[1]) == 3


@pytest.mark.slow  # ~20 s: 2 meshes x 3 batch sizes x (score, prefill, step) compiles
def test_task_results_do_not_depend_on_batch_size_or_device_count(tiny_params):
    """score_tasks (the scaling step's entry point) on one task of each kind: the same
    metrics and predictions for batch sizes 1, 3, 8 on a 1-device and an 8-device mesh, and
    with the cache off."""
    from test_tasks import ByteTokenizer, task

    c, params = tiny(32), tiny_params
    tok = ByteTokenizer()
    rng = np.random.default_rng(4)
    words = ["night", "sea", "sword", "O", "thee", "ay"]
    tasks = [
        task("multiple_choice", [{"context": f"line {i}: " + "ab" * (i * 3),
                                  "choices": [" it", " the rest", " x"], "answer": i % 3}
                                 for i in range(7)]),
        task("cloze", [{"context": "To be " * int(rng.integers(1, 9)), "target": f" {w}"}
                       for w in words]),
        task("generation", [{"context": f"say {i}" + "." * i * 4, "target": "x"}
                            for i in range(6)], stop=["\n", "e"]),
    ]
    runs = {}
    for devices in (1, 8):
        mesh = mesh_lib.make_mesh(c, jax.devices()[:devices])
        model, _ = run.load(c, params, mesh)
        for batch_size in (1, 3, 8):
            runs[devices, batch_size] = [
                score(t, tok, model, c.data.seq_len, model.rows(batch_size), 5)
                for t in tasks]
        summary = run.score_tasks(c, params, mesh, tasks, 3, 5, tok=tok)
        assert summary.step is None and set(summary.tasks) == {t.name for t in tasks}
        assert [summary.tasks[t.name].metrics for t in tasks] == [
            r.metrics for r in runs[devices, 3]]
        uncached = run.ShardedModel(c, model.params, model.layout, cached=False)
        assert [score(t, tok, uncached, c.data.seq_len, 8, 5) for t in tasks[1:]] == \
            runs[devices, 8][1:]
    first = runs[1, 1]
    for key, other in runs.items():
        for a, b in zip(first, other, strict=True):
            assert a.metrics.keys() == b.metrics.keys(), key
            if "acc" in a.metrics:
                np.testing.assert_allclose(
                    [p["loglikelihoods"] for p in b.predictions],
                    [p["loglikelihoods"] for p in a.predictions], rtol=RTOL, atol=ATOL)
                strip = [{k: v for k, v in p.items() if k != "loglikelihoods"}
                         for p in a.predictions]
                assert strip == [{k: v for k, v in p.items() if k != "loglikelihoods"}
                                 for p in b.predictions], key
                assert a.metrics == b.metrics, key
            else:
                assert a == b, key


def differences(a, b, path: str = "") -> list[str]:
    """The paths where two JSON values differ; numbers within rel 1e-5 (an accuracy step of
    1/n is far larger; bits per byte is a float sum in another order on 8 devices)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a)} != {sorted(b)}"]
        return [d for k in a for d in differences(a[k], b[k], f"{path}/{k}")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if a == pytest.approx(b, rel=1e-5) else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow  # ~40 s: two `tasks` commands in subprocesses
def test_tasks_command_gives_the_same_results_on_1_and_8_devices(trained):
    """A trained workdir restored with the mesh's shardings in a 1-device and an 8-device
    process, batch 3 (8 rows there): the same tasks.json (the default suite: multiple
    choice, cloze, generation and language-modelling corpora)."""
    work = trained / "work"
    results = []
    for devices in (1, 8):
        p = run_cli("tasks", f"--workdir={work}", "--limit=6", "--batch_size=3",
                    "--max_new_tokens=5", env=cpu_env(devices))
        assert p.returncode == 0, p.stderr[-3000:]
        results.append(json.loads((work / "tasks.json").read_text()))
    assert results[0]["step"] == 4
    assert differences(results[0], results[1]) == []
    os.remove(work / "tasks.json")
