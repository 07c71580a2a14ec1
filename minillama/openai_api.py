"""The OpenAI wire format: typed requests, validated at the edge, turned into engine Requests; responses and
stream chunks built from finished handles and pieces. Nothing here touches a tensor or a socket.

A parameter this server does not support and that would change the output (tools, response_format, echo,
...) is refused with a 400 naming it (`extra="forbid"`), never silently dropped; `user` is accepted and
ignored, as it changes nothing.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from minillama.engine import MAX_LOGPROBS, Piece, Request
from minillama.stopping import STOP_EOS, STOP_STRING


class APIError(Exception):
    """An error in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Strict = ConfigDict(extra="forbid", strict=True)
Temperature = Annotated[float, Field(ge=0, le=2)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class TextPart(BaseModel):
    model_config = Strict
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = Strict
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = Strict
    include_usage: bool = False


class Sampling(BaseModel):
    """The settings both endpoints share (OpenAI's names; top_k, min_p, repetition_penalty as in vLLM)."""

    model_config = Strict
    model: str | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Temperature | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # -1 or 0: off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    seed: int | None = None
    stop: str | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    n: Annotated[int, Field(ge=1, le=16)] = 1
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored: it changes nothing


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class CompletionRequest(Sampling):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


class TokenizeRequest(BaseModel):
    model_config = Strict
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool = True


class DetokenizeRequest(BaseModel):
    model_config = Strict
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def parse(model: type[BaseModel], body: Any) -> Any:
    """The request body as `model`, or a 400 naming the first bad parameter."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as e:
        error = e.errors()[0]
        param = ".".join(str(p) for p in error["loc"]) or None
        if error["type"] == "extra_forbidden":
            raise APIError(400, f"unsupported parameter: {param} (minillama does not implement it)", param=param,
                           code="unsupported_parameter") from None
        if error["type"] == "missing":
            raise APIError(400, f"missing required parameter: {param}", param=param) from None
        raise APIError(400, f"invalid {param}: {error['msg']}", param=param) from None


def check_common(r: Sampling, served_model: str) -> None:
    if r.model is not None and r.model != served_model:
        raise APIError(400, f"the model {r.model!r} is not served here; this server serves "
                       f"{served_model!r} (GET /v1/models)", param="model", code="model_not_found")
    if r.stream_options is not None and not r.stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")


def engine_requests(r: ChatRequest | CompletionRequest, prompt: list[int], context: int, vocab_size: int,
                    max_tokens: int | None, logprobs: int | None, param: str) -> list[Request]:
    """The n engine requests for one API request; a prompt that does not fit is a 400, never truncated."""
    room = context - len(prompt)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" + max_tokens={max_tokens} = {len(prompt) + max_tokens}" if max_tokens is not None else ""
        raise APIError(400, f"this model's context is {context} tokens, but the request has {len(prompt)} prompt "
                       f"tokens{asked}; shorten the {param} or lower max_tokens", param=param,
                       code="context_length_exceeded")
    bias = {}
    for key, value in (r.logit_bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise APIError(400, f"logit_bias: {key!r} is not a token id in 0..{vocab_size - 1}", param="logit_bias")
        bias[int(key)] = value
    stop = [r.stop] if isinstance(r.stop, str) else list(r.stop or [])
    settings = dict(temperature=1.0 if r.temperature is None else r.temperature,
                    top_p=1.0 if r.top_p is None else r.top_p, top_k=max(r.top_k or 0, 0),
                    min_p=r.min_p or 0.0, repetition_penalty=r.repetition_penalty or 1.0,
                    presence_penalty=r.presence_penalty or 0.0, frequency_penalty=r.frequency_penalty or 0.0)
    # n choices of one seeded request: the seed itself (so n=1 and the first of n agree), then seeds spread by
    # the golden ratio's 64 bits, so no choice repeats another request's seed + 1.
    seeds = [None if r.seed is None else (r.seed + i * 0x9E3779B97F4A7C15) % 2**64 for i in range(r.n)]
    return [Request(prompt=list(prompt), max_tokens=max_tokens or room, logit_bias=bias, stop=stop, seed=seed,
                    logprobs=logprobs, **settings) for seed in seeds]


def finish_reason(reason: str | None) -> str | None:
    """The engine's stop reason in OpenAI's words: the model's end of turn and stop strings are "stop"."""
    return {STOP_EOS: "stop", STOP_STRING: "stop", "length": "length", "context": "length"}.get(reason, reason)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(handles: list[Any]) -> dict[str, Any]:
    prompt = handles[0].usage["prompt_tokens"]
    completion = sum(h.usage["completion_tokens"] for h in handles)
    cached = handles[0].usage["cached_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Logprobs:
    """Log-prob entries in OpenAI's shape, one per token, with each token's own text and bytes."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def token(self, token_id: int) -> tuple[str, list[int]]:
        data = self.tokenizer.token_bytes(token_id)
        return data.decode("utf-8", errors="replace"), list(data)

    def chat_entry(self, piece: Piece) -> dict[str, Any]:
        text, data = self.token(piece.token_id)
        top = []
        for token_id, logprob in piece.top_logprobs or []:
            t, b = self.token(token_id)
            top.append({"token": t, "logprob": logprob, "bytes": b})
        return {"token": text, "logprob": piece.logprob, "bytes": data, "top_logprobs": top}

    def completion_entries(self, pieces: list[Piece], offset: int) -> dict[str, Any]:
        """The legacy completions shape: parallel lists of tokens, log-probs, top alternatives, text offsets."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for p in pieces:
            text, _ = self.token(p.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(p.logprob)
            out["top_logprobs"].append({self.token(t)[0]: lp for t, lp in p.top_logprobs or []})
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def chunk(kind: str, id_: str, created: int, model: str, choices: list[dict], **extra: Any) -> dict[str, Any]:
    return {"id": id_, "object": kind, "created": created, "model": model, "choices": choices, **extra}


def now() -> int:
    return int(time.time())
