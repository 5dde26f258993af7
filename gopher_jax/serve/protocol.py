"""The request bodies the server accepts (a subset of OpenAI's), their static ranges, the
chat template, and errors as JSON naming the field.

Unknown fields are refused (400 naming the field) rather than ignored: a client that sends
`frequency_penalty` or `best_of` would otherwise get an answer computed without them.
Limits that depend on the served model and flags (prompt length, max_tokens, top_k) are
checked by the app.

Chat template: each message becomes a line `System: ...`, `User: ...` or `Assistant: ...`
(role capitalised, then ": ", the content, "\\n"), and the prompt ends with `Assistant:`;
generation stops at EOS, at a line starting with `User:` or `System:`, and at any `stop`.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**32 - 1
MAX_STOP = 4
CHAT_STOP = ("\nUser:", "\nSystem:")


class ApiError(Exception):
    """An error response: HTTP status, message, the field at fault (OpenAI's error body)."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = (
            status, message, param, kind, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    user: str | None = None

    @pydantic.field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        stops = [] if v is None else [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} non-empty strings")
        return stops


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    return_tokens_as_token_ids: bool = False  # vLLM's: tokens as "token_id:<id>"

    @pydantic.field_validator("prompt")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if isinstance(v, list) and not v:
            raise ValueError("an empty list")
        return v


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize body (what lm-eval's remote tokenizer sends)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[int]


def chat_prompt(messages: list[Message]) -> str:
    """The plain template (module docstring)."""
    lines = [f"{m.role.capitalize()}: {m.content}\n" for m in messages]
    return "".join(lines) + "Assistant:"


def parse(raw: bytes, model: type[BaseModel]) -> Any:
    """A request body -> the model, or ApiError(400) naming the first field at fault."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the body is not valid JSON ({e})", "body") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", "body")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        loc = [str(p) for p in err["loc"]]
        # a union's branch name ("str", "list[int]") is not part of the field's path
        field = loc[0] if loc else "body"
        if err["type"] == "extra_forbidden":
            raise ApiError(400, f"unknown field {'.'.join(loc)!r}", field) from None
        raise ApiError(400, f"{'.'.join(loc)}: {err['msg']}", field) from None
