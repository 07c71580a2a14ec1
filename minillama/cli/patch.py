"""`minillama patch [MODEL] --clean TEXT --corrupted TEXT --answers A B`: activation patching.

Runs the clean prompt, then the corrupted one once per (layer, position) with that one activation taken
from the clean run, and prints the logit difference logit(A) - logit(B) at the last position of each run:
the cells where it moves from the corrupted value towards the clean one carry what makes answer A.
"""

# The computing is minillama.intervene.patching; this file parses, prints and plots. (The docstring is --help.)

from __future__ import annotations

import argparse
import json
from pathlib import Path

from minillama.cli.common import add_model_args, eprint, resolve_model_arg
from minillama.errors import MinillamaError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("patch", help="activation patching: which layer and position carry the answer",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, dtype="float32")
    p.add_argument("--clean", required=True, help="the prompt whose answer is A (plain text, no chat template)")
    p.add_argument("--corrupted", required=True, help="a prompt of as many tokens whose answer is B")
    p.add_argument("--answers", nargs=2, required=True, metavar=("A", "B"),
                   help="the clean and the corrupted answer, one token each (mind the leading space: ' Paris')")
    p.add_argument("--names", nargs="+", default=["resid_pre"],
                   help="per-layer names to patch (default resid_pre; e.g. self_attn.o_proj mlp.down_proj, "
                        "or aliases such as hook_resid_pre)")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw the grid as a heatmap")
    p.add_argument("--json", action="store_true", help="print the grid as JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.checkpoint import load_model
    from minillama.intervene import patching, plot_patching, require_matplotlib
    from minillama.tokenizer import load_tokenizer

    if args.plot:
        require_matplotlib()  # before minutes of work, not after
    path = resolve_model_arg(args)
    tokenizer = load_tokenizer(path)
    clean, corrupted = (tokenizer.encode(text, add_special_tokens=True) for text in (args.clean, args.corrupted))
    answers = [answer_id(tokenizer, answer) for answer in args.answers]
    model = load_model(path, device=args.device, dtype=args.dtype)
    result = patching(model, clean, corrupted, args.names, answers=tuple(answers), progress=True)
    labels = [position_label(tokenizer.piece_text(a), tokenizer.piece_text(b)) for a, b in zip(clean, corrupted)]
    if args.json:
        print(json.dumps({"clean_tokens": [tokenizer.piece_text(i) for i in clean],
                          "corrupted_tokens": [tokenizer.piece_text(i) for i in corrupted],
                          "answers": args.answers, "clean": result.clean, "corrupted": result.corrupted,
                          "layers": result.layers,
                          "grid": {name: grid.tolist() for name, grid in zip(result.names, result.scores)}}))
    else:
        print(format_grid(result, labels, args.answers))
    if args.plot:
        written = plot_patching(result, labels, args.plot,
                                title=f"logit({args.answers[0]!r}) - logit({args.answers[1]!r})")
        eprint(f"minillama: wrote the plot to {written}")
    return 0


def answer_id(tokenizer, answer: str) -> int:
    ids = tokenizer.encode(answer, add_special_tokens=False)
    if len(ids) != 1:
        raise MinillamaError(f"the answer {answer!r} is {len(ids)} tokens; give answers of one token each "
                             "(a leading space often makes a word one token: ' Paris')")
    return ids[0]


def position_label(clean: str, corrupted: str) -> str:
    """The token at a position; both, as clean/corrupted, where the prompts differ."""
    from minillama.model_info import visible

    return visible(clean) if clean == corrupted else f"{visible(clean)}/{visible(corrupted)}"


def format_grid(result, labels: list[str], answers: list[str]) -> str:
    width = max(7, *(len(label) + 1 for label in labels))
    out = [f"metric: logit({answers[0]!r}) - logit({answers[1]!r}) at the last position; "
           f"clean {result.clean:.3f}, corrupted {result.corrupted:.3f}"]
    for name, grid in zip(result.names, result.scores):
        out.append(f"\n{name}: one row per layer, one column per position patched from the clean run")
        out.append(" " * 9 + "".join(f"{label:>{width}}" for label in labels))
        out += [f"layer {i:<3}" + "".join(f"{v:>{width}.3f}" for v in row.tolist())
                for i, row in zip(result.layers, grid)]
    return "\n".join(out)
