"""`serve` as a real server on loopback, started by the tests on the tiny trained workdir, with
real clients (the `openai` client, requests, lm-eval's local-completions).

The fast tier starts one server (module fixture) on 127.0.0.2 with an API key and runs every
check against it; its last test sends SIGTERM mid-stream. The slow tier starts its own
servers: 32 concurrent clients, and lm-eval parity with our adapter.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import pathlib
import re
import signal
import subprocess
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
import requests  # noqa: E402
from helpers import ROOT, cli_command, cpu_env  # noqa: E402

KEY = "sk-test-3f9c2a7e5b1d"


class Server:
    def __init__(self, root: pathlib.Path, workdir: pathlib.Path, *flags: str,
                 host: str = "127.0.0.1", key: bool = False):
        root.mkdir(parents=True, exist_ok=True)
        self.audit = root / "audit.jsonl"
        self.out, self.err = root / "stdout.txt", root / "stderr.txt"
        args = ["serve", f"--workdir={workdir}", f"--host={host}", "--port=0",
                f"--audit_log={self.audit}", *flags]
        if key:
            (root / "key").write_text(KEY + "\n")
            args.append(f"--api_key_file={root / 'key'}")
        self.headers = {"Authorization": f"Bearer {KEY}"} if key else {}
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cli_command(*args), cwd=ROOT, env=cpu_env(2),
                                         stdout=out, stderr=err)
        deadline = time.time() + 300
        while not (m := re.search(r"on (http://\S+)", self.out.read_text())):
            assert self.proc.poll() is None, self.err.read_text()[-3000:]
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.2)
        self.url = m.group(1)
        while requests.get(f"{self.url}/ready", timeout=5).status_code != 200:
            assert time.time() < deadline, "the server did not get ready"
            time.sleep(0.2)

    def post(self, path: str, body: object, **kw) -> requests.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return requests.post(f"{self.url}{path}", data=data,
                             headers={"Content-Type": "application/json",
                                      **kw.pop("headers", self.headers)},
                             timeout=120, **kw)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0)

    def audit_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def no_tracebacks(server: Server) -> None:
    log = server.err.read_text()
    assert "Traceback" not in log and not re.search(r"^ERROR", log, re.M), log[-3000:]


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("serve"), trained / "work", "--slots=4", "--queue=6",
               "--max_tokens=48", "--model_name=tiny", host="127.0.0.2", key=True)
    yield s
    s.stop()


def test_openai_client_completions_streaming_and_chat(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny"]
    done = client.completions.create(model="tiny", prompt="To be, or not to be",
                                     max_tokens=12, temperature=0)
    text = done.choices[0].text
    assert done.usage.completion_tokens == 12 or done.choices[0].finish_reason == "stop"
    # the audit line of a response is in the file when the client has the response
    (line,) = [x for x in server.audit_lines() if f"cmpl-{x['id']}" == done.id]
    assert line["status"] == 200 and line["output"] == [text]
    assert line["prompt"] == "To be, or not to be" and line["model_step"] == 4
    streamed = client.completions.create(model="tiny", prompt="To be, or not to be",
                                         max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text
    messages = [{"role": "system", "content": "You are a poet."},
                {"role": "user", "content": "Shall I compare thee?"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                          temperature=0)
    reply = chat.choices[0].message.content
    assert chat.choices[0].message.role == "assistant"
    parts = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                           temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts) == reply
    (chat_line,) = [x for x in server.audit_lines() if f"chatcmpl-{x['id']}" == chat.id]
    assert chat_line["prompt"] == messages and chat_line["output"] == [reply]


def test_same_seed_same_text_and_the_batch_does_not_change_results(server):
    """Each request alone, then all at once (sharing decode steps): the same tokens, for
    greedy and for seeded sampling."""
    bodies = [{"prompt": p, "max_tokens": 16, "temperature": t, "seed": s}
              for p, t, s in (("To be", 0, 0), ("Now is the winter", 1.0, 11),
                              ("Friends, Romans", 0.8, 12), ("A horse!", 1.0, 13))]
    alone = [server.post("/v1/completions", b).json()["choices"][0]["text"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(
            lambda b: server.post("/v1/completions", b).json()["choices"][0]["text"], bodies))
    assert together == alone
    again = server.post("/v1/completions", bodies[1]).json()["choices"][0]["text"]
    assert again == alone[1]
    other = server.post("/v1/completions", {**bodies[1], "seed": 99}).json()
    assert other["choices"][0]["text"] != alone[1]


def test_echo_logprobs_score_the_prompt_like_cached_decoding(server):
    """Greedy tokens with their log-probabilities (the prefill, then cached decode steps);
    the prompt with them appended, scored with echo and max_tokens 0 (one forward pass),
    gives them the same log-probabilities."""
    ids = server.post("/tokenize", {"prompt": "Shall I compare thee"}).json()["tokens"]
    gen = server.post("/v1/completions", {
        "prompt": ids, "max_tokens": 4, "temperature": 0, "logprobs": 2,
        "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]
    new = [int(t.split(":")[1]) for t in gen["tokens"]]
    for lp, top in zip(gen["token_logprobs"], gen["top_logprobs"], strict=True):
        assert lp == pytest.approx(max(top.values()))  # greedy: the most likely token
    scored = server.post("/v1/completions", {
        "prompt": ids + new, "max_tokens": 0, "echo": True, "logprobs": 1,
        "return_tokens_as_token_ids": True}).json()["choices"][0]["logprobs"]
    assert [int(t.split(":")[1]) for t in scored["tokens"]] == ids + new
    assert all(x <= 0 for x in scored["token_logprobs"])
    assert scored["token_logprobs"][len(ids):] == pytest.approx(gen["token_logprobs"],
                                                                abs=1e-4)
    eos_first = server.post("/v1/completions", {"prompt": [1, *ids], "max_tokens": 0,
                                                "echo": True, "logprobs": 1}).json()
    first = eos_first["choices"][0]["logprobs"]["token_logprobs"]
    assert first[0] is None
    assert first[1:] == pytest.approx(scored["token_logprobs"][:len(ids)], abs=1e-5)


def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_keeps_serving(server):
    before = len(server.audit_lines())
    cases = [
        ('{"prompt": "x",', 400, "body"),
        ({"prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
        ({"prompt": "x", "best_of": 2}, 400, "best_of"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature"),
        ({"prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"prompt": "x", "n": 2}, 400, "n"),
        ({"prompt": "x", "seed": -3}, 400, "seed"),
        ({"prompt": "x", "top_k": 10**6}, 400, "top_k"),
        ({"prompt": [10**6]}, 400, "prompt"),
        ({"prompt": "x " * 200}, 400, "prompt"),
        ({"max_tokens": 3}, 400, "prompt"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ]
    for body, status, field in cases:
        r = server.post("/v1/completions", body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["param"] == field, (body, r.text)
    bad_chat = server.post("/v1/chat/completions", {"messages": [{"role": "robot",
                                                                  "content": "hi"}]})
    assert bad_chat.status_code == 400 and bad_chat.json()["error"]["param"] == "messages"
    no_reply = server.post("/v1/chat/completions", {"messages": [{"role": "user",
                                                                 "content": "hi"}],
                                                    "max_tokens": 0})
    assert no_reply.status_code == 400 and no_reply.json()["error"]["param"] == "max_tokens"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = server.post("/v1/completions", {"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 401
    assert requests.get(f"{server.url}/health", timeout=10).json() == {"status": "ok"}
    ok = server.client().completions.create(model="tiny", prompt="x", max_tokens=3)
    assert ok.choices[0].finish_reason in ("length", "stop")
    lines = server.audit_lines()[before:]
    assert len(lines) == len(cases) + 2 + 3 + 1  # one line per completion request
    assert [x["status"] for x in lines[:len(cases)]] == [s for _, s, _ in cases]
    no_tracebacks(server)


def test_queue_bound_answers_429_past_it(server):
    body = {"prompt": "To be, or not to be", "max_tokens": 40, "temperature": 0}
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(lambda _: server.post("/v1/completions", body).status_code,
                              range(16)))
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 4
    r = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2, "seed": 1},
                    headers={**server.headers, "Content-Type": "application/json"})
    assert r.status_code == 200
    busy = server.post("/v1/completions", {"prompt": "x", "max_tokens": 2})
    assert busy.status_code == 200


def test_a_client_leaving_mid_stream_is_a_clean_close(server):
    r = server.post("/v1/completions", {"prompt": "To be", "max_tokens": 48, "stream": True,
                                        "temperature": 0}, stream=True)
    lines = r.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    r.close()
    ok = server.post("/v1/completions", {"prompt": "Now is", "max_tokens": 4})
    assert ok.status_code == 200
    deadline = time.time() + 30
    while not any(x["status"] == 499 for x in server.audit_lines()):
        assert time.time() < deadline, "no audit line for the stream the client left"
        time.sleep(0.1)
    no_tracebacks(server)


def test_audit_log_rotates_by_size(tmp_path):
    from gopher_jax.serve.audit import AuditLog

    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=1000, backups=2)
    for i in range(40):
        log.write(id=str(i), prompt="x" * 50)
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    ids = [json.loads(line)["id"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert ids == [str(i) for i in range(40 - len(ids), 40)]  # the newest lines, in order
    assert all(f.stat().st_size <= 1000 for f in files)


def test_non_loopback_bind_without_a_key_is_one_error_line(trained, capsys):
    from gopher_jax.cli.app import main

    for host in ("0.0.0.0", "127.0.0.2"):
        assert main(["serve", f"--workdir={trained}/work", f"--host={host}"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --host") and "api_key_file" in err[0]


def test_sigterm_during_a_stream_finishes_it_then_exits_0(server):
    """Last in the module: the fixture's server is stopped here."""
    r = server.post("/v1/completions", {"prompt": "To be", "max_tokens": 48, "stream": True,
                                        "temperature": 0}, stream=True)
    lines = r.iter_lines()
    assert next(line for line in lines if line).startswith(b"data: ")
    server.proc.send_signal(signal.SIGTERM)
    rest = [line for line in lines if line]
    assert rest[-1] == b"data: [DONE]"
    finish = json.loads(rest[-2][len(b"data: "):])["choices"][0]["finish_reason"]
    assert finish in ("length", "stop")
    assert server.proc.wait(timeout=60) == 0
    no_tracebacks(server)
    for f in (server.err, server.out, server.audit):
        assert KEY not in f.read_text()


# -- slow: load and lm-eval parity -----------------------------------------------------------

@pytest.mark.slow
def test_32_concurrent_clients_each_get_what_it_gets_alone(trained, tmp_path):
    s = Server(tmp_path / "load", trained / "work", "--slots=8", "--queue=64",
               "--max_tokens=24")
    try:
        words = "To be or not to be that is the question whether tis nobler".split()
        bodies = [{"prompt": " ".join(words[i % 7:i % 7 + 3 + i % 5]), "max_tokens": 8 + i % 17,
                   "temperature": 0 if i % 2 else 0.9, "seed": i, "top_k": i % 3 * 20}
                  for i in range(32)]

        def ask(body: dict) -> str:
            r = s.post("/v1/completions", body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        alone = [ask(b) for b in bodies]
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            together = list(pool.map(ask, bodies))
        assert together == alone
        lines = s.audit_lines()
        assert len(lines) == 64 and all(x["status"] == 200 for x in lines)
        assert s.stop() == 0
        no_tracebacks(s)
    finally:
        s.stop()


@pytest.mark.slow
def test_lm_eval_local_completions_matches_our_adapter(trained, tmp_path):
    pytest.importorskip("lm_eval")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import lm_eval.models  # noqa: F401 - registers local-completions
    import lm_eval.tasks
    import numpy as np
    from test_lm_eval import DOCS, _our_task, local_task

    from gopher_jax.lm_eval_adapter import GopherLM
    from gopher_jax.tasks.grading import score

    s = Server(tmp_path / "eval", trained / "work", "--model_name=tiny")
    try:
        tasks = lm_eval.tasks.TaskManager(include_path=str(local_task(tmp_path / "tasks")))
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{s.url}/v1/completions", "model": "tiny",
                        "tokenizer_backend": "remote", "num_concurrent": 4,
                        "max_retries": 1, "max_length": 65},
            tasks=["gopher_mc"], task_manager=tasks, log_samples=True, bootstrap_iters=0)
        lm = GopherLM(workdir=str(trained / "work"), batch_size=4)
        ours = score(_our_task(), lm.tokenizer, lm.logits_fn, lm.seq_len, batch_size=8)
        samples = sorted(out["samples"]["gopher_mc"], key=lambda x: x["doc_id"])
        assert len(samples) == len(DOCS)
        for sample, p in zip(samples, ours.predictions, strict=True):
            theirs = [float(r[0][0]) for r in sample["resps"]]
            np.testing.assert_allclose(theirs, p["loglikelihoods"], atol=1e-4, rtol=0)
        assert out["results"]["gopher_mc"]["acc,none"] == pytest.approx(ours.metrics["acc"])
        assert s.stop() == 0
    finally:
        s.stop()


@pytest.mark.slow
def test_timeout_gives_504_and_redaction_keeps_serving(trained, tmp_path):
    """One slot and a 0.2 s timeout: of several 48-token requests at once, those that wait
    too long get 504; with --redact_output, answers are
    audited with their redaction counts and logprobs of generated tokens are refused."""
    pytest.importorskip("datatrove")
    s = Server(tmp_path / "timeout", trained / "work", "--slots=1", "--queue=32",
               "--timeout_s=0.2", "--redact_output")
    try:
        body = {"prompt": "To be, or not to be", "max_tokens": 48, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(lambda _: s.post("/v1/completions", body), range(24)))
        codes = [r.status_code for r in answers]
        tokens = [r.json()["usage"]["completion_tokens"] for r in answers if r.ok]
        assert set(codes) <= {200, 504} and 504 in codes, (codes, tokens)
        refused = s.post("/v1/completions", {**body, "logprobs": 1})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "logprobs"
        ok = s.post("/v1/completions", {"prompt": "x", "max_tokens": 4})
        assert ok.status_code == 200
        lines = s.audit_lines()
        assert sorted(x["status"] for x in lines[:24]) == sorted(codes)
        assert all(x["redacted"] is None or isinstance(x["redacted"], dict) for x in lines)
        assert s.stop() == 0
        no_tracebacks(s)
    finally:
        s.stop()


@pytest.mark.slow
def test_int8_server_scores_with_the_int8_weights(trained, tmp_path):
    """serve --int8: a prompt's echoed log-probabilities are the int8 model's (the checkpoint
    restored and quantized here), not the float model's."""
    import jax
    import numpy as np

    from gopher_jax import evaluate
    from gopher_jax.cli.common import stored_config
    from gopher_jax.model import gopher
    from gopher_jax.parallel import mesh as mesh_lib

    s = Server(tmp_path / "int8", trained / "work", "--int8")
    try:
        ids = s.post("/tokenize", {"prompt": "Shall I compare thee to a summer's day"}
                     ).json()["tokens"]
        got = s.post("/v1/completions", {"prompt": ids, "max_tokens": 0, "echo": True,
                                         "logprobs": 1}).json()
        assert s.stop() == 0
        no_tracebacks(s)
    finally:
        s.stop()
    got = np.array(got["choices"][0]["logprobs"]["token_logprobs"])
    c = stored_config(trained / "work" / "config.json")
    c.mesh.update(data=1, fsdp=1, tensor=1)
    mesh = mesh_lib.make_mesh(c, jax.devices()[:1])
    tokens = np.array([[1, *ids]], np.int32)  # the server scores after EOS
    want = {}
    for int8 in (False, True):
        params, _ = evaluate.restore_params(c, trained / "work", mesh, int8)
        graphdef, _ = gopher.abstract(c.model)
        logp = jax.nn.log_softmax(gopher.apply(graphdef, params, tokens[:, :-1])[0])
        want[int8] = np.take_along_axis(np.asarray(logp), tokens[0, 1:, None], 1)[:, 0]
    np.testing.assert_allclose(got, want[True], atol=1e-4)
    assert np.max(np.abs(got - want[False])) > 1e-3
