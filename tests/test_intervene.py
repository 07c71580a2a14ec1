"""Interventions: ablation and patching against transformers with plain forward hooks, bit-identical
self-patching, the KV cache after a patched prefill, steering, the compiled engine's refusal, errors."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.testing import assert_close

import minillama
from minillama.capture import activation_names
from minillama.intervene import add, logit_difference, mean, patch, zero

CLEAN = torch.tensor([[3, 17, 42, 99, 5, 200, 7, 64, 128, 1]])  # (1, 10)
CORRUPTED = torch.tensor([[3, 17, 250, 99, 5, 200, 7, 64, 128, 1]])  # differs at position 2


@pytest.fixture(autouse=True)
def one_thread(request):
    """Tiny models gain nothing from threads; on a loaded 2-core machine they lose (OpenMP barriers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(before if request.node.get_closest_marker("slow") else 1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(tiny_llama32):
    return minillama.load_model(tiny_llama32, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def hf(tiny_llama32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama32, dtype=torch.float32, attn_implementation="eager").eval()


def hf_logits(hf, ids, module, hook, pre: bool = False) -> torch.Tensor:
    """transformers' logits with one plain PyTorch hook on `module` (a pre-hook sees args and kwargs)."""
    handle = (module.register_forward_pre_hook(hook, with_kwargs=True) if pre
              else module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        handle.remove()


def test_zero_ablating_an_mlp_equals_transformers(model, hf):
    ref = hf_logits(hf, CLEAN, hf.model.layers[1].mlp, lambda m, args, out: torch.zeros_like(out))
    with torch.no_grad(), minillama.intervene(model, {"model.layers.1.mlp.down_proj": zero()}):
        ours = model(CLEAN)
    assert_close(ours, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(ours, model(CLEAN).detach(), atol=1e-3)  # the ablation did something


def test_zero_ablating_one_head_equals_transformers(model, hf):
    D = model.config.head_dim

    def zero_head(m, args, kwargs):  # o_proj's input: heads side by side, head 1 is channels [D, 2D)
        z = args[0].clone()
        z[..., D:2 * D] = 0
        return (z, *args[1:]), kwargs

    ref = hf_logits(hf, CLEAN, hf.model.layers[0].self_attn.o_proj, zero_head, pre=True)
    with torch.no_grad():
        with minillama.intervene(model, {"model.layers.0.self_attn.o_proj_input": zero(head=1)}):
            ours = model(CLEAN)
        with minillama.intervene(model, {"blocks.0.attn.hook_z": zero(head=1)}):  # the alias, (B, T, H, D)
            alias = model(CLEAN)
    assert_close(ours, ref, rtol=0, atol=1e-5)
    assert torch.equal(alias, ours)


def test_patching_resid_pre_at_one_position_equals_transformers(model, hf):
    layer, position = 1, 2
    with torch.no_grad():
        clean_hidden = hf(CLEAN, output_hidden_states=True).hidden_states[layer]  # resid_pre of `layer`

    def patch_position(m, args, kwargs):
        x = args[0].clone()
        x[:, position] = clean_hidden[:, position]
        return (x, *args[1:]), kwargs

    ref = hf_logits(hf, CORRUPTED, hf.model.layers[layer], patch_position, pre=True)
    name = f"model.layers.{layer}.resid_pre"
    with torch.no_grad():
        with minillama.capture(model, [name]) as clean:
            model(CLEAN)
        with minillama.intervene(model, {name: patch(clean[name], position=position)}):
            ours = model(CORRUPTED)
    assert_close(ours, ref, rtol=0, atol=1e-5)

    # the patching grid's cell for (layer, position) is the same run, scored
    metric = logit_difference(5, 9)
    grid = minillama.patching(model, CLEAN, CORRUPTED, ["resid_pre", "hook_attn_out"], metric)
    assert grid.scores.shape == (2, 2, 10) and grid.layers == [0, 1]
    assert_close(grid.scores[0, layer, position], metric(ours[0, -1]), rtol=0, atol=1e-5)
    assert_close(grid.scores[0, 0, 0], torch.tensor(grid.corrupted), rtol=0, atol=1e-5)  # the same token there
    assert_close(torch.tensor(grid.clean), metric(model(CLEAN)[0, -1]), rtol=0, atol=1e-5)


def test_patching_a_run_with_its_own_activations_is_bit_identical(model):
    names = activation_names(model)  # every value, the attention pattern included (eager attention)
    with torch.no_grad():
        with minillama.capture(model, names) as acts:
            plain = model(CLEAN)
        with minillama.intervene(model, {name: patch(acts[name]) for name in names}):
            patched = model(CLEAN)
        with minillama.intervene(model, {"model.layers.*.resid_pre": lambda x: x.clone(),
                                         "blocks.*.attn.hook_z": lambda x: x + 0.0,
                                         "model.embed_tokens": acts["model.embed_tokens"]}):  # a tensor replaces
            also = model(CLEAN)
        sdpa = model(CLEAN)  # no pattern was tapped: SDPA, not the eager path the full capture took
    assert torch.equal(patched, plain) and torch.equal(also, sdpa)


def test_mean_ablation_positions_and_nested_capture(model):
    name = "model.layers.0.mlp.down_proj"
    with torch.no_grad(), minillama.intervene(model, {name: mean(position=[1, 3])}):
        with minillama.capture(model, [name]) as inner:  # entered later: sees the edited value
            model(CLEAN)
    with torch.no_grad(), minillama.capture(model, [name]) as plain:
        model(CLEAN)
    edited, x = inner[name], plain[name]
    assert_close(edited[:, [1, 3]], x.mean(dim=(0, 1)).expand(2, -1)[None])
    assert torch.equal(edited[:, [0, 2, 4]], x[:, [0, 2, 4]])


def test_patched_prefill_writes_patched_keys_and_values_to_the_cache(model):
    """Prefill under an intervention, decode after it: the step reads the patched layer-1 keys/values."""
    T = CLEAN.shape[1]
    step = torch.tensor([[77]])
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        with minillama.intervene(model, {"model.layers.0.mlp.down_proj": zero(),
                                         "model.layers.0.self_attn.k_rot": zero(head=1)}):
            model(CLEAN, cache=cache)
        decoded = model(step, cache=cache, input_pos=T)[0, -1]
        assert (cache[0].k[:, 1, :T] == 0).all() and (cache[0].k[:, 0, :T] != 0).all()
        # the reference: one forward over prompt + step with the same edits on the prompt's positions only
        prompt = list(range(T))
        with minillama.intervene(model, {"model.layers.0.mlp.down_proj": zero(position=prompt),
                                         "blocks.0.attn.hook_rot_k": zero(head=1, position=prompt)}):
            full = model(torch.cat([CLEAN, step], dim=1))[0, -1]
        unpatched = model(torch.cat([CLEAN, step], dim=1))[0, -1]
    assert_close(decoded, full, rtol=0, atol=1e-5)
    assert not torch.allclose(decoded, unpatched, atol=1e-3)


def greedy(model, **options) -> list[int]:
    return list(minillama.generate(model, CLEAN[0].tolist(), do_sample=False, max_new_tokens=8, **options))


def test_steering_changes_greedy_text_and_scale_zero_does_not(model):
    vector = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    plain = greedy(model, engine="eager")
    with minillama.steer(model, "model.layers.0.resid_post", vector, scale=0.0):
        assert greedy(model, engine="eager") == plain
    with minillama.steer(model, "model.layers.0.resid_post", vector, scale=50.0):
        steered = greedy(model, engine="eager")
    assert steered != plain
    with minillama.intervene(model, {"blocks.0.hook_resid_post": add(vector, 50.0)}):  # the same, by alias
        assert greedy(model, engine="eager") == steered
    with pytest.raises(minillama.MinillamaError, match=r"model\.layers\.0\.resid_post is hooked\); use engine='eager'"):
        with minillama.steer(model, "model.layers.0.resid_post", vector, scale=50.0):
            greedy(model, engine="compiled")
    assert greedy(model, engine="eager") == plain  # nothing left behind


def no_hooks_left(model) -> bool:
    return "_minillama_taps" not in model.__dict__ and all(
        not m._forward_hooks and not m._forward_pre_hooks and "observer" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("edits, message", [
    ({"model.layers.*.nothing": zero()}, "no activation is named 'model.layers.*.nothing'"),
    ({"model.layers.0.*": zero(), "*.resid_pre": zero()}, "model.layers.0.resid_pre is matched by both"),
    ({"model.layers.0.resid_pre": "zero"}, "the edit for 'model.layers.0.resid_pre' is a str"),
    ({"model.layers.0.resid_pre": zero(head=0)}, "model.layers.0.resid_pre has none"),
    ({"model.layers.0.resid_pre": torch.zeros(3)}, "a tensor of shape (3,) cannot replace"),
    ({"model.layers.0.resid_pre": lambda x: x[0]}, "must return a tensor of shape (1, 10, 64)"),
    ({"model.layers.0.resid_pre": add(torch.ones(5))}, "cannot apply add to model.layers.0.resid_pre"),
])
def test_bad_edits_are_one_line_errors_and_leave_no_hooks(model, edits, message):
    with pytest.raises(minillama.MinillamaError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("*", r"\*")):
        with torch.no_grad(), minillama.intervene(model, edits):
            model(CLEAN)
    assert no_hooks_left(model)


def test_patching_checks_its_inputs(model):
    with pytest.raises(minillama.MinillamaError, match="clean prompt has 10 tokens and the corrupted one 9"):
        minillama.patching(model, CLEAN, CORRUPTED[:, 1:], answers=(1, 2))
    with pytest.raises(minillama.MinillamaError, match="needs a metric, or answers="):
        minillama.patching(model, CLEAN, CORRUPTED)
    with pytest.raises(minillama.MinillamaError, match="'resid' is not one"):
        minillama.patching(model, CLEAN, CORRUPTED, ["resid"], answers=(1, 2))


# ---- The command line ------------------------------------------------------------------------------

def test_steer_flag_on_generate(chat_model, tmp_path, capsys):
    from safetensors.torch import save_file

    from minillama.cli import main

    vector = tmp_path / "v.safetensors"
    save_file({"v": torch.randn(32, generator=torch.Generator().manual_seed(0))}, vector)
    base = ["generate", str(chat_model), "--raw", "--prompt", "Hello", "--greedy", "-n", "6"]
    replies = []
    for extra in ([], ["--steer", f"model.layers.0.resid_post={vector}:0"],
                  ["--steer", f"blocks.0.hook_resid_post={vector}:80"]):
        assert main(base + extra) == 0
        replies.append(capsys.readouterr().out)
    assert replies[1] == replies[0] and replies[2] != replies[0]
    name, junk = "model.layers.0.resid_post", tmp_path / "junk"
    junk.write_bytes(b"\x08" + bytes(20))
    for extra, message in [(["--steer", name], "expected NAME=FILE.safetensors[:SCALE]"),
                           (["--steer", f"{name}={tmp_path}/none.safetensors"], "none.safetensors: no such file"),
                           (["--steer", f"{name}={tmp_path}"], "give a regular steering vector file"),
                           (["--steer", f"{name}={junk}:2"], "junk is not a readable safetensors file"),
                           (["--steer", f"{name}={vector}", "--engine", "compiled"], "drop --engine compiled")]:
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["chat", str(chat_model), "--steer", "nothing"]) == 2  # chat takes the same flag
    assert "expected NAME=FILE.safetensors[:SCALE]" in capsys.readouterr().err


def test_steer_checks_the_vector_shape_before_generating(chat_model, tmp_path, capsys):
    """A tensor from `minillama dump` (every position of its prompt) or a vector of the wrong width is refused in
    one line before any text streams; it used to fail with torch's message at the first decode step, glued to
    the streamed reply. The activation's other spelling finds its tensor in a dump file too."""
    from safetensors.torch import load_file, save_file

    from minillama.cli import main

    dumped = tmp_path / "acts.safetensors"
    assert main(["dump", str(chat_model), "--prompt", "The cat sat on the mat", "--raw", "--out", str(dumped),
                 "--names", "*.resid_post"]) == 0
    capsys.readouterr()
    captured_shape = str(tuple(load_file(dumped)["model.layers.0.resid_post"].shape))  # (1, T, 32)
    wide = tmp_path / "wide.safetensors"
    save_file({"v": torch.ones(33)}, wide)
    base = ["generate", str(chat_model), "--raw", "--prompt", "Hello", "--greedy", "-n", "6"]
    for spec, shape in [(f"model.layers.0.resid_post={dumped}", captured_shape),
                        (f"blocks.0.hook_resid_post={dumped}", captured_shape),
                        (f"model.layers.0.resid_post={wide}", "(33,)")]:
        assert main(base + ["--steer", spec]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""  # nothing streamed before the error
        err = captured.err.strip()
        assert "\n" not in err and err.startswith("minillama: error: --steer ")
        assert f"has shape {shape}" in err and "shape (32,)" in err, err
    one = tmp_path / "one.safetensors"
    save_file({"model.layers.0.resid_post": load_file(dumped)["model.layers.0.resid_post"][0, -1]}, one)
    assert main(base + ["--steer", f"blocks.0.hook_resid_post={one}:0"]) == 0


def test_patch_cli_json_plot_and_errors(chat_model, tmp_path, capsys):
    import json

    from minillama.cli import main

    plot = tmp_path / "grid.png"
    args = ["patch", str(chat_model), "--clean", "The cat sat", "--corrupted", "The dog sat", "--answers", " on", " in"]
    assert main(args + ["--json", "--plot", str(plot), "--names", "resid_pre", "hook_mlp_out"]) == 0
    captured = capsys.readouterr()
    assert captured.err.strip() == f"minillama: wrote the plot to {plot}"  # every written file gets a line
    out = json.loads(captured.out)
    T = len(out["clean_tokens"])
    assert out["layers"] == [0, 1] and set(out["grid"]) == {"resid_pre", "hook_mlp_out"}
    assert [len(row) for row in out["grid"]["resid_pre"]] == [T, T]
    assert out["grid"]["resid_pre"][0][0] == pytest.approx(out["corrupted"], abs=1e-5)  # the same first token
    assert plot.stat().st_size > 1000
    assert main(args) == 0
    assert "resid_pre: one row per layer" in capsys.readouterr().out
    assert main(args[:2] + ["--clean", "The cat sat", "--corrupted", "A dog"] + args[-3:]) == 2
    assert "reword one" in capsys.readouterr().err
    assert main(args[:-2] + [" antidisestablishmentarianism", " in"]) == 2
    assert "give answers of one token each" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:  # no matplotlib: said before any work (the model is never read)
        mp.setitem(sys.modules, "matplotlib", None)
        assert main(["patch", str(tmp_path / "absent")] + args[2:] + ["--plot", str(plot)]) == 2
    assert "pip install 'minillama[plot]'" in capsys.readouterr().err


def test_patching_shows_progress_at_a_terminal(model, monkeypatch):
    """`minillama patch` runs for minutes on a real model: a bar, one step per (name, layer), at a terminal."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    minillama.patching(model, CLEAN, CORRUPTED, ["resid_pre", "mlp.down_proj"], answers=(1, 2), progress=True)
    assert "patching" in err.getvalue() and "4/4" in err.getvalue()
    quiet = Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    minillama.patching(model, CLEAN, CORRUPTED, answers=(1, 2))  # the Python API is quiet unless asked
    assert quiet.getvalue() == ""


@pytest.mark.slow
def test_patching_smollm2_shows_where_the_answer_moves(smollm2_dir):
    """On the real model the fact sits at the subject's tokens up to layer 23 and at the last token from
    layer 24 on (docs/interpretability.md shows the whole grid)."""
    from minillama.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm2_dir)
    model = minillama.load_model(smollm2_dir, device="cpu", dtype="float32")
    clean, corrupted = (tokenizer.encode(text) for text in ("The Eiffel Tower is in the city of",
                                                            "The Colosseum is in the city of"))
    answers = tuple(tokenizer.encode(a, add_special_tokens=False)[0] for a in (" Paris", " Rome"))
    result = minillama.patching(model, clean, corrupted, layers=[23, 24], answers=answers)
    assert result.clean > 2 and result.corrupted < -8  # the model knows both facts
    before, after = result.scores[0]  # (T,) each, at layers 23 and 24
    assert before[2] > 0 and before[-1] < -5  # "iffel" carries Paris at layer 23; the last token not yet
    assert after[2] < -8 and after[-1] > 0  # at layer 24 it has moved to the last token
