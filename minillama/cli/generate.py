"""`minillama generate [MODEL] --prompt TEXT`: one completion, streamed to stdout; stats go to stderr.

The prompt can also come on stdin (`echo "Why?" | minillama generate`). A --stop string ends the
completion and is not printed: text that could be the start of one is held back until it is decided.
"""

from __future__ import annotations

import argparse
import time

from minillama.cli.chat import clean_text
from minillama.cli.common import (add_model_args, add_prompt_args, add_sampling_args, add_steer_args, eprint,
                                  load_all, read_prompt, use_raw)
from minillama.errors import MinillamaError
from minillama.stopping import StopTrimmer


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete one prompt and print only the completion",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    add_sampling_args(p)
    add_steer_args(p)
    add_prompt_args(p)
    p.add_argument("--system", help="system prompt (chat template only)")
    p.add_argument("--stop", action="append", help="stop when the completion contains this text, which is left out "
                                                   "(repeatable)")
    p.set_defaults(func=run)


def prompt_ids(loaded, prompt: str, args: argparse.Namespace) -> list[int]:
    tok = loaded.tokenizer
    if use_raw(args):
        return tok.encode(prompt, add_special_tokens=True)
    if tok.chat_template_source is None:
        raise MinillamaError(f"{loaded.path} has no chat template; pass --raw to continue the text as is")
    messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
               [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)


def note_context_limit(loaded, prompt_tokens: int, max_new_tokens: int) -> None:
    """One line when the reply's length limit reaches past the context: the reply stops where the context ends."""
    from minillama.chat import SOURCE_TEXT

    context = loaded.model.config.max_position_embeddings
    room = context - prompt_tokens
    if room > 0 and max_new_tokens > room:
        source = SOURCE_TEXT[loaded.sampling_sources.get("max_new_tokens", "default")]
        eprint(f"minillama: max-new-tokens {max_new_tokens} ({source}) is more than the {room} tokens left in the "
               f"{context}-token context after the prompt; the reply stops when the context is full")


def run(args: argparse.Namespace) -> int:
    from minillama.chat import STOP_INTERRUPTED, TurnStats, new_engine, reply_generation
    from minillama.intervene import steering
    from minillama.sampling import make_generator

    if args.raw and args.system:
        raise MinillamaError("--system needs the chat template; drop --raw or --system")
    prompt = clean_text(read_prompt(args))
    args.system = clean_text(args.system) if args.system else args.system
    loaded = load_all(args)
    ids = prompt_ids(loaded, prompt, args)
    tok = loaded.tokenizer
    config = loaded.generation_config if use_raw(args) else loaded.generation_config.ending_turns(tok)
    note_context_limit(loaded, len(ids), config.max_new_tokens)
    context = loaded.model.config.max_position_embeddings
    length = min(context, len(ids) + config.max_new_tokens)
    if loaded.engine == "compiled" and loaded.model.device.type == "cpu":
        from minillama import aot
        from minillama.chat import default_context

        chat = default_context(loaded.model)[0]  # the chat's step where it fits, else one of a few lengths
        length = chat if length <= chat else min(context, 1 << (length - 1).bit_length())
        if not aot.is_built(loaded.model, length):
            eprint("minillama: compiling the decode step, once for this model and length (it can take a minute; "
                   "--no-compile skips it)...")
    elif loaded.engine == "compiled":
        eprint("minillama: compiling the decode step (it can take a minute; --no-compile skips it)...")
    engine = new_engine(loaded.model, loaded.engine, length)
    stream, trimmer = tok.stream_decoder(skip_special_tokens=True), StopTrimmer(args.stop)
    start = time.perf_counter()
    first = None
    generation = None
    try:
        with steering(loaded.model, args.steer):
            # As a chat's first turn (the same penalty history); a length past the context is capped at it, as
            # llama-cli and ollama do (a prompt that does not fit is an error)
            generation = reply_generation(loaded.model, ids, config, engine, tokenizer=tok, stop_strings=args.stop,
                                          generator=make_generator(loaded.model.device, args.seed),
                                          stop_at_context=True)
            for token in generation:
                first = first or time.perf_counter()
                print(trimmer.push(stream.push(token)), end="", flush=True)
        print(trimmer.push(stream.flush()) + trimmer.flush(), flush=True)
    except KeyboardInterrupt:  # stopped by Ctrl-C: still say what was made and why it ended
        print(flush=True)
    end = time.perf_counter()
    if generation is None:  # Ctrl-C during the prefill
        return 130
    n = len(generation.tokens[0])
    first = first or end
    eprint(TurnStats(len(ids), first - start, n, end - first, generation.stop_reason or STOP_INTERRUPTED,
                     len(ids) + n, loaded.model.config.max_position_embeddings, config.max_new_tokens,
                     generation.drafted, generation.accepted).line())
    return 0 if generation.stop_reason else 130
