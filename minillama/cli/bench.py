"""`minillama bench [MODEL | --config FILE | --tiny]`: minillama vs transformers, same model and prompt, one run.

Reports load time, warm-up, prompt tok/s, time to first token, decode tok/s (bs=1, greedy, eos disabled),
peak memory and the fraction of the measured copy bandwidth, per side, then ratios minillama / transformers.
Each side runs in its own process. `--json` prints one JSON object per figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from minillama.cli.common import add_tp_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark minillama against transformers", description=__doc__)
    p.add_argument("model", nargs="?", help="model directory, hub id or the default model's name "
                                            "(or use --config / --tiny for random weights)")
    p.add_argument("--config", help="a config.json whose shape to benchmark with random weights "
                                    "(e.g. scripts/configs/llama-3.2-1b.json); nothing is downloaded")
    p.add_argument("--tiny", action="store_true", help="a tiny random model: a smoke test of the benchmark")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--dtype", help="float32, bfloat16, float16 (default: the checkpoint's on a GPU, float32 on CPU)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens (random ids; default 512)")
    p.add_argument("--max-new-tokens", "--new-tokens", "-n", dest="new_tokens", type=int, default=256,
                   help="tokens to decode; eos is ignored, so exactly this many (default 256)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per side; the median is reported (default 1)")
    p.add_argument("--sides", help="comma-separated: minillama, transformers, transformers-static, and variants "
                                   "of minillama's engine such as minillama:pack=off or minillama:compile=on/attention=math "
                                   "(default: minillama,transformers; on CUDA also transformers-static)")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="minillama's engine: compiled decode step (on) or eager (off); auto: compiled on CUDA, and on a CPU "
                        "where the chat compiles it (weights that minillama's int8 kernels run: aot.py)")
    p.add_argument("--side-timeout", type=float, metavar="SECONDS",
                   help="give up on a side after this long (it is reported as failed; the others still run)")
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="seconds for all sides together: a side is cut off when they run out and later sides are "
                        "skipped (list the sides in order of importance)")
    p.add_argument("--quantize", help="comma-separated int8, int4, gguf: also a minillama side with those weights "
                                      "(= --sides ...,minillama:quantize=int4; int4 in groups of 32); gguf: the "
                                      "GGUF's own blocks as they are (the default model's Q4_1, or --gguf FILE), "
                                      "plus a llama.cpp side on the same file when llama-cpp-python is installed")
    p.add_argument("--gguf", metavar="FILE", help="the GGUF file MODEL was converted from, for --quantize gguf and "
                                                  "the llama.cpp side (default: the default model's own)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt and random weights")
    p.add_argument("--offline", action="store_true", help="use only files already downloaded")
    p.add_argument("--json", action="store_true", help="one JSON object per line, one line per figure")
    add_tp_arg(p)
    p.add_argument("--concurrency", metavar="LIST", help="e.g. 1,4,16: many requests at once through the engine "
                   "(2C requests on C slots per level) against transformers' continuous batching; sides: minillama, "
                   "minillama:weights=gguf (the default model's Q4_1), transformers (default: all that apply)")
    p.add_argument("--threads", type=int, help="torch threads per side (default: torch's choice)")
    p.add_argument("--json-file", metavar="FILE", help="also write the JSON lines to FILE (the table still prints)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.bench import TINY_CONFIG, run_bench
    from minillama.errors import MinillamaError

    if sum(bool(x) for x in (args.model, args.config, args.tiny)) > 1:
        raise MinillamaError("give one of MODEL, --config FILE or --tiny")
    if args.concurrency:
        return run_concurrency(args)
    sides = [side.strip() for side in args.sides.split(",")] if args.sides else None
    if args.quantize:
        sides = quantized_sides(args, sides)
    if sides is None or any(side.startswith("transformers") for side in sides):
        from minillama.optional import require

        require("transformers", "minillama bench (its transformers side)")  # before any work
    config = None
    model = None
    if args.tiny:
        config = {**TINY_CONFIG, "_name_or_path": "tiny"}
    elif args.config:
        try:
            with open(args.config, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise MinillamaError(f"{args.config}: cannot read the config ({e})") from None
        if not isinstance(config, dict):
            raise MinillamaError(f"{args.config}: expected a JSON object")
        config.setdefault("_name_or_path", args.config)
    else:
        from minillama.hub import DEFAULT_MODEL, resolve_model

        model = resolve_model(args.model or DEFAULT_MODEL, offline=args.offline)

    def progress(message: str) -> None:
        print(f"[bench] {message}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="minillama-bench-gguf-") as tmp:
        gguf = args.gguf or default_gguf(args, sides, Path(tmp))
        records = run_bench(model, config=config, device=args.device, dtype=args.dtype, prompt_len=args.prompt_len,
                            new_tokens=args.new_tokens, repeats=args.repeats, sides=sides,
                            compile={"auto": None, "on": True, "off": False}[args.compile], seed=args.seed,
                            side_timeout=args.side_timeout, time_budget=args.time_budget, gguf=gguf,
                            progress=progress)
    if not records:  # a rank other than 0 under torchrun: rank 0 reports every rank's figures
        return 0
    if args.json_file:
        try:
            with open(args.json_file, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)
        except OSError as e:
            print(f"minillama bench: cannot write {args.json_file} ({e}); the figures follow", file=sys.stderr)
            args.json = True
    if args.json:
        for record in records:
            print(json.dumps(record), flush=True)
    else:
        from minillama.bench import format_table

        print(format_table(records))
    failed = [r["side"] for r in records if r["figure"] == "error"]
    if failed:
        print(f"minillama bench: {', '.join(failed)} failed (see above); the other figures stand", file=sys.stderr)
        return 1
    return 0


def run_concurrency(args: argparse.Namespace) -> int:
    """--concurrency: the engine against transformers' continuous batching (minillama/bench/concurrency.py)."""
    import torch

    from minillama.bench.concurrency import SIDES, cpu_line, format_table, run_concurrency
    from minillama.errors import MinillamaError
    from minillama.hub import DEFAULT_MODEL, default_model, resolve_model

    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        raise MinillamaError(f"--concurrency {args.concurrency}: give numbers, e.g. 1,4,16") from None
    if not levels or min(levels) < 1:
        raise MinillamaError("--concurrency: every level must be >= 1")
    random_weights = bool(args.config or args.tiny)
    default = not random_weights and (args.model or DEFAULT_MODEL) == DEFAULT_MODEL
    sides = [s.strip() for s in args.sides.split(",")] if args.sides else \
        [s for s in SIDES if default or s != "minillama:weights=gguf"]
    for side in sides:
        if side not in SIDES or (side == "minillama:weights=gguf" and not default):
            raise MinillamaError(f"--concurrency side {side!r}: choose from {', '.join(SIDES)} (the gguf side runs "
                                 "the default model only)")
    if "transformers" in sides:
        from minillama.optional import require

        require("transformers", "minillama bench --concurrency (its transformers side)")
    tmp = tempfile.TemporaryDirectory(prefix="minillama-bench-")
    if random_weights:  # random weights of the config's shape, written once for every side
        from minillama.bench import TINY_CONFIG
        from minillama.bench.workers import write_random_checkpoint

        config = {**TINY_CONFIG} if args.tiny else json.loads(Path(args.config).read_text())
        dtype = getattr(torch, args.dtype) if args.dtype else torch.float32
        path = write_random_checkpoint(config, Path(tmp.name) / "model", dtype, args.seed)
    else:
        path = resolve_model(args.model or DEFAULT_MODEL, offline=args.offline)
    dirs = {side: default_model(quantized=True) if side == "minillama:weights=gguf" else path for side in sides}
    threads = args.threads or torch.get_num_threads()
    print(f"[bench] {cpu_line()}, {threads} threads; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          "greedy", file=sys.stderr)
    with tmp:
        records = run_concurrency(dirs, sorted(levels), args.prompt_len, args.new_tokens, args.seed, threads,
                                  ctx=2048,  # slots of 2,048 tokens (the model's context if shorter)
                                  progress=lambda m: print(f"[bench] {m}", file=sys.stderr, flush=True),
                                  device=args.device, dtype=args.dtype, side_timeout=args.side_timeout)
    for r in records:
        r["cpu"] = cpu_line()
    if args.json_file:
        with open(args.json_file, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    print("\n".join(json.dumps(r) for r in records) if args.json else format_table(records))
    return 1 if any("error" in r for r in records) else 0


def default_gguf(args: argparse.Namespace, sides: list[str] | None, tmp: Path) -> Path | None:
    """The default model's own GGUF, when it is the model benchmarked and a side runs the GGUF (else None)."""
    from minillama.bench.run import is_gguf_side
    from minillama.hub import DEFAULT_MODEL, fetch_default_gguf

    if not sides or not any(map(is_gguf_side, sides)) or args.config or args.tiny or \
            (args.model or DEFAULT_MODEL) != DEFAULT_MODEL:
        return None
    return fetch_default_gguf(tmp, offline=args.offline)


def quantized_sides(args: argparse.Namespace, sides: list[str] | None) -> list[str]:
    """The sides with --quantize's added: minillama:quantize=int8/int4, and for gguf minillama:weights=gguf plus
    llama.cpp when llama-cpp-python is installed (else a note saying how to get it)."""
    from minillama.bench.run import default_sides
    from minillama.checkpoint import resolve_device
    from minillama.errors import MinillamaError
    from minillama.optional import installed

    sides = list(sides or default_sides(resolve_device(args.device)))
    for mode in (mode.strip() for mode in args.quantize.split(",")):
        if mode not in ("int8", "int4", "gguf"):
            raise MinillamaError(f"--quantize {mode}: choose from int8, int4, gguf")
        if mode != "gguf":
            sides.append(f"minillama:quantize={mode}")
            continue
        sides.append("minillama:weights=gguf")
        if "llama.cpp" in sides:
            continue
        if installed("llama_cpp"):
            sides.append("llama.cpp")
        else:
            print("[bench] no llama.cpp side: llama-cpp-python is not installed (pip install llama-cpp-python; "
                  "docs/quantization.md)", file=sys.stderr)
    return sides


def main(argv: list[str] | None = None) -> int:
    """`python -m minillama.cli.bench ...`: the bench alone, without the other subcommands' imports."""
    from minillama.errors import MinillamaError

    parser = argparse.ArgumentParser(prog="minillama bench")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except MinillamaError as e:
        print(f"minillama bench: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
