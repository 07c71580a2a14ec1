"""The scheduler: which requests run in the next engine step, and in which slot of the KV cache.

A request waits in a queue until a slot is free, then holds that slot (one row of the cache) until it ends.
Each step runs one decode token for every request whose prompt is in, and at most one chunk of one prompt
(`chunk_size` tokens), so a long prompt never stalls the others for more than one chunk.

A slot keeps the keys/values of its last request after it ends. A new request goes to the free slot whose
tokens share the longest prefix with its prompt (the next turn of a conversation finds its earlier turns
there) and prefills only the rest, as the chat does with its one cache.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Sequence:
    """One request's state in the engine: its prompt, the tokens generated so far, and where it lives."""

    prompt: list[int]  # prompt token ids
    request: Any  # the settings (engine.Request)
    handle: Any  # what the caller holds (engine.Handle)
    tokens: list[int] = field(default_factory=list)  # generated ids; the last one is not in the cache yet
    slot: int | None = None  # the cache row, once admitted
    n_cached: int = 0  # prompt tokens whose keys/values are in the slot (reused or prefilled)
    reused: int = 0  # of those, the ones found in the slot (prefix reuse)
    number: int = 0  # the order rank 0 took it in (tensor parallelism: the same request on every rank)

    @property
    def prefilled(self) -> bool:
        return self.n_cached == len(self.prompt)

    @property
    def cached_ids(self) -> list[int]:
        """The ids whose keys/values the slot holds: the prompt so far, then every generated token but the last."""
        return self.prompt[:self.n_cached] + (self.tokens[:-1] if self.prefilled else [])


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Scheduler:
    """Waiting queue and slots. The engine calls `add`, `admit`, `plan` and `finish`; nothing here touches tensors."""

    def __init__(self, n_slots: int, chunk_size: int = 256):
        self.chunk_size = chunk_size
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> request, in the order they were admitted
        self.free: list[int] = list(range(n_slots))
        self.held: list[list[int]] = [[] for _ in range(n_slots)]  # ids whose keys/values each slot holds

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into free slots, each into the one with the longest common prefix (ties: the
        lowest row, so running rows stay together); returns the admitted ones."""
        admitted = []
        while self.waiting and self.free:
            seq = self.waiting.popleft()
            slot = max(self.free, key=lambda s: (common_prefix(self.held[s], seq.prompt), -s))
            # Reuse at most all but the last prompt token: its logits are needed to choose the first new token.
            seq.reused = seq.n_cached = min(common_prefix(self.held[slot], seq.prompt), len(seq.prompt) - 1)
            self.free.remove(slot)
            seq.slot = slot
            self.running[slot] = seq
            admitted.append(seq)
        return admitted

    def plan(self) -> tuple[list[Sequence], tuple[Sequence, int, int] | None]:
        """This step's work: the requests to decode one token for (by slot), and one prompt chunk
        (request, start, end) or None."""
        decode = sorted((s for s in self.running.values() if s.prefilled), key=lambda s: s.slot)
        prefill = next((s for s in self.running.values() if not s.prefilled), None)
        if prefill is None:
            return decode, None
        return decode, (prefill, prefill.n_cached, min(prefill.n_cached + self.chunk_size, len(prefill.prompt)))

    def finish(self, seq: Sequence) -> None:
        """A request ended (or was cancelled): free its slot now, or drop it from the queue."""
        if seq.slot is None:
            self.waiting.remove(seq)
            return
        self.held[seq.slot] = seq.cached_ids
        del self.running[seq.slot]
        self.free.append(seq.slot)
        seq.slot = None

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.running)
