"""Sampling: from the model's last logits to the next token id, as small pure functions.

Each function takes logits (B, V) and returns new logits (B, V) with filtered entries set to -inf;
none of them changes its input. `process_logits` chains them in transformers' order:

    penalize: logit bias -> repetition penalty -> presence/frequency penalty     (greedy too)
    warp:     temperature -> top-k -> top-p -> min-p                              (only when sampling)

then `sample` draws from the softmax with an explicit `torch.Generator`, or `greedy` takes the argmax.
Every setting is a plain number (one for the whole batch: `generate`) or a (B, 1) tensor (one per row: the
slot engine, where each row is another user's request); `sample_seeded` draws a row's token from its own seed
and step, so a seeded request gives the same text whatever else shares the batch.

They are written for a compiled GPU decode step too: only torch ops, no `.item()` or other host
syncs, and Python `if`s only on the settings (plain Python numbers), never on tensor values. Per-row
(B, 1) settings are the eager engine's: there `is_off` and top-k's largest k are read on the host.

Shapes: B batch, V vocabulary, S tokens seen so far.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minillama.errors import MinillamaError


@dataclass
class SamplingSettings:
    """How to pick the next token; the defaults are transformers' (`GenerationConfig` extends this)."""

    do_sample: bool = False  # False: greedy (argmax); True: draw from the filtered distribution
    temperature: float = 1.0  # divide logits by this when sampling; 0 means greedy
    top_k: int = 50  # keep the k most likely tokens when sampling; 0 turns it off
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p; 1.0 turns it off
    min_p: float | None = None  # drop tokens less likely than min_p * (top probability); None/0 turns it off
    repetition_penalty: float = 1.0  # >1 makes tokens already seen less likely (greedy too); 1.0 turns it off
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated; 0 turns it off
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated; 0 turns it off

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0


def check_seed(seed: object) -> None:
    """torch seeds are unsigned 64-bit integers."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise MinillamaError(f"the seed must be a whole number from 0 to 2**64 - 1, got {str(seed)[:30]}")


def make_generator(device: torch.device | str, seed: int | None = None) -> torch.Generator:
    """The one source of randomness for sampling: seeded to reproduce a run, or fresh entropy."""
    if seed is not None:
        check_seed(seed)
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


# ---- Validation ------------------------------------------------------------------------------------

def check_sampling_args(*, temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None, repetition_penalty: float | None = None,
                        max_new_tokens: int | None = None, presence_penalty: float | None = None,
                        frequency_penalty: float | None = None) -> None:
    """Raise `MinillamaError` (one line) for a value no sampler can use; None means "not given"."""

    def number(name: str, value: object) -> float:
        # An int past float's range (10**400 in a JSON file) is not finite either; isfinite would overflow.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value if isinstance(value, float) or abs(value) < 2**1023 else math.inf):
            raise MinillamaError(f"{name} must be a finite number, got {str(value)[:40]}")
        return float(value)

    def integer(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MinillamaError(f"{name} must be a whole number, got {value!r}")
        return value

    # Written as `not (in range)` so NaN, which fails every comparison, is rejected too.
    if temperature is not None and not number("temperature", temperature) >= 0:
        raise MinillamaError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and not integer("top_k", top_k) >= 0:
        raise MinillamaError(f"top_k must be >= 0 (0 turns it off), got {top_k}")
    if top_p is not None and not 0 < number("top_p", top_p) <= 1:
        raise MinillamaError(f"top_p must be in (0, 1] (1 turns it off), got {top_p}")
    if min_p is not None and not 0 <= number("min_p", min_p) <= 1:
        raise MinillamaError(f"min_p must be in [0, 1] (0 turns it off), got {min_p}")
    if repetition_penalty is not None and not number("repetition_penalty", repetition_penalty) > 0:
        raise MinillamaError(f"repetition_penalty must be > 0 (1 turns it off), got {repetition_penalty}")
    if max_new_tokens is not None and not integer("max_new_tokens", max_new_tokens) >= 1:
        raise MinillamaError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None and not -2 <= number(name, value) <= 2:
            raise MinillamaError(f"{name} must be in [-2, 2] (0 turns it off), got {value}")


# ---- The steps, each a pure function on logits (B, V) ----------------------------------------------

def seen_tokens(input_ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) bool, True for every token id that occurs in input_ids (B, S) where `mask` (B, S) is true.

    Generation keeps this mask and sets one entry per step, instead of growing a list of ids,
    so the repetition penalty works on fixed shapes.
    """
    seen = torch.zeros(input_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=input_ids.device)
    ids = input_ids.clamp(0, vocab_size)  # ids past the head's vocabulary cannot be generated: park them in
    if mask is not None:                  # the spare last column, which is dropped below
        ids = ids.masked_fill(~mask.bool(), vocab_size)
    return seen.scatter(1, ids, True)[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen less likely (penalty > 1) or more likely (penalty < 1), once per token.

    input_ids: the ids seen so far (B, S), prompt included as in transformers, or a `seen_tokens` mask (B, V).
    A positive logit is divided by the penalty and a negative one multiplied, so both move toward "less likely".
    """
    if is_off(penalty, 1.0):
        return logits
    seen = input_ids if input_ids.dtype == torch.bool else seen_tokens(input_ids, logits.shape[-1])
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def is_off(setting: float | torch.Tensor | None, off: float) -> bool:
    """Whether a setting (a number, or a (B, 1) tensor of one per row) is `off` for every row."""
    if setting is None or not isinstance(setting, torch.Tensor):
        return setting is None or setting == off
    return bool((setting == off).all())


def apply_logit_bias(logits: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """OpenAI's logit_bias: add bias (B, V) (mostly zeros) to the logits; -100 all but bans a token."""
    return logits if bias is None else logits + bias


def apply_presence_frequency_penalty(logits: torch.Tensor, counts: torch.Tensor | None,
                                     presence: float | torch.Tensor, frequency: float | torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties on the tokens generated so far, counts (B, V): logit - presence * [count > 0]
    - frequency * count. Unlike the repetition penalty, the prompt does not count."""
    if counts is None or (is_off(presence, 0.0) and is_off(frequency, 0.0)):
        return logits
    return logits - presence * (counts > 0) - frequency * counts


def apply_temperature(logits: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """Sharpen (t < 1) or flatten (t > 1) the distribution: softmax(logits / t)."""
    if is_off(temperature, 1.0):
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
    """Keep the k largest logits of each row (more on ties with the k-th), set the rest to -inf; k (B, 1) is
    one per row, 0 keeping the row whole."""
    V = logits.shape[-1]
    if not isinstance(k, torch.Tensor):
        if k <= 0:
            return logits
        kth_largest = torch.topk(logits, min(k, V), dim=-1).values[:, -1:]  # (B, 1)
        return logits.masked_fill(logits < kth_largest, float("-inf"))
    k_max = min(int(k.max()), V)
    if k_max <= 0:
        return logits
    top = torch.topk(logits, k_max, dim=-1).values  # (B, k_max), largest first
    kth_largest = top.gather(1, (k.clamp(1, k_max) - 1).long())  # (B, 1)
    return logits.masked_fill((logits < kth_largest) & (k > 0), float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keep the most likely tokens until their probability adds up to p (at least one).

    As transformers does it: sort ascending, and drop the tokens whose cumulative probability from the
    unlikely end is still <= 1 - p; the most likely token is always kept.
    """
    if is_off(p, 1.0):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=False)  # (B, V) each, least likely first
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop_sorted = cumulative <= 1 - p
    drop_sorted[:, -1] = False  # the most likely token always survives
    drop = drop_sorted.scatter(1, order, drop_sorted)  # (B, V) back in vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's (which is always kept)."""
    if is_off(min_p, 0.0):
        return logits
    probs = logits.softmax(dim=-1)  # (B, V)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)  # (B, 1)
    drop = probs < threshold
    # The top token passes `probs < threshold` unless min_p == 1 meets rounding; pin it explicitly.
    drop = drop.scatter(1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def penalize(logits: torch.Tensor, input_ids: torch.Tensor | None, settings: SamplingSettings,
             counts: torch.Tensor | None = None, logit_bias: torch.Tensor | None = None) -> torch.Tensor:
    """The steps that apply in greedy decoding too: logit bias, repetition penalty (on `input_ids`, ids seen
    so far (B, S) or a `seen_tokens` mask (B, V)), presence/frequency penalty (on `counts` (B, V) of generated
    tokens). fp32 logits (B, V) in and out."""
    logits = apply_logit_bias(logits, logit_bias)
    logits = apply_repetition_penalty(logits, input_ids, settings.repetition_penalty)
    return apply_presence_frequency_penalty(logits, counts, settings.presence_penalty, settings.frequency_penalty)


def warp(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The steps that shape the distribution to sample from: temperature, top-k, top-p, min-p."""
    logits = apply_temperature(logits, settings.temperature)
    logits = apply_top_k(logits, settings.top_k)
    logits = apply_top_p(logits, settings.top_p)
    return apply_min_p(logits, settings.min_p)


def process_logits(logits: torch.Tensor, input_ids: torch.Tensor, settings: SamplingSettings,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """All the steps in transformers' order, on fp32 logits (B, V); returns fp32 (B, V).

    input_ids: ids seen so far (B, S) or a `seen_tokens` mask (B, V), for the repetition penalty.
    The penalties apply in greedy decoding too; the warpers (temperature, top-k/p, min-p) only when sampling.
    """
    logits = penalize(logits.float(), input_ids, settings, counts)  # transformers casts the logits to fp32 first
    return logits if settings.is_greedy else warp(logits, settings)


# ---- Picking the token -----------------------------------------------------------------------------

def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely token of each row: (B, V) -> (B,) int64."""
    return logits.argmax(dim=-1)


def sampling_noise(logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Exp(1) draws (B, V) for `sample`, from `generator` (None: torch's global RNG).

    A compiled step cannot take a `torch.Generator` (torch.compile does not trace one): draw the
    noise outside it with this function and pass it in, or let the step use the global RNG.
    """
    noise = torch.empty_like(logits, dtype=torch.float32).exponential_(1.0, generator=generator)
    return noise.clamp_min(torch.finfo(torch.float32).tiny)  # a draw of exactly 0 would make 0/0 = NaN


def sample(logits: torch.Tensor, generator: torch.Generator | None = None, *,
           noise: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits): (B, V) -> (B,) int64.

    `generator` (on the logits' device) makes the draw reproducible; None uses torch's global RNG;
    `noise` (from `sampling_noise`) replaces both.
    Instead of `torch.multinomial` (which syncs with the host on CUDA) this uses the exponential race:
    argmax(p_i / E_i) with E_i ~ Exp(1) picks token i with probability exactly p_i. -inf logits have
    p_i = 0 and can never win.
    """
    probs = logits.float().softmax(dim=-1)  # (B, V)
    if noise is None:
        noise = sampling_noise(logits, generator)
    return (probs / noise).argmax(dim=-1)


# ---- Seeded draws, one stream per row -----------------------------------------------------------------

def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for x in [0, 2^32) (int64), in two 16-bit halves of c so nothing overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32): every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seeded_uniform(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One uniform draw in [0, 1) per row (float64, (B,)) that depends only on the row's seed (B, 2): two
    32-bit halves, and its step (B,): a counter-based generator, so a request's draws do not depend on
    which other requests share the batch, or in which row it sits."""
    x = _mix32(seeds[:, 0] ^ _mix32(steps & 0xFFFFFFFF))
    x = _mix32(x ^ seeds[:, 1])
    return x.double() / 2**32


def sample_seeded(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from softmax(logits) (B, V) by inverse CDF at u (B,) in [0, 1): the first token
    whose cumulative probability passes u. Tokens of probability 0 (-inf logits) can never be drawn."""
    cdf = logits.float().softmax(dim=-1).double().cumsum(dim=-1)  # (B, V), fp64: 2^-32 steps are resolved
    ids = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # (B,)
    return ids.clamp_max(logits.shape[-1] - 1)


def next_token(logits: torch.Tensor, input_ids: torch.Tensor, settings: SamplingSettings,
               generator: torch.Generator | None = None, *, noise: torch.Tensor | None = None,
               counts: torch.Tensor | None = None) -> torch.Tensor:
    """process_logits, then greedy or sample: the model's last logits (B, V) -> next ids (B,)."""
    scores = process_logits(logits, input_ids, settings, counts)
    return greedy(scores) if settings.is_greedy else sample(scores, generator, noise=noise)
