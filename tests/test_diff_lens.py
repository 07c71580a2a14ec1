"""`minillama diff` finds the layer where minillama parts from transformers; `minillama lens` reads each layer out."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillama
from conftest import llama32_like, make_hf_checkpoint
from minillama.cli import main
from minillama.cli.diff import diff_against_transformers, first_divergence
from minillama.cli.lens import logit_lens
from test_inspect import make_chat_model

IDS = torch.tensor([[7, 99, 14, 250, 3, 61, 128, 42, 5, 17, 200, 33, 90, 11, 64, 2]])  # (1, 16)


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """A tiny Llama 3.2-like model with 4 layers, so a fault can sit in the middle."""
    return make_hf_checkpoint(tmp_path_factory.mktemp("four"), seed=3, num_hidden_layers=4, **llama32_like())


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, llama32_tokenizer_dir):
    return make_chat_model(tmp_path_factory.mktemp("chat"), llama32_tokenizer_dir)


def names(rows):
    return [r.name for r in rows]


def test_healthy_model_has_no_divergence(four_layers):
    rows = diff_against_transformers(four_layers, IDS)
    assert names(rows) == ["embeddings", "layer 0", "layer 1", "layer 2", "layer 3", "final norm", "logits"]
    assert first_divergence(rows) is None
    assert all(r.max_abs < 1e-4 and r.rel < 1e-5 for r in rows)


def test_perturbed_layer_is_named(four_layers, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(four_layers, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.2.mlp.down_proj.weight"][0, :5] += 0.05  # minillama's side only
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    rows = diff_against_transformers(broken, IDS, reference_dir=four_layers)
    assert first_divergence(rows).name == "layer 2"
    assert [r.diverged for r in rows] == [False, False, False, True, True, True, True]


def test_wrong_rope_scaling_shows_in_the_first_layer(four_layers, tmp_path):
    wrong = tmp_path / "wrong_rope"
    shutil.copytree(four_layers, wrong)
    config = json.loads((wrong / "config.json").read_text())
    rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
    config[rope_key]["factor"] = 8.0  # transformers keeps reading 32 from the original directory
    (wrong / "config.json").write_text(json.dumps(config))
    rows = diff_against_transformers(wrong, IDS, reference_dir=four_layers)
    assert not rows[0].diverged  # the embeddings know nothing of positions
    assert first_divergence(rows).name == "layer 0"


def test_cli_exit_codes_and_plot(chat_model, tmp_path, capsys):
    model_dir = chat_model
    plot = tmp_path / "diff.png"
    assert main(["diff", str(model_dir), "--prompt", "Hello there", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "no divergence" in out and out.count("\nlayer ") == 2
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.input_layernorm.weight"] *= 1.5
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    assert main(["diff", str(broken), "--prompt", "Hello there", "--reference", str(model_dir), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_divergence"] == "layer 1"


def test_logit_lens_last_layer_is_the_models_prediction(tiny_llama32):
    model = minillama.load_model(tiny_llama32, device="cpu", dtype="float32")
    lens = logit_lens(model, IDS, top=3)
    assert lens.layers == ["embeddings", "layer 0", "layer 1"]
    assert lens.top_ids.shape == lens.top_probs.shape == (3, 16, 3)
    with torch.no_grad():
        probs = model(IDS)[0].softmax(-1)  # (T, V)
    expected_p, expected_ids = probs.topk(3, dim=-1)
    assert torch.equal(lens.top_ids[-1], expected_ids)
    torch.testing.assert_close(lens.top_probs[-1], expected_p)
    assert (lens.top_probs[:, :, :-1] >= lens.top_probs[:, :, 1:]).all()  # sorted, likeliest first
    # the embeddings row: norm + lm_head of the token's own embedding
    with torch.no_grad():
        own = model.lm_head(model.model.norm(model.model.embed_tokens(IDS)))[0].softmax(-1).topk(3)
    assert torch.equal(lens.top_ids[0], own.indices)


def test_lens_cli(chat_model, tmp_path, capsys):
    model_dir = chat_model
    plot = tmp_path / "lens.png"
    assert main(["lens", str(model_dir), "--prompt", "Hello world", "--raw", "--top", "2", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "position 0: '<|begin_of_text|>' (128000) -> next token"
    assert out[4].startswith("position 1: 'Hello' (9906)") and out[8].startswith("position 2: '␣world' (1917)")
    assert len(out) == 3 * (1 + 3) and out[1].startswith("  embeddings")
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["lens", str(model_dir), "--prompt", "Hi", "--top", "0"]) == 2
