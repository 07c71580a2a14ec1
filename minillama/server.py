"""`minillama serve`: the OpenAI-compatible HTTP server over the engine, and its chat page.

The layers (STYLE.md 16): engine.py runs requests and knows nothing of HTTP; openai_api.py turns the wire
format into engine Requests and back and knows nothing of tensors; this file is the HTTP layer (Starlette via
FastAPI, served by uvicorn): routes, auth, body limits, streaming, disconnects, metrics. The engine runs in its
own thread; the event loop only waits on it, woken by the engine through `call_soon_threadsafe`.

A client that goes away (streaming or not, during prefill or decode) has its requests cancelled at once,
which frees their slots at the start of the next engine step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from minillama.engine import STOP_ERROR, Engine, EngineFull, Handle, Piece
from minillama.errors import MinillamaError
from minillama.openai_api import (APIError, ChatRequest, CompletionRequest, DetokenizeRequest, Logprobs,
                                  TokenizeRequest, check_common, chunk, engine_requests, finish_reason, new_id, now,
                                  parse, usage)

WEB = Path(__file__).with_name("web")  # the chat page: plain files, no build step
PING_SECONDS = 2.0  # an SSE comment this often while nothing else is sent (a long prefill), so clients wait
DISCONNECT_POLL = 0.1  # seconds between checks that a non-streaming client is still there


@dataclass
class ServerState:
    """What the routes share. `engine` is None while the model loads (503)."""

    model_name: str
    api_keys: list[str] = field(default_factory=list)
    max_body: int = 4 * 2**20
    engine: Engine | None = None
    tokenizer: Any = None
    loading_error: str | None = None

    @property
    def context(self) -> int:
        return self.engine.max_seq_len if self.engine else 0


class EngineCollector:
    """/metrics: the engine's own counters and gauges, read at scrape time (nothing is counted twice)."""

    def __init__(self, state: ServerState):
        self.state = state

    def collect(self):
        engine = self.state.engine
        if engine is None:
            return
        c = engine.counters
        for name, key, doc in [("requests_finished", "finished", "requests that ran to a stop"),
                               ("requests_cancelled", "cancelled", "requests cancelled (clients that went away)"),
                               ("requests_refused", "refused", "requests refused before queueing (too long, full)"),
                               ("requests_failed", "errors", "requests ended by an error"),
                               ("prompt_tokens", "prompt_tokens", "prompt tokens admitted"),
                               ("prompt_tokens_cached", "cached_tokens", "prompt tokens reused from a slot"),
                               ("generation_tokens", "output_tokens", "tokens generated")]:
            yield CounterMetricFamily(f"minillama_{name}", doc, value=c[key])
        yield GaugeMetricFamily("minillama_requests_running", "requests holding a slot", value=engine.running)
        yield GaugeMetricFamily("minillama_requests_waiting", "requests waiting for a slot", value=engine.waiting)
        yield GaugeMetricFamily("minillama_slots_in_use", "KV cache slots in use", value=engine.running)
        yield GaugeMetricFamily("minillama_slots", "KV cache slots", value=engine.n_slots)


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="minillama", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    registry.register(EngineCollector(state))
    ttft = Histogram("minillama_time_to_first_token_seconds", "request start to its first token", registry=registry,
                     buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
    tpot = Histogram("minillama_time_per_output_token_seconds", "time per token after the first", registry=registry,
                     buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5))

    def observe(handles: list[Handle]) -> None:
        for h in handles:
            if h.first_token_at is not None:
                ttft.observe(h.first_token_at - h.submitted)
                if len(h.pieces) > 1 and h.finished_at is not None:
                    tpot.observe((h.finished_at - h.first_token_at) / (len(h.pieces) - 1))

    # ---- Errors, auth, bodies ---------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # 404, 405 in OpenAI's shape too
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    def ready(request: Request) -> Engine:
        """The engine, after the API key check; 503 while the model loads."""
        if state.api_keys:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            # Compare with every key, in constant time each: no early exit that a timing could reveal.
            if not any([hmac.compare_digest(token.encode(), key.encode()) for key in state.api_keys]):
                raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key")
        if state.engine is None:
            raise APIError(503, "the model is still loading; retry shortly", type="server_error",
                           code="model_loading", headers={"Retry-After": "5"})
        return state.engine

    async def read_json(request: Request) -> Any:
        """The body as JSON: 413 past max_body (by Content-Length, or as it streams in), 400 if not JSON."""
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > state.max_body:
            raise APIError(413, f"the request body is {int(length):,} bytes; the limit is {state.max_body:,}",
                           code="request_too_large")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > state.max_body:
                raise APIError(413, f"the request body is over the limit of {state.max_body:,} bytes",
                               code="request_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def submit(engine: Engine, requests: list, listener) -> list[Handle]:
        handles = []
        try:
            for r in requests:
                handles.append(engine.submit(r, listener=listener(len(handles))))
        except EngineFull as e:
            for h in handles:
                engine.cancel(h)
            raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) \
                from None
        except MinillamaError as e:
            for h in handles:
                engine.cancel(h)
            raise APIError(400, str(e)) from None
        return handles

    # ---- Running requests ---------------------------------------------------------------------------------

    async def run(engine: Engine, requests: list, request: Request, stream: bool):
        """Submit, then either a queue of (choice index, piece or None) for streaming, or wait for the end."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def listener(index: int):
            return lambda piece: loop.call_soon_threadsafe(events.put_nowait, (index, piece))

        handles = submit(engine, requests, listener)
        if stream:
            return handles, events
        try:
            remaining = len(handles)
            while remaining:
                try:
                    _, piece = await asyncio.wait_for(events.get(), DISCONNECT_POLL)
                    remaining -= piece is None
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        break
        finally:
            for h in handles:
                if not h.done:
                    engine.cancel(h)  # the client went away: free its slots
        observe(handles)
        for h in handles:
            if h.finish_reason == STOP_ERROR:
                raise APIError(500, f"generation failed: {h.error}", type="server_error")
        return handles, None

    async def sse(handles: list[Handle], events: asyncio.Queue, engine: Engine, first: list[dict],
                  piece_choice, final_choice, make_chunk, include_usage: bool) -> AsyncIterator[str]:
        """The stream: first chunks, one chunk per piece with text, one finish per choice, usage, [DONE].
        Cancels whatever still runs when the client goes away (the generator is closed)."""
        try:
            for c in first:
                yield data(c)
            remaining = len(handles)
            while remaining:
                try:
                    index, piece = await asyncio.wait_for(events.get(), PING_SECONDS)
                except asyncio.TimeoutError:
                    yield ": ping\n\n"
                    continue
                if piece is None:
                    remaining -= 1
                    handle = handles[index]
                    if handle.finish_reason == STOP_ERROR:
                        yield data({"error": APIError(500, f"generation failed: {handle.error}",
                                                      type="server_error").body()["error"]})
                        continue
                    yield data(make_chunk([final_choice(index, handle)]))
                    continue
                choice = piece_choice(index, piece)
                if choice is not None:
                    yield data(make_chunk([choice]))
            observe(handles)
            if include_usage:
                yield data(make_chunk([], usage=usage(handles)))
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                if not h.done:
                    engine.cancel(h)

    # ---- Endpoints -------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        engine = ready(request)
        r = parse(ChatRequest, await read_json(request))
        check_common(r, state.model_name)
        if r.top_logprobs is not None and not r.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        try:
            prompt = state.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in r.messages],
                                                         add_generation_prompt=True, tokenize=True)
        except MinillamaError as e:
            raise APIError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        max_tokens = r.max_completion_tokens or r.max_tokens
        n_logprobs = (r.top_logprobs or 0) if r.logprobs else None
        requests = engine_requests(r, prompt, engine.max_seq_len, engine.vocab_size, max_tokens, n_logprobs,
                                   "messages")
        handles, events = await run(engine, requests, request, r.stream)
        id_, created, logprobs = new_id("chatcmpl"), now(), Logprobs(state.tokenizer)
        if not r.stream:
            choices = [{"index": i, "message": {"role": "assistant", "content": h.text},
                        "logprobs": {"content": [logprobs.chat_entry(p) for p in visible(h)]} if r.logprobs else None,
                        "finish_reason": finish_reason(h.finish_reason)} for i, h in enumerate(handles)]
            return {"id": id_, "object": "chat.completion", "created": created, "model": state.model_name,
                    "choices": choices, "usage": usage(handles)}

        pending: dict[int, list[Piece]] = {i: [] for i in range(len(handles))}  # log-probs awaiting their text

        def piece_choice(index: int, piece: Piece) -> dict | None:
            if piece.token_id is not None and piece.logprob is not None:
                pending[index].append(piece)
            if not piece.text:
                return None
            choice = {"index": index, "delta": {"content": piece.text}, "logprobs": None, "finish_reason": None}
            if r.logprobs:
                choice["logprobs"] = {"content": [logprobs.chat_entry(p) for p in pending[index]]}
                pending[index] = []
            return choice

        def final_choice(index: int, handle: Handle) -> dict:
            return {"index": index, "delta": {}, "logprobs": None, "finish_reason": finish_reason(handle.finish_reason)}

        def make_chunk(choices: list[dict], **extra) -> dict:
            return chunk("chat.completion.chunk", id_, created, state.model_name, choices, **extra)

        first = [make_chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(len(handles))]
        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        return event_stream(sse(handles, events, engine, first, piece_choice, final_choice, make_chunk,
                                include_usage))

    @app.post("/v1/completions")
    async def completions(request: Request):
        engine = ready(request)
        r = parse(CompletionRequest, await read_json(request))
        check_common(r, state.model_name)
        prompt = state.tokenizer.encode(r.prompt) if isinstance(r.prompt, str) else list(r.prompt)
        if any(t >= engine.vocab_size for t in prompt):
            raise APIError(400, f"prompt token ids must be in 0..{engine.vocab_size - 1}", param="prompt")
        requests = engine_requests(r, prompt, engine.max_seq_len, engine.vocab_size, r.max_tokens, r.logprobs,
                                   "prompt")
        handles, events = await run(engine, requests, request, r.stream)
        id_, created, logprobs = new_id("cmpl"), now(), Logprobs(state.tokenizer)
        if not r.stream:
            choices = [{"index": i, "text": h.text, "finish_reason": finish_reason(h.finish_reason),
                        "logprobs": logprobs.completion_entries(visible(h), 0) if r.logprobs is not None else None}
                       for i, h in enumerate(handles)]
            return {"id": id_, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": choices, "usage": usage(handles)}

        pending: dict[int, list[Piece]] = {i: [] for i in range(len(handles))}
        offsets = [0] * len(handles)

        def piece_choice(index: int, piece: Piece) -> dict | None:
            if piece.token_id is not None and piece.logprob is not None:
                pending[index].append(piece)
            if not piece.text:
                return None
            choice = {"index": index, "text": piece.text, "logprobs": None, "finish_reason": None}
            if r.logprobs is not None:
                choice["logprobs"] = logprobs.completion_entries(pending[index], offsets[index])
                pending[index] = []
            offsets[index] += len(piece.text)
            return choice

        def final_choice(index: int, handle: Handle) -> dict:
            return {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason(handle.finish_reason)}

        def make_chunk(choices: list[dict], **extra) -> dict:
            return chunk("text_completion", id_, created, state.model_name, choices, **extra)

        include_usage = bool(r.stream_options and r.stream_options.include_usage)
        return event_stream(sse(handles, events, engine, [], piece_choice, final_choice, make_chunk, include_usage))

    @app.get("/v1/models")
    async def models(request: Request):
        engine = ready(request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "minillama", "max_model_len": engine.max_seq_len,
                                            "context_length": engine.max_seq_len}]}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        engine = ready(request)
        r = parse(TokenizeRequest, await read_json(request))
        if (r.prompt is None) == (r.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")
        tok = state.tokenizer
        try:
            if r.messages is not None:
                text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in r.messages],
                                               add_generation_prompt=r.add_generation_prompt, tokenize=False)
                ids = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in r.messages],
                                              add_generation_prompt=r.add_generation_prompt, tokenize=True)
            else:
                text, ids = r.prompt, tok.encode(r.prompt, add_special_tokens=r.add_special_tokens)
        except MinillamaError as e:
            raise APIError(400, str(e), param="messages") from None
        return {"tokens": ids, "pieces": [tok.piece_text(i) for i in ids], "count": len(ids),
                "max_model_len": engine.max_seq_len, "prompt": text}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        ready(request)
        r = parse(DetokenizeRequest, await read_json(request))
        tok = state.tokenizer
        if any(t >= tok.vocab_size for t in r.tokens):
            raise APIError(400, f"token ids must be in 0..{tok.vocab_size - 1}", param="tokens")
        return {"prompt": tok.decode(r.tokens), "pieces": [tok.piece_text(i) for i in r.tokens]}

    @app.get("/health")
    async def health():
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def page():
        return FileResponse(WEB / "index.html", media_type="text/html; charset=utf-8")

    @app.get("/static/{name}")
    async def static(name: str):
        files = {p.name: p for p in WEB.iterdir() if p.is_file()}  # only the page's own files, by name
        if name not in files:
            raise APIError(404, f"no such file: {name}")
        return FileResponse(files[name])

    return app


def visible(handle: Handle) -> list[Piece]:
    """The pieces whose tokens are part of the reply's text: not the end-of-turn token, not a stop string's."""
    pieces = [p for p in handle.pieces if p.token_id is not None]
    if handle.finish_reason in ("eos", "stop_string") and pieces:
        pieces = pieces[:-1]
    return pieces


def data(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def event_stream(body: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(body, media_type="text/event-stream; charset=utf-8",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
