"""`minillama.diff` finds the layer where minillama parts from transformers; `minillama.lens` reads each layer out;
and their command-line front ends."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import minillama
from conftest import llama32_like, make_hf_checkpoint
from minillama.cli import main
from minillama.diff import DiffRow, diff_against_transformers, first_divergence, plot_diff
from minillama.lens import logit_lens
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


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_healthy_model_has_no_divergence(four_layers, attention):
    """Same kernel on both sides: no gap at all; the other kernel's rounding gap is reported beside it."""
    rows = diff_against_transformers(four_layers, IDS, attention=attention)
    assert names(rows) == ["embeddings", "layer 0", "layer 1", "layer 2", "layer 3", "final norm", "logits"]
    assert first_divergence(rows) is None
    assert all(r.max_abs == 0 and r.rel == 0 for r in rows)
    # The other kernel rounds differently from layer 0 on (attention); the embeddings know no attention.
    assert rows[0].cross_rel == 0 and all(r.cross_rel < 1e-5 for r in rows) and rows[-1].cross_rel > 0


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
    captured = capsys.readouterr()
    assert "no divergence" in captured.out and captured.out.count("\nlayer ") == 2
    assert "attention sdpa on both sides" in captured.out and "vs tf eager" in captured.out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert captured.err == f"minillama: wrote the plot to {plot}\n"  # and no transformers progress bar

    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    weights = load_file(broken / "model.safetensors")
    weights["model.layers.1.input_layernorm.weight"] *= 1.5
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    args = ["diff", str(broken), "--prompt", "Hello there", "--reference", str(model_dir), "--json"]
    assert main([*args, "--attention", "eager"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["first_divergence"] == "layer 1" and report["attention"] == "eager"


def test_diff_plot_draws_the_tolerance_on_the_verdicts_axis(tmp_path):
    """The verdict is relative error > tol, so the tol line sits on the relative-error panel, with the
    relative errors; a row far below tol in relative terms may be above it in absolute terms."""
    import matplotlib.pyplot as plt

    rows = [DiffRow("layer 0", max_abs=5e-4, rel=2e-5, diverged=False, cross_rel=3e-5),
            DiffRow("layer 1", max_abs=9e-2, rel=3e-4, diverged=True, cross_rel=3e-4)]
    saved = []
    original = plt.Figure.savefig
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", lambda fig, *a, **k: (saved.append(fig), original(fig, *a, **k)))
        plot_diff(rows, 1e-4, tmp_path / "d.png")
    relative, absolute = saved[0].axes
    tol_lines = [ln for ln in relative.get_lines() if list(ln.get_ydata()) == [1e-4, 1e-4]]
    assert len(tol_lines) == 1 and "tol" in tol_lines[0].get_label()
    assert list(relative.get_lines()[0].get_ydata()) == [2e-5, 3e-4]
    assert [list(ln.get_ydata()) for ln in absolute.get_lines()] == [[5e-4, 9e-2]]  # no tol line here


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
    """Plain text and the last position by default; --all-positions, --position N, --chat on request."""
    model_dir = chat_model
    assert main(["lens", str(model_dir), "--prompt", "Hello world", "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("position 2: '␣world' (1917) -> next token") and len(out) == 1 + 3
    assert out[1].startswith("  embeddings") and out[3].startswith("  layer 1")

    plot = tmp_path / "lens.png"
    assert main(["lens", str(model_dir), "--prompt", "Hello world", "--all-positions", "--top", "2",
                 "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()
    assert out[0] == "position 0: '<|begin_of_text|>' (128000) -> next token"
    assert out[4].startswith("position 1: 'Hello' (9906)") and out[8].startswith("position 2: '␣world' (1917)")
    assert len(out) == 3 * (1 + 3)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"minillama: the lens of {model_dir} on cpu (float32 weights)\n" in captured.err  # which weights ran
    assert captured.err.endswith(f"minillama: wrote the plot to {plot}\n")

    assert main(["lens", str(model_dir), "--prompt", "Hello world", "--position", "1", "--position", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("position 1: 'Hello'") and out[4].startswith("position 0: '<|begin_of_text|>'")

    assert main(["lens", str(model_dir), "--prompt", "Hi", "--chat"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("position ") and "'↵↵' (271)" in out[0]  # after the assistant header's blank line

    assert main(["lens", str(model_dir), "--prompt", "Hello\xa0world", "--all-positions"]) == 0
    out = capsys.readouterr().out
    assert "'\\xa0" in out and "\\\\xa0" not in out  # a no-break space shown once escaped, not twice

    assert main(["lens", str(model_dir), "--prompt", "Hi", "--top", "0"]) == 2
    assert "--top must be at least 1" in capsys.readouterr().err
    assert main(["lens", str(model_dir), "--prompt", "Hi", "--position", "7"]) == 2
    assert "--position 7 is outside the prompt's 2 tokens" in capsys.readouterr().err


def test_library_functions_are_exported_and_inspect_is_not_shadowed(tmp_path):
    """The tools are library code (the CLI only parses and prints); no module of the package is called
    `inspect`, so a script run from inside the package folder still gets the standard library's."""
    import subprocess
    import sys
    from pathlib import Path

    import minillama.diff
    import minillama.dump
    import minillama.lens
    import minillama.model_info

    assert minillama.diff_against_transformers is minillama.diff.diff_against_transformers
    assert minillama.first_divergence is minillama.diff.first_divergence
    assert minillama.dump_activations is minillama.dump.dump_activations
    assert minillama.logit_lens is minillama.lens.logit_lens and minillama.format_lens is minillama.lens.format_lens
    assert minillama.inspect_model is minillama.model_info.inspect_model
    package = Path(minillama.__file__).parent
    assert not (package / "inspect.py").exists()
    r = subprocess.run([sys.executable, "-c", "import inspect; print(inspect.__file__)"], cwd=package,
                       capture_output=True, text=True, check=True)
    assert not r.stdout.strip().startswith(str(package))
