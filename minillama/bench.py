"""Benchmark minillama against transformers on the same model, prompt and settings, in one run.

Each side runs in its own subprocess (`python -m minillama.bench --worker SPEC`), so one side's imports,
peak memory and compiled code never touch the other's figures. Per side:

    load_s         reading the checkpoint onto the device, ready for a forward (modeling code imported first;
                   the files are read once beforehand, so both sides load from the page cache)
    warmup_s       first runs before timing (minillama: building the fast path, i.e. fusing, packing,
                   compiling, CUDA graph capture; transformers: its static cache compilation)
    prompt_tok_s   prompt tokens / time of one prefill forward (last position's logits only)
    ttft_s         time to first token of a generate call
    decode_tok_s   (new tokens - 1) / time from the first token to the last, bs=1, greedy, eos disabled
    peak_mem_mb    CUDA max allocated, or the process's peak RSS on CPU (imports included)
    bandwidth_fraction  decode_tok_s * weight bytes / the measured device copy bandwidth (bytes read + written
                   per second; decoding only reads, which can run a little faster, so ~100% is the ceiling)
    tokens_checked (minillama) the fraction of its first 32 timed tokens that one plain model.forward also
                   ranks first (within rounding): the timed path computes the right thing
    cudagraph_skips (minillama, compiled on CUDA) graphs torch.compile could not capture; should be 0
    cuda_graphs_recorded (the same) graphs Inductor's graph trees recorded; should be at least 1
    MINILLAMA_BENCH_LOG=FILE appends each side's whole output to FILE (set TORCH_LOGS too for compiler logs)

`minillama bench --config scripts/configs/llama-3.2-1b.json` needs no download: it writes a randomly
initialised checkpoint of that shape to a temporary directory and loads both sides from it.
transformers is imported only inside its worker.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from minillama.errors import MinillamaError

# A tiny shape for smoke tests of the benchmark itself (`--tiny`).
TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": True}

RESULT_MARK = "BENCH_RESULT "


# ---- A random checkpoint from a config file ---------------------------------------------------------

def write_random_checkpoint(config: dict[str, Any], out_dir: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """Save a randomly initialised model of this config (normal(0, 0.02) weights, unit norms) as a HF checkpoint."""
    from safetensors.torch import save_file

    from minillama.config import LlamaConfig
    from minillama.model import LlamaForCausalLM

    dtype_name = str(dtype).removeprefix("torch.")
    config = {**config, "torch_dtype": dtype_name, "model_type": config.get("model_type", "llama"),
              "architectures": config.get("architectures", ["LlamaForCausalLM"])}
    with torch.device("meta"):  # no default init: 1.2B parameters would take a while to initialise twice
        model = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(dtype)
    model = model.to_empty(device="cpu")  # storage in `dtype`
    if model.config.tie_word_embeddings:  # to_empty gives the tied head its own storage: tie it again
        model.lm_head.weight = model.model.embed_tokens.weight
    generator = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for name, p in model.named_parameters():  # the tied lm_head is listed once, as the embedding
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
            state[name] = p.detach().contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir


# ---- The workers: one side each, in a fresh process --------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_page_cache(model_dir: Path) -> None:
    """Read the checkpoint's weight files once, so that every side loads them from the OS page cache.

    Otherwise the first side to run reads from disk and the next from memory (seen here: minillama's load
    0.30 s when it ran first on a cold cache, 0.06 s on the next run)."""
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak MB, what was measured): CUDA max allocated, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        import resource  # Unix: the kernel's own record of the peak (psutil only sees the current RSS)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss"
    except ImportError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20, "rss"


def _prompt(spec: dict[str, Any], vocab_size: int) -> torch.Tensor:
    """The same random prompt (1, P) on both sides."""
    generator = torch.Generator().manual_seed(spec["seed"])
    return torch.randint(0, vocab_size, (1, spec["prompt_len"]), generator=generator)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def run_minillama(spec: dict[str, Any]) -> dict[str, Any]:
    """Load with minillama and time prefill, first token and decode (the fast path unless spec['fast'] is False)."""
    from minillama.checkpoint import load_model, resolve_device
    from minillama.fast import FastDecoder
    from minillama.generation import generate
    from minillama.sampling import SamplingSettings

    device = resolve_device(spec["device"])
    P, N = spec["prompt_len"], spec["new_tokens"]
    start = time.perf_counter()
    model = load_model(spec["model"], device=device, dtype=spec["dtype"])
    _sync(device)
    load_s = time.perf_counter() - start  # the model is ready for model(ids), like from_pretrained's
    prompt = _prompt(spec, model.config.vocab_size).to(device)

    def run_generate(n: int) -> tuple[list[int], list[float]]:
        """Generate n tokens; return them with the time each one reached the caller."""
        tokens = fast.generate(prompt, n) if fast is not None else generate(model, prompt, max_new_tokens=n,
                                                                           eos_token_id=[], fast=False)
        ids, stamps = [], []
        for token in tokens:
            ids.append(token)
            stamps.append(time.perf_counter())
        return ids, stamps

    @torch.inference_mode()
    def prefill() -> None:
        if fast is not None:
            fast.prefill(prompt)
        else:  # what generation.py runs: the full forward into a fresh cache
            model(prompt, cache=model.new_cache(1, P + N))

    start = time.perf_counter()
    fast = None
    extra = {}
    if spec["fast"]:  # setting up the fast path (fusing, packing, compiling) counts as warm-up
        options = {"compile": spec["compile"], **spec.get("fast_options", {})}  # a variant's own options win
        fast = FastDecoder(model, max_seq_len=P + N, **options)
        fast.warmup(SamplingSettings())  # the greedy step, which the benchmark times
        if fast.compiled and device.type == "cuda":
            from minillama.fast import cuda_graphs_recorded

            extra["cudagraph_skips"] = fast.cudagraph_skips
            extra["cuda_graphs_recorded"] = cuda_graphs_recorded(device)
    run_generate(min(N, 4))
    prefill()
    _sync(device)
    warmup_s = time.perf_counter() - start
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights counted once
    measured = _measure(spec, device, prefill, run_generate)
    extra["peak_mem_mb"], extra["mem_kind"] = _peak_memory_mb(device)  # before the check's own forward
    return {"load_s": load_s, "warmup_s": warmup_s, "weight_bytes": weight_bytes, **extra, **measured,
            "tokens_checked": tokens_checked(model, prompt, measured["tokens"][:CHECKED_TOKENS])}


CHECKED_TOKENS = 32


@torch.inference_mode()
def tokens_checked(model, prompt: torch.Tensor, tokens: list[int]) -> float:
    """A correctness check of what was timed: the fraction of the generated tokens that one plain forward
    over prompt + tokens (model.py's SDPA path, no cache tricks, no compile) also ranks first.

    Low precision can reorder near-ties, so a token passes when its logit is within rounding of the best
    (float32: 1e-3; bf16/fp16: 0.1 + 2% of the best logit). A broken fast path picks tokens that are
    nowhere near the best, and scores far below 1.0.
    """
    ids = torch.cat([prompt, prompt.new_tensor([tokens[:-1]])], dim=1)  # the step inputs: prompt, then each token
    logits = model(ids, logits_to_keep=len(tokens))[0].float()  # (K, V): position i predicts tokens[i]
    chosen = logits.gather(-1, prompt.new_tensor(tokens)[:, None])[:, 0]  # (K,)
    best = logits.amax(dim=-1)  # (K,)
    tolerance = 1e-3 if model.dtype == torch.float32 else 0.1 + 0.02 * best.abs()
    return float(((best - chosen) <= tolerance).float().mean())


def _measure(spec: dict[str, Any], device: torch.device, prefill, run_generate) -> dict[str, Any]:
    """Median over spec['repeats'] runs of: one prefill, then one generate of N tokens, stamped per token."""
    P, N = spec["prompt_len"], spec["new_tokens"]
    prompt_s, ttft_s, decode_s = [], [], []
    for _ in range(spec["repeats"]):
        prompt_s.append(_timed(prefill, device))
        start = time.perf_counter()
        tokens, stamps = run_generate(N)
        if len(tokens) != N:
            raise MinillamaError(f"generated {len(tokens)} tokens instead of {N}")
        ttft_s.append(stamps[0] - start)
        decode_s.append(stamps[-1] - stamps[0])
    median = statistics.median
    return {"prompt_tok_s": P / median(prompt_s), "ttft_s": median(ttft_s),
            "decode_tok_s": (N - 1) / median(decode_s) if N > 1 else None, "tokens": tokens}


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """The reference: transformers' generate, eager or with its static cache (which it compiles on a GPU)."""
    import transformers
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    from minillama.checkpoint import DTYPES, resolve_device

    import transformers.models.llama.modeling_llama  # noqa: F401  (imported before the clock starts, as
    # minillama's modules are: load time is reading the weights, not importing code)
    transformers.logging.set_verbosity_error()
    device = resolve_device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    N = spec["new_tokens"]
    start = time.perf_counter()
    try:  # straight onto the device, as users load it (needs accelerate)
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype, device_map=str(device))
    except (ImportError, ValueError):
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=dtype).to(device)
    model.eval()
    _sync(device)
    load_s = time.perf_counter() - start
    prompt = _prompt(spec, model.config.vocab_size).to(device)
    static = spec["side"] == "transformers-static"

    class Stamps(BaseStreamer):
        """Records each streamed token and when it arrived; generate's first `put` is the prompt."""

        def __init__(self) -> None:
            self.tokens: list[int] = []
            self.stamps: list[float] = []
            self.seen_prompt = False

        def put(self, value: torch.Tensor) -> None:
            if not self.seen_prompt:
                self.seen_prompt = True
                return
            now = time.perf_counter()
            for token in value.reshape(-1).tolist():
                self.tokens.append(token)
                self.stamps.append(now)

        def end(self) -> None:
            pass

    def run_generate(n: int) -> tuple[list[int], list[float]]:
        """generate() with eos disabled (min_new_tokens = max_new_tokens); tokens and their arrival times.

        On a GPU, transformers streams one step behind (it copies tokens asynchronously), so its TTFT
        includes one decode step.
        """
        stamps = Stamps()
        with torch.inference_mode():
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0, streamer=stamps,
                           **({"cache_implementation": "static"} if static else {}))
        return stamps.tokens, stamps.stamps

    @torch.inference_mode()
    def prefill() -> None:
        model(prompt, logits_to_keep=1)

    start = time.perf_counter()
    # The static path compiles for this exact cache length (prompt + new tokens): warm up with the real run.
    run_generate(N if static else min(N, 4))
    prefill()
    _sync(device)
    warmup_s = time.perf_counter() - start
    return {"load_s": load_s, "warmup_s": warmup_s, **_measure(spec, device, prefill, run_generate)}


def run_copy(spec: dict[str, Any]) -> dict[str, Any]:
    """The device's copy bandwidth: bytes read + written per second by a large tensor copy."""
    from minillama.checkpoint import resolve_device

    device = resolve_device(spec["device"])
    n_bytes = spec.get("copy_bytes") or (2**30 if device.type == "cuda" else 2**29)
    src = torch.ones(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.ones_like(src)  # touched, so no page faults inside the timing
    for _ in range(3):
        dst.copy_(src)
    iters = 10 if device.type == "cuda" else 2
    # The best of 5 batches: on a shared machine the slow batches measure the neighbours, not the memory.
    seconds = min(_timed(lambda: [dst.copy_(src) for _ in range(iters)], device) for _ in range(5))
    return {"copy_gb_s": 2 * n_bytes * iters / seconds / 1e9}


WORKERS = {"minillama": run_minillama, "transformers": run_transformers, "transformers-static": run_transformers,
           "copy": run_copy}

# Variants of the minillama side, named "minillama:attention=math/tuning=off": FastDecoder options to compare
# in one run (each variant is its own side, in its own process).
VARIANT_OPTIONS = {"attention": {"sdpa": "sdpa", "math": "math"}, "tuning": {"on": True, "off": False},
                   "pdl": {"on": True, "off": False}, "compile": {"on": True, "off": False},
                   "lag": {str(n): n for n in range(9)}}


def parse_side(side: str) -> tuple[str, dict[str, Any]]:
    """'minillama:attention=math/tuning=off' -> ('minillama', {'attention': 'math', 'tuning': False})."""
    name, _, variant = side.partition(":")
    if name not in WORKERS or name == "copy":
        raise MinillamaError(f"unknown side {name!r}; choose from minillama, transformers, transformers-static")
    options: dict[str, Any] = {}
    if variant and name != "minillama":
        raise MinillamaError(f"side {side!r}: only minillama has variants (minillama:attention=math)")
    for item in filter(None, variant.split("/")):
        key, _, value = item.partition("=")
        if key not in VARIANT_OPTIONS or value not in VARIANT_OPTIONS[key]:
            choices = "; ".join(f"{k}={'|'.join(v) if k != 'lag' else '0..8'}" for k, v in VARIANT_OPTIONS.items())
            raise MinillamaError(f"side {side!r}: unknown option {item!r}; choose from {choices}")
        options[key] = VARIANT_OPTIONS[key][value]
    return name, options


def worker_main(spec_json: str) -> None:
    """Run one side and print its figures as one JSON line after RESULT_MARK."""
    spec = json.loads(spec_json)
    from minillama.checkpoint import resolve_device

    device = resolve_device(spec["device"])
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = WORKERS[spec["side"].partition(":")[0]](spec)
    if spec["side"] != "copy" and "peak_mem_mb" not in result:
        result["peak_mem_mb"], result["mem_kind"] = _peak_memory_mb(device)
    print(RESULT_MARK + json.dumps(result), flush=True)


def _keep_output(side: str, status: str, stdout: str | bytes | None, stderr: str | bytes | None) -> None:
    """Append a side's whole output (compiler logs included) to $MINILLAMA_BENCH_LOG, if it is set."""
    log = os.environ.get("MINILLAMA_BENCH_LOG")
    if not log:
        return
    text = "".join(out.decode(errors="replace") if isinstance(out, bytes) else (out or "") for out in (stdout, stderr))
    with open(log, "a", encoding="utf-8") as f:
        f.write(f"===== {side} ({status}) =====\n{text}\n")


def run_worker(spec: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """Run one side in a fresh Python process and return its figures."""
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[1])  # so the child imports this same minillama
    env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    try:
        proc = subprocess.run([sys.executable, "-m", "minillama.bench", "--worker", json.dumps(spec)],
                              capture_output=True, text=True, env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        _keep_output(spec["side"], "timed out", e.stdout, e.stderr)
        raise MinillamaError(f"the {spec['side']} side did not finish within {timeout:g} s "
                             "(--side-timeout / --time-budget)") from None
    _keep_output(spec["side"], f"exit code {proc.returncode}", proc.stdout, proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise MinillamaError(f"the {spec['side']} side failed (exit code {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK):])


# ---- The parent: run every side, then report ---------------------------------------------------------

def default_sides(device: torch.device) -> list[str]:
    """minillama and transformers eager everywhere; on a GPU also transformers' compiled static-cache path."""
    if device.type == "cuda":
        return ["minillama", "transformers-static", "transformers"]
    return ["minillama", "transformers"]


def run_bench(model: str | Path | None, *, config: dict[str, Any] | None = None, device: str | None = None,
              dtype: str | None = None, prompt_len: int = 512, new_tokens: int = 256, repeats: int = 1,
              sides: list[str] | None = None, fast: bool = True, compile: bool | None = None, seed: int = 0,
              side_timeout: float | None = None, time_budget: float | None = None,
              progress=None) -> list[dict[str, Any]]:
    """Benchmark every side; returns one record per figure ({"figure", "side", "value", "unit", ...}).

    model:  a checkpoint directory, or None with `config` (a config.json dict) to benchmark random weights.
    A side that fails (or runs past side_timeout seconds) gets an "error" record and the others still run.
    time_budget: seconds for the whole run; a side is cut off when it runs out and later sides are skipped
    (so list the sides in order of importance).
    """
    from minillama.checkpoint import resolve_device, resolve_dtype
    from minillama.config import LlamaConfig

    dev = resolve_device(device)
    sides = sides or default_sides(dev)
    variants = {side: parse_side(side)[1] for side in sides}  # checks every side before any work
    if len(set(sides)) != len(sides):
        raise MinillamaError("a side is named twice in --sides")
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise MinillamaError("--prompt-len, --new-tokens and --repeats must be at least 1")
    progress = progress or (lambda message: None)
    with tempfile.TemporaryDirectory(prefix="minillama-bench-") as tmp:
        if model is None:
            if config is None:
                raise MinillamaError("give a model directory or a config file (--config / --tiny)")
            model_config = LlamaConfig.from_dict(config, source="the --config file")
            torch_dtype = resolve_dtype(dtype, model_config, dev)
            progress(f"writing a random {model_config.num_hidden_layers}-layer checkpoint to {tmp}")
            model_dir = write_random_checkpoint(config, Path(tmp) / "model", torch_dtype, seed)
            name = f"random:{config.get('_name_or_path', 'config')}"
        else:
            model_dir = Path(model)
            model_config = LlamaConfig.from_file(model_dir)
            torch_dtype = resolve_dtype(dtype, model_config, dev)
            name = str(model)
        if prompt_len + new_tokens > model_config.max_position_embeddings:
            raise MinillamaError(f"prompt {prompt_len} + {new_tokens} new tokens exceed the model's context of "
                                 f"{model_config.max_position_embeddings}")
        base = {"device": str(dev), "dtype": str(torch_dtype).removeprefix("torch."), "model": str(model_dir),
                "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "seed": seed,
                "fast": fast, "compile": compile}
        warm_page_cache(model_dir)  # the first side must not pay for the disk reads that the next one skips
        progress("measuring the copy bandwidth")
        copy = run_worker({**base, "side": "copy"})
        results = {}
        started = time.perf_counter()
        for side in sides:
            timeout = side_timeout
            if time_budget is not None:
                left = time_budget - (time.perf_counter() - started)
                if left < 20:
                    results[side] = {"error": f"skipped: the --time-budget of {time_budget:g} s ran out"}
                    progress(f"{side}: skipped (time budget)")
                    continue
                timeout = left if timeout is None else min(timeout, left)
            progress(f"running {side}")
            try:
                results[side] = run_worker({**base, "side": side, "fast_options": variants[side]}, timeout)
            except MinillamaError as e:  # one side's failure must not lose the others' figures
                results[side] = {"error": str(e)}
                progress(f"{side}: FAILED: {e}")
                continue
            progress(f"{side}: " + summary(results[side]))
    device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    context = {"device": device_name,
               "dtype": base["dtype"], "model": name, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "fast": fast}
    return figures(results, copy["copy_gb_s"], context)


def summary(result: dict[str, Any]) -> str:
    """One side's main figures on one line (progress output, so a cut-short run still shows them)."""
    parts = [f"load {result['load_s']:.2f} s", f"warm-up {result['warmup_s']:.1f} s",
             f"prompt {result['prompt_tok_s']:,.0f} tok/s", f"TTFT {result['ttft_s'] * 1000:.1f} ms"]
    if result.get("decode_tok_s"):
        parts.append(f"decode {result['decode_tok_s']:,.1f} tok/s")
    if "cudagraph_skips" in result:
        parts.append(f"cudagraph skips {result['cudagraph_skips']}, graphs recorded "
                     f"{result['cuda_graphs_recorded']}")
    if "tokens_checked" in result:
        parts.append(f"tokens checked against model.forward {result['tokens_checked']:.0%}")
    return ", ".join(parts)


UNITS = {"load_s": "s", "warmup_s": "s", "prompt_tok_s": "tok/s", "ttft_s": "s", "decode_tok_s": "tok/s",
         "peak_mem_mb": "MB", "bandwidth_fraction": "", "tokens_checked": ""}


def figures(results: dict[str, dict[str, Any]], copy_gb_s: float, context: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten per-side results into figure records, add ratios (minillama / each reference) and bandwidth use."""
    records: list[dict[str, Any]] = [{"figure": "copy_gb_s", "side": "device", "value": copy_gb_s, "unit": "GB/s",
                                      **context}]
    for side, r in results.items():
        if "error" in r:
            records.append({"figure": "error", "side": side, "value": r["error"], "unit": "", **context})
    results = {side: r for side, r in results.items() if "error" not in r}
    ours = [side for side in results if parse_side(side)[0] == "minillama"]  # minillama and its variants
    weight_bytes = next((results[side]["weight_bytes"] for side in ours), None)
    for side, r in results.items():
        if weight_bytes and r.get("decode_tok_s"):
            r["bandwidth_fraction"] = r["decode_tok_s"] * weight_bytes / (copy_gb_s * 1e9)
        for key, unit in UNITS.items():
            if r.get(key) is not None:
                extra = {"mem_kind": r["mem_kind"]} if key == "peak_mem_mb" else {}
                records.append({"figure": key, "side": side, "value": r[key], "unit": unit, **extra, **context})
        for key in ("cudagraph_skips", "cuda_graphs_recorded"):
            if key in r:
                records.append({"figure": key, "side": side, "value": r[key], "unit": "graphs", **context})
    if weight_bytes:
        records.append({"figure": "weight_bytes", "side": "minillama", "value": weight_bytes, "unit": "B", **context})
    for side in ours:
        mine = results[side]
        for ref, r in results.items():
            if ref in ours:
                continue
            for key in ("decode_tok_s", "prompt_tok_s", "ttft_s", "load_s", "peak_mem_mb"):
                if mine.get(key) and r.get(key):
                    better = "higher" if key.endswith("tok_s") else "lower"
                    records.append({"figure": key.removesuffix("_tok_s").removesuffix("_s") + "_ratio",
                                    "side": f"{side}/{ref}", "value": mine[key] / r[key], "unit": "x",
                                    "better": better, **context})
            same = 0
            for a, b in zip(mine["tokens"], r["tokens"]):
                if a != b:
                    break
                same += 1
            records.append({"figure": "tokens_agree", "side": f"{side}/{ref}", "value": same, "unit": "tokens",
                            **context})
    return records


def format_table(records: list[dict[str, Any]]) -> str:
    """The figures as a human-readable table: one row per side, then the ratios."""
    ctx = records[0]
    lines = [f"minillama bench: {ctx['device']}, {ctx['dtype']}, {ctx['model']}, prompt {ctx['prompt_len']} tokens, "
             f"{ctx['new_tokens']} new tokens, bs=1 greedy" + ("" if ctx["fast"] else " (fast path off)"),
             f"copy bandwidth: {ctx['value']:.1f} GB/s"]
    columns = [("load_s", "load s", "{:.2f}"), ("warmup_s", "warm-up s", "{:.1f}"),
               ("prompt_tok_s", "prompt tok/s", "{:.1f}"), ("ttft_s", "TTFT ms", "{:.1f}"),
               ("decode_tok_s", "decode tok/s", "{:.1f}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
               ("bandwidth_fraction", "of copy bw", "{:.1%}")]
    sides = [r["side"] for r in records if r["figure"] == "load_s"]
    width = max([20] + [len(side) + 2 for side in sides])
    lines.append(f"{'side':<{width}}" + "".join(f"{title:>14}" for _, title, _ in columns))
    for side in sides:
        row = f"{side:<{width}}"
        for key, _, fmt in columns:
            value = next((r["value"] for r in records if r["figure"] == key and r["side"] == side), None)
            if key == "ttft_s" and value is not None:
                value *= 1000
            row += f"{'-' if value is None else fmt.format(value):>14}"
        lines.append(row)
    # Ratios, one line per pair (higher is better for the tok/s ratios, lower for the others).
    pairs = [r["side"] for r in records if r["figure"] == "tokens_agree"]
    width = max([36] + [len(pair) + 1 for pair in pairs])
    names = {"decode_ratio": "decode", "prompt_ratio": "prompt", "ttft_ratio": "TTFT", "load_ratio": "load",
             "peak_mem_mb_ratio": "peak mem"}
    if pairs:
        lines.append("ratios minillama / reference (tok/s: higher is better; TTFT, load, memory: lower is better)")
    for pair in pairs:
        ratios = [f"{names[r['figure']]} {r['value']:.2f}x" for r in records
                  if r["side"] == pair and r["figure"] in names]
        agree = next(r["value"] for r in records if r["side"] == pair and r["figure"] == "tokens_agree")
        lines.append(f"{pair:<{width}} " + ", ".join(ratios) + f"; greedy tokens agree for the first {agree}")
    checked = min(CHECKED_TOKENS, ctx["new_tokens"])
    for r in records:
        if r["figure"] == "error":
            lines.append(f"{r['side']}: FAILED: " + r["value"].splitlines()[0])
        elif r["figure"] == "tokens_checked":
            lines.append(f"{r['side']}: {r['value']:.0%} of its first {checked} tokens are model.forward's own "
                         "first choice (within rounding)" + ("" if r["value"] == 1 else "  <-- CHECK THIS"))
        elif r["figure"] == "cudagraph_skips" and r["value"]:
            lines.append(f"{r['side']}: {r['value']} CUDA graph(s) skipped by torch.compile (slow decode; "
                         "TORCH_LOGS=cudagraphs says why)")
        elif r["figure"] == "cuda_graphs_recorded" and r["value"] == 0:
            lines.append(f"{r['side']}: no CUDA graph was recorded (slow decode; TORCH_LOGS=cudagraphs says why)")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="internal: one benchmark side (used by `minillama bench`)")
    parser.add_argument("--worker", required=True, help="the side's settings as JSON")
    worker_main(parser.parse_args().worker)
