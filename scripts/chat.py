"""Chat with a Llama model, every step written out by hand: the walkthrough as one short script.

    python scripts/chat.py --prompt "What is a KV cache?" --verbose
    python scripts/chat.py path/to/model --system "Be brief."        # questions from stdin, Ctrl-D ends

`minillama chat` does the same through `minillama.generate` and `ChatSession`; this file spells out what
they do, in numbered stages:
  1. messages   the conversation as a list of {"role", "content"} dicts
  2. template   the chat template renders them into one prompt string
  3. tokens     the prompt string becomes token ids
  4. prefill    one forward pass over the prompt fills the KV cache
  5. sample     the next token from the last logits (settings, then the top candidates' probabilities)
  6. stop       end of turn, or the length limit
  7. stream     the new text, printed as it comes
  8. decode     the token goes back in: one forward pass for one token, reading the cache
--verbose logs each stage to stderr under its number and prints the reply on stdout after it, so the
two never mix on a terminal; without --verbose the reply streams.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from minillama import GenerationConfig, LlamaForCausalLM, MinillamaError, Tokenizer
from minillama import load_model, load_tokenizer, resolve_model
from minillama.chat import chat_generation_config, describe_sampling, why_stopped
from minillama.hub import DEFAULT_MODEL
from minillama.model_info import token_table, visible
from minillama.sampling import greedy, make_generator, process_logits, sample

TOP_CANDIDATES = 3  # how many of the most likely next tokens --verbose shows at each step


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def log_prompt(tokenizer: Tokenizer, messages: list[dict], prompt: str, ids: list[int]) -> None:
    """Stages 1-3 for --verbose: the messages, the rendered prompt, its tokens."""
    count = f"{len(messages)} message" + ("s" if len(messages) > 1 else "")
    log(f"[1 messages] {count}: " + ", ".join(f"{m['role']} {m['content']!r}" for m in messages))
    log(f"[2 template] the chat template ({tokenizer.chat_template_source}) renders them as:\n{prompt}")
    log(f"[3 tokens] {len(ids)} tokens\nindex      id  piece")
    for row in token_table(tokenizer, ids):
        log(f"{row['index']:>5} {row['id']:>7}  {row['piece']}")


def log_step(tokenizer: Tokenizer, step: int, scores: torch.Tensor, token: int) -> None:
    """Stage 5 for --verbose: the top candidates' probabilities after the filters, and the pick."""
    probs = torch.softmax(scores[0].float(), dim=-1)  # (V,) what the draw uses (greedy: the argmax of it)
    top = torch.topk(probs, TOP_CANDIDATES)
    candidates = "  ".join(f"{visible(tokenizer.piece_text(int(i)))} {float(p):.1%}"
                           for p, i in zip(top.values, top.indices) if p > 0)  # not the tokens the filters removed
    log(f"[5 sample] step {step}: {candidates}  -> {token} {visible(tokenizer.piece_text(token))}")


@torch.inference_mode()
def reply(model: LlamaForCausalLM, tokenizer: Tokenizer, messages: list[dict], settings: GenerationConfig,
          generator: torch.Generator, verbose: bool, sources: dict[str, str]) -> str:
    """Answer `messages`: stream it on stdout (after the log with --verbose) and return its text.
    `sources` says where each setting came from (flag, model file, default), for the log."""
    # 2. template: the messages become one string with the model's special tokens, ending with the
    #    assistant header so the model's next tokens are the answer.
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # 3. tokens: the template already wrote <|begin_of_text|>, so add no special tokens again.
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if verbose:
        log_prompt(tokenizer, messages, prompt, ids)
    if len(ids) + settings.max_new_tokens > model.config.max_position_embeddings:
        raise MinillamaError(f"{len(ids)} prompt tokens + {settings.max_new_tokens} new ones exceed the context "
                             f"of {model.config.max_position_embeddings}; lower --max-new-tokens or start afresh")

    # 4. prefill: one forward pass over the whole prompt writes every token's keys and values into the
    #    KV cache; only the last position's logits are needed, to choose the first new token.
    cache = model.new_cache(batch_size=1, max_seq_len=len(ids) + settings.max_new_tokens)
    start = time.perf_counter()
    logits = model(torch.tensor([ids], device=model.device), cache=cache, input_pos=0, logits_to_keep=1)  # (1, 1, V)
    prefill_done = time.perf_counter()
    if verbose:
        seconds = prefill_done - start
        log(f"[4 prefill] {len(ids)} tokens in {seconds:.3f} s ({len(ids) / seconds:.1f} tok/s); "
            f"the KV cache holds {len(ids)}")
        log(f"[5 sample] {describe_sampling(settings, sources)}")

    stream = tokenizer.stream_decoder()  # holds text back until a multi-byte character is complete
    generated: list[int] = []
    text, reason = "", "length"
    for step in range(settings.max_new_tokens):
        # 5. sample: filter the logits (repetition penalty over all ids so far but the end-of-turn ones, which
        #    the prompt holds after every message: penalizing them keeps replies from ending; temperature, top-k,
        #    top-p, min-p when sampling), then take the argmax or draw from the softmax with our generator.
        counted = [i for i in ids + generated if i not in settings.eos_token_id]
        scores = process_logits(logits[:, -1], torch.tensor([counted], device=model.device), settings)
        token = int(greedy(scores) if settings.is_greedy else sample(scores, generator))  # (1,) -> int
        generated.append(token)
        if verbose:
            log_step(tokenizer, step, scores, token)
        # 6. stop on any of the model's end ids (Llama 3 Instruct ends a turn with <|eot_id|>).
        if token in settings.eos_token_id:
            reason = "eos"
            break
        # 7. stream: print the new text now rather than at the end (after the log with --verbose).
        piece = stream.push(token)
        text += piece
        if not verbose:
            print(piece, end="", flush=True)
        if step == settings.max_new_tokens - 1:
            break  # the limit: this token is never fed back
        # 8. decode: feed the token back; its keys and values go into the cache at slot `input_pos`,
        #    and attention reads the earlier ones from the cache instead of recomputing them.
        logits = model(torch.tensor([[token]], device=model.device), cache=cache, input_pos=len(ids) + step)
    tail = stream.flush()
    text += tail
    if verbose:
        decode_s = time.perf_counter() - prefill_done
        log(f"[6 stop] {why_stopped(reason, settings.max_new_tokens)}"
            + (f": {visible(tokenizer.piece_text(generated[-1]))}" if reason == "eos" else ""))
        log(f"[7 stream] the reply, {len(text)} characters, follows on stdout")
        log(f"[8 decode] {len(generated)} tokens in {decode_s:.3f} s ({len(generated) / max(decode_s, 1e-9):.1f} "
            f"tok/s); the KV cache holds {len(ids) + len(generated) - 1}")
    print(text if verbose else tail, flush=True)
    return text


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model directory, hub id or the default model")
    p.add_argument("--prompt", help="ask this one question and exit (default: read questions from stdin)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", "-n", type=int, help="the most tokens in one reply")
    p.add_argument("--temperature", type=float, help="0 means greedy (default: the model file's, else 0.8)")
    p.add_argument("--top-k", type=int, help="keep the k most likely tokens (default: the model file's, else 40)")
    p.add_argument("--top-p", type=float, help="keep the smallest set of tokens reaching probability p "
                                               "(default: the model file's, else 0.95)")
    p.add_argument("--min-p", type=float, help="drop tokens below min_p x the top one's probability "
                                               "(default: the model file's, else 0.05)")
    p.add_argument("--repeat-penalty", type=float, help="> 1 discourages tokens already in the conversation "
                                                        "(default: the model file's, else 1.15)")
    p.add_argument("--seed", type=int, help="seed the sampler, to reproduce a reply")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="log every stage (1-8 above) to stderr, then the reply on stdout")
    p.add_argument("--device", help="cpu, cuda, mps (default: cuda if there is one)")
    p.add_argument("--dtype", help="float32, bfloat16, float16")
    args = p.parse_args()
    try:
        path = resolve_model(args.model)
        # The model's sampling settings and end ids (generation_config.json), the chat's defaults for what it
        # leaves out (llama.cpp's sampling, a measured repeat penalty), the flags on top; asking for a temperature above 0 means asking to sample.
        settings, sources = chat_generation_config(path, dict(
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
            repetition_penalty=args.repeat_penalty, max_new_tokens=args.max_new_tokens, do_sample=None if args.temperature is None else args.temperature > 0))
        tokenizer = load_tokenizer(path)
        settings = settings.ending_turns(tokenizer)  # also stop at the template's end-of-turn token
        model = load_model(path, device=args.device, dtype=args.dtype)
        generator = make_generator(model.device, args.seed)  # all randomness comes from here

        # 1. messages: the conversation as a list of {"role", "content"} dicts.
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is not None:
            messages.append({"role": "user", "content": args.prompt})
            reply(model, tokenizer, messages, settings, generator, args.verbose, sources)
            return 0
        # Each turn re-renders and re-prefills the whole conversation: the simplest correct way.
        # (`minillama chat` keeps earlier turns in the KV cache and prefills only the new tokens.)
        while True:
            if sys.stdin.isatty():
                print(">>> ", end="", file=sys.stderr, flush=True)
            question = sys.stdin.readline()
            if not question:  # Ctrl-D or the end of piped input
                return 0
            if question.strip():
                messages.append({"role": "user", "content": question.strip()})
                answer = reply(model, tokenizer, messages, settings, generator, args.verbose, sources)
                messages.append({"role": "assistant", "content": answer})
    except MinillamaError as e:
        log(f"chat.py: error: {e}")
        return 2
    except KeyboardInterrupt:
        log()
        return 130


if __name__ == "__main__":
    sys.exit(main())
