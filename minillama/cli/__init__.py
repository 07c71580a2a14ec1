"""The `minillama` command line: one subcommand per module in this package.

Each subcommand module has `add_parser(subparsers)`, which registers its arguments and sets
`func` to the function that runs it. A `MinillamaError` (bad input, a broken file, ...) is printed
as one line and exits with code 2; nothing else is caught, so real bugs still show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from minillama.errors import MinillamaError

# Subcommand modules, in the order `minillama --help` lists them.
SUBCOMMANDS = ["chat", "generate", "convert", "inspect", "dump", "diff", "lens", "patch", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillama", description="A readable Llama decoder that chats.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"minillama.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"minillama.cli.{name}":
                raise
            continue  # not written yet
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from minillama.cli.common import tensor_parallel_session

    try:
        with tensor_parallel_session(args):  # under torchrun: one rank of a tensor-parallel model
            return args.func(args) or 0
    except MinillamaError as e:
        print(f"minillama: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
