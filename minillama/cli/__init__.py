"""The `minillama` command line: one subcommand per module in this package.

Each subcommand module has `add_parser(subparsers)`, which registers its arguments and sets `func` to
the function that runs it; the subcommands only parse flags and print, the work is library code. A
`MinillamaError` (bad input, a broken file, a missing optional dependency, ...) is printed as one line
and exits with code 2; a reader that closes the pipe (`| head`) ends the command quietly. Nothing else
is caught, so real bugs still show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from minillama.errors import MinillamaError

# Subcommand modules, in the order `minillama --help` lists them.
SUBCOMMANDS = ["chat", "generate", "serve", "convert", "inspect", "dump", "diff", "lens", "patch", "bench"]


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("minillama")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillama", description="A readable Llama decoder that chats.")
    parser.add_argument("--version", action="version", version=f"minillama {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"minillama.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said with the subcommand's usage, which lists its flags, not the top-level one
        sub = next(a for a in parser._actions if a.dest == "command").choices.get(args.command, parser)
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from minillama.cli.common import tensor_parallel_session

    try:
        if hasattr(args, "threads"):  # a subcommand that runs a model: --threads, or the cores idle right now
            if args.threads is not None and args.threads < 1:
                raise MinillamaError(f"--threads must be at least 1, got {args.threads}")
            set_threads(args.threads)
        with tensor_parallel_session(args):  # under torchrun: one rank of a tensor-parallel model
            return args.func(args) or 0
    except MinillamaError as e:
        print(f"minillama: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return closed_pipe()


def set_threads(threads: int | None) -> None:
    """torch's thread count: `threads`, or one per idle core (minillama/threads.py), said in one line at a
    terminal when that is fewer than the cores (a script's stderr stays as it was)."""
    import torch

    from minillama.threads import default_threads, usable_cores

    if threads is None:
        threads = default_threads()
        if threads < usable_cores() and sys.stderr.isatty():
            print(f"minillama: {threads} thread{'s' if threads > 1 else ''} (other programs keep "
                  f"{usable_cores() - threads} of {usable_cores()} cores busy; --threads N to choose)", file=sys.stderr)
    torch.set_num_threads(threads)


def closed_pipe() -> int:
    """The reader of stdout went away (`minillama inspect | head -1`): stop quietly, as a C tool killed by
    SIGPIPE would (exit 141). stdout is pointed at /dev/null so the interpreter's final flush of the
    unwritable buffer does not print a second error on the way out."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout already closed or not a real file
        pass
    return 141


if __name__ == "__main__":
    sys.exit(main())
