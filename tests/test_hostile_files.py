"""Hostile model files: random configs and corrupted safetensors only ever give the clean one-line error."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minillama
from minillama.config import LlamaConfig
from minillama.errors import MinillamaError

FIELDS = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
          "rope_scaling", "rope_parameters", "attention_bias", "mlp_bias", "tie_word_embeddings", "hidden_act",
          "model_type", "torch_dtype", "eos_token_id", "bos_token_id"]

anything = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30) | st.floats()
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.sampled_from(["rope_type", "type", "factor", "rope_theta", "low_freq_factor", "high_freq_factor",
                         "original_max_position_embeddings"]), inner, max_size=4),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(changes=st.dictionaries(st.sampled_from(FIELDS), anything, max_size=4),
       removed=st.lists(st.sampled_from(FIELDS), max_size=2))
def test_any_config_parses_or_names_a_field(changes, removed):
    d = {"model_type": "llama", **TINY, **changes}
    for name in removed:
        d.pop(name, None)
    try:
        c = LlamaConfig.from_dict(d)
    except MinillamaError as e:
        assert "field '" in str(e) and "\n" not in str(e)
        return
    # whatever parsed is a model that can be built
    assert c.num_attention_heads % c.num_key_value_heads == 0 and c.head_dim % 2 == 0
    assert c.rope_type in ("default", "llama3", "linear", "dynamic") and c.rms_norm_eps > 0


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    from conftest import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("hostile"), num_hidden_layers=1, vocab_size=64,
                              hidden_size=32, intermediate_size=48, num_attention_heads=2, num_key_value_heads=1)


def _mutated_copy(src, dst, mutate):
    """A copy of the checkpoint whose model.safetensors went through `mutate(bytes) -> bytes`."""
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    weights.write_bytes(mutate(weights.read_bytes()))
    return dst


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_flipped_bytes_give_a_clean_error(small_checkpoint, tmp_path, data):
    """Either a clean one-line error, or (a flip in the data that left numbers finite) a working model."""
    raw = (small_checkpoint / "model.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    # aim most flips at the 8-byte length and the JSON header, where damage is most interesting
    positions = data.draw(st.lists(st.integers(0, 8 + header_len + 16) | st.integers(0, len(raw) - 1),
                                   min_size=1, max_size=4))
    bits = data.draw(st.lists(st.integers(0, 7), min_size=len(positions), max_size=len(positions)))

    def flip(raw: bytes) -> bytes:
        out = bytearray(raw)
        for p, b in zip(positions, bits):
            out[p] ^= 1 << b
        return bytes(out)

    path = _mutated_copy(small_checkpoint, tmp_path / "m", flip)
    try:
        model = minillama.load_model(path, device="cpu")
    except MinillamaError as e:
        assert "\n" not in str(e)
        return
    assert all(torch.isfinite(p).all() for p in model.parameters())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0))
def test_truncated_files_give_a_clean_error(small_checkpoint, tmp_path, cut):
    keep = cut % (small_checkpoint / "model.safetensors").stat().st_size  # empty file up to one byte short
    path = _mutated_copy(small_checkpoint, tmp_path / "m", lambda raw: raw[:keep])
    with pytest.raises(MinillamaError, match="corrupted or truncated"):
        minillama.load_model(path, device="cpu")
