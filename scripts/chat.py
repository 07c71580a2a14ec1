"""Chat with a Llama model, every step written out by hand: the walkthrough as one short script.

    python scripts/chat.py --prompt "What is a KV cache?" --verbose
    python scripts/chat.py path/to/model --system "Be brief."        # questions from stdin, Ctrl-D ends

`minillama chat` does the same through `minillama.generate` and `ChatSession`; this file spells out what
they do: 1. messages, 2. render the chat template, 3. tokenize, 4. prefill, 5-8. the decode loop.
--verbose prints each stage to stderr, so stdout holds only the reply.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from minillama import GenerationConfig, LlamaForCausalLM, MinillamaError, Tokenizer
from minillama import load_model, load_tokenizer, resolve_model
from minillama.hub import DEFAULT_MODEL
from minillama.inspect import token_table, visible
from minillama.sampling import greedy, make_generator, process_logits, sample


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


@torch.inference_mode()
def reply(model: LlamaForCausalLM, tokenizer: Tokenizer, messages: list[dict], settings: GenerationConfig,
          generator: torch.Generator, verbose: bool) -> str:
    """Stream the assistant's answer to `messages` on stdout and return its text."""
    # 2. render the chat template: the messages become one string with the model's special tokens,
    #    ending with the assistant header so the model's next tokens are the answer.
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    # 3. tokenize: the template already wrote <|begin_of_text|>, so add no special tokens again.
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if verbose:
        log(f"--- rendered prompt ---\n{prompt}\n--- {len(ids)} tokens ---\nindex      id  piece")
        for row in token_table(tokenizer, ids):
            log(f"{row['index']:>5} {row['id']:>7}  {row['piece']}")
    if len(ids) + settings.max_new_tokens > model.config.max_position_embeddings:
        raise MinillamaError(f"{len(ids)} prompt tokens + {settings.max_new_tokens} new ones exceed the context "
                             f"of {model.config.max_position_embeddings}; lower --max-new-tokens or start afresh")

    # 4. prefill: one forward pass over the whole prompt writes every token's keys and values into the
    #    KV cache; only the last position's logits are needed, to choose the first new token.
    cache = model.new_cache(batch_size=1, max_seq_len=len(ids) + settings.max_new_tokens)
    start = time.perf_counter()
    logits = model(torch.tensor([ids], device=model.device), cache=cache, input_pos=0, logits_to_keep=1)  # (1, 1, V)
    prefill_done = time.perf_counter()

    stream = tokenizer.stream_decoder()  # holds text back until a multi-byte character is complete
    generated: list[int] = []
    text = ""
    for step in range(settings.max_new_tokens):
        # 5. sample: filter the logits (repetition penalty over all ids so far; temperature, top-k,
        #    top-p when sampling), then take the argmax or draw from the softmax with our generator.
        scores = process_logits(logits[:, -1], torch.tensor([ids + generated], device=model.device), settings)
        token = int(greedy(scores) if settings.is_greedy else sample(scores, generator))  # (1,) -> int
        generated.append(token)
        if verbose:
            log(f"[sampled {token} {visible(tokenizer.piece_text(token))}]")
        # 6. stop on any of the model's end ids (Llama 3 Instruct ends a turn with <|eot_id|>).
        if token in settings.eos_token_id:
            break
        # 7. stream: print the new text now rather than at the end.
        piece = stream.push(token)
        text += piece
        print(piece, end="", flush=True)
        if step == settings.max_new_tokens - 1:
            break  # the limit: this token is never fed back
        # 8. decode: feed the token back; its keys and values go into the cache at slot `input_pos`,
        #    and attention reads the earlier ones from the cache instead of recomputing them.
        logits = model(torch.tensor([[token]], device=model.device), cache=cache, input_pos=len(ids) + step)
    piece = stream.flush()
    print(piece, flush=True)
    if verbose:
        prefill_s, decode_s = prefill_done - start, time.perf_counter() - prefill_done
        log(f"[prefill: {len(ids)} tokens in {prefill_s:.3f} s ({len(ids) / prefill_s:.1f} tok/s) | decode: "
            f"{len(generated)} tokens in {decode_s:.3f} s ({len(generated) / max(decode_s, 1e-9):.1f} tok/s)]")
    return text + piece


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help="model directory, hub id or the default model")
    p.add_argument("--prompt", help="ask this one question and exit (default: read questions from stdin)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", "-n", type=int, help="the most tokens in one reply")
    p.add_argument("--temperature", type=float, help="0 means greedy (default: the model's generation_config)")
    p.add_argument("--top-p", type=float, help="keep the smallest set of tokens reaching probability p")
    p.add_argument("--seed", type=int, help="seed the sampler, to reproduce a reply")
    p.add_argument("--verbose", "-v", action="store_true", help="print every stage to stderr")
    p.add_argument("--device", help="cpu, cuda, mps (default: cuda if there is one)")
    p.add_argument("--dtype", help="float32, bfloat16, float16")
    args = p.parse_args()
    try:
        path = resolve_model(args.model)
        # The model's sampling defaults and end ids (generation_config.json), with the flags on top;
        # asking for a temperature above 0 means asking to sample.
        settings = GenerationConfig.from_model_dir(path).updated(
            temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens,
            do_sample=None if args.temperature is None else args.temperature > 0)
        tokenizer = load_tokenizer(path)
        model = load_model(path, device=args.device, dtype=args.dtype)
        generator = make_generator(model.device, args.seed)  # all randomness comes from here

        # 1. messages: the conversation as a list of {"role", "content"} dicts.
        messages = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is not None:
            messages.append({"role": "user", "content": args.prompt})
            reply(model, tokenizer, messages, settings, generator, args.verbose)
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
                answer = reply(model, tokenizer, messages, settings, generator, args.verbose)
                messages.append({"role": "assistant", "content": answer})
    except MinillamaError as e:
        log(f"chat.py: error: {e}")
        return 2
    except KeyboardInterrupt:
        log()
        return 130


if __name__ == "__main__":
    sys.exit(main())
