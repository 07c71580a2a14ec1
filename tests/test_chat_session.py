"""ChatSession: the fast path and the plain path hold the same conversation, token for token."""

from __future__ import annotations

import pytest
import torch

import minillama
from minillama.chat import ChatSession
from minillama.fast import FastDecoder
from minillama.generation import GenerationConfig
from minillama.kv_cache import KVCache
from minillama.tokenizer import load_tokenizer

TURNS = ["Hello!", "Tell me about rivers.", "And mountains?", "Thanks."]


@pytest.mark.parametrize("sampling", [
    dict(do_sample=False),
    dict(do_sample=False, repetition_penalty=1.3),  # the penalty must count earlier turns on both paths
    dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, min_p=0.02),
])
def test_fast_and_plain_sessions_agree(chat_model, sampling):
    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(max_new_tokens=16, **sampling)
    fast = ChatSession(model, tokenizer, config, system="Be kind.", seed=4, context=512)
    plain = ChatSession(model, tokenizer, config, system="Be kind.", seed=4, context=512, fast=False)
    assert isinstance(fast.cache, FastDecoder) and isinstance(plain.cache, KVCache)
    for text in TURNS:
        assert "".join(fast.send(text)) == "".join(plain.send(text))
        assert fast.cached_ids == plain.cached_ids
        assert fast.last_stats.prompt_tokens == plain.last_stats.prompt_tokens
    # later turns prefilled only their new tokens
    assert fast.last_stats.prompt_tokens < len(fast.cached_ids) // 2


def test_interrupted_reply_keeps_a_consistent_cache(chat_model):
    """Stopping a reply early (what Ctrl-C does) keeps the partial reply; the next turn still matches a
    session that never was interrupted but holds the same conversation."""
    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(do_sample=False, max_new_tokens=20)
    session = ChatSession(model, tokenizer, config, context=512)
    stream = session.send("Count to ten")
    partial = "".join(piece for _, piece in zip(range(5), stream))
    stream.close()  # what a KeyboardInterrupt inside the loop does to the generator
    assert session.messages[-1] == {"role": "assistant", "content": partial}
    assert session.last_stats.stop_reason == "interrupted"
    replay = ChatSession(model, tokenizer, config, context=512, fast=False)
    replay.messages = [dict(m) for m in session.messages]
    with torch.no_grad():
        assert "".join(session.send("go on")) == "".join(replay.send("go on"))
