"""A request to the engine and what its caller holds: `Request` (a prompt and its own settings, OpenAI's names),
`Handle` (the `Piece`s as they are chosen, then the finish reason and usage), `EngineFull`.

The engine (engine.py) fills handles from its own thread; a caller reads them from any thread, by iterating
(a thread-safe queue) or through a `listener` callback.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from minillama.errors import MinillamaError

STOP_CANCELLED, STOP_ERROR = "cancelled", "error"
MAX_LOGPROBS = 20  # top alternatives per token, at most (OpenAI's and vLLM's limit)


@dataclass
class Request:
    """One completion: a prompt of token ids and its own settings (OpenAI's names and defaults)."""

    prompt: list[int]
    max_tokens: int = 256  # the most tokens to generate
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # transformers': on prompt and output; 1: off
    presence_penalty: float = 0.0  # OpenAI's: on the output only; 0: off
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    seed: int | None = None  # None: a fresh random one (reported back in handle.seed)
    stop: list[str] = field(default_factory=list)  # stop strings, never part of the text
    eos_token_ids: list[int] | None = None  # None: the engine's (the model's eos and end-of-turn tokens)
    logprobs: int | None = None  # None: no log-probs; N >= 0: the chosen token's and the N most likely
    prompt_lookup_num_tokens: int = 0  # draft tokens per step copied from the prompt and reply (lookup.py); 0: off


@dataclass
class Piece:
    """One generated token: its id, the text it completes (often "" mid-character or while a stop string may
    be starting), and, when asked, its log-probability and the top alternatives [(id, logprob), ...]."""

    token_id: int | None  # None: a last piece with text held back until the end (a stop string that was not)
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Handle:
    """What `Engine.submit` returns: iterate it for `Piece`s as they are chosen (from any thread); after the
    last one, `finish_reason` ("eos", "stop_string", "length", "cancelled", "error"), `usage`, `text`.

    listener: called in the engine's thread with each Piece, then None at the end (an asyncio server passes
              one that hands them to its event loop with `call_soon_threadsafe`).
    """

    def __init__(self, request: Request, seed: int, listener: Callable[[Piece | None], None] | None = None):
        self.request, self.seed, self.listener = request, seed, listener
        self.pieces: list[Piece] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.usage: dict[str, int] = {"prompt_tokens": len(request.prompt), "completion_tokens": 0,
                                      "cached_tokens": 0}
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._events: queue.Queue[Piece | None] = queue.Queue()
        self._done = threading.Event()

    @property
    def token_ids(self) -> list[int]:
        return [p.token_id for p in self.pieces]

    def __iter__(self) -> Iterator[Piece]:
        while (piece := self._events.get()) is not None:
            yield piece

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the request has finished; False on timeout."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    # Called by the engine, in its thread:
    def _put(self, piece: Piece) -> None:
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.pieces.append(piece)
        self.text += piece.text
        self.usage["completion_tokens"] = len(self.pieces)
        self._send(piece)

    def _finish(self, reason: str, tail: str = "", error: str | None = None) -> None:
        if tail:  # text held back until the end (a possible stop string that was not): one last piece
            self.text += tail
            self._send(Piece(None, tail))
        self.finish_reason, self.error, self.finished_at = reason, error, time.perf_counter()
        self._done.set()
        self._send(None)

    def _send(self, piece: Piece | None) -> None:
        self._events.put(piece)
        if self.listener is not None:
            self.listener(piece)


class EngineFull(MinillamaError):
    """The waiting queue is full: try again later (HTTP 429)."""
