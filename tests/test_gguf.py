"""GGUF import: tiny synthetic GGUFs written from transformers checkpoints, and the real SmolLM2 GGUF.

The real-model tests compare against transformers loading the same GGUF itself (`gguf_file=`, its own
dequantization) and against token ids produced by llama.cpp itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import make_hf_checkpoint, read_json
from safetensors.torch import load_file

from minillama import LlamaConfig, MinillamaError, load_model
from minillama.cli import main as cli_main
from minillama.gguf import convert_gguf, llama3_rope_factors, unpermute_rope_rows

# ---- tiny synthetic GGUFs ------------------------------------------------------------------------

BYTES = [chr(c) for c in range(ord("!"), ord("~") + 1)]  # a few byte-level symbols for a toy vocabulary


def permute_like_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`: HF half-split rows -> interleaved pairs (rewritten here)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(hf_dir: Path, path: Path, arch: str = "llama", dtype=np.float32, skip: tuple = (),
               extra_tensors: dict | None = None, rope_freqs: np.ndarray | None = None, pre: str = "smollm",
               quant: dict | None = None) -> Path:
    """Write a GGUF the way llama.cpp's converter does, from an HF checkpoint (permuted q/k, GGUF names).
    quant: {GGUF name suffix: GGMLQuantizationType} quantizes matching matrices with llama.cpp's own gguf package."""
    config = read_json(hf_dir / "config.json")
    cfg = LlamaConfig.from_dict(config)  # reads either rope spelling
    state = load_file(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(path, arch)
    if "arch_keys" not in skip:
        w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(config["hidden_size"] // config["num_attention_heads"])
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + BYTES + ["to", "tok"]
    tokens += [f"tok{i}" for i in range(config["vocab_size"] - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}")
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in state.items():
        module, kind = name.rsplit(".", 1)
        if module.startswith("model.layers."):
            _, _, i, rest = module.split(".", 3)
            gname = f"blk.{i}.{layer[rest]}.{kind}"
        else:
            gname = f"{names[module]}.{kind}"
        a = t.float().numpy()
        if gname.endswith(("attn_q.weight", "attn_q.bias")):
            a = permute_like_llama_cpp(a, config["num_attention_heads"])
        elif gname.endswith(("attn_k.weight", "attn_k.bias")):
            a = permute_like_llama_cpp(a, config["num_key_value_heads"])
        kind = next((k for suffix, k in (quant or {}).items() if gname.endswith(suffix)), None)
        if kind is not None and a.ndim == 2:
            w.add_tensor(gname, gguf.quants.quantize(a, kind), raw_dtype=kind)
            continue
        w.add_tensor(gname, a.astype(np.float32 if a.ndim == 1 else dtype))
    for gname, a in (extra_tensors or {}).items():
        w.add_tensor(gname, a)
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_logits(hf_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        return hf(ids).logits


IDS = torch.tensor([[5, 17, 99, 3, 200, 41, 7, 128, 64, 250]])


@pytest.mark.parametrize("kind", ["tied-gqa", "llama2"])
def test_tiny_gguf_roundtrip_matches_transformers(kind, tiny_llama2, tmp_path):
    """A GGUF written like llama.cpp's converter (permuted q/k) converts back to the same logits."""
    hf_dir = tiny_llama2 if kind == "llama2" else make_hf_checkpoint(tmp_path / "hf", seed=2,
                                                                     tie_word_embeddings=True, rope_theta=500000.0)
    out = convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf"), tmp_path / "out", progress=False)
    config = read_json(out / "config.json")
    assert config["tie_word_embeddings"] == (kind == "tied-gqa")
    model = load_model(out, "cpu", "float32")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), hf_logits(hf_dir, IDS), atol=1e-5, rtol=1e-5)


def test_attention_bias_is_unpermuted_too(tmp_path):
    hf_dir = make_hf_checkpoint(tmp_path / "hf", seed=3, attention_bias=True)
    out = convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf"), tmp_path / "out", progress=False)
    assert read_json(out / "config.json")["attention_bias"] is True
    with torch.no_grad():
        torch.testing.assert_close(load_model(out, "cpu", "float32")(IDS), hf_logits(hf_dir, IDS),
                                   atol=1e-5, rtol=1e-5)


def test_f16_gguf_stays_f16(tiny_llama2, tmp_path):
    out = convert_gguf(write_gguf(tiny_llama2, tmp_path / "m.gguf", dtype=np.float16), tmp_path / "out",
                       progress=False)
    assert read_json(out / "config.json")["torch_dtype"] == "float16"
    state = load_file(out / "model.safetensors")
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float16


def test_unpermute_inverts_llama_cpp_permute():
    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    back = unpermute_rope_rows(torch.from_numpy(permute_like_llama_cpp(w, 3)), 3)
    torch.testing.assert_close(back, torch.from_numpy(w), atol=0, rtol=0)


def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path):
    """llama.cpp keeps Llama 3's rope scaling only as computed divisors (`rope_freqs`)."""
    hf_dir = make_hf_checkpoint(tmp_path / "hf", tie_word_embeddings=True, rope_theta=1e6, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})  # with this theta, D=16 has frequencies in all three bands
    freqs = llama3_rope_factors(1e6, 16, 32.0, 1.0, 4.0, 8192).numpy()
    assert freqs.min() == 1.0 and freqs.max() == 32.0 and ((freqs > 1) & (freqs < 32)).any()
    out = convert_gguf(write_gguf(hf_dir, tmp_path / "m.gguf", rope_freqs=freqs), tmp_path / "out", progress=False)
    assert read_json(out / "config.json")["rope_scaling"] == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    with torch.no_grad():
        torch.testing.assert_close(load_model(out, "cpu", "float32")(IDS), hf_logits(hf_dir, IDS),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(MinillamaError, match="rope_freqs does not match"):
        convert_gguf(write_gguf(hf_dir, tmp_path / "bad.gguf", rope_freqs=freqs * 1.5), tmp_path / "out2",
                     progress=False)
    for n in (0, 3):  # an empty rope_freqs ended in torch's RuntimeError (max of an empty tensor)
        with pytest.raises(MinillamaError, match=rf"rope_freqs has shape \({n},\), not \(8,\)"):
            convert_gguf(write_gguf(hf_dir, tmp_path / f"empty{n}.gguf", rope_freqs=freqs[:n]), tmp_path / "out3",
                         progress=False)


@pytest.mark.parametrize("case, message", [
    ("arch", "architecture is 'gpt2'"),
    ("missing_key", "'llama.block_count' is missing"),
    ("extra_tensor", "unexpected tensor 'blk.0.attn_sinks.weight'"),
    ("pre", "pre-tokenizer 'mystery' is not supported"),
])
def test_unsupported_gguf_is_one_line_error(case, message, tiny_llama2, tmp_path):
    kwargs = {"arch": dict(arch="gpt2"), "missing_key": dict(skip=("arch_keys",)),
              "extra_tensor": dict(extra_tensors={"blk.0.attn_sinks.weight": np.zeros(4, np.float32)}),
              "pre": dict(pre="mystery")}[case]
    path = write_gguf(tiny_llama2, tmp_path / "m.gguf", **kwargs)
    with pytest.raises(MinillamaError, match=message) as e:
        convert_gguf(path, tmp_path / "out", progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no partial directory left behind


def test_interrupted_conversion_leaves_nothing_loadable(tiny_llama2, tmp_path, monkeypatch):
    import minillama.gguf

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    path = write_gguf(tiny_llama2, tmp_path / "m.gguf")
    monkeypatch.setattr(minillama.gguf, "_write_json", interrupted)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]
    with pytest.raises(MinillamaError):
        load_model(tmp_path / "out")


def test_shards_when_large(tiny_llama2, tmp_path, monkeypatch):
    import minillama.gguf

    monkeypatch.setattr(minillama.gguf, "SHARD_BYTES", 100_000)
    out = convert_gguf(write_gguf(tiny_llama2, tmp_path / "m.gguf"), tmp_path / "out", progress=False)
    index = read_json(out / "model.safetensors.index.json")
    assert len(set(index["weight_map"].values())) > 1 and not (out / "model.safetensors").exists()
    with torch.no_grad():
        torch.testing.assert_close(load_model(out, "cpu", "float32")(IDS), hf_logits(tiny_llama2, IDS),
                                   atol=1e-5, rtol=1e-5)


def test_cli_convert_gguf(tiny_llama2, tmp_path, capsys):
    path = write_gguf(tiny_llama2, tmp_path / "m.gguf")
    assert cli_main(["convert-gguf", str(path), str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "config.json").is_file()
    assert cli_main(["convert-gguf", str(path), str(tmp_path / "out")]) == 2  # exists: refuses
    err = capsys.readouterr().err
    assert "already exists" in err and "Traceback" not in err
    assert cli_main(["convert-gguf", str(tmp_path / "none.gguf"), str(tmp_path / "o2")]) == 2


# ---- the real SmolLM2 GGUF -----------------------------------------------------------------------

# Token ids from llama.cpp itself: the CPU build of llama.cpp inside the PyPI wheel llama-cpp-cffi==0.4.20
# (`llama_model_load_from_file` with vocab_only, then `llama_tokenize(vocab, text, add_special=False,
# parse_special=True)`) on this very GGUF. Pinned here because that wheel is ~300 MB and needs a newer
# libstdc++ in its later versions: too heavy to install in CI for a tokenizer check.
LLAMA_CPP_IDS = {
    "In 2024, 12345 apples": [788, 216, 34, 32, 34, 36, 28, 216, 33, 34, 35, 36, 37, 13855],
    "Hello world": [19556, 905],
    "It's 3.14159 o'clock; we'll've   spaces\n\n  and\ttabs":
        [1589, 506, 216, 35, 30, 33, 36, 33, 37, 41, 263, 23, 17466, 43, 392, 3060, 3543, 256, 5600, 8866, 284,
         197, 100, 7366],
    "Ünïcödé naïve café — 東京 ٣٤٥ ½ Ⅻ 🦙🦙":
        [142, 246, 94, 25972, 83, 7466, 84, 2756, 15486, 46494, 37366, 1841, 17097, 247, 126, 16736, 122, 216,
         164, 113, 164, 114, 164, 115, 216, 16738, 216, 173, 223, 121, 15107, 116, 243, 10813, 116, 243],
    "<|im_start|>user\nWhat is 7*8?<|im_end|>\n<|im_start|>assistant\n":
        [1, 4093, 198, 1780, 314, 216, 39, 26, 40, 47, 2, 198, 1, 520, 9531, 198],
    "def f(x):\n    return x**2  # 100%\n":
        [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 216, 33, 32, 32, 21, 198],
    "   leading and trailing   ": [256, 2899, 284, 35079, 333],
    "I'M SHOUTING, DON'T": [57, 23, 61, 334, 21953, 4728, 28, 422, 2154, 23, 68],
    "$1,000,000.00 vs. 1e-9": [20, 33, 28, 32, 32, 32, 28, 32, 32, 32, 30, 32, 32, 6375, 30, 216, 33, 85, 29, 41],
}


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", list(LLAMA_CPP_IDS))
def test_tokenizer_matches_llama_cpp(text, smollm2_tokenizer):
    assert smollm2_tokenizer.encode(text, add_special_tokens=False).ids == LLAMA_CPP_IDS[text]


def test_smollm_pre_tokenizer_splits_digits_one_by_one(smollm2_tokenizer):
    enc = smollm2_tokenizer.encode("In 2024, 12345 apples", add_special_tokens=False)
    assert enc.tokens == ["In", "Ġ", "2", "0", "2", "4", ",", "Ġ", "1", "2", "3", "4", "5", "Ġapples"]
    assert smollm2_tokenizer.decode(enc.ids) == "In 2024, 12345 apples"


def test_smollm2_files(smollm2_dir):
    config = read_json(smollm2_dir / "config.json")
    assert {k: config[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                   "vocab_size", "rope_theta", "tie_word_embeddings", "rms_norm_eps")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "rope_theta": 100000.0, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
    assert read_json(smollm2_dir / "generation_config.json")["eos_token_id"] == 2
    tok_config = read_json(smollm2_dir / "tokenizer_config.json")
    assert tok_config["eos_token"] == "<|im_end|>" and "<|im_start|>" in tok_config["chat_template"]
    assert tok_config["added_tokens_decoder"]["2"]["special"] is True
    tok = json.loads((smollm2_dir / "tokenizer.json").read_text())
    assert {t["content"] for t in tok["added_tokens"]} >= {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}


QUESTION = "Explain how photosynthesis works."  # its greedy answer runs past 40 tokens


def chat_prompt_ids(model_dir: Path, question: str) -> list[int]:
    """Render the model's own ChatML template and tokenize it, as transformers' apply_chat_template does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from tokenizers import Tokenizer

    template = read_json(model_dir / "tokenizer_config.json")["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(template).render(messages=[{"role": "user", "content": question}],
                                            add_generation_prompt=True)
    return Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text, add_special_tokens=False).ids


def greedy(model, ids: torch.Tensor, n: int) -> list[int]:
    """Argmax decoding with minillama's KV cache: prefill the prompt, then one token at a time."""
    cache = model.new_cache(1, ids.shape[1] + n)
    out, pos, x = [], 0, ids
    with torch.no_grad():
        for _ in range(n):
            logits = model(x, cache=cache, input_pos=pos)  # (1, T, V)
            pos += x.shape[1]
            out.append(int(logits[0, -1].argmax()))
            x = torch.tensor([[out[-1]]])
    return out


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    """transformers' own GGUF loader on the same file: an independent dequantization and un-permutation."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32, attn_implementation="eager").eval()


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    model = load_model(smollm2_dir, "cpu", "float32")
    model.set_attn_implementation("eager")
    return model


@pytest.mark.slow
def test_smollm2_logits_match_transformers_gguf(smollm2, hf_smollm2, smollm2_dir):
    ids = torch.tensor([chat_prompt_ids(smollm2_dir, QUESTION)])
    with torch.no_grad():
        torch.testing.assert_close(smollm2(ids), hf_smollm2(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_smollm2_greedy_40_tokens_match_transformers(smollm2, hf_smollm2, smollm2_dir):
    prompt = chat_prompt_ids(smollm2_dir, QUESTION)
    assert prompt[:2] == [1, 9690] and prompt[-4:] == [1, 520, 9531, 198]  # <|im_start|>system ... assistant\n
    ids = torch.tensor([prompt])
    with torch.no_grad():
        expected = hf_smollm2.generate(ids, max_new_tokens=40, do_sample=False)[0, len(prompt):].tolist()
    assert len(expected) == 40
    assert greedy(smollm2, ids, 40) == expected
