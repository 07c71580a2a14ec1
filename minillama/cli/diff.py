"""`minillama diff [MODEL] --prompt TEXT`: find the first layer where minillama and transformers part ways.

Parses flags and prints; the work is `minillama.diff.diff_against_transformers`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from minillama.cli.common import (add_model_args, add_prompt_args, eprint, prompt_input_ids, quantize_args,
                                  read_prompt, resolve_model_arg, use_raw)
from minillama.optional import require


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diff", help="compare every layer's output with transformers",
                       description="Run the prompt through minillama and transformers (the reference), both with "
                                   "the same attention kernel, and show the error after each layer; the error "
                                   "against transformers' other kernel is shown beside it, not judged. "
                                   "Exits 1 when some layer is past --tol. Needs transformers.")
    add_model_args(p, dtype="float32")
    add_prompt_args(p)
    p.add_argument("--tol", type=float, default=1e-4,
                   help="a layer diverges when max|minillama - transformers| > tol * max|transformers| (default 1e-4)")
    p.add_argument("--attention", choices=["sdpa", "eager"], default="sdpa",
                   help="the attention kernel of both sides (default sdpa, minillama's own default)")
    p.add_argument("--reference", type=Path, metavar="DIR",
                   help="load transformers from this directory instead of MODEL (e.g. the original of a conversion)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw error against layer")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.checkpoint import resolve_device, resolve_dtype
    from minillama.config import LlamaConfig
    from minillama.diff import diff_against_transformers, first_divergence, plot_diff

    require("transformers", "minillama diff")  # before any work
    if args.plot:
        require("matplotlib", "--plot")
    prompt = read_prompt(args)
    model_dir = resolve_model_arg(args)
    reference_dir = args.reference or model_dir
    config = LlamaConfig.from_file(model_dir)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, config, device)
    _, ids = prompt_input_ids(model_dir, prompt, use_raw(args), config.vocab_size)
    rows = diff_against_transformers(model_dir, ids, reference_dir=reference_dir, tol=args.tol, dtype=dtype,
                                     device=device, attention=args.attention, **quantize_args(args))
    bad = first_divergence(rows)
    if args.json:
        print(json.dumps({"tol": args.tol, "attention": args.attention, "rows": [asdict(r) for r in rows],
                          "first_divergence": bad.name if bad else None}, indent=1))
    else:
        other = "eager" if args.attention == "sdpa" else "sdpa"
        print(f"minillama {model_dir} vs transformers {reference_dir}: {ids.shape[1]} tokens, "
              f"{str(dtype).removeprefix('torch.')}, {device}, attention {args.attention} on both sides")
        width = max(len(r.name) for r in rows)
        print(f"{'output':<{width}}  {'max abs err':>11}  {'rel err':>9}  {f'vs tf {other}':>11}")
        for r in rows:
            print(f"{r.name:<{width}}  {r.max_abs:>11.3e}  {r.rel:>9.3e}  {r.cross_rel:>11.3e}"
                  + ("  <- past tol" if r.diverged else ""))
        if bad:
            print(f"first divergence: {bad.name} (rel err {bad.rel:.3e} > tol {args.tol:g})")
        else:
            print(f"no divergence: every output within tol {args.tol:g}")
        print(f"(the last column, minillama {args.attention} against transformers {other}, is the two kernels' "
              "own rounding gap; it is not judged)")
    if args.plot:
        eprint(f"minillama: wrote the plot to {plot_diff(rows, args.tol, args.plot)}")
    return 1 if bad else 0
