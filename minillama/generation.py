"""Generation: one prefill over the prompt, then one decode step per new token through the KV cache.

`generate` returns a `Generation`, an iterator that yields each token id as soon as it is chosen, so
the caller can stream text; once it is exhausted, `.stop_reason` says why it ended ("eos", "length"
or "stop_string"). Sampling settings and stop rules live in `GenerationConfig`, whose defaults are
transformers' and which a model directory's `generation_config.json` overrides.

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

from minillama.errors import MinillamaError, read_json_object
from minillama.fast import FastDecoder, decoder_for, fast_path_applies
from minillama.sampling import SamplingSettings, check_sampling_args, make_generator, next_token, seen_tokens

STOP_EOS, STOP_LENGTH, STOP_STRING = "eos", "length", "stop_string"


@dataclass
class GenerationConfig(SamplingSettings):
    """Sampling settings (inherited: do_sample, temperature, top_k, top_p, min_p, repetition_penalty) plus
    when to stop."""

    max_new_tokens: int = 256  # the most tokens one call generates
    eos_token_id: list[int] = field(default_factory=list)  # stop when any of these is generated
    pad_token_id: int | None = None  # what finished rows of a batch yield (default: the first eos id, else 0)
    stop_strings: list[str] = field(default_factory=list)  # stop when the generated text contains one

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

    def check(self) -> None:
        """Raise `MinillamaError` for any invalid value."""
        check_sampling_args(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
                            repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens)

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


class Generation:
    """The running generation that `generate` returns. Iterate it for token ids.

    Single prompt: yields an int per step. Batch: yields a LongTensor (B,) per step, where rows that
    have finished yield the pad id, until every row has finished.

    After (or during) iteration:
        stop_reason   why the single prompt (or row 0) stopped: "eos", "length", "stop_string"; None while running
        stop_reasons  the same for every row
        tokens        the generated ids, one list per row
        cache         the KV cache, holding `input_pos` tokens (the last generated token is not in it yet)
        input_pos     how many tokens the cache holds; pass both to the next `generate` to continue
    """

    def __init__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 config: GenerationConfig, generator: torch.Generator | None, cache: Any, input_pos: int,
                 tokenizer: Any, batched: bool, history: Sequence[int] | None = None):
        self.model, self.config, self.generator, self.tokenizer = model, config, generator, tokenizer
        self.history = history
        self.batched = batched
        self.cache, self.input_pos = cache, input_pos
        B = input_ids.shape[0]
        self.stop_reasons: list[str | None] = [None] * B
        self.tokens: list[list[int]] = [[] for _ in range(B)]
        self._steps = self._run(input_ids, attention_mask)

    @property
    def stop_reason(self) -> str | None:
        return self.stop_reasons[0]

    def __iter__(self) -> Generation:
        return self

    def __next__(self) -> int | torch.Tensor:
        return next(self._steps)

    # The work is done in the methods below under torch.inference_mode(). Each call enters and leaves
    # it, because a `with` block around the `yield`s would leave inference mode switched on in the
    # caller's code between steps.

    @torch.inference_mode()
    def _forward(self, ids: torch.Tensor, position_ids: torch.Tensor | None,
                 key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Run ids (B, T) through the model at slot `input_pos`; return the last position's logits (B, V)."""
        logits = self.model(ids, cache=self.cache, input_pos=self.input_pos, position_ids=position_ids,
                            key_padding_mask=key_padding_mask, logits_to_keep=1)  # (B, 1, V)
        self.input_pos += ids.shape[1]
        return logits[:, -1, :]

    @torch.inference_mode()
    def _choose(self, logits: torch.Tensor, seen: torch.Tensor,
                finished: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Next ids (B,) from logits (B, V), and whether every running row's logits were finite (a 0-d bool).

        Finished rows get the pad id. The ids are marked seen, for the repetition penalty.
        """
        # One max per row is enough to catch a NaN or +inf anywhere in it (max propagates NaN).
        healthy = (torch.isfinite(logits.amax(dim=-1)) | finished).all()
        ids = next_token(logits, seen, self.config, self.generator)  # (B,)
        ids = ids.masked_fill(finished, self.config.pad_id)
        seen.scatter_(1, ids[:, None], True)
        return ids, healthy

    def _run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> Iterator[int | torch.Tensor]:
        cfg, model = self.config, self.model
        B, T = input_ids.shape
        device = input_ids.device
        eos = set(cfg.eos_token_id)
        start = self.input_pos

        if attention_mask is None:
            position_ids = key_padding_mask = next_pos = None  # the model's defaults: all real, positions count on
        else:
            # The mask may cover the cached tokens too (B, start + T); if it covers only the new ones,
            # the cached ones are real.
            if attention_mask.shape[1] == T:
                attention_mask = torch.cat([attention_mask.new_ones(B, start), attention_mask], dim=1)
            real = attention_mask.bool()  # (B, start + T)
            # Positions count real tokens only, so a padded row sees the positions it would see alone;
            # pads get position 1, as in transformers (their outputs are never used).
            positions = (real.long().cumsum(-1) - 1).masked_fill(~real, 1)  # (B, start + T)
            position_ids = positions[:, start:]  # (B, T)
            next_pos = positions[:, -1:] + 1  # (B, 1): where each row's first new token goes
            # One mask over every cache slot: the prompt's pads are False, and every slot after the
            # prompt is True already, since each holds a generated token by the time it is attended.
            key_padding_mask = torch.ones(B, self.cache.max_seq_len, dtype=torch.bool, device=device)
            key_padding_mask[:, : start + T] = real

        # (B, V) tokens the repetition penalty applies to: the new prompt tokens, not the pads
        # (transformers counts the pad id too), then each generated one.
        seen = seen_tokens(input_ids, model.config.vocab_size,
                           None if attention_mask is None else attention_mask[:, start:])
        if self.history:  # earlier turns, already in the cache, count for the penalty too
            seen |= seen_tokens(torch.as_tensor([list(self.history)], device=device), model.config.vocab_size)
        finished = torch.zeros(B, dtype=torch.bool, device=device)  # (B,) mirrors stop_reasons on the device

        logits = self._forward(input_ids, position_ids, key_padding_mask)  # the prefill
        for step in range(cfg.max_new_tokens):
            ids, healthy = self._choose(logits, seen, finished)
            ids_list = ids.tolist()  # the one wait for the device per step
            if not bool(healthy):
                raise MinillamaError("the model produced NaN or infinite logits; its weights or the dtype "
                                     "do not work (try float32)")
            for b, token in enumerate(ids_list):
                if self.stop_reasons[b] is not None:
                    continue  # finished earlier: this is padding
                self.tokens[b].append(token)
                if token in eos:
                    self.stop_reasons[b] = STOP_EOS
                elif self._hits_stop_string(b):
                    self.stop_reasons[b] = STOP_STRING
                elif step == cfg.max_new_tokens - 1:
                    self.stop_reasons[b] = STOP_LENGTH
                if self.stop_reasons[b] is not None:
                    finished[b] = True
            yield ids if self.batched else ids_list[0]
            if all(r is not None for r in self.stop_reasons):
                return
            # Feed the chosen tokens back: one decode step at the next slot.
            if next_pos is not None:
                position_ids = next_pos + step  # (B, 1)
            logits = self._forward(ids[:, None], position_ids, key_padding_mask)

    def _hits_stop_string(self, b: int) -> bool:
        """Whether row b's generated text now contains a stop string."""
        stops = self.config.stop_strings
        if not stops:
            return False
        # Decode only the tail: a stop string of n characters lies within the last n tokens (a few more
        # where one character spans several byte tokens), so each step costs the same.
        window = 4 * max(len(s) for s in stops) + 4
        text = self.tokenizer.decode(self.tokens[b][-window:])
        return any(s in text for s in stops)


class FastGeneration(Generation):
    """What `generate` returns on the fast path (`minillama/fast.py`): one prompt, the same interface as
    `Generation` (iterate for ints; `stop_reason`, `tokens`, `input_pos`; `cache` is the FastDecoder,
    which holds its own static KV cache: pass it back as `cache=` to continue)."""

    def __init__(self, decoder: Any, input_ids: torch.Tensor, config: GenerationConfig,
                 generator: torch.Generator | None, input_pos: int, tokenizer: Any,
                 history: Sequence[int] | None):
        self.cache, self.config, self.tokenizer = decoder, config, tokenizer
        self.input_pos = input_pos
        self.stop_reasons: list[str | None] = [None]
        self.tokens: list[list[int]] = [[]]
        self._steps = self._run_fast(decoder, input_ids, generator, history)

    def _run_fast(self, decoder: Any, input_ids: torch.Tensor, generator: torch.Generator | None,
                  history: Sequence[int] | None) -> Iterator[int]:
        cfg, tokens = self.config, self.tokens[0]
        steps = decoder.generate(input_ids, cfg.max_new_tokens, cfg, eos_token_ids=cfg.eos_token_id,
                                 generator=generator, input_pos=self.input_pos,
                                 history=list(history) if history else None)
        for token in steps:
            tokens.append(token)
            self.input_pos = decoder.cached_tokens
            stop = self._hits_stop_string(0)
            if stop:
                self.stop_reasons[0] = STOP_STRING
            yield token
            if stop:
                return
        self.stop_reasons[0] = decoder.stop_reason


def generate(model: torch.nn.Module, input_ids: Any, generation_config: GenerationConfig | None = None, *,
             attention_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
             cache: Any = None, input_pos: int = 0, tokenizer: Any = None, stop_strings: list[str] | None = None,
             history: Sequence[int] | None = None, fast: bool | None = None,
             **overrides: Any) -> Generation | FastGeneration:
    """Generate tokens after a prompt; returns a `Generation` that yields them one step at a time.

    input_ids:         one prompt (list of ints, 1-D tensor or (1, T)) -> yields ints;
                       a batch (B, T) tensor, or a list of id lists (left-padded here) -> yields (B,) tensors
    generation_config: settings (default: transformers' defaults); `overrides` replace single fields
                       (temperature=0.7, max_new_tokens=50, ...; None values are ignored)
    attention_mask:    (B, T) or (B, input_pos + T), 1 for real tokens and 0 for left padding
    generator:         a torch.Generator on the model's device, for reproducible sampling
    cache, input_pos:  continue from a KV cache already holding `input_pos` tokens (e.g. the earlier
                       turns of a chat); only `input_ids` (the new tokens) are prefilled
    tokenizer:         needed for stop strings (anything with `decode(ids) -> str`)
    history:           one prompt only: ids already in the cache (a chat's earlier turns) that the
                       repetition penalty counts too, as it would if the whole conversation were fed again
    fast:              one prompt: decode with `minillama.fast.FastDecoder` (static cache, fused and packed
                       weights, CUDA graphs on a GPU), which yields the same tokens. None (default) uses it
                       where it applies: one prompt, no padding, no `cache` given or a FastDecoder given as
                       `cache` (how a chat continues), and a non-dynamic RoPE. False: always the plain path.

    Every check (settings, ids, context length) happens here, before any model work.
    """
    config = (generation_config or GenerationConfig()).updated(stop_strings=stop_strings, **overrides)
    if config.stop_strings and tokenizer is None:
        raise MinillamaError("stop strings need a tokenizer to decode the generated text; pass tokenizer=")
    device = model.device

    # One prompt or a batch?
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
    input_ids = input_ids.reshape(-1, input_ids.shape[-1]).to(device=device, dtype=torch.long)  # (B, T)
    B, T = input_ids.shape
    vocab = model.config.vocab_size
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab:
        raise MinillamaError(f"token id {low if low < 0 else high} is outside the model's vocabulary (0..{vocab - 1})")
    if B > 1 and not 0 <= config.pad_id < vocab:
        raise MinillamaError(f"pad_token_id {config.pad_id} is outside the model's vocabulary (0..{vocab - 1}); "
                             "set pad_token_id to a valid id")
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask).to(device).reshape(B, -1)
        if attention_mask.shape[1] not in (T, input_pos + T):
            raise MinillamaError(f"attention_mask has {attention_mask.shape[1]} columns; expected {T} "
                                 f"(the prompt) or {input_pos + T} (cached and new tokens)")
        if bool(attention_mask.bool().all()):
            attention_mask = None  # no padding: take the plain causal path

    # Will it fit? Checked before anything is allocated or computed.
    if isinstance(input_pos, bool) or not isinstance(input_pos, int) or input_pos < 0:
        raise MinillamaError(f"input_pos must be a number of cached tokens >= 0, got {input_pos!r}")
    if cache is None and input_pos:
        raise MinillamaError("input_pos > 0 needs the cache that holds those tokens; pass cache=")
    context = model.config.max_position_embeddings
    if cache is not None:
        context = min(context, cache.max_seq_len)
        if getattr(cache, "batch_size", 1) != B:  # (a FastDecoder holds one row)
            raise MinillamaError(f"the cache holds {cache.batch_size} rows but the prompt has {B}")
    needed = input_pos + T + config.max_new_tokens
    if needed > context:
        raise MinillamaError(f"{input_pos + T} prompt tokens + max_new_tokens={config.max_new_tokens} = {needed} "
                             f"exceeds the context of {context} tokens; shorten the prompt or lower max_new_tokens")

    if history and B != 1:
        raise MinillamaError("history= is for a single prompt; a batch passes its full ids instead")
    if generator is None and not config.is_greedy:
        generator = make_generator(device)  # fresh entropy; pass a seeded generator to reproduce a run

    fast_cache = isinstance(cache, FastDecoder)
    if fast is None:
        fast = B == 1 and attention_mask is None and (cache is None or fast_cache) and fast_path_applies(model)
    if fast:
        if B != 1 or attention_mask is not None or (cache is not None and not fast_cache):
            raise MinillamaError("fast=True decodes one unpadded prompt, with no cache or a FastDecoder as cache")
        decoder = cache if fast_cache else decoder_for(model, needed)
        return FastGeneration(decoder, input_ids, config, generator, input_pos, tokenizer, history)
    if fast_cache:
        raise MinillamaError("a FastDecoder cache needs the fast path; pass fast=True or a KVCache")
    if cache is None:  # just long enough for this call (the last token is never fed back)
        cache = model.new_cache(B, needed)
    return Generation(model, input_ids, attention_mask, config, generator, cache, input_pos, tokenizer, batched,
                      history)
