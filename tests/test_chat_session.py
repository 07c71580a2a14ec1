"""ChatSession: the compiled and the eager engine hold the same conversation, token for token."""

from __future__ import annotations

import pytest
import torch

import minillama
from minillama.chat import ChatSession, ContextFull
from minillama.aot import AotEngine
from minillama.generation import EagerEngine, GenerationConfig
from minillama.tokenizer import load_tokenizer

TURNS = ["Hello!", "Tell me about rivers.", "And mountains?", "Thanks."]


SAMPLINGS = [
    dict(do_sample=False),
    dict(do_sample=False, repetition_penalty=1.3),  # the penalty must count earlier turns on both engines
    dict(do_sample=True, temperature=0.9, top_k=40, top_p=0.95, min_p=0.02),
]


def test_compiled_and_eager_sessions_agree(chat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLAMA_CACHE", str(tmp_path))  # where the compiled step is kept (aot.py)
    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(max_new_tokens=16)
    compiled = ChatSession(model, tokenizer, config, system="Be kind.", seed=4, context=512, engine="compiled")
    eager = ChatSession(model, tokenizer, config, system="Be kind.", seed=4, context=512)
    assert isinstance(compiled.engine, AotEngine) and isinstance(eager.engine, EagerEngine)  # eager: float on a CPU
    assert compiled.engine.ready  # built now (no load_args for a background build), so every turn runs the graph
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


def test_dropping_the_oldest_turns_keeps_the_system_prompt_and_a_consistent_cache(chat_model):
    """drop_oldest forgets whole turns from the start; the next reply equals that of a fresh session holding
    the same conversation (the cache is re-used only up to where the rendering changed)."""
    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(do_sample=False, max_new_tokens=6)
    session = ChatSession(model, tokenizer, config, system="Be kind.", context=512)
    for text in TURNS[:3]:
        "".join(session.send(text))
    assert session.drop_oldest(2) == 2
    assert [m["content"] for m in session.messages if m["role"] == "user"] == [TURNS[2]]
    assert session.conversation()[0] == {"role": "system", "content": "Be kind."}
    fresh = ChatSession(model, tokenizer, config, system="Be kind.", context=512)
    fresh.messages = [dict(m) for m in session.messages]
    assert "".join(session.send(TURNS[3])) == "".join(fresh.send(TURNS[3]))
    assert session.drop_oldest(5) == 2 and session.messages == []  # only what is there goes


def test_make_room_drops_only_what_the_new_message_needs(chat_model):
    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(do_sample=False, max_new_tokens=8)
    session = ChatSession(model, tokenizer, config, system="Be kind.", context=96)
    for text in TURNS[:2]:
        "".join(session.send(text))
    before = len(session.messages)
    assert session.make_room("Hi") == 0 and len(session.messages) == before  # it fits: nothing goes
    long = "rivers and mountains " * 10
    assert len(session.prompt_ids(long)) + 8 > 96 and len(session.prompt_ids()) > 40  # the history is in the way
    dropped = session.make_room(long)
    assert dropped >= 1 and len(session.prompt_ids(long)) + 8 <= 96
    with pytest.raises(ContextFull, match="this message alone needs .* shorten it or raise --context") as e:
        session.make_room("word " * 200)
    assert e.value.alone


def test_the_repetition_penalty_spares_the_end_of_turn_ids(chat_model, monkeypatch):
    """The rendered conversation holds an end-of-turn token after every message; a penalty counting them kept
    the default model's replies from ending (docs/defaults.md). What the penalty counts is the conversation
    without them, and the reply; the cache still holds every token."""
    import minillama.chat as chat

    model, tokenizer = minillama.load_model(chat_model, device="cpu"), load_tokenizer(chat_model)
    config = GenerationConfig.from_model_dir(chat_model).updated(do_sample=False, max_new_tokens=4,
                                                                 repetition_penalty=1.3)
    session = ChatSession(model, tokenizer, config, system="Be kind.", context=512)
    calls = []

    def spy(model, input_ids, config, **kwargs):
        calls.append((list(input_ids), list(kwargs["history"]), kwargs["input_pos"]))
        return minillama.generate(model, input_ids, config, **kwargs)

    monkeypatch.setattr(chat, "generate", spy)
    for text in ("Hello!", "And rivers?"):
        ids = session.prompt_ids(text)
        "".join(session.send(text))
        input_ids, history, input_pos = calls[-1]
        end_of_turn = set(session.config.eos_token_id)
        assert input_ids == ids[-1:] and input_pos == len(ids) - 1
        assert history == [i for i in ids[:-1] if i not in end_of_turn]
        assert end_of_turn & set(ids[:-1])  # the rendered prompt does hold them
        assert session.cached_ids[:len(ids)] == ids


def test_default_context_fits_a_quarter_of_free_memory(chat_model, monkeypatch, capsys):
    """The chat's KV cache is allocated up front: unless --context says otherwise it takes at most a quarter of
    the free memory (a model with 512 KiB per token took 4 GiB for 8192 positions), and the chat says so."""
    import minillama.chat as chat
    from minillama.cli import main

    model = minillama.load_model(chat_model, device="cpu")
    c = model.config
    per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4  # float32 keys and values
    assert ChatSession(model, load_tokenizer(chat_model), GenerationConfig()).context == 4096  # the model's own
    monkeypatch.setattr(chat, "available_bytes", lambda device=None: 4 * 1000 * per_token)
    session = ChatSession(model, load_tokenizer(chat_model), GenerationConfig())
    assert session.context == 1000 and session.engine.max_seq_len == 1000
    assert "context 1,000 tokens, not 4,096" in session.context_note and "--context N" in session.context_note
    assert ChatSession(model, load_tokenizer(chat_model), GenerationConfig(), context=3000).context == 3000
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    assert main(["chat", str(chat_model), "-n", "2"]) == 0
    assert "minillama: context 1,000 tokens, not 4,096" in capsys.readouterr().err
