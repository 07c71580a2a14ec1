"""Generation: one prefill over the prompt, then one decode step per new token through the KV cache.

`generate` returns a `Generation`, an iterator that yields each token id as soon as it is chosen, so
the caller can stream text; once it is exhausted, `.stop_reason` says why it ended ("eos", "length",
"stop_string" or "context"). Sampling settings and stop rules live in `GenerationConfig`, whose defaults
are transformers' and which a model directory's `generation_config.json` overrides.

With `prompt_lookup_num_tokens=K` (one prompt, eager engine) each forward also feeds up to K draft tokens
copied from earlier in the text (lookup.py) and keeps those the model would have chosen anyway: the same
tokens, fewer forwards.

This is the one generation loop. It drives an *engine*, anything with `forward(ids, input_pos, ...)` ->
last logits over its own KV cache: `EagerEngine` (model.forward, any batch) or `fast.CompiledEngine` (the
same forward compiled for one token, CUDA graphs on a GPU). Every stop rule, the repetition history, and
the pipe that reads tokens a few steps behind a GPU live here, once.

Batches are left-padded: every row's last prompt token sits in the same column, so one decode step
serves all rows. `attention_mask` (B, T) marks real tokens; padding gets no attention, and positions
count real tokens only, so each row computes what it would alone.

Shapes: B batch, T prompt tokens, V vocabulary, S_max cache slots.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minillama.capture import active_taps
from minillama.errors import MinillamaError, read_json_object
from minillama.fast import compiled_engine_applies, compiled_engine_for
from minillama.lookup import check_prompt_lookup, find_draft
from minillama.sampling import SamplingSettings, check_sampling_args, make_generator, next_token, seen_tokens
from minillama.stopping import STOP_CONTEXT, STOP_EOS, STOP_LENGTH, STOP_STRING, stop_reason  # noqa: F401 (re-exported)

# Tokens that close a turn in common chat formats (Llama 3, ChatML). An instruct model ends its reply
# with one; a generation_config.json that forgets it would otherwise let the model talk forever.
END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>")


@dataclass
class GenerationConfig(SamplingSettings):
    """Sampling settings (inherited: do_sample, temperature, top_k, top_p, min_p, repetition_penalty) plus
    when to stop."""

    max_new_tokens: int = 256  # the most tokens one call generates
    eos_token_id: list[int] = field(default_factory=list)  # stop when any of these is generated
    pad_token_id: int | None = None  # what finished rows of a batch yield (default: the first eos id, else 0)
    stop_strings: list[str] = field(default_factory=list)  # stop when the generated text contains one
    prompt_lookup_num_tokens: int | None = None  # draft tokens per forward copied from the text (lookup.py); 0: off

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "generation_config.json") -> GenerationConfig:
        """Read the fields minillama knows from a parsed generation_config.json; null means the default."""
        if not isinstance(d, dict):
            raise MinillamaError(f"{source}: expected a JSON object, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known and v is not None}
        try:
            return cls().updated(**values)
        except MinillamaError as e:
            raise MinillamaError(f"{source}: {e}") from None

    @classmethod
    def from_model_dir(cls, path: str | Path) -> GenerationConfig:
        """The model's defaults: generation_config.json if there is one, eos/pad ids from config.json otherwise."""
        path = Path(path)
        d: dict[str, Any] = {}
        for name in ("config.json", "generation_config.json"):  # the second wins where both set an id
            file = path / name
            if not file.is_file():
                continue
            data = read_json_object(file)
            if name == "config.json":  # only the token ids: its other keys are the model's shape
                data = {k: data.get(k) for k in ("eos_token_id", "pad_token_id")}
            d.update({k: v for k, v in data.items() if v is not None})
            source = str(file)
        return cls.from_dict(d, source=source) if d else cls()

    def updated(self, **overrides: Any) -> GenerationConfig:
        """A copy with the given fields replaced; None values are ignored (so CLI flags pass straight in)."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise MinillamaError(f"unknown generation setting {unknown[0]!r}; known: {', '.join(sorted(known))}")
        changes = {k: v for k, v in overrides.items() if v is not None}
        if "eos_token_id" in changes:
            changes["eos_token_id"] = _id_list("eos_token_id", changes["eos_token_id"], allow_empty=True)
        if "stop_strings" in changes:
            stops = changes["stop_strings"]
            stops = [stops] if isinstance(stops, str) else stops
            if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) and s for s in stops):
                raise MinillamaError(f"stop_strings must be a list of non-empty strings, got {stops!r}")
            changes["stop_strings"] = list(stops)
        if "pad_token_id" in changes:
            changes["pad_token_id"] = _id_list("pad_token_id", changes["pad_token_id"])[0]
        if "do_sample" in changes and not isinstance(changes["do_sample"], bool):
            raise MinillamaError(f"do_sample must be true or false, got {changes['do_sample']!r}")
        config = dataclasses.replace(self, **changes)
        config.check()
        return config

    def ending_turns(self, tokenizer: Any) -> GenerationConfig:
        """These settings, also stopping at the end of a chat turn: the tokenizer's eos token and any
        end-of-turn token (`END_OF_TURN_TOKENS`) its vocabulary has. Chat, pipeline and `minillama generate`
        all stop by this one rule."""
        extra = [tokenizer.eos_token_id, *(tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)]
        ids = list(dict.fromkeys([*self.eos_token_id, *(i for i in extra if i is not None)]))
        return self.updated(eos_token_id=ids)

    def check(self) -> None:
        """Raise `MinillamaError` for any invalid value."""
        check_sampling_args(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        check_prompt_lookup(self.prompt_lookup_num_tokens)

    @property
    def pad_id(self) -> int:
        if self.pad_token_id is not None:
            return self.pad_token_id
        return _id_list("eos_token_id", self.eos_token_id)[0] if self.eos_token_id else 0


def _id_list(name: str, value: Any, allow_empty: bool = False) -> list[int]:
    """An id or a list of ids, as a list; bad entries raise."""
    ids = list(value) if isinstance(value, (list, tuple)) else [value]
    if (not ids and not allow_empty) or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise MinillamaError(f"{name} must be a token id or a list of ids, got {value!r}")
    return ids


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of different lengths as one left-padded batch: (input_ids (B, T), attention_mask (B, T))."""
    T = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, T - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


# ---- Engines: where the logits come from -------------------------------------------------------------

class EagerEngine:
    """model.forward over a KV cache, one call per prefill or decode step: any batch, any padding.

    The cache attends over its filled slots only, so a long cache costs nothing until it fills.
    """

    kind = "eager"
    lag = 0  # each token is read as soon as it is chosen (on a CPU the read costs nothing)

    def __init__(self, model: torch.nn.Module, cache: Any):
        self.model, self.cache = model, cache
        self.max_seq_len = cache.max_seq_len

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, input_pos: int, position_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The last position's logits (B, V) for ids (B, T) written at slot input_pos."""
        logits = self.model(ids, cache=self.cache, input_pos=input_pos, position_ids=position_ids,
                            key_padding_mask=key_padding_mask, logits_to_keep=1)  # (B, 1, V)
        return logits[:, -1]

    @torch.inference_mode()
    def forward_all(self, ids: torch.Tensor, input_pos: int) -> torch.Tensor:
        """Every position's logits (B, T, V) for ids (B, T) written at slot input_pos: what prompt lookup
        checks its draft with (a chunk after the cached tokens, like a prefill's)."""
        return self.model(ids, cache=self.cache, input_pos=input_pos)


def _pick_engine(model: torch.nn.Module, engine: Any, B: int, padded: bool, needed: int, lookup: bool) -> Any:
    """The engine a `generate` call runs on: the one given, or a new one of the named kind."""
    if engine is not None and not isinstance(engine, str):
        return engine  # a running engine (a chat's): it holds the tokens before input_pos
    if engine is None:  # compiled where it pays: one unpadded prompt on a GPU, no capture/intervene hooks
        applies = B == 1 and not padded and compiled_engine_applies(model) and not active_taps(model) and not lookup
        engine = "compiled" if applies and model.device.type == "cuda" else "eager"
    if engine == "eager":  # a cache just long enough for this call (the last token is never fed back)
        return EagerEngine(model, model.new_cache(B, needed))
    if engine == "compiled":
        if lookup:
            raise MinillamaError(LOOKUP_ENGINE)
        if B != 1 or padded:
            raise MinillamaError("engine='compiled' runs one unpadded prompt; use engine='eager' for batches")
        return compiled_engine_for(model, needed)
    raise MinillamaError(f"engine={engine!r}: choose 'eager' or 'compiled'")


# Prompt lookup checks 1 + K tokens per forward; the compiled engine's graph takes one.
LOOKUP_ENGINE = ("prompt lookup runs on the eager engine (the compiled step takes one token per forward); "
                 "use engine='eager' (--engine eager) or turn prompt lookup off")


# ---- Reading tokens behind the device ----------------------------------------------------------------

class TokenPipe:
    """Chosen tokens on their way to the host, read `lag` steps after they were chosen.

    With lag 0 a token is read at once (one wait for the device per step: nothing on a CPU). With lag > 0
    (a GPU) each token is copied into pinned host memory without blocking and read once its copy has
    completed, `lag` steps later, so the GPU always has work queued while Python checks the stop rules.
    Steps run past a stop are wasted work (at most `lag`), never a stall.
    """

    def __init__(self, lag: int, batch_size: int, device: torch.device):
        self.lag, self.cuda = lag, device.type == "cuda" and lag > 0
        ring = lag + 1
        self.host = torch.empty(ring, batch_size + 1, dtype=torch.long, pin_memory=self.cuda)  # [ids..., healthy]
        self.copied = [torch.cuda.Event() if self.cuda else None for _ in range(ring)]
        self.pushed = self.popped = 0

    def __len__(self) -> int:
        return self.pushed - self.popped

    def push(self, ids: torch.Tensor, healthy: torch.Tensor) -> None:
        slot = self.pushed % len(self.copied)
        with torch.inference_mode():
            self.host[slot, :-1].copy_(ids, non_blocking=self.cuda)
            self.host[slot, -1].copy_(healthy.long(), non_blocking=self.cuda)  # (same dtype: a plain D2H copy)
        if self.cuda:
            self.copied[slot].record()
        self.pushed += 1

    def due(self) -> bool:
        """Whether the oldest token should be read now (more than `lag` tokens in flight)."""
        return len(self) > self.lag

    def pop(self) -> tuple[list[int], bool]:
        """The oldest token ids (B,) and whether its logits were finite."""
        slot = self.popped % len(self.copied)
        if self.cuda:
            self.copied[slot].synchronize()
        self.popped += 1
        row = self.host[slot].tolist()
        return row[:-1], bool(row[-1])


# ---- The loop ----------------------------------------------------------------------------------------

class Generation:
    """The running generation that `generate` returns. Iterate it for token ids.

    Single prompt: yields an int per step. Batch: yields a LongTensor (B,) per step, where rows that
    have finished yield the pad id, until every row has finished.

    After (or during) iteration:
        stop_reason   why the single prompt (or row 0) stopped: "eos", "length", "stop_string", "context";
                      None while running
        stop_reasons  the same for every row
        tokens        the generated ids, one list per row
        engine        the engine, whose KV cache holds `input_pos` tokens (the last generated one is not in it)
        input_pos     how many tokens the cache holds: the one position counter. Pass `engine` and
                      `input_pos` to the next `generate` to continue.
        drafted       prompt lookup: draft tokens fed to the model so far
        accepted      of those, the ones the model agreed with: each one a token without a forward of its own
    """

    def __init__(self, engine: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 config: GenerationConfig, generator: torch.Generator | None, input_pos: int, limit: int,
                 tokenizer: Any, batched: bool, history: Sequence[int] | None = None,
                 cached_ids: Sequence[int] | None = None):
        self.engine, self.config, self.generator, self.tokenizer = engine, config, generator, tokenizer
        self.batched, self.input_pos, self.limit = batched, input_pos, limit
        B, T = input_ids.shape
        self._first_slot = input_pos + T  # where the first generated token's keys/values will go
        self.stop_reasons: list[str | None] = [None] * B
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self.vocab_size = engine.model.config.vocab_size
        self.drafted = self.accepted = 0
        if config.prompt_lookup_num_tokens:
            self._steps = self._run_lookup(input_ids, history, list(cached_ids or []))
        else:
            self._steps = self._run(input_ids, attention_mask, history)

    @property
    def stop_reason(self) -> str | None:
        return self.stop_reasons[0]

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> int | torch.Tensor:
        return next(self._steps)

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             history: Sequence[int] | None) -> Iterator[int | torch.Tensor]:
        B, T = input_ids.shape
        start = self.input_pos
        position_ids, key_padding_mask, next_pos = self._padding(attention_mask, B, T)
        seen = self._seen(input_ids, attention_mask, history)  # (B, V) what the repetition penalty counts
        finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # (B,) rows that stopped
        penalties = self.config.presence_penalty or self.config.frequency_penalty
        counts = torch.zeros(B, self.vocab_size, device=input_ids.device) if penalties else None  # (B, V) generated
        pipe = TokenPipe(self.engine.lag if B == 1 else 0, B, input_ids.device)

        logits = self.engine.forward(input_ids, start, position_ids, key_padding_mask)  # the prefill: (B, V)
        for step in range(self.limit):
            ids, healthy = self._choose(logits, seen, finished, counts)  # (B,) on the device
            pipe.push(ids, healthy)
            if pipe.due():
                yield from self._emit(*pipe.pop(), finished)
                if all(r is not None for r in self.stop_reasons):
                    return
            if step + 1 < self.limit:  # feed the chosen tokens back: one decode step at the next slot
                if next_pos is not None:
                    position_ids = next_pos + step  # (B, 1)
                logits = self.engine.forward(ids[:, None], start + T + step, position_ids, key_padding_mask)
        while len(pipe) and not all(r is not None for r in self.stop_reasons):
            yield from self._emit(*pipe.pop(), finished)

    def _run_lookup(self, input_ids: torch.Tensor, history: Sequence[int] | None,
                    cached_ids: list[int]) -> Iterator[int]:
        """The loop with prompt lookup (lookup.py), for one unpadded prompt: each forward feeds the last chosen
        token and a draft of up to K tokens copied from earlier in the text, then chooses the next token after
        every position in turn, as `_run` would after each step, for as long as its choice equals the draft.

        Exact: every token is chosen by `_choose` from the logits after exactly the tokens before it, with the
        penalties and the sampling draw `_run` would use at that step (one draw per token chosen, in order), so
        seeded sampling gives the same tokens too. Rejected drafts' keys/values stay in the cache past
        `input_pos`, where the next forward writes over them before anything attends to them."""
        K = self.config.prompt_lookup_num_tokens
        seen = self._seen(input_ids, None, history)  # (1, V)
        finished = torch.zeros(1, dtype=torch.bool, device=input_ids.device)
        penalties = self.config.presence_penalty or self.config.frequency_penalty
        counts = torch.zeros(1, self.vocab_size, device=input_ids.device) if penalties else None  # (1, V)
        text = cached_ids + input_ids[0].tolist()  # what drafts are copied from; each chosen token joins it

        rows = self.engine.forward(input_ids, self.input_pos)  # the prefill: logits (1, V) after the prompt
        draft: list[int] = []
        while True:
            for i in range(len(rows)):  # row i: the logits after the last token and draft[:i]
                ids, healthy = self._choose(rows[i:i + 1], seen, finished, counts)
                token = int(ids[0])
                yield from self._emit([token], bool(healthy), finished)
                if self.stop_reasons[0] is not None:
                    return
                text.append(token)
                if i == len(draft) or token != draft[i]:
                    break  # the model chose otherwise (or the draft is used up): what follows is not valid
                self.accepted += 1
            # `token` is in no cache yet; it goes to slot input_pos, its draft after it. Never draft past the
            # limit: a forward of n rows chooses up to n tokens.
            draft = find_draft(text, min(K, self.limit - len(self.tokens[0]) - 1))
            self.drafted += len(draft)
            fed = torch.tensor([[token, *draft]], device=input_ids.device)  # (1, 1 + len(draft))
            rows = self.engine.forward_all(fed, self.input_pos)[0]  # (1 + len(draft), V)

    def _padding(self, attention_mask: torch.Tensor | None, B: int, T: int):
        """For a left-padded batch: RoPE positions of the prompt (B, T), the key mask over every cache slot
        (B, S_max), and each row's next position (B, 1). All None without padding (the model's defaults)."""
        if attention_mask is None:
            return None, None, None
        start = self.input_pos
        # The mask may cover the cached tokens too (B, start + T); if it covers only the new ones,
        # the cached ones are real.
        if attention_mask.shape[1] == T:
            attention_mask = torch.cat([attention_mask.new_ones(B, start), attention_mask], dim=1)
        real = attention_mask.bool()  # (B, start + T)
        # Positions count real tokens only, so a padded row sees the positions it would see alone;
        # pads get position 1, as in transformers (their outputs are never used).
        positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)  # (B, start + T)
        # One mask over every cache slot: the prompt's pads are False, and every slot after the
        # prompt is True already, since each holds a generated token by the time it is attended.
        key_padding_mask = torch.ones(B, self.engine.max_seq_len, dtype=torch.bool, device=real.device)
        key_padding_mask[:, : start + T] = real
        return positions[:, start:], key_padding_mask, positions[:, -1:] + 1

    def _seen(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
              history: Sequence[int] | None) -> torch.Tensor:
        """(B, V) tokens the repetition penalty applies to: the new prompt tokens (not the pads, as in
        transformers), the earlier turns in the cache (`history`), then each generated token."""
        T = input_ids.shape[1]
        seen = seen_tokens(input_ids, self.vocab_size, None if attention_mask is None else attention_mask[:, -T:])
        if history:
            seen |= seen_tokens(torch.as_tensor([list(history)], device=input_ids.device), self.vocab_size)
        return seen

    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor, seen: torch.Tensor, finished: torch.Tensor,
                counts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Next ids (B,) from logits (B, V), and whether every running row's logits were finite (a 0-d bool),
        both left on the device. Finished rows get the pad id. The ids are marked seen (and counted)."""
        # One max per row is enough to catch a NaN or +inf anywhere in it (max propagates NaN).
        healthy = (torch.isfinite(logits.amax(dim=-1)) | finished).all()
        ids = next_token(logits, seen, self.config, self.generator, counts=counts)  # (B,)
        ids = ids.masked_fill(finished, self.config.pad_id)
        seen.scatter_(1, ids[:, None], True)
        if counts is not None:
            counts.scatter_add_(1, ids[:, None], (~finished[:, None]).float())
        return ids, healthy

    def _emit(self, ids: list[int], healthy: bool, finished: torch.Tensor) -> Iterator[int | torch.Tensor]:
        """Hand one step's tokens to the caller, applying every stop rule to each running row."""
        if not healthy:
            raise MinillamaError("the model produced NaN or infinite logits; its weights or the dtype "
                                 "do not work (try float32)")
        for b, token in enumerate(ids):
            if self.stop_reasons[b] is not None:
                continue  # finished earlier: this is padding
            self.tokens[b].append(token)
            self.stop_reasons[b] = self._stop_rule(b, token)
            if self.stop_reasons[b] is not None:
                finished[b] = True
        step = max(len(t) for t in self.tokens)
        self.input_pos = self._first_slot + step - 1  # the token just handed over is not in the cache yet
        yield torch.tensor(ids) if self.batched else ids[0]

    def _stop_rule(self, b: int, token: int) -> str | None:
        """Why row b stops after `token`, or None (stopping.py: the rules the engine applies too)."""
        c = self.config
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        return stop_reason(self.tokens[b], c.eos_token_id, c.stop_strings, self.limit, c.max_new_tokens, decode)


def generate(model: torch.nn.Module, input_ids: Any, generation_config: GenerationConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             engine: str | Any | None = None, input_pos: int = 0, tokenizer: Any = None,
             stop_strings: list[str] | None = None, history: Sequence[int] | None = None,
             cached_ids: Sequence[int] | None = None, stop_at_context: bool = False, **overrides: Any) -> Generation:
    """Generate tokens after a prompt; returns a `Generation` that yields them one step at a time.

    input_ids:         one prompt (list of ints, 1-D tensor or (1, T)) -> yields ints;
                       a batch (B, T) tensor, or a list of id lists (left-padded here) -> yields (B,) tensors
    generation_config: settings (default: the model's own `model.generation_config` if it has one, else
                       transformers' defaults); `overrides` replace single fields (temperature=0.7, ...)
    attention_mask:    (B, T) or (B, input_pos + T), 1 for real tokens and 0 for left padding
    generator:         a torch.Generator on the model's device, for reproducible sampling
    engine:            "eager" (model.forward step by step), "compiled" (the same forward compiled for one
                       token; CUDA graphs on a GPU; one unpadded prompt), an engine already holding
                       `input_pos` tokens (from a previous `Generation.engine`, e.g. a chat's earlier turns:
                       then only `input_ids`, the new tokens, are prefilled), or None: compiled on a GPU
                       where it applies, eager otherwise. Every engine yields the same tokens.
    tokenizer:         needed for stop strings (anything with `decode(ids) -> str`)
    history:           one prompt only: ids already in the cache (a chat's earlier turns) that the
                       repetition penalty counts too, as it would if the whole conversation were fed again
    cached_ids:        one prompt only: the `input_pos` ids the running engine's cache holds, which prompt
                       lookup copies drafts from too (the prompt and the reply always count)
    stop_at_context:   when prompt + max_new_tokens do not fit the context, generate until it is full and
                       stop with reason "context" (a chat does this); False: refuse the request

    Prompt lookup (`prompt_lookup_num_tokens=K`, lookup.py): one prompt on the eager engine; the tokens are
    those without it, greedy or seeded (up to the rounding a K + 1-token forward changes); `Generation.drafted`
    and `.accepted` count its drafts.

    Every check (settings, ids, context length) happens here, before any model work.
    """
    config = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    config = config.updated(stop_strings=stop_strings, **overrides)
    if config.stop_strings and tokenizer is None:
        raise MinillamaError("stop strings need a tokenizer to decode the generated text; pass tokenizer=")
    input_ids, attention_mask, batched = _check_prompt(model, input_ids, attention_mask, config, input_pos)
    B, T = input_ids.shape

    # Will it fit? Checked before anything is allocated or computed.
    if isinstance(input_pos, bool) or not isinstance(input_pos, int) or input_pos < 0:
        raise MinillamaError(f"input_pos must be a number of cached tokens >= 0, got {input_pos!r}")
    running = engine is not None and not isinstance(engine, str)
    if input_pos and not running:
        raise MinillamaError("input_pos > 0 needs the engine whose cache holds those tokens; pass engine=")
    context = model.config.max_position_embeddings
    if running:
        context = min(context, engine.max_seq_len)
        rows = getattr(engine.cache, "batch_size", 1)
        if rows != B:
            raise MinillamaError(f"the engine's cache holds {rows} rows but the prompt has {B}")
    limit = config.max_new_tokens
    if input_pos + T + limit > context:
        if not stop_at_context or input_pos + T >= context:
            raise MinillamaError(f"{input_pos + T} prompt tokens + max_new_tokens={limit} = {input_pos + T + limit} "
                                 f"exceeds the context of {context} tokens; shorten the prompt or lower "
                                 "max_new_tokens")
        limit = context - input_pos - T
    if history and B != 1:
        raise MinillamaError("history= is for a single prompt; a batch passes its full ids instead")
    lookup = bool(config.prompt_lookup_num_tokens)
    if cached_ids is not None and len(cached_ids) != input_pos:
        raise MinillamaError(f"cached_ids holds {len(cached_ids)} ids but the cache holds input_pos={input_pos}")
    if lookup and (B != 1 or attention_mask is not None):
        raise MinillamaError("prompt lookup decodes one unpadded prompt; turn it off for a batch or a padded prompt")
    if lookup and running and not hasattr(engine, "forward_all"):
        raise MinillamaError(LOOKUP_ENGINE)
    if generator is None and not config.is_greedy:
        generator = make_generator(model.device)  # fresh entropy; pass a seeded generator to reproduce a run

    engine = _pick_engine(model, engine, B, attention_mask is not None, input_pos + T + limit, lookup)
    return Generation(engine, input_ids, attention_mask, config, generator, input_pos, limit, tokenizer, batched,
                      history, cached_ids)


def _check_prompt(model: torch.nn.Module, input_ids: Any, attention_mask: Any, config: GenerationConfig,
                  input_pos: int) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """The prompt as ids (B, T) on the model's device, its padding mask (None when there is none) and
    whether it is a batch; raises for ids the model cannot take."""
    if isinstance(input_ids, (list, tuple)) and input_ids and isinstance(input_ids[0], (list, tuple)):
        padded, mask = left_pad(input_ids, config.pad_id)
        input_ids, attention_mask = padded, mask if attention_mask is None else attention_mask
    input_ids = torch.as_tensor(input_ids, dtype=torch.long) if not torch.is_tensor(input_ids) else input_ids
    if input_ids.ndim not in (1, 2):
        raise MinillamaError(f"input_ids must be a list of ids or a (batch, tokens) tensor, got shape "
                             f"{tuple(input_ids.shape)}")
    if input_ids.numel() == 0:
        raise MinillamaError("the prompt is empty; give at least one token")
    batched = input_ids.ndim == 2 and input_ids.shape[0] > 1
    input_ids = input_ids.reshape(-1, input_ids.shape[-1]).to(device=model.device, dtype=torch.long)  # (B, T)
    B, T = input_ids.shape
    vocab = model.config.vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise MinillamaError(f"token id {low if low < 0 else high} is outside the model's vocabulary (0..{vocab - 1})")
    if B > 1 and not 0 <= config.pad_id < vocab:
        raise MinillamaError(f"pad_token_id {config.pad_id} is outside the model's vocabulary (0..{vocab - 1}); "
                             "set pad_token_id to a valid id")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).to(model.device).reshape(B, -1)
        if attention_mask.shape[1] not in (T, input_pos + T):
            raise MinillamaError(f"attention_mask has {attention_mask.shape[1]} columns; expected {T} "
                                 f"(the prompt) or {input_pos + T} (cached and new tokens)")
        if bool(attention_mask.bool().all()):
            attention_mask = None  # no padding: take the plain causal path
    return input_ids, attention_mask, batched
