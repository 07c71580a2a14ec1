"""The KV cache: prefill then token-by-token decode gives the logits of one full forward."""

from __future__ import annotations

import pytest
import torch

import minillama


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("fixture", ["tiny_llama32", "tiny_llama2"])
def test_prefill_then_decode_equals_full_forward(fixture, impl, request):
    model = minillama.load_model(request.getfixturevalue(fixture), device="cpu")
    model.set_attn_implementation(impl)
    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)  # (B, T, V)
        cache = model.new_cache(batch_size=2, max_seq_len=80)
        steps = [model(ids[:, :50], cache=cache, input_pos=0)]  # prefill crosses the llama3 band edge
        for t in range(50, 60):  # then one token at a time
            steps.append(model(ids[:, t:t + 1], cache=cache, input_pos=t))
        steps.append(model(ids[:, 60:], cache=cache, input_pos=60))  # a chunk again (chat turns do this)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_cache_is_preallocated_on_the_models_device_and_dtype(tiny_llama32):
    model = minillama.load_model(tiny_llama32, device="cpu", dtype="bfloat16")
    cache = model.new_cache(batch_size=3, max_seq_len=40)
    layer = cache[0]
    assert len(cache.layers) == model.config.num_hidden_layers
    assert layer.k.shape == (3, model.config.num_key_value_heads, 40, model.config.head_dim)
    assert layer.k.dtype == torch.bfloat16 and layer.v.device == model.device
    before = layer.k.data_ptr()
    with torch.no_grad():
        model(torch.zeros(3, 5, dtype=torch.long), cache=cache, input_pos=0)
    assert layer.k.data_ptr() == before  # written in place, never reallocated
    assert layer.k[:, :, :5].abs().sum() > 0 and layer.k[:, :, 5:].abs().sum() == 0


def test_overflowing_the_cache_is_refused(tiny_llama32):
    model = minillama.load_model(tiny_llama32, device="cpu")
    cache = model.new_cache(max_seq_len=8)
    with pytest.raises(ValueError, match="do not fit"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)
