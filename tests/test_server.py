"""`minillama serve` as a real process on a loopback port, talked to with the official `openai` client and raw HTTP.

The model is tiny and random (initializer 0.2, so greedy output varies) with the real Llama 3.2 tokenizer and
chat template: replies cost milliseconds and are random pieces of a 128K vocabulary, multi-byte characters
included, which is what stream splitting must survive.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time

import httpx
import openai
import psutil
import pytest
from conftest import make_hf_checkpoint
from serving import start_server

import minillama
from minillama.engine import Engine, Request


@pytest.fixture(scope="module")
def lively_chat_model(tmp_path_factory, llama32_tokenizer_dir):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("lively-chat"), seed=5, vocab_size=128256, hidden_size=32,
                              intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                              tie_word_embeddings=True, max_position_embeddings=4096, initializer_range=0.2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama32_tokenizer_dir / name, path / name)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128008, 128009]}))
    return path


@pytest.fixture(scope="module")
def server(lively_chat_model, tmp_path_factory):
    # Chunks of 4 prompt tokens: a 3,600-token prompt takes ~900 steps, so a test can leave during its prefill.
    with start_server(lively_chat_model, "--slots", "2", "--ctx", "4096", "--chunk-size", "4", "--max-body",
                      "200000", tmp_path=tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tok(lively_chat_model):
    return minillama.load_tokenizer(lively_chat_model)


MODEL = "lively-chat0"  # the served name: the model directory's name
HI = [{"role": "user", "content": "Hi there"}]


def chat_stream(client, **kw):
    """The chunks of a streamed chat completion."""
    return list(client.chat.completions.create(model=MODEL, stream=True, **kw))


def streamed_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def metric(server, name: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def test_models_and_health(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 4096
    assert httpx.get(server.url + "/health").status_code == 200


def test_chat_streamed_equals_not_streamed_and_usage_is_the_tokenizers(client, tok):
    whole = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20, temperature=0)
    chunks = chat_stream(client, messages=HI, max_tokens=20, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert streamed_text(chunks) == whole.choices[0].message.content != ""
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"] == [whole.choices[0].finish_reason]
    assert all(c.usage is None for c in chunks)  # usage only when asked
    prompt = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=True)
    assert whole.usage.prompt_tokens == len(prompt) and whole.usage.completion_tokens == 20
    assert whole.usage.total_tokens == len(prompt) + 20
    with_usage = chat_stream(client, messages=HI, max_tokens=20, temperature=0,
                             stream_options={"include_usage": True})
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == 20
    assert with_usage[-1].usage.prompt_tokens == len(prompt)
    assert [c for c in with_usage[:-1] if c.usage is not None] == []


def test_completions_streamed_and_not(client, tok):
    whole = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=15, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=15, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert whole.usage.prompt_tokens == len(tok.encode("Once upon a time")) == chunks[-1].usage.prompt_tokens
    assert whole.choices[0].finish_reason == "length"
    ids = client.completions.create(model=MODEL, prompt=tok.encode("Once upon a time"), max_tokens=15,
                                    temperature=0)
    assert ids.choices[0].text == whole.choices[0].text  # a prompt of token ids is the same prompt


def test_finish_reasons_for_end_of_turn_length_and_stop_strings(client, tok):
    eot = tok.token_to_id("<|eot_id|>")
    ended = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=20, temperature=0,
                                           logit_bias={str(eot): 100})
    assert ended.choices[0].finish_reason == "stop" and ended.choices[0].message.content == ""
    assert ended.usage.completion_tokens == 1
    free = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=40, temperature=0)
    text = free.choices[0].message.content
    stop = text[len(text) // 2:][:2]  # two characters from the middle: likely spread over tokens
    cut = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=40, temperature=0, stop=[stop, "zzz"])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == text[:text.index(stop)]
    chunks = chat_stream(client, messages=HI, max_tokens=40, temperature=0, stop=stop)
    assert streamed_text(chunks) == text[:text.index(stop)]  # not one character of the stop string was sent
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


def test_utf8_is_never_split(server, tok):
    """Raw SSE: the deltas add up to the reply decoded whole, so none split a character (a split one would be
    U+FFFD in the stream only). A random model can emit bytes that never form a character (a 3-byte lead, then
    another lead): the reply itself then holds that U+FFFD, and so does the stream."""
    body = {"model": MODEL, "messages": HI, "max_tokens": 60, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content") or "" for line in lines[:-1]
              if line.startswith("data: ")]
    whole = httpx.post(server.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=60).json()
    text = whole["choices"][0]["message"]["content"]
    assert "".join(deltas) == text  # a split character would show as U+FFFD here where the whole reply has it
    assert any(not d.isascii() for d in deltas)  # the reply did hold multi-byte characters to split


def test_logprobs_equal_the_engines(client, lively_chat_model, tok):
    reply = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=5)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == 8
    model = minillama.load_model(lively_chat_model, device="cpu")
    prompt = tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=True)
    engine = Engine(model, tok, slots=1, max_seq_len=512)
    local = engine.generate([Request(prompt, max_tokens=8, temperature=0, logprobs=5)])[0]
    for entry, piece in zip(content, local.pieces):
        assert entry.logprob == pytest.approx(piece.logprob, abs=1e-4)
        assert entry.bytes == list(tok.token_bytes(piece.token_id))
        assert [t.bytes for t in entry.top_logprobs] == [list(tok.token_bytes(i)) for i, _ in piece.top_logprobs]
        assert len(entry.top_logprobs) == 5 and sum(2.718281828 ** t.logprob for t in entry.top_logprobs) <= 1
    chunks = chat_stream(client, messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.logprob for e in streamed] == [e.logprob for e in content]
    legacy = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0, logprobs=3)
    entries = legacy.choices[0].logprobs
    assert len(entries.tokens) == 4 and all(len(t) == 3 for t in entries.top_logprobs)


def test_n_choices_and_seeds(client):
    two = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=1.0, n=2, seed=42)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content
    assert two.usage.completion_tokens == 24
    again = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=1.0, n=2, seed=42)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    first = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=1.0, seed=42)
    assert first.choices[0].message.content == two.choices[0].message.content  # n=1 is the first of n
    other = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=1.0, seed=43)
    assert other.choices[0].message.content not in [c.message.content for c in two.choices]
    chunks = chat_stream(client, messages=HI, max_tokens=12, temperature=1.0, n=2, seed=42)
    for i in (0, 1):
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        assert text == two.choices[i].message.content


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": MODEL, "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ({"model": MODEL, "messages": HI, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": HI, "top_logprobs": 21, "logprobs": True}, 400, "top_logprobs"),
    ({"model": "gpt-4o", "messages": HI}, 400, "model"),
    ({"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, 400, "tools"),
    ({"model": MODEL, "messages": HI, "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"model": MODEL, "messages": HI, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 5000}]}, 400, "messages"),
    ({"model": MODEL, "messages": HI, "max_tokens": 5000}, 400, "messages"),
    ({"model": MODEL, "messages": HI, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "x" * 300000}]}, 413, None),
])
def test_errors_in_openais_shape_and_the_server_keeps_serving(server, client, body, status, param):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + "/v1/chat/completions", content=data, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if "5000" in data.decode()[:200000] and status == 400:
        assert error["code"] == "context_length_exceeded"
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices[0].finish_reason


def test_the_client_sees_bad_requests_as_such(client):
    with pytest.raises(openai.BadRequestError, match="unsupported parameter: tools"):
        client.chat.completions.create(model=MODEL, messages=HI, tools=[{"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {}}}}])
    assert httpx.get(str(client.base_url) + "nope").json()["error"]["message"]  # 404 in OpenAI's shape too


def test_tokenize_and_detokenize(server, tok):
    r = httpx.post(server.url + "/tokenize", json={"messages": HI}).json()
    assert r["tokens"] == tok.apply_chat_template(HI, add_generation_prompt=True, tokenize=True)
    assert r["count"] == len(r["tokens"]) and r["max_model_len"] == 4096
    assert "<|start_header_id|>user<|end_header_id|>" in r["prompt"] and len(r["pieces"]) == r["count"]
    d = httpx.post(server.url + "/detokenize", json={"tokens": tok.encode("héllo wörld", add_special_tokens=False)})
    assert d.json()["prompt"] == "héllo wörld"
    assert httpx.post(server.url + "/detokenize", json={"tokens": [10**9]}).status_code == 400


def raw_request(server, body: dict) -> socket.socket:
    """Send a POST over a plain socket (no client library that could buffer or retry) and return the socket."""
    host, port = server.url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def read_until(s: socket.socket, marker: bytes, timeout: float = 30) -> bytes:
    """Bytes from the socket until `marker` has arrived (headers and the first chunk may come apart)."""
    s.settimeout(timeout)
    data = b""
    while marker not in data:
        part = s.recv(4096)
        assert part, f"the server closed the connection before {marker!r}: {data[-300:]!r}"
        data += part
    return data


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_client_gone_mid_stream_frees_its_slot(server):
    cancelled = metric(server, "minillama_requests_cancelled_total")
    generated = metric(server, "minillama_generation_tokens_total")
    s = raw_request(server, {"model": MODEL, "messages": HI, "max_tokens": 3000, "stream": True})
    read_until(s, b"data: ")  # the stream has begun
    s.close()
    wait_for(lambda: metric(server, "minillama_requests_running") == 0, timeout=10)
    assert metric(server, "minillama_requests_cancelled_total") == cancelled + 1
    assert metric(server, "minillama_generation_tokens_total") - generated < 3000  # stopped, not run to the end


def test_a_client_gone_mid_prefill_frees_its_slot(server, tok):
    """A long prompt prefills 4 tokens per step; the client leaves before the first token (not streaming)."""
    cancelled, generated = metric(server, "minillama_requests_cancelled_total"), \
        metric(server, "minillama_generation_tokens_total")
    long = [{"role": "user", "content": "count the words " * 900}]  # ~3,600 tokens: hundreds of chunks
    s = raw_request(server, {"model": MODEL, "messages": long, "max_tokens": 5})
    wait_for(lambda: metric(server, "minillama_requests_running") == 1)
    s.close()
    wait_for(lambda: metric(server, "minillama_requests_running") == 0, timeout=10)
    assert metric(server, "minillama_requests_cancelled_total") == cancelled + 1
    assert metric(server, "minillama_generation_tokens_total") == generated  # gone before its first token


def test_metrics(server, client):
    client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    for name in ("minillama_requests_running", "minillama_requests_waiting", "minillama_requests_finished_total",
                 "minillama_requests_cancelled_total", "minillama_requests_refused_total",
                 "minillama_prompt_tokens_total", "minillama_generation_tokens_total", "minillama_slots_in_use",
                 "minillama_time_to_first_token_seconds_bucket", "minillama_time_per_output_token_seconds_count"):
        assert name in text
    assert metric(server, "minillama_time_to_first_token_seconds_count") >= 1


def test_the_page_and_its_files_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(server.url + "/static/app.js").status_code == 200
    assert httpx.get(server.url + "/static/..%2Fserver.py").status_code == 404


@pytest.fixture(scope="module")
def keyed_server(lively_chat_model, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("second-key\n")
    with start_server(lively_chat_model, "--slots", "4", "--max-queue", "16", "--ctx", "512", "--api-key", "k1",
                      "--api-key-file", str(keys), tmp_path=tmp_path_factory.mktemp("keyed")) as s:
        yield s


def test_api_keys(keyed_server):
    url = keyed_server.url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": HI, "max_tokens": 2}
    assert httpx.post(url, json=body).status_code == 401
    wrong = httpx.post(url, json=body, headers={"Authorization": "Bearer k2"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    for key in ("k1", "second-key"):
        assert httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}).status_code == 200
    assert httpx.get(keyed_server.url + "/health").status_code == 200  # health stays open
    ok = openai.OpenAI(base_url=keyed_server.url + "/v1", api_key="k1", max_retries=0)
    assert ok.models.list().data[0].id == MODEL


def test_64_clients_on_4_slots_each_complete_or_get_429(keyed_server):
    """None hangs, the queue stays bounded (429 with Retry-After beyond it), memory stays flat."""
    process = psutil.Process(keyed_server.process.pid)
    url = keyed_server.url + "/v1/chat/completions"
    headers = {"Authorization": "Bearer k1"}
    results: list = []

    def one(i):
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 24,
                "stream": i % 2 == 0}
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=120)
            results.append((r.status_code, r.headers.get("retry-after"), r.text))
        except httpx.HTTPError as e:
            results.append((0, None, repr(e)))

    def wave():
        threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(150)
        assert not any(t.is_alive() for t in threads), "a request hung"

    start = time.monotonic()
    wave()
    rss = process.memory_info().rss
    results.clear()
    wave()
    assert time.monotonic() - start < 240
    assert len(results) == 64 and {status for status, _, _ in results} <= {200, 429}
    assert sum(status == 200 for status, _, _ in results) >= 20  # 4 running + 16 waiting at least got through
    assert all(retry == "1" for status, retry, _ in results if status == 429)
    assert all("data: [DONE]" in text or '"finish_reason"' in text for status, _, text in results if status == 200)
    assert process.memory_info().rss < rss + 64 * 2**20  # the second wave left nothing behind
    wait_for(lambda: "minillama_requests_running 0.0" in httpx.get(keyed_server.url + "/metrics").text)


def test_503_while_loading(lively_chat_model):
    """Before the engine is there, every API route says 503 and /health says loading (in-process: a real server
    loads a tiny model too fast to catch)."""
    from starlette.testclient import TestClient

    from minillama.server import ServerState, create_app

    client = TestClient(create_app(ServerState(model_name="m")))
    assert client.get("/health").status_code == 503
    r = client.post("/v1/chat/completions", json={"messages": HI})
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_loading" and r.headers["retry-after"]


def test_serve_refuses_bad_flags_before_loading(tmp_path):
    import subprocess
    import sys

    for args, match in [(["--slots", "0"], "--slots must be at least 1"), (["--port", "70000"], "--port"),
                        (["--api-key-file", str(tmp_path / "none")], "cannot read --api-key-file")]:
        out = subprocess.run([sys.executable, "-m", "minillama", "serve", *args], capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 2 and match in out.stderr and "Traceback" not in out.stderr
