"""ChatSession: the compiled and the eager engine hold the same conversation, token for token."""

from __future__ import annotations

import torch

import minillama
from minillama.chat import ChatSession
from minillama.fast import CompiledEngine
from minillama.generation import EagerEngine, GenerationConfig
from minillama.tokenizer import load_tokenizer

TURNS = ["Hello!", "Tell me about rivers.", "And mountains?", "Thanks."]


SAMPLINGS = [
    dict(do_sample=False),
    dict(do_sample=False, repetition_penalty=1.3),  # the penalty must count earlier turns on both engines
    dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, min_p=0.02),
]


def test_compiled_and_eager_sessions_agree(chat_model):
    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(max_new_tokens=16)
    compiled = ChatSession(model, tokenizer, config, system="Be kind.", seed=4, context=512, engine="compiled")
    eager = ChatSession(model, tokenizer, config, system="Be kind.", seed=4, context=512)
    assert isinstance(compiled.engine, CompiledEngine) and isinstance(eager.engine, EagerEngine)  # eager on CPU
    for sampling in SAMPLINGS:  # one session per engine (one compile), cleared between settings
        for session in (compiled, eager):
            session.config = config.updated(**sampling)
            session.clear()
        for text in TURNS:
            assert "".join(compiled.send(text)) == "".join(eager.send(text))
            assert compiled.cached_ids == eager.cached_ids
            assert compiled.last_stats.prompt_tokens == eager.last_stats.prompt_tokens
        # later turns prefilled only their new tokens
        assert compiled.last_stats.prompt_tokens < len(compiled.cached_ids) // 2


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
    replay = ChatSession(model, tokenizer, config, context=512)
    replay.messages = [dict(m) for m in session.messages]
    with torch.no_grad():
        assert "".join(session.send("go on")) == "".join(replay.send("go on"))
