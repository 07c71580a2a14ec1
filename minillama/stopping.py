"""When a reply stops, and the text a stop string must not leak: one place for `generate`, the chat and the engine.

`stop_reason` is every stop rule of minillama, checked after each generated token; `StopTrimmer` cuts the
streamed text at the first stop string and holds back any tail that could still become one, so no part of
a stop string is ever shown (or sent to an API client).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

STOP_EOS, STOP_LENGTH, STOP_STRING, STOP_CONTEXT = "eos", "length", "stop_string", "context"


def stop_reason(tokens: Sequence[int], eos_token_ids: Sequence[int], stop_strings: Sequence[str], limit: int,
                max_new_tokens: int, decode: Callable[[Sequence[int]], str] | None) -> str | None:
    """Why a reply whose generated ids are `tokens` (the last one just chosen) stops now, or None.

    limit: the most tokens this reply may have: max_new_tokens, or fewer where the context ends first
    (then the reason is "context", not "length"). decode: ids -> text, for the stop strings.
    """
    if tokens[-1] in eos_token_ids:
        return STOP_EOS
    if stop_strings and hits_stop_string(tokens, stop_strings, decode):
        return STOP_STRING
    if len(tokens) >= limit:
        return STOP_LENGTH if limit == max_new_tokens else STOP_CONTEXT
    return None


def hits_stop_string(tokens: Sequence[int], stop_strings: Sequence[str],
                     decode: Callable[[Sequence[int]], str]) -> bool:
    """Whether the text of `tokens` now contains a stop string.

    Decodes only the tail: a stop string of n characters lies within the last n tokens (a few more where one
    character spans several byte tokens), so each step costs the same.
    """
    window = 4 * max(len(s) for s in stop_strings) + 4
    text = decode(list(tokens[-window:]))
    return any(s in text for s in stop_strings)


class StopTrimmer:
    """Cuts streamed text at the first stop string, holding back any tail that could begin one."""

    def __init__(self, stops: Sequence[str] | None):
        self.stops = [s for s in stops or [] if s]
        self.pending = ""  # text not shown yet: a possible start of a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of the text so far that is safe to show now."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        # The longest tail of the text that is a proper prefix of some stop string waits for more text.
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
