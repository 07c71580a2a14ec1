"""`minillama generate [MODEL] --prompt TEXT`: one completion, streamed to stdout; stats go to stderr."""

from __future__ import annotations

import argparse
import sys
import time

from minillama.cli.chat import clean_text
from minillama.cli.common import add_model_args, add_sampling_args, add_steer_args, eprint, load_all
from minillama.errors import MinillamaError
from minillama.sampling import make_generator


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt and print only the completion",
                       description=__doc__)
    add_model_args(p)
    add_sampling_args(p)
    add_steer_args(p)
    p.add_argument("--prompt", "-p", required=True, help="the user message (or the raw text with --raw); "
                                                         "- reads it from stdin")
    p.add_argument("--system", help="system prompt (chat template only)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the text as is")
    p.add_argument("--stop", action="append", help="stop when the completion contains this text (repeatable)")
    p.set_defaults(func=run)


PROMPT_LIMIT = 16 * 1024**2  # bytes of prompt read from stdin (`-p -`): far more than any context holds


def read_stdin_prompt() -> str:
    """The prompt from stdin, at most PROMPT_LIMIT bytes; bytes that are not UTF-8 become U+FFFD."""
    stream = getattr(sys.stdin, "buffer", None)  # a replaced sys.stdin (tests, notebooks) may be text only
    data = stream.read(PROMPT_LIMIT + 1) if stream is not None else sys.stdin.read(PROMPT_LIMIT + 1)
    if len(data) > PROMPT_LIMIT:
        raise MinillamaError(f"the prompt on stdin is longer than {PROMPT_LIMIT:,} bytes; is it text?")
    return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data


def run(args: argparse.Namespace) -> int:
    from minillama.chat import STOP_INTERRUPTED, TurnStats
    from minillama.generation import generate
    from minillama.intervene import steering

    prompt = clean_text(read_stdin_prompt() if args.prompt == "-" else args.prompt)
    args.system = clean_text(args.system) if args.system else args.system
    if not prompt.strip():
        raise MinillamaError("the prompt is empty; pass --prompt TEXT")
    loaded = load_all(args)
    tok = loaded.tokenizer
    if args.raw:
        ids = tok.encode(prompt, add_special_tokens=True)
    elif tok.chat_template_source is None:
        raise MinillamaError(f"{loaded.path} has no chat template; pass --raw to continue the text as is")
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    config = loaded.generation_config if args.raw else loaded.generation_config.ending_turns(tok)
    if loaded.engine == "compiled":
        eprint("minillama: compiling the decode step (it can take a minute; --no-compile skips it)...")
    generation = generate(loaded.model, ids, config, generator=make_generator(loaded.model.device, args.seed),
                          tokenizer=tok, stop_strings=args.stop, engine=loaded.engine)
    stream = tok.stream_decoder(skip_special_tokens=True)
    start = time.perf_counter()
    first = None
    try:
        with steering(loaded.model, args.steer):
            for token in generation:
                first = first or time.perf_counter()
                print(stream.push(token), end="", flush=True)
        print(stream.flush(), flush=True)
    except KeyboardInterrupt:  # stopped by Ctrl-C: still say what was made and why it ended
        print(flush=True)
    end = time.perf_counter()
    n = len(generation.tokens[0])
    first = first or end
    eprint(TurnStats(len(ids), first - start, n, end - first, generation.stop_reason or STOP_INTERRUPTED,
                     len(ids) + n, loaded.model.config.max_position_embeddings, config.max_new_tokens).line())
    return 0 if generation.stop_reason else 130
