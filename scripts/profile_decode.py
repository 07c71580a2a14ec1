"""Where a decode step's time goes: matrix kernels, attention, norms/rotary/elementwise, sampling, Python.

    python scripts/profile_decode.py                          # the default model's Q4_1 weights, 1 and 16 rows
    python scripts/profile_decode.py --weights float32 --rows 1 --threads 2
    python scripts/profile_decode.py --compiled               # batch 1 through the compiled step as well

Each case runs `--steps` decode steps of the engine (`minillama.Engine`, one request per row, prompts of
`--prompt-len` random tokens, greedy, eos ignored) under torch.profiler, after the same number of untimed
steps. An op's *self* time goes to one category by its name (CATEGORIES, first match), and to "sampling" when
it runs inside the engine's sampling (`Engine._choose`); what the ops do not account for of the wall time is
Python and dispatch. The compiled case times `minillama.generate` on the compiled step (batch 1), where
Inductor's fused C++ kernels stand for most of the elementwise work.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillama
from minillama import hub, kernels
from minillama.bench.concurrency import cpu_line

CATEGORIES = [  # (category, substrings of op names), first match wins
    ("matrix", ("minillama::int", "_weight_int", "aten::mm", "aten::addmm", "aten::bmm", "mkldnn", "aten::linear")),
    ("attention", ("scaled_dot_product", "_flash_attention", "index_copy", "aten::softmax", "_softmax")),
    ("norms/rotary/elementwise", ("aten::",)),
]


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other ops"


def split(prof: torch.profiler.profile, wall_s: float, steps: int) -> dict[str, float]:
    """ms per step in each category, from the events' self CPU times."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name == "sampling":
            continue
        inside, parent = False, event.cpu_parent
        while parent is not None:
            inside |= parent.name == "sampling"
            parent = parent.cpu_parent
        totals["sampling" if inside else category(event.name)] += event.self_cpu_time_total / 1e3
    out = {k: v / steps for k, v in totals.items()}
    out["Python/dispatch"] = max(0.0, 1e3 * wall_s / steps - sum(out.values()))
    return out


def profile_engine(model, tokenizer, rows: int, prompt_len: int, steps: int) -> tuple[float, dict[str, float]]:
    engine = minillama.Engine(model, tokenizer, slots=rows, max_seq_len=prompt_len + 4 * steps + 8)
    choose = engine._choose

    def labelled(*args, **kwargs):
        with torch.profiler.record_function("sampling"):
            return choose(*args, **kwargs)

    engine._choose = labelled
    g = torch.Generator().manual_seed(0)
    for _ in range(rows):
        ids = torch.randint(100, model.config.vocab_size - 100, (prompt_len,), generator=g).tolist()
        engine.submit(minillama.Request(prompt=ids, max_tokens=4 * steps, temperature=0.0, eos_token_ids=[]))
    while engine.waiting or engine.running < rows:  # every prompt prefilled
        engine.step()
    for _ in range(steps):  # warm-up
        engine.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - start
    return 1e3 * wall / steps, split(prof, wall, steps)


def profile_compiled(model, prompt_len: int, steps: int) -> tuple[float, dict[str, float]]:
    from minillama.fast import CompiledEngine

    engine = CompiledEngine(model, max_seq_len=prompt_len + 3 * steps + 8)
    ids = torch.randint(100, model.config.vocab_size - 100, (1, prompt_len))
    config = minillama.GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=[])
    for _ in minillama.generate(model, ids, config, engine=engine):  # compiles, then warms up
        pass
    stream = minillama.generate(model, ids, config, engine=engine)
    next(stream)  # the prompt: not a decode step
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in stream:
            pass
        wall = time.perf_counter() - start
    return 1e3 * wall / (steps - 1), split(prof, wall, steps - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", choices=["gguf", "float32"], default="gguf",
                   help="the default model's own Q4_1 blocks (gguf) or its float32 conversion")
    p.add_argument("--rows", default="1,16", help="comma-separated numbers of running requests")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--compiled", action="store_true", help="also batch 1 through the compiled step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = hub.default_model(offline=True, quantized=args.weights == "gguf")
    model, tokenizer = minillama.load_model(str(path), "cpu"), minillama.load_tokenizer(str(path))
    print(f"{cpu_line()}, {args.threads} thread(s), torch {torch.__version__}; weights {args.weights} "
          f"({kernels.describe() if args.weights == 'gguf' else 'float32 F.linear'}); prompt {args.prompt_len}")
    cases = [(f"engine, {r} row{'s' if r > 1 else ''}", lambda r=r: profile_engine(model, tokenizer, r,
                                                                                    args.prompt_len, args.steps))
             for r in map(int, args.rows.split(","))]
    if args.compiled:
        cases.append(("compiled step, 1 row", lambda: profile_compiled(model, args.prompt_len, args.steps)))
    names = ["matrix", "attention", "norms/rotary/elementwise", "sampling", "other ops", "Python/dispatch"]
    print("| case | ms/step | " + " | ".join(names) + " |")
    print("|---|---" * (len(names) + 1) + "|")
    for label, run in cases:
        ms, parts = run()
        print(f"| {label} | {ms:.1f} | " + " | ".join(f"{parts.get(n, 0.0):.1f}" for n in names) + " |", flush=True)


if __name__ == "__main__":
    main()
