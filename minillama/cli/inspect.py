"""`minillama inspect MODEL [--prompt TEXT] [--json]`: a tour of a model directory."""

from __future__ import annotations

import argparse
import json

from minillama.cli.common import resolve_model_arg
from minillama.hub import DEFAULT_MODEL
from minillama.inspect import format_report, inspect_model


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="show a model's files, config, special tokens, modules and parameters",
                       description="Show what a model directory holds, without loading the weights.")
    p.add_argument("model", help=f"model directory, hub id (org/name) or {DEFAULT_MODEL!r}")
    p.add_argument("--offline", action="store_true", help="use only files already downloaded")
    p.add_argument("--prompt", help="also show this prompt rendered through the chat template, token by token")
    p.add_argument("--raw", action="store_true", help="tokenize --prompt as plain text, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = inspect_model(resolve_model_arg(args), prompt=args.prompt, raw=args.raw)
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else format_report(report))
    return 0
