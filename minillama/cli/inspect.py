"""`minillama inspect [MODEL] [--prompt TEXT] [--json]`: a tour of a model directory.

Parses flags and prints; the work is `minillama.model_info.inspect_model`.
"""

from __future__ import annotations

import argparse
import json

from minillama.cli.common import add_prompt_args, resolve_model_arg, use_raw
from minillama.hub import DEFAULT_MODEL


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a model's files, config, special tokens, modules and parameters",
                       description="Show what a model directory holds, without loading the weights; with --prompt, "
                                   "also the prompt as the model sees it, token by token.")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, metavar="MODEL",
                   help=f"model directory, hub id (org/name) or {DEFAULT_MODEL!r} (the default)")
    p.add_argument("--offline", action="store_true", help="use only files already downloaded (also HF_HUB_OFFLINE=1)")
    add_prompt_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.model_info import format_report, inspect_model

    report = inspect_model(resolve_model_arg(args), prompt=args.prompt, raw=use_raw(args))
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0
