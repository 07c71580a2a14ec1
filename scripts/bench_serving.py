"""Serving benchmark: OpenAI-compatible servers under C concurrent streaming clients, vLLM's benchmark_serving metrics.

Each server runs alone (one after another, in its own process) on the same model, prompts and settings:
    minillama     `minillama serve` on the default model's Q4_1 weights (the CPU default); minillama:float32 the
                  same model dequantized to float32 (`--dtype float32`)
    transformers  `transformers serve --continuous-batching` on the same model in float32 (it cannot run Q4_1)
    llama-server  llama.cpp's server on the same GGUF file, same slots and threads (when --llama-server PATH
                  or `llama-server` on PATH is there)
At each concurrency C, 2C chat requests (greedy, max_tokens each) go out with C in flight at a time. Reported:
TTFT (first content chunk - request start), TPOT ((latency - TTFT) / (tokens - 1)), ITL (gaps between content
chunks) at p50/p99, output tok/s (all output tokens / wall time) and requests/s.

    python scripts/bench_serving.py --concurrency 1,4,16 --threads 2 --json-file serving.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from minillama.bench.concurrency import cpu_line, percentile

QUESTIONS = ["What is the capital of France?", "Name three rivers in Africa.", "Write a haiku about the sea.",
             "Explain what a KV cache is.", "Why is the sky blue?", "Give me a recipe for pancakes.",
             "What is the tallest mountain?", "Tell me a short story about a robot."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], port: int, log: Path, env: dict | None = None, ready_path: str = "/health"):
    """Start a server process, wait until `ready_path` answers 200, stop it afterwards."""
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[0]} exited: {log.read_text()[-1500:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{port}{ready_path}", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[0]} not ready in 600 s")
            time.sleep(0.5)
        yield
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


async def one_request(client: httpx.AsyncClient, url: str, model: str, question: str, max_tokens: int) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    stamps, tokens = [], None
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    stamps.append(time.perf_counter())
    end = time.perf_counter()
    return {"start": start, "stamps": stamps, "end": end, "tokens": tokens or len(stamps)}


async def level(url: str, model: str, concurrency: int, max_tokens: int) -> dict:
    """2C requests, C at a time."""
    n = 2 * concurrency
    gate = asyncio.Semaphore(concurrency)
    # A fresh connection per request: servers differ in how long they keep idle ones (llama-server closes them).
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        async def gated(i: int) -> dict:
            async with gate:
                return await one_request(client, url, model, QUESTIONS[i % len(QUESTIONS)], max_tokens)

        await one_request(client, url, model, "Hi", 4)  # warm-up
        start = time.perf_counter()
        results = await asyncio.gather(*(gated(i) for i in range(n)))
        wall = time.perf_counter() - start
    ttft = [r["stamps"][0] - r["start"] for r in results if r["stamps"]]
    tpot = [(r["end"] - r["stamps"][0]) / (r["tokens"] - 1) for r in results if r["stamps"] and r["tokens"] > 1]
    itl = [b - a for r in results for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(r["tokens"] for r in results)
    figures = {"concurrency": concurrency, "requests": n, "output_tokens": tokens, "wall_s": wall,
               "output_tok_s": tokens / wall, "requests_s": n / wall}
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        figures[f"{name}_p50_ms"] = 1e3 * percentile(values, 50) if values else float("nan")
        figures[f"{name}_p99_ms"] = 1e3 * percentile(values, 99) if values else float("nan")
    return figures


def servers(args, tmp: Path) -> dict[str, tuple[list[str], int, str, dict]]:
    """name -> (command, port, model name for requests, env)."""
    from minillama.hub import default_model, fetch_default_gguf

    slots, threads = str(max(args.levels)), str(args.threads)
    out = {}
    model = args.model or "smollm2-135m-instruct"
    for name, extra in (("minillama", []), ("minillama:float32", ["--dtype", "float32"])):
        if name in args.servers:
            port = free_port()
            out[name] = ([sys.executable, "-m", "minillama", "serve", model, "--port", str(port), "--slots", slots,
                          "--threads", threads, "--ctx", "1024", *extra], port, Path(model).name, {})
    if "transformers" in args.servers:
        port = free_port()
        path = args.model or str(default_model())
        tf = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
        out["transformers"] = ([tf, "serve", path, "--continuous-batching", "--device", "cpu", "--dtype", "float32",
                                "--port", str(port)], port, path, {"OMP_NUM_THREADS": threads})
    server = args.llama_server or shutil.which("llama-server")
    if "llama-server" in args.servers and server and not args.model:
        port = free_port()
        gguf = fetch_default_gguf(tmp)
        out["llama-server"] = ([server, "-m", str(gguf), "--port", str(port), "-np", slots, "-c",
                                str(1024 * max(args.levels)), "-t", threads, "-tb", threads, "--no-webui"],
                               port, "smollm2", {})
    elif "llama-server" in args.servers:
        print("[serving] no llama-server (give --llama-server PATH): that side is skipped", file=sys.stderr)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--servers", default="minillama,transformers,llama-server")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--llama-server", help="path to llama.cpp's llama-server binary")
    p.add_argument("--model", help="a model directory for minillama and transformers instead of the default model "
                                   "(no llama-server side then)")
    p.add_argument("--json-file")
    args = p.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.servers = args.servers.split(",")
    records = []
    print(f"[serving] {cpu_line()}, {args.threads} threads, max_tokens {args.max_tokens}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        for name, (command, port, model, env) in servers(args, Path(tmp)).items():
            print(f"[serving] {name}: {' '.join(command)}", file=sys.stderr, flush=True)
            log = Path(tmp) / f"{name}.log"
            try:
                with running(command, port, log, env):
                    for c in args.levels:
                        route = f"http://127.0.0.1:{port}/v1/chat/completions"
                        r = {"server": name, **asyncio.run(level(route, model, c, args.max_tokens))}
                        print(f"[serving] {json.dumps(r)}", file=sys.stderr, flush=True)
                        records.append(r)
            except Exception as e:  # one server failing does not hide the others' figures
                print(f"[serving] {name} failed: {e}", file=sys.stderr)
                records.append({"server": name, "error": str(e)[:500]})
    if args.json_file:
        Path(args.json_file).write_text("".join(json.dumps({**r, "cpu": cpu_line()}) + "\n" for r in records))
    print(table(records))


def table(records: list[dict]) -> str:
    rows = [f"{'server':<14}{'conc':>5}{'out tok/s':>10}{'req/s':>7}{'TTFT p50':>10}{'p99':>8}{'TPOT p50':>10}"
            f"{'p99':>8}{'ITL p50':>9}{'p99':>8}   (ms)"]
    ok = [r for r in records if "error" not in r]
    for r in records:
        if "error" in r:
            rows.append(f"{r['server']:<14} failed: {r['error'][:100]}")
            continue
        rows.append(f"{r['server']:<14}{r['concurrency']:>5}{r['output_tok_s']:>10.1f}{r['requests_s']:>7.2f}"
                    f"{r['ttft_p50_ms']:>10.0f}{r['ttft_p99_ms']:>8.0f}{r['tpot_p50_ms']:>10.1f}{r['tpot_p99_ms']:>8.1f}"
                    f"{r['itl_p50_ms']:>9.1f}{r['itl_p99_ms']:>8.1f}")
    by = {(r["server"], r["concurrency"]): r for r in ok}
    levels = sorted({c for _, c in by})
    if levels and ("minillama", levels[0]) in by and ("minillama", levels[-1]) in by:
        one, top = by[("minillama", levels[0])], by[("minillama", levels[-1])]
        rows.append(f"minillama: output tok/s at {levels[-1]} = {top['output_tok_s'] / one['output_tok_s']:.2f}x "
                    f"at {levels[0]}; p99 ITL at {levels[-1]} = {top['itl_p99_ms'] / one['tpot_p50_ms']:.2f}x the "
                    "batch-1 step")
    for other in ("transformers", "llama-server"):
        for c in levels:
            if ("minillama", c) in by and (other, c) in by:
                ratio = by[("minillama", c)]["output_tok_s"] / by[(other, c)]["output_tok_s"]
                rows.append(f"minillama / {other} at {c}: {ratio:.2f}x output tok/s")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
