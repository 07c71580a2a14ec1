"""Prompt-lookup decoding: draft tokens copied from earlier in the text, checked by the model in one forward.

A summary repeats phrases of the text it summarises, an answer about code repeats the code's names, a chat
repeats what was said a turn ago. When the last few tokens generated also appear earlier in the prompt or the
conversation, the tokens that followed them there are a cheap guess at what comes next: the draft. One forward
over [last token, draft...] gives the model's logits after every position at once; the reply takes the model's
own choice at each position for as long as it equals the next draft token, then the first choice that differs.
Each choice is made from the same logits by the same rule as without a draft, so the tokens are the same
(up to the rounding a longer forward changes), and a forward makes 1 + (accepted drafts) tokens instead of 1.
Rejected drafts leave keys/values in the cache past the reply's end: the next forward overwrites those slots
before it attends to them, and no query attends to a slot after its own (model.py's causal mask).

The same idea as transformers' `prompt_lookup_num_tokens` and vLLM's n-gram speculator, which look for the
last n tokens for n = max_ngram down to min_ngram. transformers takes the earliest match in the text (and goes
down to n = 1); this takes the latest, whose continuation is the most recent (what a model in a repetition loop
says next), and stops at n = 2.
"""

from __future__ import annotations

from collections.abc import Sequence

from minillama.errors import MinillamaError

MAX_NGRAM = 3  # the longest tail looked up; a longer match is tried first, as in vLLM's and transformers'
# The shortest. A single recurring token (" the", ",") is a poor guess at what follows: on the default model a
# draft after a 1-gram match was mostly rejected, and a rejected draft still costs its rows in the forward.
# Replaying the default model's greedy replies (docs/benchmarks.md), 2 gave more tokens per second than 1 or 3.
MIN_NGRAM = 2


def find_draft(tokens: Sequence[int], max_tokens: int, max_ngram: int = MAX_NGRAM,
               min_ngram: int = MIN_NGRAM) -> list[int]:
    """`max_tokens` ids that followed the most recent earlier occurrence of the last n tokens of `tokens` (the
    text so far: prompt, then what was generated), trying n = max_ngram down to min_ngram; [] when none recurs.

        find_draft([5, 6, 7, 8, 1, 5, 6], 3)  ->  [7, 8, 1]   (the 2-gram [5, 6] recurs; no 3-gram does)
        find_draft([3, 9, 4, 9, 4], 5)        ->  [9, 4, 9, 4, 9]

    The copy may run on into the tokens it is copying (as an LZ77 copy does), so text that has fallen into a
    loop of period p gets a whole draft, not just the p tokens between the match and the end.
    """
    L = len(tokens)
    if max_tokens <= 0 or L < 2:
        return []
    last = tokens[-1]
    for n in range(min(max_ngram, L - 1), max(min_ngram, 1) - 1, -1):
        tail = list(tokens[L - n:])
        # An earlier occurrence ends at index `end` < L - 1 (the tail itself ends at L - 1); the latest first.
        for end in range(L - 2, n - 2, -1):
            if tokens[end] == last and list(tokens[end - n + 1:end + 1]) == tail:
                draft: list[int] = []
                for i in range(end + 1, end + 1 + max_tokens):  # past the text's end, the draft's own tokens
                    draft.append(tokens[i] if i < L else draft[i - L])
                return draft
    return []


def check_prompt_lookup(value: object, name: str = "prompt_lookup_num_tokens") -> None:
    """Draft tokens per forward: None or 0 (off), or a whole number >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise MinillamaError(f"{name} must be a whole number of draft tokens >= 0 (0: off), got {str(value)[:40]}")
