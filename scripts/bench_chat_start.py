"""How long `minillama chat` takes from its start to the first token of its first reply, start after start.

    python scripts/bench_chat_start.py                 # 3 starts of the default chat (Q4_1 weights on a CPU)
    python scripts/bench_chat_start.py --cold --starts 3 --wait 90

Each start is a fresh process with one question on stdin (greedy, --threads as given); the figure is the time from
launching it to the first byte of its reply on stdout, and the reply's tok/s from its stats line. With --cold the
compiled decode steps in minillama's cache (aot.py) are deleted first, so the first start builds its step in the
background (the reply runs eagerly) and, with --wait, the script waits that long with the chat open (the build
finishing meanwhile) before the next start. Figures: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minillama.hub import cache_dir


def start(model: list[str], question: str, threads: int, wait: float) -> tuple[float, str, str]:
    """Seconds to the first reply byte, the reply's stats line, and stderr's other lines."""
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "minillama", "chat", *model, "--greedy", "-n", "48",
                              "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, bufsize=0)
    child.stdin.write(question + "\n")
    child.stdin.flush()
    child.stdout.read(1)
    first = time.perf_counter() - t0
    if wait:  # keep the chat open (stdin not closed) while a background build may finish
        time.sleep(wait)
        child.stdin.write("Thanks!\n")
        child.stdin.flush()
    child.stdin.close()
    child.stdout.read()
    err = child.stderr.read()
    child.wait(600)
    stats = [line for line in err.splitlines() if line.startswith("[prompt:")]
    notes = [line for line in err.splitlines() if line.startswith("minillama:")]
    return first, stats[0] if stats else "", " | ".join(notes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", help="default: the default model")
    p.add_argument("--starts", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cold", action="store_true", help="delete the cached compiled steps first")
    p.add_argument("--wait", type=float, default=0.0, help="seconds the first chat stays open (the build's time)")
    p.add_argument("--question", default="What is the capital of France?")
    args = p.parse_args()
    if args.cold:
        shutil.rmtree(cache_dir() / "aot", ignore_errors=True)
    print(f"{os.uname().machine}, {os.cpu_count()} cores; minillama chat {args.model or '(default model)'}, "
          f"--threads {args.threads}")
    print("| start | to first token s | reply tok/s | notes |\n|---|---|---|---|")
    for i in range(args.starts):
        first, stats, notes = start([args.model] if args.model else [], args.question, args.threads,
                                    args.wait if i == 0 else 0.0)
        rate = re.search(r"reply: \d+ tokens?, ([\d.]+) tok/s", stats)
        print(f"| {i + 1} | {first:.2f} | {rate.group(1) if rate else '?'} | {notes} |", flush=True)


if __name__ == "__main__":
    main()
