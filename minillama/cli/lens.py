"""`minillama lens [MODEL] --prompt TEXT`: the logit lens, for the last position unless asked for more.

Parses flags and prints; the work is `minillama.lens.logit_lens`. The prompt is plain text by default
(the lens is read on text like "The capital of France is"); --chat renders it through the chat template.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from minillama.cli.common import (add_model_args, add_prompt_args, eprint, prompt_input_ids, quantize_args,
                                  read_prompt, resolve_model_arg, use_raw)
from minillama.errors import MinillamaError
from minillama.optional import require


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lens", help="logit lens: what each layer would predict",
                       description="Apply the final norm and lm_head to every layer's residual stream and show "
                                   "the top next tokens, at the last position of the prompt by default.")
    add_model_args(p)
    add_prompt_args(p, chat=False)
    p.add_argument("--top", type=int, default=5, help="predictions shown per layer and position (default 5)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--position", type=int, action="append", metavar="N",
                       help="show this token position (0 is the first, -1 the last; repeatable; default -1)")
    where.add_argument("--all-positions", action="store_true", help="show every position of the prompt")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="also draw a heatmap of every position's top-1 "
                                                                 "prediction")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from minillama.checkpoint import load_model
    from minillama.cli.chat import weights_in_words
    from minillama.lens import format_lens, logit_lens, plot_lens
    from minillama.tokenizer import load_tokenizer

    if args.plot:
        require("matplotlib", "--plot")
    if args.top < 1:
        raise MinillamaError(f"--top must be at least 1, got {args.top}")
    prompt = read_prompt(args)
    model_dir = resolve_model_arg(args)
    model = load_model(model_dir, device=args.device, dtype=args.dtype, **quantize_args(args))
    weights = weights_in_words(model)
    eprint(f"minillama: the lens of {model_dir} on {model.device} ({str(model.dtype)[6:]}"
           f"{'; weights: ' + weights if weights else ' weights'})")
    if args.top > model.config.vocab_size:
        raise MinillamaError(f"--top must be at most the vocabulary size {model.config.vocab_size}, got {args.top}")
    _, ids = prompt_input_ids(model_dir, prompt, use_raw(args), model.config.vocab_size)
    T = ids.shape[1]
    positions = None if args.all_positions else (args.position or [-1])
    for n in positions or []:
        if not -T <= n < T:
            raise MinillamaError(f"--position {n} is outside the prompt's {T} tokens (0..{T - 1}, or -1 for the last)")
    piece = load_tokenizer(model_dir).piece_text
    lens = logit_lens(model, ids.to(model.device), top=args.top)
    print(format_lens(lens, ids[0].tolist(), piece, positions))
    if args.plot:
        eprint(f"minillama: wrote the plot to {plot_lens(lens, ids[0].tolist(), piece, args.plot)}")
    return 0
