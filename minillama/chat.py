"""A multi-turn chat whose earlier turns stay in the KV cache.

Each turn renders the whole conversation with the model's chat template, tokenizes it, and compares it
with the tokens already in the cache: only the part after the longest common prefix is prefilled.
Usually that is just the new user message (and the template's glue around it), so a long conversation
does not get slower turn by turn.

When the conversation no longer fits the context, the turn is refused with a message saying so: nothing
is silently dropped from the start of the conversation.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minillama.errors import MinillamaError
from minillama.fast import CompiledEngine, compiled_engine_applies
from minillama.generation import EagerEngine, GenerationConfig, generate
from minillama.sampling import make_generator

DEFAULT_CONTEXT = 8192  # KV cache slots allocated when the model's own context is longer


class ContextFull(MinillamaError):
    """The conversation no longer fits the model's context."""


@dataclass
class TurnStats:
    prompt_tokens: int  # tokens prefilled for this turn (not those reused from the cache)
    prompt_seconds: float  # prefill and the first token
    generated_tokens: int
    generate_seconds: float  # the rest of the decode
    stop_reason: str | None  # "eos", "length", "stop_string", "context" or "interrupted"
    context_used: int  # tokens in the conversation after this turn

    def line(self) -> str:
        """One line for the user, llama.cpp style: prompt and generation speed."""
        prompt_rate = self.prompt_tokens / self.prompt_seconds if self.prompt_seconds else 0.0
        decode_steps = max(self.generated_tokens - 1, 0)
        gen_rate = decode_steps / self.generate_seconds if self.generate_seconds else 0.0
        return (f"[prompt: {self.prompt_tokens} tokens, {prompt_rate:.1f} tok/s | "
                f"reply: {self.generated_tokens} tokens, {gen_rate:.1f} tok/s | context: {self.context_used}]")


class ChatSession:
    """A conversation with one model. `send(text)` streams the reply as text pieces.

    engine: "eager" (model.forward step by step) or "compiled" (the decode step compiled: CUDA graphs on a
            GPU; call `engine.warmup()` before the first reply to compile up front); None: compiled on a GPU
            where it applies, eager elsewhere. The session keeps one engine, whose KV cache holds the
            conversation so far.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, generation_config: GenerationConfig,
                 system: str | None = None, seed: int | None = None, context: int | None = None,
                 engine: str | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, generation_config.ending_turns(tokenizer)
        self.seed = seed
        self.context = min(model.config.max_position_embeddings, context or DEFAULT_CONTEXT)
        if engine is None:
            engine = "compiled" if model.device.type == "cuda" and compiled_engine_applies(model) else "eager"
        if engine == "compiled":
            self.engine = CompiledEngine(model, max_seq_len=self.context)
        elif engine == "eager":
            self.engine = EagerEngine(model, model.new_cache(batch_size=1, max_seq_len=self.context))
        else:
            raise MinillamaError(f"engine={engine!r}: choose 'eager' or 'compiled'")
        self.system = system
        self.clear()

    def clear(self) -> None:
        """Forget the conversation (the system prompt stays) and restart the random stream."""
        self.messages: list[dict[str, str]] = []
        self.cached_ids: list[int] = []  # tokens whose keys/values are in the cache, in order
        self.generator = make_generator(self.model.device, self.seed)
        self.last_stats: TurnStats | None = None

    def set_system(self, text: str | None) -> None:
        """Change the system prompt; the cache stays valid up to where the rendering changes."""
        self.system = text or None

    def conversation(self) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces.

        Stopping the iteration early (Ctrl-C, `close()`) keeps what was said so far as the reply.
        """
        if not text.strip():
            raise MinillamaError("the message is empty; type something to send")
        messages = self.conversation() + [{"role": "user", "content": text}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        room = self.context - len(ids)
        if room < 1:
            raise ContextFull(f"the conversation needs {len(ids)} tokens but the context holds {self.context}; "
                              "/save it if you like, then /clear to start over")
        reused = common_prefix(self.cached_ids, ids)
        if reused == len(ids):  # the cache already holds everything: re-feed the last token to get logits
            reused -= 1
        self.messages.append({"role": "user", "content": text})
        self.cached_ids = ids[:reused]  # slots past here are about to be overwritten

        stream = self.tokenizer.stream_decoder(skip_special_tokens=True)
        generation = generate(self.model, ids[reused:], self.config, engine=self.engine, input_pos=reused,
                              generator=self.generator, tokenizer=self.tokenizer, history=ids[:reused],
                              stop_at_context=True)
        pieces: list[str] = []
        start = first = time.perf_counter()
        try:
            for token in generation:
                if len(generation.tokens[0]) == 1:
                    first = time.perf_counter()
                piece = stream.push(token) if generation.stop_reason != "eos" else ""  # no end-of-turn text
                if piece:
                    pieces.append(piece)
                    yield piece
            tail = stream.flush()
            if tail:
                pieces.append(tail)
                yield tail
        finally:  # also on Ctrl-C or an early close: keep the partial reply and what the cache holds
            end = time.perf_counter()
            self.messages.append({"role": "assistant", "content": "".join(pieces)})
            self.cached_ids = (ids + generation.tokens[0])[:generation.input_pos]
            n = len(generation.tokens[0])
            self.last_stats = TurnStats(len(ids) - reused, (first if n else end) - start, n,
                                        end - first if n else 0.0, generation.stop_reason or "interrupted",
                                        len(ids) + n)

    def transcript(self, **extra) -> dict:
        """The conversation and the settings that produced it, as saved by /save."""
        return {"format": "minillama-chat/1", "system": self.system, "messages": self.messages,
                "settings": {**asdict(self.config), "seed": self.seed, "context": self.context}, **extra}

    def load_transcript(self, data: dict) -> None:
        """Continue a saved conversation (its messages and system prompt)."""
        messages = data.get("messages") if isinstance(data, dict) else None
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise MinillamaError("not a minillama chat transcript (needs a 'messages' list of role/content)")
        self.clear()
        self.system = data.get("system") if isinstance(data.get("system"), str) else self.system
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists (os.path.commonprefix works on any sequences)."""
    return len(os.path.commonprefix([a, b]))


def write_json_atomic(path: str | Path, data: dict) -> Path:
    """Write JSON to a temp file beside `path`, then rename it over: a crash never leaves half a file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MinillamaError(f"{path}: is a directory; give a file name")
    if not path.parent.is_dir():
        raise MinillamaError(f"{path.parent}: no such directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
