"""`minillama inspect`: the numbers match transformers, the token table matches the tokenizer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import llama32_like, make_hf_checkpoint
from minillama.cli import main
from minillama.model_info import inspect_model, visible
from minillama.tokenizer import load_tokenizer

PROMPT = "write 3 lines about\ttransformers\n  in llms"


def make_chat_model(path: Path, llama32_tokenizer_dir: Path) -> Path:
    """A tiny random Llama 3.2-like model with the real Llama 3.2 tokenizer (so the full 128,256 ids)."""
    make_hf_checkpoint(path, vocab_size=128256, **llama32_like())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama32_tokenizer_dir / name, path / name)
    return path


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, llama32_tokenizer_dir) -> Path:
    return make_chat_model(tmp_path_factory.mktemp("chat"), llama32_tokenizer_dir)


def transformers_num_parameters(model_dir: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).num_parameters()


@pytest.mark.parametrize("fixture", ["tiny_llama32", "tiny_llama2"])
def test_numbers_match_transformers(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    report = inspect_model(model_dir)
    tied = fixture == "tiny_llama32"
    params = report["parameters"]
    assert params["total"] == transformers_num_parameters(model_dir)
    assert params["by_kind"]["embed_tokens"] == 256 * 64
    assert ("lm_head" in params["by_kind"]) is not tied  # a tied head is the embedding: counted once
    assert params["by_kind"]["self_attn.k_proj"] == 2 * 64 * (32 if tied else 64)  # two layers, GQA or MHA
    assert report["stored"] == {"F32": {"tensors": 20 if tied else 21, "elements": params["total"],
                                        "bytes": 4 * params["total"]}}
    c = report["config"]
    assert (c["layers"], c["hidden_size"], c["attention_heads"], c["kv_heads"], c["head_dim"], c["vocab_size"],
            c["context_length"], c["tie_word_embeddings"], c["dtype"]) == (2, 64, 4, 2 if tied else 4, 16, 256,
                                                                          256, tied, "float32")
    assert c["rope_type"] == ("llama3" if tied else "default")
    files = {f["name"]: f for f in report["files"]}
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors"}
    assert files["model.safetensors"]["bytes"] == (model_dir / "model.safetensors").stat().st_size
    assert files["model.safetensors"]["purpose"] == "the weights"
    assert report["generation"]["eos_token_id"]["from"] == "generation_config.json"
    assert report["generation"]["temperature"] == {"value": 1.0, "from": "default"}
    assert "(q_proj): Linear(in_features=64, out_features=64, bias=False)" in report["module_tree"]


def test_sharded_checkpoint_files(tmp_path):
    model_dir = make_hf_checkpoint(tmp_path / "sharded", max_shard_size="100KB")
    report = inspect_model(model_dir)
    purposes = {f["name"]: f["purpose"] for f in report["files"]}
    assert purposes["model.safetensors.index.json"] == "which shard holds each tensor"
    shards = [name for name in purposes if name.startswith("model-")]
    assert len(shards) > 1 and purposes[shards[0]] == f"the weights, shard 1 of {len(shards)}"
    assert report["parameters"]["total"] == transformers_num_parameters(model_dir)
    assert report["stored"]["F32"]["elements"] == report["parameters"]["total"]  # untied: lm_head stored too


def test_token_table_matches_the_tokenizer(chat_model):
    tokenizer = load_tokenizer(chat_model)
    report = inspect_model(chat_model, prompt=PROMPT)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert report["prompt"]["text"] == text and report["prompt"]["chat_template"] is not None
    assert [t["id"] for t in report["prompt"]["tokens"]] == ids
    assert [t["index"] for t in report["prompt"]["tokens"]] == list(range(len(ids)))
    assert ids[0] == 128000 and ids.count(128000) == 1  # one bos: the template's, not a second one
    pieces = [t["piece"] for t in report["prompt"]["tokens"]]
    assert pieces == [visible(tokenizer.piece_text(i)) for i in ids]
    assert pieces[-17:-5] == ["write", "␣", "3", "␣lines", "␣about", "⇥transform", "ers", "↵", "␣", "␣in", "␣ll", "ms"]
    assert "↵↵" in pieces and all(" " not in p and "\n" not in p and "\t" not in p for p in pieces)

    raw = inspect_model(chat_model, prompt=PROMPT, raw=True)["prompt"]
    assert raw["chat_template"] is None and raw["text"] == PROMPT
    assert [t["id"] for t in raw["tokens"]] == tokenizer.encode(PROMPT)

    roles = {r["role"]: (r["token"], r["id"]) for r in inspect_model(chat_model)["special_tokens"]["roles"]}
    assert roles["bos"] == ("<|begin_of_text|>", 128000) and roles["eos"] == ("<|end_of_text|>", 128001)


def test_cli_text_and_json(chat_model, capsys):
    assert main(["inspect", str(chat_model), "--prompt", "Hi there"]) == 0
    text = capsys.readouterr().out
    for section in ("## Files", "## Config", "## Generation defaults", "## Special tokens", "## Modules",
                    "## Parameters", "## Stored weights", "## Prompt (chat template", "## Tokens"):
        assert section in text
    assert "bos  '<|begin_of_text|>' = 128000" in text and "␣there" in text
    assert main(["inspect", str(chat_model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parameters"]["total"] == transformers_num_parameters(chat_model)
    assert "prompt" not in report


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("minillama: error: ") and "nowhere" in err


@pytest.mark.slow
def test_smollm2(smollm2_dir):
    report = inspect_model(smollm2_dir, prompt="What is 2+2?")
    assert report["parameters"]["total"] == 134_515_008 == transformers_num_parameters(smollm2_dir)
    c = report["config"]
    assert (c["layers"], c["hidden_size"], c["attention_heads"], c["kv_heads"], c["head_dim"], c["vocab_size"],
            c["rope_theta"], c["tie_word_embeddings"]) == (30, 576, 9, 3, 64, 49152, 100000.0, True)
    tokenizer = load_tokenizer(smollm2_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], add_generation_prompt=True)
    assert "<|im_start|>user\nWhat is 2+2?<|im_end|>" in report["prompt"]["text"] == text
    assert [t["id"] for t in report["prompt"]["tokens"]] == tokenizer.encode(text, add_special_tokens=False)
    assert report["stored"] and sum(e["elements"] for e in report["stored"].values()) == 134_515_008


def test_inspect_shows_both_sets_of_defaults_and_the_quantization(tiny_llama2, tmp_path, capsys):
    """The chat/generate CLI's sampling (the chat defaults under the model file) beside the Python API's
    (transformers'), each labelled, and the stored quantization formats in words; a float model has none."""
    from minillama import quant
    from minillama.chat import CHAT_SAMPLING
    from minillama.checkpoint import load_model

    float_report = inspect_model(tiny_llama2)
    assert float_report["quantization"] is None
    cli, api = float_report["chat_sampling"], float_report["generation"]
    assert cli["temperature"]["value"] == CHAT_SAMPLING["temperature"] and api["temperature"]["value"] == 1.0
    assert cli["top_k"]["value"] == CHAT_SAMPLING["top_k"] and cli["top_k"]["from"] == "llama.cpp's defaults"
    assert cli["repetition_penalty"]["value"] == 1.15 and "measured" in cli["repetition_penalty"]["from"]
    assert api["do_sample"]["value"] is False and cli["do_sample"]["value"] is True

    out = quant.save_quantized(load_model(tiny_llama2, "cpu", quantize="int4", group_size=32), tiny_llama2,
                               tmp_path / "q")
    report = inspect_model(out)
    assert report["quantization"]["readable"] and report["quantization"]["formats"]["int4-g32"] == 14  # 2 x 7
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "## Quantization" in text and "int4 (4-bit integers, a scale and offset per 32 weights) in 14" in text
    assert "## Sampling of minillama chat and minillama generate" in text
    assert "## Generation defaults of the Python API" in text
