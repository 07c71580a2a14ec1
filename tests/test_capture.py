"""Activation capture: names, aliases, agreement with transformers, and clean-up."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import minillama
from minillama.capture import activation_names

IDS = torch.tensor([[3, 17, 42, 99, 5, 200, 7, 64, 128, 1, 250, 33]])  # (1, 12)


@pytest.fixture(scope="module")
def model(tiny_llama32):
    return minillama.load_model(tiny_llama32, device="cpu", dtype="float32")


def no_hooks_left(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and "observer" not in m.__dict__
               for m in model.modules())


def test_residual_streams_equal_transformers_hidden_states(model, tiny_llama32):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(tiny_llama32, dtype=torch.float32, attn_implementation="eager").eval()
    last_layer_out = {}
    handle = hf.model.layers[-1].register_forward_hook(lambda m, args, out: last_layer_out.update(x=out))
    with torch.no_grad():
        ref = hf(IDS, output_hidden_states=True)
    handle.remove()
    hidden = ref.hidden_states  # L + 1 entries; the last is after the final norm
    L = model.config.num_hidden_layers
    assert len(hidden) == L + 1

    with torch.no_grad(), minillama.capture(model, names=["model.embed_tokens", "model.layers.*.resid_*",
                                                          "model.norm", "lm_head"]) as acts:
        logits = model(IDS)
    assert_close(acts["model.embed_tokens"], hidden[0])
    for i in range(L):
        assert_close(acts[f"model.layers.{i}.resid_pre"], hidden[i], rtol=1e-5, atol=1e-5)
    for i in range(L - 1):
        assert_close(acts[f"model.layers.{i}.resid_post"], hidden[i + 1], rtol=1e-5, atol=1e-5)
    x = last_layer_out["x"]
    assert_close(acts[f"model.layers.{L - 1}.resid_post"], x[0] if isinstance(x, tuple) else x, rtol=1e-5, atol=1e-5)
    assert_close(acts["model.norm"], hidden[L], rtol=1e-5, atol=1e-5)
    assert_close(acts["lm_head"], ref.logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(acts["lm_head"], logits)
    assert set(acts) == {"model.embed_tokens", "model.norm", "lm_head",
                         *(f"model.layers.{i}.resid_{s}" for i in range(L) for s in ("pre", "mid", "post"))}


def test_every_name_is_recorded_and_consistent(model):
    with torch.no_grad(), minillama.capture(model) as acts:
        logits = model(IDS)
    assert list(acts) == activation_names(model)  # all names, in forward order
    torch.testing.assert_close(acts["lm_head"], logits)
    a = "model.layers.1"
    assert torch.equal(acts[f"{a}.resid_pre"], acts["model.layers.0.resid_post"])
    assert_close(acts[f"{a}.resid_mid"], acts[f"{a}.resid_pre"] + acts[f"{a}.self_attn.o_proj"])
    assert_close(acts[f"{a}.resid_post"], acts[f"{a}.resid_mid"] + acts[f"{a}.mlp.down_proj"])
    gate, up = acts[f"{a}.mlp.gate_proj"], acts[f"{a}.mlp.up_proj"]
    assert_close(acts[f"{a}.mlp.down_proj_input"], torch.nn.functional.silu(gate) * up)
    # the pattern times the values, heads side by side, is o_proj's input
    v = acts[f"{a}.self_attn.v_proj"].unflatten(-1, (2, 16)).transpose(1, 2).repeat_interleave(2, dim=1)
    z = (acts[f"{a}.self_attn.attn_weights"] @ v).transpose(1, 2).flatten(-2)
    assert_close(acts[f"{a}.self_attn.o_proj_input"], z)


def test_pattern_rows_sum_to_one_and_are_causal(model):
    with torch.no_grad(), minillama.capture(model, names=["*.attn_weights", "*.attn_scores"]) as acts:
        model(IDS)
    for i in range(model.config.num_hidden_layers):
        pattern = acts[f"model.layers.{i}.self_attn.attn_weights"]  # (B, H, T, S)
        assert pattern.shape == (1, 4, 12, 12)
        assert_close(pattern.sum(-1), torch.ones(1, 4, 12))
        assert (pattern.triu(1) == 0).all()
        assert torch.isneginf(acts[f"model.layers.{i}.self_attn.attn_scores"].triu(1)[..., 0, 1:]).all()


def test_capturing_the_pattern_forces_eager_and_restores_sdpa(model):
    assert model.model.layers[0].self_attn.attn_implementation == "sdpa"
    with torch.no_grad():
        plain = model(IDS)
        with minillama.capture(model, names=["model.layers.0.self_attn.attn_weights"]):
            assert all(layer.self_attn.attn_implementation == "eager" for layer in model.model.layers)
            captured = model(IDS)
        with minillama.capture(model, names=["lm_head"]):  # no pattern: the fast path stays
            assert model.model.layers[0].self_attn.attn_implementation == "sdpa"
    assert all(layer.self_attn.attn_implementation == "sdpa" for layer in model.model.layers)
    assert_close(captured, plain, rtol=1e-5, atol=1e-5)


def test_transformerlens_aliases_give_the_same_tensors(model):
    with torch.no_grad(), minillama.capture(model) as hf:
        model(IDS)
    with torch.no_grad(), minillama.capture(model, names=["hook_embed", "blocks.*", "ln_final.*"]) as tl:
        model(IDS)
    assert list(tl) == activation_names(model, aliases=True)
    b, a = "blocks.1", "model.layers.1"
    assert torch.equal(tl["hook_embed"], hf["model.embed_tokens"])
    assert torch.equal(tl["ln_final.hook_normalized"], hf["model.norm"])
    for tl_name, hf_name in [("hook_resid_pre", "resid_pre"), ("hook_resid_mid", "resid_mid"),
                             ("hook_resid_post", "resid_post"), ("ln1.hook_normalized", "input_layernorm"),
                             ("ln2.hook_normalized", "post_attention_layernorm"),
                             ("attn.hook_attn_scores", "self_attn.attn_scores"),
                             ("attn.hook_pattern", "self_attn.attn_weights"),
                             ("hook_attn_out", "self_attn.o_proj"), ("mlp.hook_pre", "mlp.gate_proj"),
                             ("mlp.hook_pre_linear", "mlp.up_proj"), ("mlp.hook_post", "mlp.down_proj_input"),
                             ("hook_mlp_out", "mlp.down_proj")]:
        assert torch.equal(tl[f"{b}.{tl_name}"], hf[f"{a}.{hf_name}"]), tl_name
    # heads get their own axis, positions before heads: [batch, pos, head, d_head]
    assert tl[f"{b}.attn.hook_q"].shape == (1, 12, 4, 16) and tl[f"{b}.attn.hook_k"].shape == (1, 12, 2, 16)
    assert torch.equal(tl[f"{b}.attn.hook_q"].flatten(-2), hf[f"{a}.self_attn.q_proj"])
    assert torch.equal(tl[f"{b}.attn.hook_v"].flatten(-2), hf[f"{a}.self_attn.v_proj"])
    assert torch.equal(tl[f"{b}.attn.hook_z"].flatten(-2), hf[f"{a}.self_attn.o_proj_input"])
    assert torch.equal(tl[f"{b}.attn.hook_rot_q"], hf[f"{a}.self_attn.q_rot"].transpose(1, 2))
    assert torch.equal(tl[f"{b}.attn.hook_rot_k"], hf[f"{a}.self_attn.k_rot"].transpose(1, 2))


def test_globs_select_and_unknown_names_fail(model):
    with torch.no_grad(), minillama.capture(model, names=["model.layers.1.mlp.*", "*.hook_resid_post"]) as acts:
        model(IDS)
    assert list(acts) == ["blocks.0.hook_resid_post", "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj",
                          "model.layers.1.mlp.down_proj_input", "model.layers.1.mlp.down_proj",
                          "blocks.1.hook_resid_post"]  # forward order
    with pytest.raises(minillama.MinillamaError, match="no activation is named 'model.layers.9.resid_pre'"):
        with minillama.capture(model, names=["model.layers.9.resid_pre"]):
            pass
    assert no_hooks_left(model)


def test_no_hooks_left_after_exit_even_on_error(model):
    with pytest.raises(RuntimeError, match="boom"):
        with minillama.capture(model):
            assert not no_hooks_left(model)
            raise RuntimeError("boom")
    assert no_hooks_left(model)
    assert all(layer.self_attn.attn_implementation == "sdpa" for layer in model.model.layers)


def test_offload_callback_and_nesting(model):
    seen = []
    with torch.no_grad():
        with minillama.capture(model, names=["*.resid_mid"]) as outer:
            with minillama.capture(model, names=["model.layers.0.*"], offload="cpu",
                                   callback=lambda key, x: seen.append((key, x.device.type))) as inner:
                model(IDS)
            assert not inner  # a callback takes the values instead of the dict
            assert "observer" in model.model.layers[0].__dict__  # the outer capture's observer is back
        assert no_hooks_left(model)
    assert [key for key, _ in seen] == [n for n in activation_names(model) if n.startswith("model.layers.0.")]
    assert {device for _, device in seen} == {"cpu"}
    assert list(outer) == ["model.layers.0.resid_mid", "model.layers.1.resid_mid"]  # nested capture still fed it
