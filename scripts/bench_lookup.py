"""Prompt-lookup decoding on the default model: decode speed and acceptance, with and without it.

    python scripts/bench_lookup.py                       # float32 and Q4_1, K = 4 and 8, 128 tokens, 1 thread
    python scripts/bench_lookup.py --weights q4_1 --k 8 --repeats 3

Two greedy chat prompts: (a) "summarise this text" over the first ~300 words of tests/data/alice-chapter1.txt,
where the reply repeats phrases of the prompt, and (b) an open question, where it has little to copy. Each
side runs the same prompt through `minillama.generate` on the eager engine (oneDNN-packed weights on a CPU, as
`minillama chat` runs), without lookup and with `prompt_lookup_num_tokens=K`, and the tokens are compared: equal
in float32; where they part (Q4_1's kernels, int8 activations, round differently for 1 and K + 1 rows), the table says
at which token and how close the top two logits were there in one forward over the text (a tie, not a bug).
Decode speed counts the tokens after the first over the time after the first (the prefill is the same on both
sides). Sides alternate within a round, and the median of the rounds is reported. Prints a markdown table with
the CPU model and the load average, for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from minillama.checkpoint import load_model
from minillama.generation import GenerationConfig, generate
from minillama.hub import default_model
from minillama.tokenizer import load_tokenizer

ALICE = Path(__file__).resolve().parents[1] / "tests" / "data" / "alice-chapter1.txt"
QUESTION = "What makes a good teacher? Give a few reasons."


def summarise_prompt(words: int = 300) -> str:
    text = ALICE.read_text(encoding="utf-8").split("\n\n", 1)[1]  # past the title line
    return "Summarise this text in a few sentences:\n\n" + " ".join(text.split()[:words])


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], check=False, capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or "unknown CPU"


def run_once(model, ids: list[int], config: GenerationConfig) -> dict:
    """One reply: its tokens, decode tok/s, drafts fed and accepted."""
    start = time.perf_counter()
    generation = generate(model, ids, config, engine="eager")
    first = None
    for _ in generation:
        first = first or time.perf_counter()
    end = time.perf_counter()
    n = len(generation.tokens[0])
    return {"tokens": generation.tokens[0], "decode": (n - 1) / (end - first) if n > 1 else 0.0,
            "prefill_s": first - start, "drafted": generation.drafted, "accepted": generation.accepted}


def parting(model, ids: list[int], plain: list[int], other: list[int]) -> str:
    """'same', or where `other` leaves `plain` and the gap between their two tokens' logits there."""
    i = next((i for i, (a, b) in enumerate(zip(plain, other)) if a != b), None)
    if i is None:
        return "same" if len(plain) == len(other) else f"same to {min(len(plain), len(other))}"
    with torch.inference_mode():
        logits = model(torch.tensor([ids + plain[:i]]))[0, -1].float()
    return f"parts at {i} (logit gap {abs(float(logits[plain[i]] - logits[other[i]])):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", nargs="+", default=["float32", "q4_1"], choices=["float32", "q4_1"])
    p.add_argument("--k", nargs="+", type=int, default=[4, 8], help="draft tokens per forward to try")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=1, help="rounds per side (the median is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the cores are shared)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    rows = []
    for weights in args.weights:
        path = default_model(quantized=weights == "q4_1")
        model = load_model(path, device="cpu", dtype="float32", pack=True)
        tok = load_tokenizer(path)
        base = GenerationConfig.from_model_dir(path).updated(do_sample=False, max_new_tokens=args.new_tokens)
        base = base.ending_turns(tok)
        prompts = {"summarise": summarise_prompt(), "question": QUESTION}
        run_once(model, tok.encode("Hello there"), base.updated(max_new_tokens=8))  # warm-up, not timed
        for name, text in prompts.items():
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          tokenize=True)
            sides = {0: [], **{k: [] for k in args.k}}
            for _ in range(args.repeats):
                for k, runs in sides.items():
                    runs.append(run_once(model, ids, base.updated(prompt_lookup_num_tokens=k)))
            plain = sides[0][0]["tokens"]
            for k, runs in sides.items():
                r = runs[0]
                rows.append((weights, name, len(ids), len(r["tokens"]), k,
                             statistics.median(x["decode"] for x in runs), r["accepted"], r["drafted"],
                             parting(model, ids, plain, r["tokens"]) if k else ""))
            print(f"{weights} {name}: {tok.decode(plain)[:300]!r}", flush=True)

    load_after = os.getloadavg()
    print(f"\n{cpu_model()}, {args.threads} thread{'s' * (args.threads != 1)}, torch {torch.__version__}, "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after; greedy, median of "
          f"{args.repeats} round{'s' * (args.repeats != 1)}\n")
    print("| weights | prompt | prompt tokens | reply tokens | K | decode tok/s | vs off | accepted / drafted "
          "| tokens vs off |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    off = {(w, n): s for w, n, _, _, k, s, *_ in rows if k == 0}
    for w, name, T, n, k, speed, accepted, drafted, parts in rows:
        ratio = speed / off[(w, name)]
        share = f"{accepted} / {drafted} ({accepted / drafted:.0%})" if drafted else "-"
        print(f"| {w} | {name} | {T} | {n} | {k or 'off'} | {speed:.1f} | {ratio:.2f}x | {share} | {parts} |")


if __name__ == "__main__":
    main()
