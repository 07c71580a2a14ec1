"""`minillama bench --concurrency 1,4,16`: many requests at once, minillama's engine vs transformers' own
continuous batching (`generate_batch`), same model, prompts and settings, each side in its own process.

For each concurrency C, 2C requests (random prompts of `prompt_len` tokens, greedy, eos ignored, exactly
`new_tokens` each) go in at once to an engine of C slots, so half of them join while others run. Reported per
side and C: output tok/s (all output tokens / wall time), TTFT and TPOT at p50/p99 (vLLM's definitions: TTFT =
first token - submit; TPOT = (finish - first token) / (tokens - 1)), and for minillama the peak RSS against
the model + C slots x the KV arithmetic the engine prints.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULT = "CONCURRENCY_RESULT "
SIDES = ("minillama", "minillama:weights=gguf", "transformers")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks as numpy's default."""
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    rank = (len(values) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(values) - 1)
    return values[low] + (values[high] - values[low]) * (rank - low)


def summarize(side: str, concurrency: int, wall: float, stamps: list[tuple[float, float, float, int]],
              **extra: Any) -> dict[str, Any]:
    """stamps: per request (submitted, first token, finished, output tokens)."""
    ttft = [first - start for start, first, _, _ in stamps]
    tpot = [(end - first) / (n - 1) for _, first, end, n in stamps if n > 1]
    tokens = sum(n for *_, n in stamps)
    return {"side": side, "concurrency": concurrency, "requests": len(stamps), "output_tokens": tokens,
            "wall_s": wall, "output_tok_s": tokens / wall, "ttft_p50_ms": 1e3 * percentile(ttft, 50),
            "ttft_p99_ms": 1e3 * percentile(ttft, 99), "tpot_p50_ms": 1e3 * percentile(tpot, 50),
            "tpot_p99_ms": 1e3 * percentile(tpot, 99), **extra}


def prompts(n: int, prompt_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab_size - 100, (prompt_len,), generator=g).tolist() for _ in range(n)]


def run_minillama(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import psutil

    import minillama
    from minillama.engine import Engine, Request

    model = minillama.load_model(spec["model_dir"], device=spec["device"], dtype=spec["dtype"], pack=True)
    model_rss = psutil.Process().memory_info().rss
    out = []
    for c in spec["concurrency"]:
        engine = Engine(model, slots=c, max_seq_len=spec["ctx"], eos_token_ids=[])
        expected = model_rss + c * engine.kv_bytes_per_slot
        engine.generate([Request([1, 2, 3], max_tokens=4, temperature=0)])  # warm-up: first-call costs
        batch = prompts(2 * c, spec["prompt_len"], model.config.vocab_size, spec["seed"] + c)
        start = time.perf_counter()
        handles = engine.generate([Request(p, max_tokens=spec["new_tokens"], temperature=0) for p in batch])
        wall = time.perf_counter() - start
        rss = psutil.Process().memory_info().rss
        stamps = [(start, h.first_token_at, h.finished_at, len(h.pieces)) for h in handles]
        out.append(summarize(spec["side"], c, wall, stamps, rss_mb=rss / 2**20, expected_rss_mb=expected / 2**20,
                             kv_mb=c * engine.kv_bytes_per_slot / 2**20))
        del engine, handles
    return out


def run_transformers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    device = spec["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] else (torch.float32 if device == "cpu" else "auto")
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype,
                                                 attn_implementation="sdpa").to(device).eval()
    out = []
    for c in spec["concurrency"]:
        config = GenerationConfig(max_new_tokens=spec["new_tokens"], do_sample=False, eos_token_id=-1, pad_token_id=0)
        # C requests at a time, each a 256-token page per 256 tokens, and a step budget like minillama's chunk.
        pages = 2 * c * -(-(spec["prompt_len"] + spec["new_tokens"]) // 256) + 2
        cb = ContinuousBatchingConfig(num_blocks=pages, max_requests_per_batch=c, max_batch_tokens=256 + c)
        batch = prompts(2 * c, spec["prompt_len"], model.config.vocab_size, spec["seed"] + c)
        with torch.inference_mode():
            model.generate_batch(batch[:1], generation_config=config, continuous_batching_config=cb,
                                 max_new_tokens=4)  # warm-up
            start = time.perf_counter()
            results = model.generate_batch(batch, generation_config=config, continuous_batching_config=cb,
                                           record_timestamps=True)
            wall = time.perf_counter() - start
        stamps = [(start, r.timestamps[0], r.timestamps[-1], len(r.generated_tokens)) for r in results.values()]
        out.append(summarize(spec["side"], c, wall, stamps))
    return out


def worker(spec_json: str) -> None:
    import torch

    spec = json.loads(spec_json)
    torch.set_num_threads(spec["threads"])
    records = (run_transformers if spec["side"] == "transformers" else run_minillama)(spec)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for r in records:
        r["peak_rss_mb"] = peak
        print(RESULT + json.dumps(r), flush=True)


def run_concurrency(model_dirs: dict[str, Path], concurrency: list[int], prompt_len: int, new_tokens: int,
                    seed: int, threads: int, ctx: int, progress, device: str | None = None, dtype: str | None = None,
                    side_timeout: float | None = None) -> list[dict[str, Any]]:
    """Each side (its model directory) in its own process; returns one record per side and concurrency."""
    records = []
    for side, model_dir in model_dirs.items():
        spec = {"side": side, "model_dir": str(model_dir), "concurrency": concurrency, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "seed": seed, "threads": threads, "ctx": ctx, "device": device,
                "dtype": dtype}
        progress(f"{side}: concurrency {','.join(map(str, concurrency))}")
        try:
            run = subprocess.run([sys.executable, "-m", "minillama.bench.concurrency", json.dumps(spec)],
                                 capture_output=True, text=True, timeout=side_timeout)
            out, err, failed = run.stdout, run.stderr, run.returncode != 0
        except subprocess.TimeoutExpired as e:
            out, err, failed = (e.stdout or b"").decode(), f"timed out after {side_timeout} s", True
        found = [json.loads(line[len(RESULT):]) for line in out.splitlines() if line.startswith(RESULT)]
        if failed or not found:
            tail = (err or out).strip().splitlines()[-3:]
            records.append({"side": side, "error": " | ".join(tail)})
            progress(f"{side} failed: {' | '.join(tail)}")
        records += found
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    rows = [f"{'side':<24}{'conc':>5}{'reqs':>6}{'out tok/s':>11}{'TTFT p50':>10}{'p99':>9}{'TPOT p50':>10}"
            f"{'p99':>9}{'RSS MB':>9}{'model+KV':>10}"]
    for r in records:
        if "error" in r:
            rows.append(f"{r['side']:<24} failed: {r['error']}")
            continue
        expected = f"{r['expected_rss_mb']:>10.0f}" if "expected_rss_mb" in r else f"{'':>10}"
        rss = f"{r['rss_mb']:>9.0f}" if "rss_mb" in r else f"{r['peak_rss_mb']:>9.0f}"
        rows.append(f"{r['side']:<24}{r['concurrency']:>5}{r['requests']:>6}{r['output_tok_s']:>11.1f}"
                    f"{r['ttft_p50_ms']:>9.0f}m{r['ttft_p99_ms']:>8.0f}m{r['tpot_p50_ms']:>9.1f}m{r['tpot_p99_ms']:>8.1f}m"
                    f"{rss}{expected}")
    by = {(r["side"], r["concurrency"]): r for r in records if "error" not in r}
    lines = []
    for side in dict.fromkeys(r["side"] for r in records if "error" not in r):
        levels = sorted(c for s, c in by if s == side)
        if 1 in levels and len(levels) > 1:
            top = levels[-1]
            one = by[(side, 1)]
            decode1 = 1e3 / one["tpot_p50_ms"]
            lines.append(f"{side}: output tok/s at {top} = {by[(side, top)]['output_tok_s'] / decode1:.2f}x its "
                         f"batch-1 decode ({decode1:.1f} tok/s)")
        if side.startswith("minillama") and "transformers" in {s for s, _ in by}:
            for c in levels:
                if ("transformers", c) in by:
                    ratio = by[(side, c)]["output_tok_s"] / by[("transformers", c)]["output_tok_s"]
                    lines.append(f"{side} / transformers at concurrency {c}: {ratio:.2f}x output tok/s")
    return "\n".join(rows + ["(m = ms)"] + lines)


def cpu_line() -> str:
    import platform

    model, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = " ".join(f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f in have)
                break
    except OSError:
        pass
    return f"{model} [{flags}]"


if __name__ == "__main__":
    worker(sys.argv[1])
