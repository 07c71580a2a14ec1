"""config.json parsing: both RoPE spellings, explicit head_dim, and clear errors naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY, make_hf_checkpoint

import minillama
from minillama.config import LlamaConfig
from minillama.errors import MinillamaError

LLAMA3 = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def base(**extra) -> dict:
    return {"model_type": "llama", **TINY, **extra}


def test_spellings_agree():
    v4 = LlamaConfig.from_dict(base(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", **LLAMA3}))
    v4_old_key = LlamaConfig.from_dict(base(rope_theta=500000.0, rope_scaling={"type": "llama3", **LLAMA3}))
    v5 = LlamaConfig.from_dict(base(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}))
    assert v4 == v4_old_key == v5
    assert (v5.rope_type, v5.rope_theta, v5.rope_scaling["factor"]) == ("llama3", 500000.0, 32.0)
    assert v5.rope_scaling["original_max_position_embeddings"] == 32


def test_default_rope_and_derived_values():
    c = LlamaConfig.from_dict(base())
    assert (c.rope_type, c.rope_theta, c.head_dim, c.n_rep) == ("default", 10000.0, 16, 2)
    assert LlamaConfig.from_dict(base(head_dim=32)).head_dim == 32  # explicit, not hidden // heads


def test_both_spellings_load_to_the_same_model(tmp_path):
    """Rewrite a saved checkpoint's config.json in the 4.x spelling: same model, same logits."""
    v5 = make_hf_checkpoint(tmp_path / "v5", rope_theta=500000.0,
                            rope_scaling={"rope_type": "llama3", **LLAMA3})
    d = json.loads((v5 / "config.json").read_text())
    assert "rope_parameters" in d  # transformers 5.x writes the new spelling
    v4 = tmp_path / "v4"
    v4.mkdir()
    for f in v5.iterdir():
        (v4 / f.name).write_bytes(f.read_bytes())
    params = d.pop("rope_parameters")
    d["rope_theta"] = params.pop("rope_theta")
    d["rope_scaling"] = {"type": params.pop("rope_type"), **params}
    (v4 / "config.json").write_text(json.dumps(d))
    a, b = minillama.load_model(v5, device="cpu"), minillama.load_model(v4, device="cpu")
    assert a.config == b.config
    ids = torch.arange(80)[None] % 256
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


@pytest.mark.parametrize("change, field", [
    ({"model_type": "mistral"}, "model_type"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1.0}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling.low_freq_factor"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"hidden_size": -64}, "hidden_size"),
    ({"hidden_size": 65, "num_attention_heads": 4}, "hidden_size"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"vocab_size": "256"}, "vocab_size"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
    ({"intermediate_size": None}, "intermediate_size"),
])
def test_bad_values_name_the_field(change, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        LlamaConfig.from_dict(base(**change))


def test_config_file_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(MinillamaError, match="config.json: not valid JSON"):
        LlamaConfig.from_file(tmp_path)
    with pytest.raises(MinillamaError, match="not found"):
        LlamaConfig.from_file(tmp_path / "nowhere")
