"""How often the default model's chat replies end by themselves, for candidate sampling settings.

    OMP_NUM_THREADS=1 python scripts/chat_defaults_eval.py --check                 # the table in docs/defaults.md
    OMP_NUM_THREADS=1 python scripts/chat_defaults_eval.py --candidates rp=1.0 rp=1.15,spare --json rows.json

The default model (SmolLM2-135M-Instruct on its own Q4_1 weights, what `minillama chat` runs on a CPU) answers
the 20 prompts of tests/data/chat_prompts.json, one fresh chat each, prompt i seeded with i. Every candidate
keeps the chat's other defaults (`chat.chat_generation_config`) and sets the penalties (`parse_candidate`): the
repetition penalty over the whole conversation and reply, or over the last N tokens (llama.cpp's and ollama's
repeat_last_n), counting the end-of-turn tokens or sparing them (what the chat does); or OpenAI's presence and
frequency penalties. For each: how many replies ended at end of turn and how many at the length limit (and of
those, how many were looping), the mean reply length, and the share of repeated 4-grams (a 4-gram of the reply
that already occurred earlier in it). Figures go into docs/defaults.md.

The candidates run a small loop of their own (the same engine, sampler and seeds, the prompt prefilled as the
chat does it); `--check` first proves that loop gives the chat's own tokens for the chat's own rule.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minillama import load_model, load_tokenizer
from minillama.chat import ChatSession, chat_generation_config
from minillama.generation import EagerEngine
from minillama.hub import default_model
from minillama.sampling import make_generator, next_token, seen_tokens

PROMPTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "chat_prompts.json"


def reply(model, tokenizer, config, prompt: str, seed: int, window: int | None,
          spare_end: bool = False) -> tuple[list[int], bool]:
    """The reply's ids to one prompt in a fresh chat, and whether it ended at end of turn. `window`: the
    repetition penalty counts only the last N tokens (None: all of them); `spare_end`: it does not count the
    end-of-turn ids (the prompt holds one after every message). The presence and frequency penalties count the
    reply's tokens, as in generate()."""
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)
    engine = EagerEngine(model, model.new_cache(batch_size=1, max_seq_len=len(ids) + config.max_new_tokens))
    generator = make_generator(model.device, seed)
    vocab = model.config.vocab_size
    counts = torch.zeros(1, vocab) if config.presence_penalty or config.frequency_penalty else None  # (1, V)
    with torch.inference_mode():
        engine.forward(torch.tensor([ids[:-1]]), 0)  # the prompt but its last token, then that one: as the chat does
        logits = engine.forward(torch.tensor([ids[-1:]]), len(ids) - 1)  # (1, V)
        tokens = list(ids)
        for step in range(config.max_new_tokens):
            counted = tokens if window is None else tokens[-window:]
            seen = seen_tokens(torch.tensor([counted]), vocab)  # (1, V)
            if spare_end:
                seen[:, config.eos_token_id] = False
            token = int(next_token(logits, seen, config, generator, counts=counts)[0])
            if token in config.eos_token_id:
                return tokens[len(ids):], True
            tokens.append(token)
            if counts is not None:
                counts[0, token] += 1
            if step + 1 < config.max_new_tokens:
                logits = engine.forward(torch.tensor([[token]]), len(tokens) - 1)
    return tokens[len(ids):], False


def repeated_ngrams(ids: list[int], n: int = 4) -> tuple[int, int]:
    """(repeated, total) n-grams of ids: a repeated one occurred earlier in the same ids."""
    seen, repeated = set(), 0
    grams = [tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)]
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated, len(grams)


def check_loop(model, tokenizer, config, prompt: str) -> None:
    """This script's loop, sparing the end-of-turn ids as the chat does, gives the chat's own reply."""
    session = ChatSession(model, tokenizer, config, seed=0)
    text = "".join(session.send(prompt))
    ids, _ = reply(model, tokenizer, session.config, prompt, 0, None, spare_end=True)
    mine = tokenizer.decode(ids, skip_special_tokens=True)
    assert mine == text, f"the loop differs from the chat:\n{mine!r}\n{text!r}"
    print(f"check: this loop gives the chat's own reply ({len(ids)} tokens)")


DEFAULT_CANDIDATES = ["rp=1.0", "rp=1.1,n=64", "rp=1.1", "rp=1.1,spare", "rp=1.15,n=64", "rp=1.15", "rp=1.15,spare",
                      "rp=1.15,n=64,spare", "rp=1.2,spare", "pp=0.5", "fp=0.3"]


def parse_candidate(spec: str) -> dict:
    """'rp=1.15,n=64,spare' -> the candidate's settings: rp repetition penalty, n its window (repeat_last_n),
    spare: end-of-turn ids not counted, pp presence penalty, fp frequency penalty."""
    out = {"rp": 1.0, "n": None, "spare": False, "pp": 0.0, "fp": 0.0}
    for part in spec.split(","):
        key, _, value = part.partition("=")
        out[key] = True if key == "spare" else int(value) if key == "n" else float(value)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: the default model's Q4_1 form)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--candidates", nargs="+", default=DEFAULT_CANDIDATES,
                   help="rp=PENALTY[,n=LAST_N][,spare] and/or pp=PRESENCE, fp=FREQUENCY (see parse_candidate)")
    p.add_argument("--check", action="store_true", help="first check the loop against ChatSession")
    p.add_argument("--json", help="also write the rows (and every reply) here")
    args = p.parse_args()
    torch.set_num_threads(1)

    path = Path(args.model) if args.model else default_model(quantized=True)
    model, tokenizer = load_model(path, pack=True), load_tokenizer(path)
    prompts = json.loads(PROMPTS.read_text())
    base, _ = chat_generation_config(path, {"max_new_tokens": args.max_new_tokens})
    if args.check:
        check_loop(model, tokenizer, base.updated(repetition_penalty=1.15), prompts[0])
    rows = []
    print("| candidate | end of turn | length limit | of which looping | mean reply (tokens) | repeated 4-grams |")
    print("|---|---|---|---|---|---|")
    for spec in args.candidates:
        c = parse_candidate(spec)
        config = base.updated(repetition_penalty=c["rp"], presence_penalty=c["pp"],
                              frequency_penalty=c["fp"]).ending_turns(tokenizer)
        start = time.perf_counter()
        ended, lengths, rep, grams, loops, replies = 0, [], 0, 0, 0, []
        for seed, prompt in enumerate(prompts):
            ids, eot = reply(model, tokenizer, config, prompt, seed, c["n"], c["spare"])
            r, g = repeated_ngrams(ids)
            ended, rep, grams = ended + eot, rep + r, grams + g
            loops += not eot and r > 0.2 * max(g, 1)  # a reply cut at the limit while going round in circles
            lengths.append(len(ids))
            replies.append(dict(prompt=prompt, end_of_turn=eot, tokens=len(ids), repeated=r / max(g, 1),
                                text=tokenizer.decode(ids, skip_special_tokens=True)))
        row = dict(candidate=spec, **c, end_of_turn=ended, length_limit=len(prompts) - ended, looping=loops,
                   mean_tokens=sum(lengths) / len(lengths), repeated_4grams=rep / max(grams, 1),
                   seconds=time.perf_counter() - start, replies=replies)
        rows.append(row)
        print(f"| {spec} | {ended}/{len(prompts)} | {len(prompts) - ended} | {loops} | {row['mean_tokens']:.0f} | "
              f"{100 * row['repeated_4grams']:.1f}% |", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
