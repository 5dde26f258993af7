"""The HTTP side: a FastAPI app over an `Engine` (OpenAI-style completions and chat, model
list, health, readiness, and vLLM's tokenizer endpoints, which lm-eval's `remote` tokenizer
reads).

A prompt string is the model's input after EOS (documents start with EOS in training, as in
`sample`); a prompt of token ids gets EOS in front unless it starts with it. With `echo` and
`logprobs`, token_logprobs lists every prompt token (the first after an added EOS has its
probability given EOS; a first token the client sent as EOS has null) and then the generated
ones: so `max_tokens` 0 or 1 scores a prompt, as lm-eval's local-completions asks.
Log-probabilities are the model's (temperature 1, before top-k/top-p).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from gopher_jax.serve import engine as engine_lib
from gopher_jax.serve.audit import AuditLog
from gopher_jax.serve.protocol import (
    CHAT_STOP,
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_prompt,
    parse,
)
from gopher_jax.serve.text import TextSoFar, token_name


@dataclasses.dataclass
class Limits:
    max_prompt_tokens: int  # the model's input, EOS included
    max_tokens: int  # per request
    timeout_s: float  # per request, from its arrival


@dataclasses.dataclass
class Service:
    """What the handlers need: the engine, the tokenizer, limits, key, audit log, filter."""

    engine: engine_lib.Engine
    tokenizer: Any  # gopher_jax.data.tokenizer.Tokenizer
    vocab_size: int
    model_name: str
    model_step: int | None
    limits: Limits
    api_key: str | None = None
    audit: AuditLog | None = None
    redact: Callable[[str], tuple[str, dict[str, int]]] | None = None
    draining: bool = False
    ready: bool = False

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send Authorization: Bearer KEY)",
                           kind="authentication_error", code="invalid_api_key")


def _error(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@dataclasses.dataclass
class _Call:
    """One completion request being answered: what its audit line says."""

    service: Service
    request: Request
    endpoint: str
    id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))
    parameters: dict[str, Any] = dataclasses.field(default_factory=dict)
    prompt: Any = None
    jobs: list[engine_lib.Job] = dataclasses.field(default_factory=list)
    outputs: list[str] = dataclasses.field(default_factory=list)
    redacted: dict[str, int] = dataclasses.field(default_factory=dict)
    audited: bool = False

    def audit(self, status: int, error: str = "") -> None:
        if self.audited:
            return
        self.audited = True
        log = self.service.audit
        if log is None:
            return
        client = self.request.client
        log.write(id=self.id, client=f"{client.host}:{client.port}" if client else None,
                  endpoint=self.endpoint, model=self.service.model_name,
                  model_step=self.service.model_step, status=status,
                  finish_reasons=[j.finish_reason for j in self.jobs],
                  parameters=self.parameters, prompt=self.prompt, output=self.outputs,
                  prompt_tokens=sum(len(j.ids) for j in self.jobs),
                  completion_tokens=sum(len(j.tokens) for j in self.jobs),
                  redacted=self.redacted or None, error=error or None)


def _redact(call: _Call, text: str) -> str:
    if call.service.redact is None:
        return text
    text, counts = call.service.redact(text)
    for k, v in counts.items():
        if v:
            call.redacted[k] = call.redacted.get(k, 0) + v
    return text


def _finished_line(text: str, final: bool) -> str:
    """The part of a growing text that redaction can see now: whole lines (no pattern of
    pii.py spans a newline), or everything once final."""
    return text if final else text[:text.rfind("\n") + 1]


# -- building jobs --------------------------------------------------------------------------

def _prompt_ids(service: Service, prompt: str | list[int]) -> tuple[list[int], bool]:
    """(the model's input, whether EOS was added in front)."""
    eos = service.tokenizer.eos_id
    if isinstance(prompt, str):
        return [eos] + service.tokenizer.encode(prompt), True
    bad = [t for t in prompt if not 0 <= t < service.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary "
                            f"0..{service.vocab_size - 1}", "prompt")
    if prompt and prompt[0] == eos:
        return list(prompt), False
    return [eos, *prompt], True


def _check_sampling(service: Service, body: Any, max_tokens: int) -> None:
    lim = service.limits
    if max_tokens > lim.max_tokens:
        raise ApiError(400, f"max_tokens={max_tokens} is more than this server's limit of "
                            f"{lim.max_tokens}", "max_tokens")
    if body.top_k > service.vocab_size:
        raise ApiError(400, f"top_k={body.top_k} is more than the vocabulary size "
                            f"{service.vocab_size}", "top_k")
    if body.model is not None and body.model != service.model_name:
        raise ApiError(404, f"model {body.model!r} is not served here (this server serves "
                            f"{service.model_name!r})", "model", code="model_not_found")


def _jobs(call: _Call, body: Any, prompts: Sequence[str | list[int]], max_tokens: int,
          stop: Sequence[str], score: bool, notify: Callable[[engine_lib.Job], None]
          ) -> tuple[list[engine_lib.Job], list[bool]]:
    service = call.service
    seed = body.seed if body.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4])
    deadline = time.monotonic() + service.limits.timeout_s
    jobs, added = [], []
    for p in prompts:
        ids, eos_added = _prompt_ids(service, p)
        if len(ids) > service.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {len(ids)} tokens (EOS included), more than "
                                f"this server's limit of {service.limits.max_prompt_tokens}",
                           "prompt")
        jobs.append(engine_lib.Job(ids=ids, max_tokens=max_tokens, seed=seed,
                                   temperature=body.temperature, top_k=body.top_k,
                                   top_p=body.top_p, stop=tuple(stop or ()), score_prompt=score,
                                   deadline=deadline, notify=notify))
        added.append(eos_added)
    call.parameters = {k: v for k, v in body.model_dump(exclude={"prompt", "messages"}).items()
                       if v is not None}
    call.parameters["seed"] = seed
    return jobs, added


def _submit(call: _Call, jobs: list[engine_lib.Job]) -> None:
    if not call.service.ready or call.service.draining:
        raise ApiError(503, "the model is not ready (starting or shutting down)",
                       kind="server_error")
    try:
        call.service.engine.submit(jobs)
    except engine_lib.QueueFull as e:
        raise ApiError(429, f"too many requests: {e}; retry later", kind="rate_limit_error",
                       code="queue_full") from None
    except engine_lib.EngineFailed as e:
        raise ApiError(503, f"the model's decoding loop stopped ({e}); restart the server",
                       kind="server_error") from None
    call.jobs = jobs


def _notifier() -> tuple[asyncio.Event, Callable[[engine_lib.Job], None]]:
    """An event set (in this loop) whenever the engine reports on a job."""
    loop, event = asyncio.get_running_loop(), asyncio.Event()
    return event, lambda _job: loop.call_soon_threadsafe(event.set)


async def _wait(call: _Call, event: asyncio.Event, jobs: Sequence[engine_lib.Job]) -> None:
    """Until every job is done, or the request's time is up (then they are cancelled)."""
    end = time.monotonic() + call.service.limits.timeout_s + 1.0
    while not all(j.done for j in jobs):
        event.clear()
        if all(j.done for j in jobs):
            break
        try:
            await asyncio.wait_for(event.wait(), max(end - time.monotonic(), 0.0))
        except TimeoutError:
            for j in jobs:
                j.cancel()
            raise ApiError(504, "the request took longer than this server's timeout",
                           kind="timeout_error") from None


def _raise_failed(jobs: Sequence[engine_lib.Job]) -> None:
    for j in jobs:
        if j.finish_reason == engine_lib.TIMEOUT:
            raise ApiError(504, "the request took longer than this server's timeout",
                           kind="timeout_error")
        if j.finish_reason == engine_lib.FAILED:
            raise ApiError(500, f"decoding failed: {j.error}", kind="server_error")


def _usage(jobs: Sequence[engine_lib.Job]) -> dict[str, int]:
    p = sum(len(j.ids) for j in jobs)
    c = sum(len(j.tokens) for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _logprobs(service: Service, job: engine_lib.Job, echo: bool, eos_added: bool, k: int,
              as_ids: bool) -> dict[str, Any]:
    """OpenAI's completion logprobs object: tokens, token_logprobs, top_logprobs,
    text_offset (of the echoed prompt then the completion); tokens named by
    text.token_name, or with `as_ids` "token_id:<id>" (vLLM's return_tokens_as_token_ids)."""
    tok = service.tokenizer

    def name(i: int) -> str:
        return f"token_id:{i}" if as_ids else token_name(tok.decode_bytes([i]),
                                                          tok.sp.id_to_piece(i))

    def top(alts: list[tuple[int, float]]) -> dict[str, float]:
        d: dict[str, float] = {}
        for i, lp in alts[:k]:
            d.setdefault(name(i), lp)
        return d

    tokens, lps, tops = [], [], []
    shown: list[int] = []
    if echo:
        shown = job.ids[1:] if eos_added else job.ids
        scored = list(zip(job.prompt_logprobs, job.prompt_top, strict=True))
        if not eos_added:
            scored = [(None, None), *scored]
        for t, (lp, alts) in zip(shown, scored, strict=True):
            tokens.append(t)
            lps.append(lp)
            tops.append(None if alts is None else top(alts))
    tokens += job.tokens
    lps += job.logprobs
    tops += [top(a) for a in job.top]
    return {"tokens": [name(t) for t in tokens], "token_logprobs": lps, "top_logprobs": tops,
            "text_offset": _text_offsets(service, [shown, job.tokens])}


def _text_offsets(service: Service, parts: list[list[int]]) -> list[int]:
    """Where each token starts in the answer's text (the parts' texts, each decoded on its
    own, one after the other), in characters: the pieces of a character spread over several
    byte tokens all start where the character does."""
    offsets, at = [], 0
    for ids in parts:
        decoded = TextSoFar()
        for t in ids:
            offsets.append(at + len(decoded.finished))
            decoded.add(service.tokenizer.decode_bytes((t,)))
        at += len(decoded.text)
    return offsets


# -- the app --------------------------------------------------------------------------------

class _Stream(StreamingResponse):
    """A stream whose client may leave: the body generator is closed (its request
    cancelled and audited) instead of an error escaping to the server's log."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except (ClientDisconnect, OSError):
            pass
        finally:
            await self.body_iterator.aclose()


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="gopher_jax", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.get("/health")
    async def health() -> JSONResponse:
        failed = service.engine.failed
        if failed is not None:  # a liveness probe restarts the server
            return JSONResponse({"status": "failed", "error": failed}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> JSONResponse:
        failed = service.engine.failed is not None
        ok = service.ready and not service.draining and not failed
        state = "ready" if ok else "failed" if failed else \
            "draining" if service.draining else "starting"
        return JSONResponse({"status": state, "slots": service.engine.batch.slots,
                             "busy": service.engine.busy, "waiting": service.engine.waiting},
                            status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        service.authorize(request)
        return {"object": "list", "data": [{
            "id": service.model_name, "object": "model", "created": 0, "owned_by": "gopher_jax",
            "max_model_len": service.limits.max_prompt_tokens, "step": service.model_step}]}

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request) -> dict[str, Any]:
        service.authorize(request)
        tok = service.tokenizer
        eos = tok.sp.id_to_piece(tok.eos_id)
        return {"eos_token": eos, "bos_token": None, "pad_token": None,
                "model_max_length": service.limits.max_prompt_tokens,
                "vocab_size": service.vocab_size}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        service.authorize(request)
        body = parse(await request.body(), TokenizeRequest)
        tok = service.tokenizer
        eos = tok.sp.id_to_piece(tok.eos_id)
        # The EOS piece spelled out is the EOS id, as Hugging Face tokenizers read specials.
        ids: list[int] = []
        for k, part in enumerate(body.prompt.split(eos)):
            if k:
                ids.append(tok.eos_id)
            ids += tok.encode(part) if part else []
        if body.add_special_tokens:
            ids = [tok.eos_id, *ids]
        return {"tokens": ids, "count": len(ids),
                "max_model_len": service.limits.max_prompt_tokens}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        service.authorize(request)
        body = parse(await request.body(), DetokenizeRequest)
        if any(not 0 <= t < service.vocab_size for t in body.tokens):
            raise ApiError(400, "a token id is outside the vocabulary", "tokens")
        return {"prompt": service.tokenizer.decode(body.tokens)}

    async def audited(request: Request, endpoint: str,
                      answer: Callable[[_Call], Awaitable[Any]]) -> Any:
        """A completion endpoint's answer; its errors are audited too."""
        call = _Call(service, request, endpoint)
        try:
            return await answer(call)
        except ApiError as e:
            call.audit(e.status, e.message)
            return _error(e)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await audited(request, "/v1/completions", _completion)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await audited(request, "/v1/chat/completions", _chat)

    return app


async def _completion(call: _Call) -> Any:
    service = call.service
    service.authorize(call.request)
    body: CompletionRequest = parse(await call.request.body(), CompletionRequest)
    p = body.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    call.prompt = p
    max_tokens = 16 if body.max_tokens is None else body.max_tokens
    _check_sampling(service, body, max_tokens)
    if max_tokens == 0 and not body.echo:
        raise ApiError(400, "max_tokens=0 returns nothing without echo", "max_tokens")
    if body.stream and (len(prompts) > 1 or body.logprobs is not None):
        raise ApiError(400, "stream takes one prompt and no logprobs", "stream")
    if body.logprobs is not None and max_tokens and service.redact is not None:
        raise ApiError(400, "logprobs of generated tokens would show text that "
                            "--redact_output removes", "logprobs")
    event, notify = _notifier()
    score = body.echo and body.logprobs is not None
    jobs, added = _jobs(call, body, prompts, max_tokens, body.stop, score, notify)
    _submit(call, jobs)
    if body.stream:
        return _Stream(_stream(call, event, jobs[0], chat=False,
                               usage=bool((body.stream_options or {}).get("include_usage"))),
                       media_type="text/event-stream")
    try:
        await _wait(call, event, jobs)
    except asyncio.CancelledError:
        for j in jobs:
            j.cancel()
        raise
    _raise_failed(jobs)
    choices = []
    for i, (job, prompt, eos_added) in enumerate(zip(jobs, prompts, added, strict=True)):
        text = _redact(call, job.text)
        head = ""
        if body.echo:
            head = prompt if isinstance(prompt, str) else service.tokenizer.decode(
                job.ids[1:] if eos_added else job.ids)
        call.outputs.append(text)
        lp = None
        if body.logprobs is not None:
            lp = _logprobs(service, job, body.echo, eos_added, body.logprobs,
                           body.return_tokens_as_token_ids)
        choices.append({"index": i, "text": head + text, "logprobs": lp,
                        "finish_reason": job.finish_reason})
    call.audit(200)
    return {"id": f"cmpl-{call.id}", "object": "text_completion", "created": call.created,
            "model": service.model_name, "choices": choices, "usage": _usage(jobs)}


async def _chat(call: _Call) -> Any:
    service = call.service
    service.authorize(call.request)
    body: ChatRequest = parse(await call.request.body(), ChatRequest)
    call.prompt = [m.model_dump(exclude_none=True) for m in body.messages]
    max_tokens = next((n for n in (body.max_completion_tokens, body.max_tokens)
                       if n is not None), service.limits.max_tokens)
    if max_tokens == 0:
        raise ApiError(400, "max_tokens=0 asks a chat for no reply", "max_tokens")
    _check_sampling(service, body, max_tokens)
    event, notify = _notifier()
    jobs, _ = _jobs(call, body, [chat_prompt(body.messages)], max_tokens,
                    (*CHAT_STOP, *(body.stop or ())), False, notify)
    _submit(call, jobs)
    if body.stream:
        return _Stream(_stream(call, event, jobs[0], chat=True,
                               usage=bool((body.stream_options or {}).get("include_usage"))),
                       media_type="text/event-stream")
    try:
        await _wait(call, event, jobs)
    except asyncio.CancelledError:
        jobs[0].cancel()
        raise
    _raise_failed(jobs)
    job = jobs[0]
    text = _redact(call, job.text.lstrip())
    call.outputs.append(text)
    call.audit(200)
    return {"id": f"chatcmpl-{call.id}", "object": "chat.completion", "created": call.created,
            "model": service.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": job.finish_reason}],
            "usage": _usage(jobs)}


async def _stream(call: _Call, event: asyncio.Event, job: engine_lib.Job, chat: bool,
                  usage: bool) -> AsyncIterator[str]:
    """Server-sent events: text deltas as tokens come, then the finish reason, the audit
    line (written before the last event), `data: [DONE]`. A client that leaves cancels the
    job; a timeout ends the stream with an error event."""
    service = call.service
    kind = "chat.completion.chunk" if chat else "text_completion"
    sent = ""  # the text sent so far (redacted when redacting)
    seen = 0  # how much of the job's text has been sent (before redaction)
    end = time.monotonic() + service.limits.timeout_s + 1.0

    def chunk(delta: str | None, finish: str | None) -> dict[str, Any]:
        if chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{call.id}", "object": kind,
                "created": call.created, "model": service.model_name, "choices": [choice]}

    try:
        if chat:
            first = chunk(None, None)
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield _sse(first)
        while True:
            event.clear()
            done = job.done
            text = job.visible()
            if chat:  # the reply starts after the template's "Assistant:"
                text = text.lstrip()
            if service.redact is not None:
                text = _finished_line(text, done)
            if len(text) > seen:
                piece = _redact(call, text[seen:])
                seen = len(text)
                sent += piece
                yield _sse(chunk(piece, None))
            if done:
                break
            try:
                await asyncio.wait_for(event.wait(), max(end - time.monotonic(), 0.0))
            except TimeoutError:
                job.cancel()
                job.finish_reason = engine_lib.TIMEOUT
                break
        if job.finish_reason in (engine_lib.TIMEOUT, engine_lib.FAILED):
            status = 504 if job.finish_reason == engine_lib.TIMEOUT else 500
            message = "timeout" if status == 504 else f"decoding failed: {job.error}"
            call.outputs.append(sent)
            call.audit(status, message)
            yield _sse({"error": {"message": message, "type": "server_error",
                                  "param": None, "code": None}})
            return
        last = chunk(None if chat else "", job.finish_reason)
        if chat:
            last["choices"][0]["delta"] = {}
        call.outputs.append(sent)
        call.audit(200)
        yield _sse(last)
        if usage:
            u = chunk(None, None)
            u["choices"], u["usage"] = [], _usage([job])
            yield _sse(u)
        yield "data: [DONE]\n\n"
    finally:
        if not call.audited:  # the client left mid-stream
            job.cancel()
            call.outputs[:] = [sent]
            call.audit(499, "the client closed the connection")
