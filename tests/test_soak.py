"""A long chat: 200 turns on a tiny model with a small context.

Memory stays flat (process RSS and the number of live tensors stop growing after warm-up), every
context-full event is reported and handled as designed (the turn is refused, nothing is truncated,
/clear starts over), and after /clear the session answers exactly as a fresh one would.
"""

from __future__ import annotations

import gc
import warnings

import psutil
import pytest
import torch

import minillama
from minillama.chat import ChatSession, ContextFull
from minillama.generation import GenerationConfig
from minillama.tokenizer import load_tokenizer

CONTEXT = 160  # a few turns fill it, so the soak meets many context-full events


@pytest.fixture(scope="module")
def session_parts(chat_model):
    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(do_sample=True, temperature=0.8, top_p=0.9,
                                                                 max_new_tokens=24)
    return model, tokenizer, config


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # touching some torch.distributed objects warns; they are not tensors
        warnings.simplefilter("ignore")
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_200_turns_memory_flat_and_context_full_handled(session_parts):
    model, tokenizer, config = session_parts
    session = ChatSession(model, tokenizer, config, system="You are terse.", seed=3, context=CONTEXT)
    process = psutil.Process()
    refused = clipped = 0
    baseline = None
    for turn in range(200):
        if turn == 30:  # warm-up done: allocator pools, caches and lazy imports have settled
            baseline = (process.memory_info().rss, live_tensors())
        try:
            reply = "".join(session.send(f"question number {turn}: what comes next?"))
        except ContextFull as e:
            refused += 1
            assert "/clear" in str(e)
            assert session.messages == [] or session.messages[-1]["role"] == "assistant"  # nothing half-added
            session.clear()
            continue
        stats = session.last_stats
        assert stats.context_used <= CONTEXT  # never past the context, so never silently truncated
        assert session.messages[-1] == {"role": "assistant", "content": reply}
        if stats.stop_reason == "context":
            clipped += 1  # the reply ran into the end of the context: reported, kept, and the next turn refused
    rss, tensors = process.memory_info().rss, live_tensors()
    print(f"refused {refused}, replies cut by the context {clipped}, RSS {(rss - baseline[0]) / 2**20:+.1f} MiB")
    assert refused >= 10 and clipped >= 5  # the soak really exercised both context-full paths
    assert rss - baseline[0] < 30 * 2**20, f"RSS grew {(rss - baseline[0]) / 2**20:.1f} MiB over 170 turns"
    assert tensors <= baseline[1], f"live tensors grew from {baseline[1]} to {tensors}"


def test_after_clear_the_session_answers_as_a_fresh_one(session_parts):
    model, tokenizer, config = session_parts
    used = ChatSession(model, tokenizer, config, seed=11, context=CONTEXT)
    for text in ("hello", "tell me more", "and more"):
        try:
            "".join(used.send(text))
        except ContextFull:
            break
    used.clear()
    fresh = ChatSession(model, tokenizer, config, seed=11, context=CONTEXT)
    for text in ("first again", "second again"):
        assert "".join(used.send(text)) == "".join(fresh.send(text))
    assert used.messages == fresh.messages


pytestmark = pytest.mark.usefixtures("one_thread")  # small matrices (conftest.one_thread)
