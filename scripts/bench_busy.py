"""Decode speed on a quiet machine and beside one busy process per core, for each thread setting.

Runs `minillama generate` (the default model, the chat's default path: its compiled step once a chat has built
it, so run one chat first) in a fresh process per measurement and
reads the decode tok/s from its stats line; "busy" starts one spinning process per core first. Settings: the
default (threads = idle cores at start), --threads 1, --threads <all cores>. Rounds interleave the settings.

    python scripts/bench_busy.py --rounds 3 --tokens 128
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time

SPIN = "while True: pass"


def decode_rate(threads: str | None, tokens: int) -> float:
    args = [sys.executable, "-m", "minillama", "generate", "--prompt", "Write a long story about a lighthouse.",
            "-n", str(tokens), "--seed", "0", "--temperature", "0"]
    if threads is not None:
        args += ["--threads", threads]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900)
    match = re.search(r"reply: \d+ tokens, ([\d.]+) tok/s", out.stderr)
    if not match:
        raise RuntimeError(out.stderr[-500:])
    return float(match.group(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    args = p.parse_args()
    cores = len(os.sched_getaffinity(0))
    settings = {"default (idle cores)": None, "1 thread": "1", f"{cores} threads": str(cores)}
    results: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for state in ("quiet", "busy"):
            spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(cores if state == "busy" else 0)]
            time.sleep(1.0 if spinners else 0)
            try:
                for name, threads in settings.items():
                    rate = decode_rate(threads, args.tokens)
                    results.setdefault((name, state), []).append(rate)
                    print(f"[busy] {name}, {state}: {rate:.1f} tok/s", file=sys.stderr, flush=True)
            finally:
                for s in spinners:
                    s.kill()
    print(f"{'setting':<22}{'quiet tok/s':>12}{'busy tok/s':>12}{'busy slowdown':>15}   (median of {args.rounds})")
    for name in settings:
        quiet = statistics.median(results[(name, "quiet")])
        busy = statistics.median(results[(name, "busy")])
        print(f"{name:<22}{quiet:>12.1f}{busy:>12.1f}{quiet / busy:>14.2f}x")


if __name__ == "__main__":
    main()
