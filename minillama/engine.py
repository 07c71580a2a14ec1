"""The continuous-batching engine: many requests through one model, joining and leaving a running batch.

    engine = minillama.Engine(model, tokenizer, slots=16)
    handle = engine.submit(Request(prompt=ids, max_tokens=100, temperature=0.7, seed=1))
    engine.start()                       # a background thread runs the steps (or call engine.step() yourself)
    for piece in handle:                 # token ids, text pieces and log-probs as they are chosen
        print(piece.text, end="")
    print(handle.finish_reason, handle.usage)

The KV cache has `slots` rows, one request per row, each with its own length. One `step()`:
  1. takes in new requests and cancellations (a cancelled request frees its slot at once);
  2. asks the scheduler (scheduler.py) which requests decode and which prompt chunk prefills;
  3. runs model.py's forward once for the decoding rows (B, 1), each at its own position (`CacheRows`,
     kv_cache.py), and once for the prompt chunk (1, T);
  4. chooses every row's next token in one vectorised call of sampling.py's pure functions, each row with its
     own settings ((B, 1) tensors kept per slot) and its own seed (`sample_seeded`);
  5. applies the stop rules (stopping.py, the ones `generate` uses) and hands each request its token.
A request with `prompt_lookup_num_tokens=K` whose text so far offers a draft (lookup.py) decodes apart from the
batch: its last token and the draft go in as one chunk at its position (1, 1 + K), and every token the model
chooses there as the draft guessed is one more token in the same step, chosen exactly as the batch would have.

Under tensor parallelism (torchrun, `load_model(tp=True)`) every rank runs the same engine: rank 0 takes the
requests and cancellations in and sends them to the others at the start of each step (`SharedInbox`), so every
rank schedules, runs and samples the same rows; the others call `engine.follow()`.

Greedy tokens equal `minillama.generate`'s alone, up to the rounding that batch composition changes (a tie
between the top two logits can then go the other way). Design and figures: docs/serving.md.

Shapes: B rows in this step, T new tokens, V vocabulary, S slots.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq
from typing import Any

import torch

from minillama.errors import MinillamaError
from minillama.generation import END_OF_TURN_TOKENS
from minillama.kv_cache import CacheRows
from minillama.lookup import check_prompt_lookup, find_draft
from minillama.request import (MAX_LOGPROBS, STOP_CANCELLED, STOP_ERROR, EngineFull, Handle, Piece,  # noqa: F401
                               Request)
from minillama.sampling import (SamplingSettings, check_sampling_args, check_seed, greedy, is_off, penalize,
                                sample_seeded, seeded_uniform, seen_tokens, warp)
from minillama.scheduler import Scheduler, Sequence
from minillama.stopping import StopTrimmer, stop_reason

class SlotSettings:
    """Every slot's sampling settings as tensors, one row per slot, written when a request is admitted, so a
    step reads the settings of its rows with one index instead of a loop over requests."""

    def __init__(self, n_slots: int, vocab_size: int, device: torch.device):
        def col(dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.zeros(n_slots, 1, dtype=dtype, device=device)  # (S, 1)

        self.temperature, self.top_p, self.min_p = col(), col(), col()
        self.repetition_penalty, self.presence_penalty, self.frequency_penalty = col(), col(), col()
        self.top_k, self.greedy = col(torch.long), torch.zeros(n_slots, dtype=torch.bool, device=device)
        self.seeds = torch.zeros(n_slots, 2, dtype=torch.long, device=device)  # (S, 2) two 32-bit halves
        self.seen = torch.zeros(n_slots, vocab_size, dtype=torch.bool, device=device)  # (S, V) prompt + output
        self.counts = torch.zeros(n_slots, vocab_size, device=device)  # (S, V) output tokens, for OpenAI's penalties
        self.logit_bias = torch.zeros(n_slots, vocab_size, device=device)  # (S, V)
        self.any_bias = [False] * n_slots  # host-side: skip the (B, V) add when no row has a bias

    def write(self, slot: int, r: Request, seed: int, vocab_size: int) -> None:
        greedy = r.temperature == 0
        self.temperature[slot] = 1.0 if greedy else r.temperature
        self.top_p[slot], self.min_p[slot], self.top_k[slot] = r.top_p, r.min_p, r.top_k
        self.repetition_penalty[slot] = r.repetition_penalty
        self.presence_penalty[slot], self.frequency_penalty[slot] = r.presence_penalty, r.frequency_penalty
        self.greedy[slot] = greedy
        self.seeds[slot, 0], self.seeds[slot, 1] = seed & 0xFFFFFFFF, seed >> 32
        self.seen[slot] = seen_tokens(torch.tensor([r.prompt], device=self.seen.device), vocab_size)[0]
        self.counts[slot] = 0
        self.logit_bias[slot] = 0
        for token, bias in r.logit_bias.items():
            self.logit_bias[slot, token] = bias
        self.any_bias[slot] = bool(r.logit_bias)

    def rows(self, rows: torch.Tensor) -> SamplingSettings:
        """The settings of these rows as (B, 1) tensors, in the shape sampling.py's functions take."""
        return SamplingSettings(do_sample=True, temperature=self.temperature[rows], top_k=self.top_k[rows],
                                top_p=self.top_p[rows], min_p=self.min_p[rows],
                                repetition_penalty=self.repetition_penalty[rows],
                                presence_penalty=self.presence_penalty[rows],
                                frequency_penalty=self.frequency_penalty[rows])


class Engine:
    """Requests in, tokens out, many at a time through one model.

    slots:       requests decoded together (rows of the KV cache)
    max_seq_len: tokens per slot (prompt + reply); default min(the model's context, 4096)
    chunk_size:  the most prompt tokens prefilled in one step
    max_waiting: requests that may wait for a slot; one more is refused with `EngineFull` (None: no limit)
    eos_token_ids: where replies end unless a request says otherwise (default: the model's generation_config
                 eos ids plus the tokenizer's eos and end-of-turn tokens)
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any = None, slots: int = 16, *,
                 max_seq_len: int | None = None, chunk_size: int = 256, max_waiting: int | None = None,
                 eos_token_ids: Seq[int] | None = None):
        if slots < 1 or chunk_size < 1:
            raise MinillamaError(f"slots and chunk_size must be >= 1, got {slots} and {chunk_size}")
        self.model, self.tokenizer = model, tokenizer
        self.vocab_size = model.config.vocab_size
        self.max_seq_len = min(max_seq_len or 4096, model.config.max_position_embeddings)
        self.n_slots, self.max_waiting = slots, max_waiting
        self.cache = model.new_cache(slots, self.max_seq_len)  # (S rows of max_seq_len tokens) per layer
        self.settings = SlotSettings(slots, self.vocab_size, model.device)
        self.scheduler = Scheduler(slots, chunk_size)
        self.eos_token_ids = list(eos_token_ids) if eos_token_ids is not None else self._default_eos()
        self._streams: dict[int, tuple[Any, StopTrimmer]] = {}  # slot -> (detokenizer, stop trimmer)
        self._inbox: list[Sequence] = []
        self._cancelled: list[Handle] = []
        self._seqs: dict[int, Sequence] = {}  # id(handle) -> its request's state
        self._wake = threading.Condition()
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = {"finished": 0, "cancelled": 0, "refused": 0, "errors": 0, "prompt_tokens": 0,
                         "cached_tokens": 0, "output_tokens": 0, "steps": 0, "drafted": 0, "accepted": 0}
        self.shared = SharedInbox() if SharedInbox.needed() else None  # tensor parallel: rank 0's plan for all

    # ---- The caller's side (any thread) ---------------------------------------------------------------

    @property
    def kv_bytes_per_slot(self) -> int:
        layer = self.cache[0].k
        return 2 * len(self.cache.layers) * layer[0].numel() * layer.element_size()

    def memory_line(self) -> str:
        c, layer = self.model.config, self.cache[0].k
        return (f"KV cache: {self.n_slots} slots x {self.max_seq_len:,} tokens x {c.num_hidden_layers} layers x 2 "
                f"(k, v) x {layer.shape[1]} kv heads x {layer.shape[3]} dims x {layer.element_size()} bytes = "
                f"{self.n_slots * self.kv_bytes_per_slot / 2**20:,.1f} MiB")

    def check(self, r: Request) -> None:
        """Raise `MinillamaError` (one line, with the numbers) for a request this engine cannot run."""
        if not isinstance(r.prompt, list) or not r.prompt:
            raise MinillamaError("the prompt is empty; give at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in r.prompt):
            raise MinillamaError(f"prompt token ids must be in 0..{self.vocab_size - 1}")
        check_sampling_args(temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, min_p=r.min_p,
                            repetition_penalty=r.repetition_penalty, max_new_tokens=r.max_tokens,
                            presence_penalty=r.presence_penalty, frequency_penalty=r.frequency_penalty)
        if len(r.prompt) + r.max_tokens > self.max_seq_len:
            raise MinillamaError(f"{len(r.prompt)} prompt tokens + max_tokens={r.max_tokens} = "
                                 f"{len(r.prompt) + r.max_tokens} exceeds the context of {self.max_seq_len} "
                                 "tokens; shorten the prompt or lower max_tokens")
        for token, bias in r.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
                raise MinillamaError(f"logit_bias: token id {token!r} is not in 0..{self.vocab_size - 1}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
                raise MinillamaError(f"logit_bias: the bias of token {token} must be in [-100, 100], got {bias!r}")
        if r.logprobs is not None and (isinstance(r.logprobs, bool) or not isinstance(r.logprobs, int)
                                       or not 0 <= r.logprobs <= MAX_LOGPROBS):
            raise MinillamaError(f"logprobs must be a whole number from 0 to {MAX_LOGPROBS}, got {r.logprobs!r}")
        if r.seed is not None:
            check_seed(r.seed)
        check_prompt_lookup(r.prompt_lookup_num_tokens)
        if r.stop and self.tokenizer is None:
            raise MinillamaError("stop strings need the engine's tokenizer; pass tokenizer= to Engine")

    def submit(self, request: Request, listener: Callable[[Piece | None], None] | None = None) -> Handle:
        """Queue a request; returns its handle at once. Raises `MinillamaError` for a request that cannot
        run (checked before it is queued) and `EngineFull` when the waiting queue is full. `listener`: see
        `Handle`."""
        try:
            self.check(request)
        except MinillamaError:
            self.counters["refused"] += 1
            raise
        handle = Handle(request, secrets.randbits(64) if request.seed is None else request.seed, listener)
        with self._wake:
            # Waiting means waiting for a slot: the requests beyond the free slots, which the next step fills.
            queued = self.waiting - len(self.scheduler.free)
            if self.max_waiting is not None and queued >= self.max_waiting:
                self.counters["refused"] += 1
                raise EngineFull(f"{queued} requests are waiting for one of {self.n_slots} slots; try again shortly")
            seq = Sequence(list(request.prompt), request, handle)
            self._seqs[id(handle)] = seq
            self._inbox.append(seq)
            self._wake.notify()
        return handle

    def cancel(self, handle: Handle) -> None:
        """Stop a request; its slot is free after the next step begins. Cancelling a finished one does nothing."""
        with self._wake:
            self._cancelled.append(handle)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._inbox) + len(self.scheduler.waiting)

    @property
    def running(self) -> int:
        return len(self.scheduler.running)

    def start(self) -> Engine:
        """Run steps in a background thread until `stop()`; submit and cancel from any thread meanwhile."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="minillama-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the background thread (and, under tensor parallelism, the other ranks' `follow()`)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.shared is not None and not self.shared.stopped:  # every rank: rank 0 says stop, the others hear it
            self.shared.exchange([], [], True, self._seqs)

    def generate(self, requests: Seq[Request]) -> list[Handle]:
        """Run a batch of requests to the end (offline, like vLLM's `LLM.generate`); handles in request order."""
        handles = [self.submit(r) for r in requests]
        while not all(h.done for h in handles):
            if self._thread is not None:
                handles[[h.done for h in handles].index(False)].wait()
            else:
                self.step()
        return handles

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not (self._stopping or self._inbox or self._cancelled or self.scheduler.busy):
                    self._wake.wait()
                if self._stopping:
                    return
            self.step()

    # ---- One step (the engine's thread) -----------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> bool:
        """One iteration: admit, decode every running request one token, prefill one chunk. False if idle."""
        with self._step_lock:
            self._take_inbox()
            for seq in self.scheduler.admit():
                self._admitted(seq)
            decode, prefill = self.scheduler.plan()
            if not decode and prefill is None:
                return False
            self.counters["steps"] += 1
            seqs, logits = [], []
            drafts = {s.slot: d for s in decode if (d := self._draft(s))}  # prompt lookup: these decode apart
            try:
                batch = [s for s in decode if s.slot not in drafts]
                if batch:
                    logits.append(self._decode(batch))
                    seqs += batch
                if prefill is not None:
                    seq, start, end = prefill
                    last = self._prefill(seq, start, end)
                    if seq.prefilled:  # the whole prompt is in: its last logits choose the first token
                        logits.append(last)
                        seqs.append(seq)
                if seqs:
                    self._emit(seqs, *self._choose(seqs, torch.cat(logits)))
                for seq in decode:
                    if seq.slot in drafts:
                        self._verify(seq, drafts[seq.slot])
            except Exception as e:  # a failing forward ends the requests in it, not the engine
                for seq in ([*decode] + ([prefill[0]] if prefill else [])):
                    if seq.slot is not None:
                        self.counters["errors"] += 1
                        self._end(seq, STOP_ERROR, error=f"{type(e).__name__}: {e}")
            return True

    def follow(self) -> None:
        """Tensor parallelism, ranks > 0: run the steps rank 0 runs, until rank 0's engine stops."""
        while not self.shared.stopped:
            self.step()

    def _take_inbox(self) -> None:
        with self._wake:
            inbox, self._inbox = self._inbox, []
            cancelled, self._cancelled = self._cancelled, []
        if self.shared is not None:
            inbox, cancelled = self.shared.exchange(inbox, cancelled, self._stopping, self._seqs)
        for seq in inbox:
            self.scheduler.add(seq)
        for handle in cancelled:
            seq = self._seqs.get(id(handle))
            if seq is not None and not handle.done:
                self.counters["cancelled"] += 1
                self._end(seq, STOP_CANCELLED)

    def _admitted(self, seq: Sequence) -> None:
        r = seq.request
        self.settings.write(seq.slot, r, seq.handle.seed, self.vocab_size)
        detok = self.tokenizer.stream_decoder(skip_special_tokens=True) if self.tokenizer is not None else None
        self._streams[seq.slot] = (detok, StopTrimmer(r.stop))
        seq.handle.usage["cached_tokens"] = seq.reused
        self.counters["prompt_tokens"] += len(seq.prompt)
        self.counters["cached_tokens"] += seq.reused

    def _rows(self, slots: list[int]) -> slice | torch.Tensor:
        """Cache rows for these slots (ascending): a slice when they are consecutive (a view, no copy)."""
        if slots == list(range(slots[0], slots[0] + len(slots))):
            return slice(slots[0], slots[0] + len(slots))
        return torch.tensor(slots, device=self.model.device)

    def _decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """One token for each request, each at its own position: logits (B, V)."""
        device = self.model.device
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=device)  # (B, 1)
        positions = [len(s.prompt) + len(s.tokens) - 1 for s in seqs]
        pos = torch.tensor(positions, device=device)  # (B,) where each row's token goes
        cache = CacheRows(self.cache, self._rows([s.slot for s in seqs]), max(positions) + 1)
        return self.model(ids, cache=cache, input_pos=pos, logits_to_keep=1)[:, -1]

    def _draft(self, seq: Sequence) -> list[int]:
        """Prompt lookup: the tokens that followed the latest earlier occurrence of the request's last few, never
        more than the tokens it may still generate after the next one; [] when off or nothing recurs."""
        k = min(seq.request.prompt_lookup_num_tokens, seq.request.max_tokens - len(seq.tokens) - 1)
        return find_draft(seq.prompt + seq.tokens, k) if k > 0 else []

    def _verify(self, seq: Sequence, draft: list[int]) -> None:
        """One request's last token and its draft as one chunk at its position; the logits after each position
        choose its next token in turn (its own settings, penalties and seeded draw: `_choose` as in the batch),
        for as long as the choice equals the draft. The rejected drafts' keys/values stay past the request's
        length, where its next step writes before anything attends to them."""
        device = self.model.device
        pos = len(seq.prompt) + len(seq.tokens) - 1  # the slot of its last token
        ids = torch.tensor([[seq.tokens[-1], *draft]], device=device)  # (1, 1 + k)
        cache = CacheRows(self.cache, slice(seq.slot, seq.slot + 1), pos + len(ids[0]))
        rows = self.model(ids, cache=cache, input_pos=torch.tensor([pos], device=device))[0]  # (1 + k, V)
        self.counters["drafted"] += len(draft)
        for i in range(len(rows)):
            self._emit([seq], *self._choose([seq], rows[i:i + 1]))
            if seq.slot is None or i == len(draft) or seq.tokens[-1] != draft[i]:
                return  # it ended, the draft is used up, or the model chose otherwise
            self.counters["accepted"] += 1

    def _prefill(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Prompt tokens [start, end) of one request into its slot: the last one's logits (1, V)."""
        device = self.model.device
        ids = torch.tensor([seq.prompt[start:end]], device=device)  # (1, T)
        cache = CacheRows(self.cache, slice(seq.slot, seq.slot + 1), end)
        logits = self.model(ids, cache=cache, input_pos=torch.tensor([start], device=device), logits_to_keep=1)
        seq.n_cached = end
        return logits[:, -1]

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor):
        """Every row's next token from its logits (B, V), by its own settings, in one vectorised pass."""
        slots = [s.slot for s in seqs]
        rows = torch.tensor(slots, device=logits.device)  # (B,)
        st = self.settings
        settings = st.rows(rows)
        bias = st.logit_bias[rows] if any(st.any_bias[s] for s in slots) else None
        # The (B, V) histories are gathered only when some row's penalty reads them.
        seen = None if is_off(settings.repetition_penalty, 1.0) else st.seen[rows]
        penalized = not (is_off(settings.presence_penalty, 0.0) and is_off(settings.frequency_penalty, 0.0))
        scores = penalize(logits.float(), seen, settings, st.counts[rows] if penalized else None, bias)  # (B, V)
        ids = greedy(scores)  # (B,) the greedy rows' choice
        if not all(s.request.temperature == 0 for s in seqs):
            steps = torch.tensor([len(s.tokens) for s in seqs], device=logits.device)  # (B,) each row's draw count
            sampled = sample_seeded(warp(scores, settings), seeded_uniform(st.seeds[rows], steps))
            ids = torch.where(st.greedy[rows], ids, sampled)
        st.seen[rows, ids] = True
        st.counts[rows, ids] += 1
        healthy = torch.isfinite(logits.amax(dim=-1))  # (B,) a NaN or inf anywhere in a row shows in its max
        want = [s.request.logprobs for s in seqs]
        top = None
        if any(n is not None for n in want):  # the model's own distribution, before any setting reshaped it
            logprobs = logits.float().log_softmax(dim=-1)  # (B, V)
            chosen = logprobs.gather(1, ids[:, None])[:, 0]  # (B,)
            n = max(n or 0 for n in want)
            top = (chosen.tolist(), *(t.tolist() for t in logprobs.topk(n, dim=-1))) if n else (chosen.tolist(),)
        return ids.tolist(), healthy.tolist(), top

    def _emit(self, seqs: list[Sequence], ids: list[int], healthy: list[bool], top) -> None:
        """Hand each request its token, then apply the stop rules: the one loop over rows, for the text."""
        for b, (seq, token) in enumerate(zip(seqs, ids)):
            if not healthy[b]:
                self.counters["errors"] += 1
                self._end(seq, STOP_ERROR, error="the model produced NaN or infinite logits")
                continue
            r = seq.request
            seq.tokens.append(token)
            eos = r.eos_token_ids if r.eos_token_ids is not None else self.eos_token_ids
            detok, trimmer = self._streams[seq.slot]
            decode = self.tokenizer.decode if self.tokenizer is not None else None
            reason = stop_reason(seq.tokens, eos, r.stop, r.max_tokens, r.max_tokens, decode)
            text = "" if detok is None or reason == "eos" else trimmer.push(detok.push(token))
            piece = Piece(token, text)
            if r.logprobs is not None and top is not None:
                piece.logprob = top[0][b]
                if r.logprobs:
                    piece.top_logprobs = list(zip(top[2][b][:r.logprobs], top[1][b][:r.logprobs]))
            seq.handle._put(piece)
            self.counters["output_tokens"] += 1
            if reason is not None:
                tail = "" if detok is None else trimmer.push(detok.flush()) + trimmer.flush()
                self.counters["finished"] += 1
                self._end(seq, reason, tail)

    def _end(self, seq: Sequence, reason: str, tail: str = "", error: str | None = None) -> None:
        slot = seq.slot
        self.scheduler.finish(seq)  # frees the slot in this very step
        self._streams.pop(slot, None)
        self._seqs.pop(id(seq.handle), None)
        seq.handle._finish(reason, tail, error)

    def _default_eos(self) -> list[int]:
        config = getattr(self.model, "generation_config", None)
        ids = list(config.eos_token_id) if config is not None else []
        if self.tokenizer is not None:
            extra = [self.tokenizer.eos_token_id, *(self.tokenizer.token_to_id(t) for t in END_OF_TURN_TOKENS)]
            ids += [i for i in extra if i is not None]
        return list(dict.fromkeys(ids))


class SharedInbox:
    """Tensor parallelism: at the start of every step rank 0 sends the requests it took in (prompt, settings,
    seed) and the ones cancelled; every rank then holds the same requests in the same order, so its scheduler
    makes the same choices, its forward runs the same rows, and its sampling (the same logits after the head's
    all-gather, the same seeds) the same tokens. A rank that submitted the same requests itself (every rank
    running one script) keeps its handles, matched by order; otherwise handles are made for rank 0's requests."""

    def __init__(self):
        import datetime

        import torch.distributed as dist

        from minillama import tp

        self.dist, self.rank, self.stopped, self.taken = dist, tp.rank(), False, 0
        # Its own gloo group with a long timeout: a server may idle for days between requests.
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=7))

    @staticmethod
    def needed() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def exchange(self, inbox: list[Sequence], cancelled: list[Handle], stopping: bool,
                 seqs: dict[int, Sequence]) -> tuple[list[Sequence], list[Handle]]:
        box: list[Any] = [None]
        if self.rank == 0:
            for seq in inbox:
                seq.number = self.taken = self.taken + 1
            box = [([(s.request, s.handle.seed) for s in inbox],
                    [getattr(seqs.get(id(h)), "number", None) for h in cancelled], stopping)]
        self.dist.broadcast_object_list(box, src=0, group=self.group)
        sent, numbers, self.stopped = box[0]
        if self.rank == 0:
            return inbox, cancelled
        mine, taken = [], []
        for i, (request, seed) in enumerate(sent):
            seq = inbox[i] if i < len(inbox) else Sequence(list(request.prompt), request, Handle(request, seed))
            seq.handle.seed = seed
            seq.number = self.taken = self.taken + 1
            seqs[id(seq.handle)] = seq
            mine.append(seq)
        by_number = {getattr(s, "number", None): s for s in seqs.values()}
        taken = [by_number[n].handle for n in numbers if n in by_number]
        return mine, taken


def generate_many(model: torch.nn.Module, tokenizer: Any, prompts: Seq[str | list[int]], *, slots: int = 16,
                  **settings: Any) -> list[Handle]:
    """Complete many prompts at once through one engine (vLLM's `LLM.generate`): text prompts are encoded
    with the tokenizer as is (apply a chat template first for a chat model); `settings` are `Request` fields.
    Returns one finished `Handle` per prompt, in order (`.text`, `.token_ids`, `.finish_reason`, `.usage`)."""
    requests = [Request(prompt=tokenizer.encode(p) if isinstance(p, str) else list(p), **settings) for p in prompts]
    needed = max(len(r.prompt) + r.max_tokens for r in requests)
    engine = Engine(model, tokenizer, slots=min(slots, len(requests)), max_seq_len=needed)
    handles = engine.generate(requests)
    engine.stop()
    return handles
