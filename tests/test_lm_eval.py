"""The lm-evaluation-harness adapter (the `eval` extra): lm-eval's requests on a tiny trained
workdir give the numbers of our own task runner, on a local task offline."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("lm_eval")  # the `eval` extra; the `test` extra installs it too
pytestmark = pytest.mark.slow  # ~40 s: trains its own workdir, runs lm-eval end to end
import lm_eval.api.instance  # noqa: E402
import lm_eval.api.registry  # noqa: E402
import lm_eval.tasks  # noqa: E402
import lm_eval.utils  # noqa: E402
from helpers import ROOT  # noqa: E402

from gopher_jax import lm_eval_adapter  # noqa: E402
from gopher_jax.tasks import model_queries  # noqa: E402
from gopher_jax.tasks.grading import score  # noqa: E402
from gopher_jax.tasks.spec import Example, Task  # noqa: E402

DOCS = [
    {"question": "To be, or not to be, that is the", "choices": ["question", "answer", "end"],
     "label": 0},
    {"question": "Shall I compare thee to a summer's", "choices": ["day", "night"], "label": 0},
    {"question": "Now is the winter of our", "choices": ["summer", "discontent", "king"],
     "label": 1},
    {"question": "A horse! a horse! my kingdom for a", "choices": ["crown", "horse"], "label": 1},
    {"question": "Friends, Romans,", "choices": ["countrymen", "senators", "soldiers", "men"],
     "label": 0},
]


@pytest.fixture(scope="module")
def lm(trained):
    return lm_eval.api.registry.get_model("gopher_jax").create_from_arg_obj(
        {"workdir": str(trained / "work")}, {"batch_size": 4})


def local_task(d: pathlib.Path) -> pathlib.Path:
    """A multiple-choice task YAML reading a local jsonl (lm-eval puts its " " target
    delimiter between question and choice)."""
    d.mkdir()
    data = d / "mc.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (d / "gopher_mc.yaml").write_text(
        "task: gopher_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n  cache_dir: {d / 'cache'}\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return d


def _our_task() -> Task:
    """DOCS as a gopher_jax task: the choices continue the question after a space."""
    return Task(name="gopher_mc", group="g", kind="multiple_choice",
                examples=tuple(Example(d["question"], tuple(" " + c for c in d["choices"]),
                                       d["label"]) for d in DOCS))


def test_simple_evaluate_matches_our_task_runner(lm, tmp_path):
    tasks = lm_eval.tasks.TaskManager(include_path=str(local_task(tmp_path / "tasks")))
    out = lm_eval.simple_evaluate(model=lm, tasks=["gopher_mc"], task_manager=tasks,
                                  log_samples=True, bootstrap_iters=0)
    ours = score(_our_task(), lm.tokenizer, lm.logits_fn, lm.seq_len, batch_size=8)
    assert out["results"]["gopher_mc"]["acc,none"] == pytest.approx(ours.metrics["acc"])
    samples = sorted(out["samples"]["gopher_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(DOCS)
    for s, p in zip(samples, ours.predictions, strict=True):
        theirs = [float(r[0][0]) for r in s["resps"]]
        np.testing.assert_allclose(theirs, p["loglikelihoods"], rtol=1e-5, atol=1e-5)


def _request(*args):
    return lm_eval.api.instance.Instance("loglikelihood", {}, args, 0)


def test_loglikelihood_and_greedy_flag_from_one_forward_pass(lm):
    tok = lm.tokenizer
    ctx = "To be, or not to be, that is"
    ids = [tok.eos_id] + tok.encode(ctx)
    logits = lm.logits_fn(model_queries._padded([ids], lm.batch_size, lm.seq_len))[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    top = int(np.argmax(logits[len(ids) - 1]))
    other = (top + 1) % logits.shape[-1]
    got = lm.loglikelihood([_request(ctx, tok.decode([top])), _request(ctx + " ", "x"),
                            _request(ctx, "")])
    (lp_top, greedy_top), _, empty = got
    if tok.encode(tok.decode([top])) == [top]:
        assert lp_top == pytest.approx(float(logp[len(ids) - 1, top]), abs=1e-5)
        assert greedy_top
    # a continuation that is not the argmax is not greedy
    lp, g = lm_eval_adapter.with_greedy(lm.logits_fn, [(ids, [other])], lm.seq_len, 4)[0]
    assert not g and lp == pytest.approx(float(logp[len(ids) - 1, other]), abs=1e-5)
    # "ctx " + "x" is scored as "ctx" + " x"
    assert got[1][0] == pytest.approx(lm.loglikelihood([_request(ctx, " x")])[0][0], abs=1e-6)
    assert empty == (0.0, True)


def test_rolling_loglikelihood_predicts_each_token_once_from_eos(lm):
    tok = lm.tokenizer
    text = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 4
    ids = tok.encode(text)
    assert len(ids) > 2 * lm.seq_len  # several windows
    want = 0.0
    for inp, pred in lm_eval.utils.get_rolling_token_windows(ids, tok.eos_id, lm.seq_len, 1):
        logits = lm.logits_fn(model_queries._padded([inp], lm.batch_size, lm.seq_len))[0]
        x = logits[:len(inp)] - logits[:len(inp)].max(-1, keepdims=True)
        x = x - np.log(np.exp(x).sum(-1, keepdims=True))
        want += float(x[np.arange(len(inp) - len(pred), len(inp)), pred].sum())
    roll = lm_eval.api.instance.Instance("loglikelihood_rolling", {}, (text,), 0)
    short = lm_eval.api.instance.Instance("loglikelihood_rolling", {}, ("Shall I",), 0)
    got, got_short = lm.loglikelihood_rolling([roll, short])
    assert got == pytest.approx(want, rel=1e-5)
    s_ids = tok.encode("Shall I")
    assert got_short == pytest.approx(
        model_queries.loglikelihoods(lm.logits_fn, [([tok.eos_id], s_ids)], lm.seq_len, 4)[0],
        abs=1e-5)


def test_generate_until_is_our_greedy_cut_at_the_stop(lm):
    tok = lm.tokenizer
    ctx = "To be, or not to be"
    req = lm_eval.api.instance.Instance(
        "generate_until", {}, (ctx, {"until": ["\n"], "max_gen_toks": 6}), 0)
    (text,) = lm.generate_until([req])
    ids = model_queries.greedy(lm.logits_fn, [[tok.eos_id] + tok.encode(ctx)], 6, lm.seq_len, 4,
                         lambda new: tok.eos_id in new or "\n" in tok.decode(new))[0]
    if tok.eos_id in ids:
        ids = ids[:ids.index(tok.eos_id)]
    assert text == tok.decode(ids).split("\n")[0]
    assert "\n" not in text


def test_lm_eval_command_line_with_the_model_registered(lm, trained, tmp_path):
    tasks = local_task(tmp_path / "tasks")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "gopher_jax.lm_eval_adapter", "run", "--model",
                        "gopher_jax", "--model_args", f"workdir={trained / 'work'}",
                        "--batch_size", "4", "--tasks", "gopher_mc", "--include_path",
                        str(tasks), "--output_path", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    (path,) = (tmp_path / "out").rglob("results_*.json")
    got = json.loads(path.read_text())["results"]["gopher_mc"]["acc,none"]
    assert got == pytest.approx(score(_our_task(), lm.tokenizer, lm.logits_fn, lm.seq_len,
                                      batch_size=8).metrics["acc"])
