"""The benchmark's sides, each run in a fresh process (`python -m minillama.bench --worker SPEC`):
minillama, transformers (eager or static-cache compiled), llama.cpp (llama-cpp-python, on a GGUF file) and a
device copy for the bandwidth figure; plus the random checkpoint that `--config` benchmarks. Figures are
described in `minillama.bench`."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from minillama.errors import MinillamaError

RESULT_MARK = "BENCH_RESULT "

# A tiny shape for smoke tests of the benchmark itself (`--tiny`).
TINY_CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64,
               "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
               "head_dim": 16, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
               "tie_word_embeddings": True}


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
    try:  # Linux: the peak since start or since reset_peak_rss()
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:")), "peak_rss"
    except (OSError, StopIteration):
        pass
    try:
        import resource  # Unix: the kernel's own record of the peak (psutil only sees the current RSS)

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "peak_rss"
    except ImportError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20, "rss"


def reset_peak_rss() -> None:
    """Restart the peak RSS from the current one (Linux; elsewhere nothing), e.g. after writing a checkpoint."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


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
    """Load with minillama and time prefill, first token and decode through `generate` on its engine.

    The side's options (a variant such as "minillama:compile=on/attention=math"): compile (the engine:
    compiled or eager; default compiled on CUDA), pack (oneDNN-packed weights; default on for the eager
    engine on a CPU), attention ("math": model.py's explicit attention instead of SDPA), tuning, pdl, lag,
    quantize and group (int8 / int4 weights: `load_model`'s quantize and group_size).
    """
    from minillama.checkpoint import load_model, resolve_device
    from minillama.fast import CompiledEngine, cuda_graphs_recorded
    from minillama.generation import EagerEngine, generate

    device = resolve_device(spec["device"])
    options = spec.get("options", {})
    compile = options.get("compile", spec["compile"])
    if compile is None and device.type == "cuda":
        compile = True
    P, N = spec["prompt_len"], spec["new_tokens"]
    start = time.perf_counter()
    model = load_model(spec["model"], device=device, dtype=spec["dtype"], pack=options.get("pack", not compile),
                       tp=spec.get("tp", False), quantize=options.get("quantize"), group_size=options.get("group"))
    _sync(device)
    load_s = time.perf_counter() - start  # the model is ready for model(ids), like from_pretrained's
    if compile is None:  # a CPU: the chat's default (aot.py's step on minillama's int8 kernels, else eager)
        from minillama import aot

        compile = aot.default_applies(model)  # (it does not apply under tensor parallelism)
    prompt = _prompt(spec, model.config.vocab_size).to(device)
    if options.get("attention") == "math":
        model.set_attn_implementation("eager")

    start = time.perf_counter()  # setting up the engine (compiling, CUDA graph capture) counts as warm-up
    extra = {}
    if compile and device.type == "cpu":  # the chat's compiled engine: loaded if cached, else built in a child
        from minillama.aot import AotEngine

        load_args = dict(path=spec["model"], device=str(device), dtype=spec["dtype"], quantize=options.get("quantize"),
                         group_size=options.get("group"))
        engine = AotEngine(model, P + N, build="background", load_args=load_args)  # peak memory: not the build's
        while not engine.ready and engine.builder is not None:
            time.sleep(0.2)
            engine.poll()
        if not engine.ready:
            raise RuntimeError(f"the compiled step could not be built: {engine.build_error}")
        extra = {"engine": "aot"}
    elif compile:
        engine = CompiledEngine(model, P + N, tuning=options.get("tuning"), pdl=options.get("pdl", False),
                                lag=options.get("lag"))
        engine.warmup()
        if device.type == "cuda":
            extra = {"cudagraph_skips": engine.cudagraph_skips, "cuda_graphs_recorded": cuda_graphs_recorded(device)}
    else:
        engine = EagerEngine(model, model.new_cache(1, P + N))
        engine.lag = options.get("lag", engine.lag)

    def run_generate(n: int) -> tuple[list[int], list[float]]:
        """Generate n tokens; return them with the time each one reached the caller."""
        ids, stamps = [], []
        for token in generate(model, prompt, max_new_tokens=n, eos_token_id=[], engine=engine):
            ids.append(token)
            stamps.append(time.perf_counter())
        return ids, stamps

    def prefill() -> None:
        engine.forward(prompt, 0)

    run_generate(min(N, 4))
    prefill()
    _sync(device)
    warmup_s = time.perf_counter() - start
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # tied and shared ones counted once
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())  # quantized weights are buffers
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
    (float32: 1e-3; bf16/fp16, or int8 activations: 0.1 + 2% of the best logit). A quantized model's decode
    steps quantize each activation row to 8 bits (kernels.py) while this forward over many rows multiplies
    float32 ones (quant.prompt_chunk), like bf16's rounding. A broken fast path picks tokens that are nowhere
    near the best, and scores far below 1.0.
    """
    ids = torch.cat([prompt, prompt.new_tensor([tokens[:-1]])], dim=1)  # the step inputs: prompt, then each token
    logits = model(ids, logits_to_keep=len(tokens))[0].float()  # (K, V): position i predicts tokens[i]
    chosen = logits.gather(-1, prompt.new_tensor(tokens)[:, None])[:, 0]  # (K,)
    best = logits.amax(dim=-1)  # (K,)
    int8_activations = any(getattr(m, "kernel", None) == "minillama" for m in model.modules())
    tolerance = 1e-3 if model.dtype == torch.float32 and not int8_activations else 0.1 + 0.02 * best.abs()
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


def _stamps_streamer():
    """A transformers streamer that records each token and when it arrived (made here: transformers is
    imported only inside its worker)."""
    from transformers.generation.streamers import BaseStreamer

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

    return Stamps()


def run_transformers(spec: dict[str, Any]) -> dict[str, Any]:
    """The reference: transformers' generate, eager or with its static cache (which it compiles on a GPU)."""
    import transformers
    from transformers import AutoModelForCausalLM

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

    def run_generate(n: int) -> tuple[list[int], list[float]]:
        """generate() with eos disabled (min_new_tokens = max_new_tokens); tokens and their arrival times.

        On a GPU, transformers streams one step behind (it copies tokens asynchronously), so its TTFT
        includes one decode step.
        """
        stamps = _stamps_streamer()
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


def run_llama_cpp(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp through llama-cpp-python on spec["gguf"] (the file minillama's gguf side runs as it is), with
    as many threads as torch uses here; the same random prompt, greedy, eos never checked (its `generate` runs
    until stopped). Its prefill computes the last position's logits only, like the other sides'."""
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    P, N = spec["prompt_len"], spec["new_tokens"]
    start = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=P + N, n_batch=P, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    load_s = time.perf_counter() - start
    prompt = _prompt(spec, llm.n_vocab())[0].tolist()

    def prefill() -> None:
        llm.reset()  # forget the cached tokens, so the whole prompt is evaluated again
        llm.eval(prompt)

    def run_generate(n: int) -> tuple[list[int], list[float]]:
        llm.reset()
        tokens, stamps = [], []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            tokens.append(token)
            stamps.append(time.perf_counter())
            if len(tokens) == n:
                break
        return tokens, stamps

    start = time.perf_counter()
    run_generate(min(N, 4))
    prefill()
    warmup_s = time.perf_counter() - start
    return {"load_s": load_s, "warmup_s": warmup_s, "threads": threads, "weight_bytes": gguf_tensor_bytes(spec["gguf"]),
            **_measure(spec, torch.device("cpu"), prefill, run_generate)}


def gguf_tensor_bytes(path: str | Path) -> int:
    """The bytes of a GGUF file's tensors as stored (quantized blocks included): what a decode step reads."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors)


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
           "llama.cpp": run_llama_cpp, "copy": run_copy}


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


