"""`minillama convert-gguf FILE.gguf OUT_DIR`: turn a llama.cpp GGUF file into a model directory."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-gguf", help="convert a llama-architecture GGUF file into a model directory",
                       description="Dequantize a llama.cpp GGUF file (or keep its Q4_0/Q4_1/Q8_0 blocks, "
                                   "--keep-quantized) and write a Hugging Face-format model directory (config, "
                                   "safetensors weights, tokenizer, chat template).")
    p.add_argument("gguf_file", metavar="FILE.gguf", help="the GGUF file to convert")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the directory to create (must not exist, or be empty)")
    p.add_argument("--keep-quantized", action="store_true",
                   help="keep Q4_0/Q4_1/Q8_0 tensors as int4/int8 (no dequantizing; docs/quantization.md): "
                        "a 4-bit file stays ~4x smaller than float32, on disk and in memory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.gguf import convert_gguf

    out = convert_gguf(args.gguf_file, args.out_dir, progress=not args.quiet, keep_quantized=args.keep_quantized)
    print(f"wrote {out}", file=sys.stderr)
    return 0
