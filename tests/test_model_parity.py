"""The hand-written decoder against transformers' LlamaForCausalLM: same saved directory, same logits."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import llama32_like, make_hf_checkpoint

import minillama

# fp32, minillama's SDPA against transformers' eager: the two attention kernels round differently (~1e-6 here;
# transformers' own SDPA and eager differ by as much). With the same kernel on both sides there is no gap at all.
ATOL = 1e-4


def hf_model(path, dtype=torch.float32, attention="eager"):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, attn_implementation=attention, dtype=dtype).eval()


CASES = {
    # GQA, tied embeddings, llama3 scaling; the 100-token prompt crosses original_max_position_embeddings=32
    "llama3.2-like": dict(llama32_like()),
    # MHA, untied lm_head, default rope
    "llama2-like": dict(num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10000.0),
    "linear-scaling": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # dynamic NTK only acts past max_position_embeddings (64 here), which the prompt crosses
    "dynamic-scaling": dict(max_position_embeddings=64, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    # head_dim given explicitly and not hidden // heads (64 // 4 = 16)
    "explicit-head-dim": dict(head_dim=32),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    """Same attention kernel on both sides (SDPA and SDPA, eager and eager): bit-identical fp32 logits.
    Across kernels (minillama's default SDPA against transformers' eager): within ATOL, the kernels' own gap."""
    path = make_hf_checkpoint(tmp_path, seed=3, **CASES[case])
    ids = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model = minillama.load_model(path, device="cpu")
        default = model(ids)  # SDPA
        expected = {}
        for kernel in ("sdpa", "eager"):
            expected[kernel] = hf_model(path, attention=kernel)(ids).logits
            model.set_attn_implementation(kernel)
            assert torch.equal(model(ids), expected[kernel]), kernel
        torch.testing.assert_close(default, expected["eager"], atol=ATOL, rtol=0)


def test_sharded_checkpoint(tmp_path):
    path = make_hf_checkpoint(tmp_path, seed=4, max_shard_size="60KB", **llama32_like())
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "the checkpoint should really be sharded"
    assert not (path / "model.safetensors").exists()
    ids = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(minillama.load_model(path, device="cpu")(ids), hf_model(path)(ids).logits,
                                   atol=ATOL, rtol=0)


def test_left_padded_batch_matches_transformers(tiny_llama32):
    """Rows of different lengths, left-padded: positions restart at each row's first real token."""
    ids = torch.randint(0, 256, (3, 50), generator=torch.Generator().manual_seed(2))
    attention_mask = torch.ones(3, 50, dtype=torch.long)
    attention_mask[1, :7] = 0
    attention_mask[2, :31] = 0
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf_model(tiny_llama32)(ids, attention_mask=attention_mask, position_ids=position_ids).logits
        model = minillama.load_model(tiny_llama32, device="cpu")
        for impl in ("sdpa", "eager"):
            model.set_attn_implementation(impl)
            got = model(ids, position_ids=position_ids, key_padding_mask=attention_mask.bool())
            real = attention_mask.bool()
            torch.testing.assert_close(got[real], expected[real], atol=ATOL, rtol=0)


def test_sdpa_equals_eager(tiny_llama2):
    model = minillama.load_model(tiny_llama2, device="cpu")
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(ids)
        model.set_attn_implementation("eager")
        eager = model(ids)
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=0)


def test_print_model_reads_like_transformers(tiny_llama32):
    """Same module tree as transformers prints, line for line, but for the activation's class name."""
    text = str(minillama.load_model(tiny_llama32, device="cpu"))
    reference = str(hf_model(tiny_llama32))
    normalise = lambda s: [line.replace("SiLUActivation()", "SiLU()") for line in s.splitlines()]  # noqa: E731
    assert normalise(text) == normalise(reference)


def test_bf16_matches_transformers_bf16(tmp_path):
    """bf16: the eager path does transformers' ops in transformers' order, so it is bit-identical.

    The SDPA path fuses the softmax differently, so a rounding can go the other way: bf16 keeps
    8 significant bits, one step at the logits' magnitude here (~1.5) is 2**-7 ~ 0.008, and we see
    one such step. 0.03 allows four steps and still fails on a real mistake (a missed fp32 cast in
    RMSNorm moves logits by > 0.1, a wrong rope by ~1). Greedy tokens must agree wherever
    transformers' top two are not a near-tie.
    """
    path = make_hf_checkpoint(tmp_path, seed=6, **llama32_like())
    ids = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_model(path, dtype=torch.bfloat16)(ids).logits
        model = minillama.load_model(path, device="cpu", dtype="bfloat16")
        assert model.lm_head.weight.dtype == torch.bfloat16
        model.set_attn_implementation("eager")
        assert torch.equal(model(ids), expected)
        model.set_attn_implementation("sdpa")
        got = model(ids)
    torch.testing.assert_close(got.float(), expected.float(), atol=3e-2, rtol=0)
    top2 = expected.float().topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.03
    assert clear.float().mean() > 0.5
    assert torch.equal(got.argmax(-1)[clear], expected.argmax(-1)[clear])


def test_real_llama32_rope_far_positions(tmp_path):
    """Llama 3.2's real rope settings (theta 5e5, factor 32, original 8192) at positions past 8K, where
    errors in the scaling or in fp32 angle math grow; position_ids reach there without a long prompt."""
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192}
    path = make_hf_checkpoint(tmp_path, seed=7, tie_word_embeddings=True, rope_theta=500000.0, rope_scaling=rope,
                              max_position_embeddings=131072)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(4))
    position_ids = torch.arange(9000, 9064).expand(2, 64)
    with torch.no_grad():
        expected = hf_model(path)(ids, position_ids=position_ids).logits
        got = minillama.load_model(path, device="cpu")(ids, position_ids=position_ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
