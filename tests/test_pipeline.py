"""The walkthrough in one call: the real Llama 3.2 tokenizer with a tiny random model of its vocabulary."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import llama32_like, make_hf_checkpoint

from minillama import ChatPipeline, pipeline
from minillama.errors import MinillamaError
from minillama.generation import GenerationConfig, generate
from minillama.tokenizer import load_tokenizer

EOT = 128009  # <|eot_id|>
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hi in emoji 👋"}]
DATE = {"date_string": "26 Jul 2024"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model; extra threads only fight over the shared cores
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, llama32_tokenizer_dir):
    """A tiny random model with Llama 3.2's full vocabulary, next to the real tokenizer files."""
    path = make_hf_checkpoint(tmp_path_factory.mktemp("chat32"), vocab_size=128256, hidden_size=16,
                              intermediate_size=32, num_attention_heads=2, num_key_value_heads=1,
                              initializer_range=0.2, **llama32_like(bos_token_id=128000, eos_token_id=128001))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama32_tokenizer_dir / f, path / f)
    (path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [128001, 128008, EOT]}))
    return path


@pytest.fixture(scope="module")
def pipe(chat_model_dir):
    return pipeline(chat_model_dir, device="cpu", seed=0)


def test_pipeline_reads_the_model_directory(pipe):
    c = pipe.generation_config
    assert (c.do_sample, c.temperature, c.top_p, c.eos_token_id) == (True, 0.6, 0.9, [128001, 128008, EOT])
    assert pipe.tokenizer.chat_template_source is not None


def test_reply_is_the_decoded_greedy_generation(pipe):
    reply = pipe(MESSAGES, DATE, do_sample=False, max_new_tokens=30)
    ids = pipe.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, **DATE)
    tokens = list(generate(pipe.model, ids, pipe.generation_config, do_sample=False, max_new_tokens=30,
                           eos_token_id=[128001, 128008, EOT]))
    assert pipe.last_generation.tokens[0] == tokens
    assert reply == pipe.tokenizer.decode(tokens, skip_special_tokens=True)


def test_greedy_reply_matches_transformers(pipe, chat_model_dir):
    from transformers import LlamaForCausalLM as HFLlama

    hf = HFLlama.from_pretrained(chat_model_dir, attn_implementation="eager", dtype=torch.float32).eval()
    ids = pipe.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True, **DATE)
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, pad_token_id=0,
                          eos_token_id=[128001, 128008, EOT])
    expected = out[0, len(ids):].tolist()
    reply = pipe(MESSAGES, DATE, do_sample=False, max_new_tokens=40)
    assert pipe.last_generation.tokens[0] == expected
    assert reply == pipe.tokenizer.decode(expected, skip_special_tokens=True)


def test_stream_pieces_join_to_the_reply(pipe):
    pieces = list(pipe.stream(MESSAGES, DATE, do_sample=False, max_new_tokens=40))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == pipe(MESSAGES, DATE, do_sample=False, max_new_tokens=40)
    assert "\ufffd" not in "".join(pieces) or "\ufffd" in pipe.tokenizer.decode(pipe.last_generation.tokens[0])


def test_seeded_sampling_reproduces(chat_model_dir, pipe):
    a = ChatPipeline(pipe.model, pipe.tokenizer, pipe.generation_config, seed=5)(MESSAGES, DATE, max_new_tokens=15)
    b = ChatPipeline(pipe.model, pipe.tokenizer, pipe.generation_config, seed=5)(MESSAGES, DATE, max_new_tokens=15)
    assert a == b


def test_stops_on_eos(pipe):
    free = pipe(MESSAGES, DATE, do_sample=False, max_new_tokens=20)
    stop_at = pipe.last_generation.tokens[0][3]
    reply = pipe(MESSAGES, DATE, do_sample=False, max_new_tokens=20, eos_token_id=[stop_at])
    tokens = pipe.last_generation.tokens[0]
    assert pipe.last_generation.stop_reason == "eos" and tokens[-1] == stop_at and len(tokens) <= 4
    assert free.startswith(reply)


def test_end_of_turn_tokens_always_stop(chat_model_dir, pipe):
    """Without generation_config.json, the tokenizer's eos and <|eot_id|> still end the reply."""
    bare = ChatPipeline(pipe.model, load_tokenizer(chat_model_dir), GenerationConfig())
    bare(MESSAGES, DATE, max_new_tokens=2)
    assert set(bare.last_generation.config.eos_token_id) == {128001, EOT}


def test_errors_come_before_any_text(pipe):
    with pytest.raises(MinillamaError, match="context"):
        pipe.stream([{"role": "user", "content": "word " * 300}], max_new_tokens=10)
    with pytest.raises(MinillamaError, match="temperature"):
        pipe.stream(MESSAGES, temperature=-1.0)
    with pytest.raises(MinillamaError, match="empty"):
        pipe([])


def test_a_plain_string_is_one_user_message(pipe):
    assert pipe("hello", DATE, do_sample=False, max_new_tokens=5) == \
        pipe([{"role": "user", "content": "hello"}], DATE, do_sample=False, max_new_tokens=5)


def test_the_transformers_spelling_answers_in_the_transformers_shape(chat_model_dir, pipe):
    """The usual walkthrough's lines (`pipeline("text-generation", model=..., torch_dtype=..., device_map="auto")`,
    then `outputs[0]["generated_text"][-1]["content"]`) run unchanged, and give the reply the plain form gives."""
    tf = pipeline("text-generation", model=str(chat_model_dir), torch_dtype=torch.float32, device_map="auto")
    outputs = tf(MESSAGES, max_new_tokens=8, do_sample=False)
    assert outputs[0]["generated_text"][:-1] == MESSAGES
    assert outputs[0]["generated_text"][-1]["role"] == "assistant"
    assert outputs[0]["generated_text"][-1]["content"] == pipe(MESSAGES, max_new_tokens=8, do_sample=False)
    reply_only = tf(MESSAGES, max_new_tokens=8, do_sample=False, return_full_text=False)
    assert reply_only == [{"generated_text": outputs[0]["generated_text"][-1]["content"]}]
    with pytest.raises(MinillamaError, match="needs model="):
        pipeline("text-generation")


def test_functions_named_like_their_modules_stay_functions():
    """`minillama.pipeline`, `.intervene` and `.capture` are functions in modules of the same name. The package
    imports its names lazily, and the import system sets a submodule as its package's attribute once it has run:
    the function must stay what the name means, whichever comes first. A fresh process, so nothing is imported yet."""
    script = """
import sys
import minillama.pipeline, minillama.intervene, minillama.capture
from minillama.pipeline import ChatPipeline
for name in ("pipeline", "intervene", "capture"):
    assert getattr(minillama, name) is getattr(sys.modules["minillama." + name], name), name
    assert callable(getattr(minillama, name)) and not isinstance(getattr(minillama, name), type(sys))
import minillama.pipeline as m
assert m is minillama.pipeline and minillama.ChatPipeline is ChatPipeline
names = {}
exec("from minillama import *", names)
assert sorted(k for k in names if k != "__builtins__") == sorted(minillama.__all__)
assert names["pipeline"] is minillama.pipeline and minillama.generation.generate is minillama.generate
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]
    import minillama

    assert pipeline is minillama.pipeline and minillama.intervene.__module__ == "minillama.intervene"
    assert set(minillama.__all__) <= set(dir(minillama)) and len(set(minillama.__all__)) == len(minillama.__all__)
