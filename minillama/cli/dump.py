"""`minillama dump [MODEL] --prompt TEXT --out FILE.safetensors`: save every activation of one forward pass.

Parses flags and prints; the work is `minillama.dump.dump_activations`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minillama.cli.common import (add_model_args, add_prompt_args, prompt_input_ids, quantize_args, read_prompt,
                                  resolve_model_arg, tensor_parallel, use_raw)
from minillama.files import check_output_file


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dump", help="save a forward pass's activations to a safetensors file",
                       description="Run the prompt through the model once and write the captured activations "
                                   "(names as in minillama.capture) to FILE.safetensors, plus FILE.summary.json.")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    p.add_argument("--names", nargs="+", metavar="GLOB",
                   help="which activations, as globs (e.g. 'model.layers.*.resid_post' 'blocks.0.attn.*'); default all")
    p.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from minillama.checkpoint import load_model
    from minillama.dump import dump_activations, summary_path

    for path in (args.out, summary_path(args.out)):  # before the slow part
        check_output_file(path, args.force)
    prompt = read_prompt(args)
    model_dir = resolve_model_arg(args)
    model = load_model(model_dir, device=args.device, dtype=args.dtype, tp=tensor_parallel(), **quantize_args(args))
    text, ids = prompt_input_ids(model_dir, prompt, use_raw(args), model.config.vocab_size)
    ids = ids.to(model.device)
    if tensor_parallel() and torch.distributed.get_rank() != 0:  # the same forward, for its collectives;
        with torch.inference_mode():                              # rank 0 alone writes the files
            model(ids)
        return 0
    summary = dump_activations(model, ids, args.out, names=args.names, force=args.force,
                               metadata={"model": str(model_dir), "prompt": text})
    size = args.out.stat().st_size
    print(f"wrote {len(summary['tensors'])} tensors ({size / 1e6:.1f} MB) for {ids.shape[1]} tokens to {args.out}; "
          f"summary in {summary_path(args.out)}")
    return 0
