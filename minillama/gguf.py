"""Converting a llama.cpp GGUF file into a Hugging Face model directory that minillama loads.

A GGUF file holds everything in one place: metadata (`llama.block_count`, `tokenizer.ggml.tokens`, ...)
and tensors, most of them quantized. `convert_gguf` turns it into the files a Hugging Face checkpoint has:

    config.json              from the `llama.*` metadata
    generation_config.json   bos / eos ids
    model.safetensors        dequantized tensors under HF names (sharded past a few GB)
    tokenizer.json           the byte-level BPE vocabulary and merges, with llama.cpp's pre-tokenizer
    tokenizer_config.json    special tokens and the chat template

Two details matter for exactness:
- llama.cpp's converter permutes the rows of q_proj / k_proj from HF's half-split RoPE layout into the
  interleaved layout its kernels use; we permute them back (`unpermute_rope_rows`).
- The pre-tokenizer (how text is split before BPE merges) is named by `tokenizer.ggml.pre`; we rebuild the
  regexes llama.cpp uses for that name (`smollm` isolates every digit).

Reading uses the `gguf` package, llama.cpp's own reader and dequantizer (the third-party package, not
this module: imports here are absolute).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from minillama.errors import MinillamaError
from minillama.files import locked_temp_dir, remove_stale_dirs
from minillama.gguf_header import check_gguf_header
from minillama.quant import pack_nibbles, quantization_config

# A shard holds at most this many bytes, so writing never needs more than one shard of tensors in memory.
SHARD_BYTES = 2 * 1024**3

# GGUF tensor name (after `blk.N.`) -> HF module path (after `model.layers.N.`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# llama.cpp's pre-tokenizer regexes (llama-vocab.cpp), applied one after the other: each splits the pieces
# the previous one produced. The GPT-2 pattern is the one the ByteLevel pre-tokenizer applies itself.
_GPT2 = "gpt2"
_DIGITS = r"\p{N}"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {
    "default": [_GPT2], "gpt-2": [_GPT2], "gpt2": [_GPT2], "mpt": [_GPT2], "olmo": [_GPT2], "jais": [_GPT2],
    # starcoder-family vocabularies: every digit on its own, then GPT-2 splitting
    "smollm": [_DIGITS, _GPT2], "starcoder": [_DIGITS, _GPT2], "refact": [_DIGITS, _GPT2],
    "codeshell": [_DIGITS, _GPT2], "command-r": [_DIGITS, _GPT2],
    "llama3": [_LLAMA3], "llama-v3": [_LLAMA3], "llama-bpe": [_LLAMA3],
}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_CONTROL, _USER_DEFINED = 3, 4


def unpermute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: interleaved RoPE pairs -> HF's half-split layout.

    Within each head, llama.cpp stores the rows as (x0, y0, x1, y1, ...), the pairs that RoPE rotates
    together; HF stores (x0, x1, ..., y0, y1, ...), which is what `rotate_half` expects.
    Works for weights (rows, C) and biases (rows,).
    """
    rows = w.shape[0]
    D = rows // n_heads
    w = w.reshape(n_heads, D // 2, 2, *w.shape[1:])  # (heads, D/2, pair, ...)
    return w.transpose(1, 2).reshape(rows, *w.shape[3:])  # (heads * D, ...) as (heads, pair, D/2, ...)


class _Metadata:
    """Typed access to the GGUF key/value metadata: a one-line error for a missing key or a wrong type."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise MinillamaError(f"{self.path}: GGUF metadata key {key!r} is missing; the file is incomplete")
        return value

    def _typed(self, key: str, value: Any, ok: bool, expected: str) -> Any:
        if not ok:
            shown = f"a list of {len(value)}" if isinstance(value, list) else repr(value)[:40]
            raise MinillamaError(f"{self.path}: GGUF metadata {key!r} should be {expected}, got {shown}")
        return value

    def integer(self, key: str, default: int | None = None, required: bool = True, minimum: int = 1) -> int | None:
        """An integer key (>= minimum); missing: `default`, or an error when required without a default."""
        value = self.require(key) if required and default is None else self.get(key, default)
        if value is None:
            return None
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
        return self._typed(key, value, ok, f"an integer >= {minimum}")

    def number(self, key: str, default: float | None = None) -> float:
        value = self.require(key) if default is None else self.get(key, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
        return self._typed(key, value, ok, "a positive number")

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key, default)
        return self._typed(key, value, value is None or isinstance(value, str), "a string")

    def strings(self, key: str) -> list[str]:
        value = self.require(key)
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return self._typed(key, value, ok, "a list of strings")

    def token_id(self, key: str, n_tokens: int) -> int | None:
        """A token id key (bos, eos, ...): None when absent, else an id inside the vocabulary."""
        value = self.get(key)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < n_tokens)
        return self._typed(key, value, ok, f"a token id below {n_tokens}")

    def token_types(self, n_tokens: int) -> list[int]:
        """llama.cpp's per-token types (normal, control, user-defined, ...): one int per token."""
        value = self.get("tokenizer.ggml.token_type")
        if value is None:
            return [1] * n_tokens
        ok = isinstance(value, list) and len(value) == n_tokens and all(isinstance(v, int) for v in value)
        return self._typed("tokenizer.ggml.token_type", value, ok, f"a list of {n_tokens} integers")


def _short_float(x: float) -> float:
    """A float32 metadata value as its shortest decimal (9.99999975e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def read_config(meta: _Metadata, tensor_names: set[str], dtype: str) -> dict[str, Any]:
    """Build an HF `config.json` dict from the `llama.*` metadata."""
    arch = meta.string("general.architecture")
    if arch != "llama":
        raise MinillamaError(f"{meta.path}: GGUF architecture is {arch!r}; minillama converts only 'llama'")
    a = "llama."
    hidden = meta.integer(a + "embedding_length")
    n_heads = meta.integer(a + "attention.head_count")
    n_kv_heads = meta.integer(a + "attention.head_count_kv", n_heads)
    if hidden % n_heads and meta.get(a + "attention.key_length") is None:
        raise MinillamaError(f"{meta.path}: embedding_length {hidden} is not divisible by head_count {n_heads}")
    head_dim = meta.integer(a + "attention.key_length", hidden // n_heads)
    rope_dim = meta.integer(a + "rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise MinillamaError(f"{meta.path}: RoPE covers {rope_dim} of {head_dim} head dims; "
                             "partial rotary embeddings are not a Llama feature minillama supports")
    tokens = meta.strings("tokenizer.ggml.tokens")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.integer(a + "vocab_size", len(tokens) or None),
        "hidden_size": hidden,
        "intermediate_size": meta.integer(a + "feed_forward_length"),
        "num_hidden_layers": meta.integer(a + "block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": meta.integer(a + "context_length"),
        "rms_norm_eps": _short_float(meta.number(a + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _short_float(meta.number(a + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        # Without an `output` tensor llama.cpp reuses the embedding as the output head.
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": dtype,
        "bos_token_id": meta.token_id("tokenizer.ggml.bos_token_id", len(tokens)),
        "eos_token_id": meta.token_id("tokenizer.ggml.eos_token_id", len(tokens)),
        "pad_token_id": meta.token_id("tokenizer.ggml.padding_token_id", len(tokens)),
    }
    scaling = meta.string(a + "rope.scaling.type", "none")
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _short_float(meta.number(a + "rope.scaling.factor"))}
    elif scaling not in ("none", None):
        raise MinillamaError(f"{meta.path}: RoPE scaling {scaling!r} is not supported (minillama: linear, llama3)")
    return config


def llama3_rope_factors(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                        high_freq_factor: float, original_max: int) -> torch.Tensor:
    """The per-frequency divisors llama.cpp stores as `rope_freqs.weight` for llama3 rope scaling."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (original_max / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < original_max / high_freq_factor, 1.0,  # high band: unscaled
                       torch.where(wavelen > original_max / low_freq_factor, factor, mid))  # low band: / factor


def llama3_scaling_from_factors(freqs: torch.Tensor, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """Recover llama3 rope_scaling parameters from a `rope_freqs` tensor.

    GGUF keeps only the computed divisors, not the parameters; Llama 3.1/3.2/3.3 all use low 1, high 4,
    original context 8192, so we try those with the largest divisor as the factor, and insist they
    reproduce the tensor exactly rather than guess.
    """
    if freqs.shape != (head_dim // 2,):  # an empty one had no max()
        raise MinillamaError(f"{path}: rope_freqs has shape {tuple(freqs.shape)}, not ({head_dim // 2},) (one per "
                             "frequency of a head); the file is damaged or uses a RoPE variant minillama lacks")
    factor = float(freqs.max())
    params = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    expected = llama3_rope_factors(theta, head_dim, factor, 1.0, 4.0, 8192)
    if freqs.shape != expected.shape or not torch.allclose(freqs.double(), expected, rtol=1e-4, atol=1e-4):
        raise MinillamaError(f"{path}: rope_freqs does not match Llama 3's rope scaling; "
                             "this RoPE variant is not supported")
    return {"rope_type": "llama3", **params}


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for an unknown name."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(1) in _TOP_NAMES:
        return f"{_TOP_NAMES[m.group(1)]}.{m.group(2)}"
    return None


def to_torch(t: gguf.ReaderTensor) -> torch.Tensor:
    """A GGUF tensor as a torch tensor, (rows, cols) like HF: f32/f16 as stored, bf16 as bf16, quantized -> f32."""
    kind = gguf.GGMLQuantizationType
    if t.tensor_type in (kind.F32, kind.F16):
        return torch.from_numpy(np.array(t.data))  # copy out of the memory-mapped file
    if t.tensor_type == kind.BF16:
        return torch.from_numpy(np.array(t.data).view(np.int16)).view(torch.bfloat16).reshape(
            tuple(int(n) for n in reversed(t.shape)))
    # The reader's numpy shape is GGUF's shape reversed, i.e. (rows, cols) as HF stores it.
    return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))


def _model_dtype(tensors: list[gguf.ReaderTensor]) -> str:
    """float16 / bfloat16 when every matrix is stored so, else float32 (what dequantized values need)."""
    kinds = {t.tensor_type for t in tensors if len(t.shape) > 1}
    if kinds == {gguf.GGMLQuantizationType.F16}:
        return "float16"
    if kinds == {gguf.GGMLQuantizationType.BF16}:
        return "bfloat16"
    return "float32"


# ---- Tokenizer -----------------------------------------------------------------------------------

def build_tokenizer_json(meta: _Metadata) -> str:
    """A `tokenizers` byte-level BPE tokenizer, serialized, from the GGUF vocabulary and merges."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.string("tokenizer.ggml.model")
    if kind != "gpt2":
        raise MinillamaError(f"{meta.path}: tokenizer model {kind!r} is not supported; minillama converts "
                             "byte-level BPE ('gpt2') vocabularies")
    pre = meta.string("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise MinillamaError(f"{meta.path}: pre-tokenizer {pre!r} is not supported; known: "
                             f"{', '.join(sorted(PRE_TOKENIZERS))}")
    tokens = meta.strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta.strings("tokenizer.ggml.merges")]
    types = meta.token_types(len(tokens))

    try:
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False, ignore_merges=False))
    except Exception as e:  # tokenizers raises a bare Exception for a merge naming an unknown token
        raise MinillamaError(f"{meta.path}: tokenizer vocabulary and merges do not fit together ({e})") from None
    splits = []
    for pattern in PRE_TOKENIZERS[pre]:
        if pattern == _GPT2:  # ByteLevel applies GPT-2's regex itself, then maps bytes to characters
            splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            splits.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if PRE_TOKENIZERS[pre][-1] != _GPT2:
        splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tok.decoder = decoders.ByteLevel()

    bos_id = meta.token_id("tokenizer.ggml.bos_token_id", len(tokens))
    if meta.get("tokenizer.ggml.add_bos_token", False) is True and bos_id is not None:
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    # Control tokens (<|im_start|>, ...) are special: matched whole, skipped when decoding with
    # skip_special_tokens. User-defined ones are matched whole but decode as text.
    tok.add_tokens([AddedToken(tokens[i], special=types[i] == _CONTROL, normalized=False)
                    for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)])
    return tok.to_str()


def tokenizer_config(meta: _Metadata, context_length: int) -> dict[str, Any]:
    tokens = meta.strings("tokenizer.ggml.tokens")
    types = meta.token_types(len(tokens))

    def token(key: str) -> str | None:
        i = meta.token_id(f"tokenizer.ggml.{key}_token_id", len(tokens))
        return None if i is None else tokens[i]

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", False) is True,
        "add_eos_token": meta.get("tokenizer.ggml.add_eos_token", False) is True,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "pad_token": token("padding"),
        "unk_token": token("unknown"),
        "chat_template": meta.string("tokenizer.chat_template"),
        "model_max_length": context_length,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": types[i] == _CONTROL}
            for i in range(len(tokens)) if types[i] in (_CONTROL, _USER_DEFINED)
        },
    }


def generation_config(meta: _Metadata) -> dict[str, Any]:
    """bos and the end-of-generation ids: eos, plus end-of-turn / end-of-message when the GGUF names them."""
    n = len(meta.strings("tokenizer.ggml.tokens"))
    eos = [meta.token_id(f"tokenizer.ggml.{k}_token_id", n) for k in ("eos", "eot", "eom")]
    eos = list(dict.fromkeys(i for i in eos if i is not None))  # unique, in order
    config = {"bos_token_id": meta.token_id("tokenizer.ggml.bos_token_id", n),
              "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    if meta.token_id("tokenizer.ggml.padding_token_id", n) is not None:
        config["pad_token_id"] = meta.token_id("tokenizer.ggml.padding_token_id", n)
    return config


# ---- Conversion ----------------------------------------------------------------------------------

# GGML's block formats that minillama keeps quantized (`keep_quantized`): 32 weights per block, an fp16 scale d
# (and an fp16 minimum m for Q4_1) before the quants (ggml-common.h). As quant.py's layouts:
#   Q8_0  w = d * q          -> int8, group 32: scales d
#   Q4_0  w = d * (q - 8)    -> int4, group 32: scales d, zeros 0
#   Q4_1  w = d * q + m      -> int4, group 32: scales d, zeros m + 8 d   (int4's w = (q - 8) * scale + zero)
_KEPT = {gguf.GGMLQuantizationType.Q8_0: "int8", gguf.GGMLQuantizationType.Q4_0: "int4",
         gguf.GGMLQuantizationType.Q4_1: "int4"}
_FLOAT = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)


def quantized_tensors(t: gguf.ReaderTensor) -> dict[str, torch.Tensor]:
    """A Q8_0 / Q4_0 / Q4_1 tensor as quant.py's saved tensors (qweight, scales[, zeros]), values unchanged."""
    kind = gguf.GGMLQuantizationType
    rows = np.asarray(t.data)  # (N, bytes per row): N rows of K/32 blocks
    N = rows.shape[0]
    if t.tensor_type == kind.Q8_0:
        blocks = rows.reshape(N, -1, 2 + 32)
        d = blocks[..., :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (N, K/32)
        q = blocks[..., 2:].copy().view(np.int8).reshape(N, -1)  # (N, K)
        return {"qweight": torch.from_numpy(q), "scales": torch.from_numpy(d)}
    header = 2 if t.tensor_type == kind.Q4_0 else 4
    blocks = rows.reshape(N, -1, header + 16)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)  # (N, K/32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64) if header == 4 else -8 * d
    qs = blocks[..., header:]  # (N, K/32, 16): weight j in the low 4 bits of byte j, weight j + 16 in the high
    q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(N, -1)  # (N, K) in 0..15
    return {"qweight": pack_nibbles(torch.from_numpy(q)), "scales": torch.from_numpy(d.astype(np.float32)),
            "zeros": torch.from_numpy((m + 8 * d).astype(np.float32))}


def _converted(t: gguf.ReaderTensor, config: dict[str, Any], keep_quantized: bool,
               path: Path) -> dict[str, torch.Tensor]:
    """One GGUF tensor as the HF-named tensor(s) it becomes: renamed, unpermuted, dequantized unless kept."""
    name = hf_name(t.name)
    if keep_quantized and len(t.shape) == 2 and t.tensor_type not in _FLOAT:
        if t.tensor_type not in _KEPT or (name == "model.embed_tokens.weight" and _KEPT[t.tensor_type] != "int8"):
            allowed = "Q8_0" if name == "model.embed_tokens.weight" else "Q4_0, Q4_1 or Q8_0"
            raise MinillamaError(f"{path}: tensor {t.name} is {t.tensor_type.name}, which minillama cannot keep "
                                 f"quantized (it keeps {allowed}); convert without --keep-quantized to dequantize")
        module = name[: -len(".weight")]
        tensors = {f"{module}.{k}": v for k, v in quantized_tensors(t).items()}
    else:
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[config["torch_dtype"]]
        tensors = {name: to_torch(t).to(dtype)}
    heads = {".attn_q.": config["num_attention_heads"], ".attn_k.": config["num_key_value_heads"]}
    for part, n_heads in heads.items():
        if t.name.startswith("blk.") and part in t.name:  # a row permutation: quants, scales, zeros alike
            tensors = {k: unpermute_rope_rows(v, n_heads) for k, v in tensors.items()}
    return {k: v.contiguous() for k, v in tensors.items()}


def _converted_bytes(t: gguf.ReaderTensor, itemsize: int, keep_quantized: bool) -> int:
    n = int(np.prod([int(n) for n in t.shape]))
    if keep_quantized and t.tensor_type in _KEPT:
        int8 = _KEPT[t.tensor_type] == "int8"
        return (n if int8 else n // 2) + n // 32 * 4 * (1 if int8 else 2)  # quants, float32 scales (and zeros)
    return n * itemsize


def _write_tensors(reader: gguf.GGUFReader, config: dict[str, Any], out: Path, progress: bool,
                   path: Path, keep_quantized: bool = False) -> dict[str, str]:
    """Rename, unpermute and dequantize (or keep) every tensor, writing safetensors shards of at most SHARD_BYTES.
    Returns the formats of the tensors kept quantized ({module: "int4-g32"}), for quantization_config."""
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[config["torch_dtype"]]
    wanted = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    for t in wanted:
        if hf_name(t.name) is None:
            raise MinillamaError(f"{path}: unexpected tensor {t.name!r}; not a plain Llama GGUF")
    sizes = [_converted_bytes(t, itemsize, keep_quantized) for t in wanted]
    n_shards = max(1, math.ceil(sum(sizes) / SHARD_BYTES))

    def shard_name(i: int) -> str:
        return "model.safetensors" if n_shards == 1 else f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"

    weight_map: dict[str, str] = {}
    kept: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_index = 0, 0
    bar = tqdm(wanted, desc="converting", unit="tensor", disable=not progress, file=sys.stderr)
    for t, size in zip(bar, sizes):
        if shard and shard_bytes + size > SHARD_BYTES and shard_index < n_shards - 1:
            save_file(shard, out / shard_name(shard_index), metadata={"format": "pt"})
            shard, shard_bytes, shard_index = {}, 0, shard_index + 1
        for name, w in _converted(t, config, keep_quantized, path).items():
            shard[name] = w
            weight_map[name] = shard_name(shard_index)
            if name.endswith(".qweight"):
                kept[name[: -len(".qweight")]] = f"{_KEPT[t.tensor_type]}-g32"
        shard_bytes += size
    save_file(shard, out / shard_name(shard_index), metadata={"format": "pt"})
    if n_shards > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return kept


def _apply_umask(directory: Path) -> None:
    """Give the directory and its files ordinary permissions (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for file in directory.iterdir():
        file.chmod(0o666 & ~umask)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def expected_shape(hf: str, config: dict[str, Any]) -> tuple[int, ...] | None:
    """The shape a Llama tensor must have under `config` (HF names); None for a layer past the last."""
    C, V, I = config["hidden_size"], config["vocab_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * config["head_dim"], config["num_key_value_heads"] * config["head_dim"]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", hf)
    if m and int(m.group(1)) >= config["num_hidden_layers"]:
        return None
    module, kind = (m.group(2), m.group(3)) if m else hf.rsplit(".", 1)
    rows, cols = {
        "model.embed_tokens": (V, C), "lm_head": (V, C), "model.norm": (C, None),
        "input_layernorm": (C, None), "post_attention_layernorm": (C, None),
        "self_attn.q_proj": (q, C), "self_attn.k_proj": (kv, C), "self_attn.v_proj": (kv, C),
        "self_attn.o_proj": (C, q), "mlp.gate_proj": (I, C), "mlp.up_proj": (I, C), "mlp.down_proj": (C, I),
    }[module]
    return (rows,) if kind == "bias" or cols is None else (rows, cols)


def check_tensors(tensors: list[gguf.ReaderTensor], config: dict[str, Any], path: Path) -> None:
    """Every tensor a known name with the shape the metadata implies, before anything is converted."""
    for t in tensors:
        if t.name == "rope_freqs.weight":
            continue
        hf = hf_name(t.name)
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims as (cols, rows)
        want = None if hf is None else expected_shape(hf, config)
        if hf is None or want is None:
            raise MinillamaError(f"{path}: unexpected tensor {t.name!r}; not a plain Llama GGUF")
        if shape != want:
            raise MinillamaError(f"{path}: tensor {t.name!r} has shape {list(shape)} but the metadata implies "
                                 f"{list(want)}; the file is inconsistent")


def read_gguf(path: Path) -> tuple[gguf.GGUFReader, _Metadata, dict[str, Any], str]:
    """Open a GGUF file and check all of it that conversion relies on: the header against the file
    (`check_gguf_header`), the metadata's types and ranges, the config, every tensor's name and shape, and
    the tokenizer. Returns (reader, metadata, HF config, tokenizer.json text)."""
    from minillama.config import LlamaConfig

    if not path.is_file():
        raise MinillamaError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    check_gguf_header(path)
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError, TypeError) as e:
        raise MinillamaError(f"{path}: not a readable GGUF file ({' '.join(str(e).split())})") from None
    meta = _Metadata(reader, path)
    names = {t.name for t in reader.tensors}
    config = read_config(meta, names, _model_dtype(reader.tensors))
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embed is None or len(embed.shape) != 2:
        raise MinillamaError(f"{path}: tensor 'token_embd.weight' is missing or not a matrix; the file is incomplete")
    config["vocab_size"] = int(embed.shape[1])  # GGUF shapes are (cols, rows): the embedding is (C, V)
    LlamaConfig.from_dict(config, source=f"{path} (its llama.* metadata)")  # ranges, divisibility, limits
    check_tensors(reader.tensors, config, path)
    if "rope_freqs.weight" in names:  # llama3 rope scaling, stored as computed divisors
        freqs = to_torch(next(t for t in reader.tensors if t.name == "rope_freqs.weight")).float()
        config["rope_scaling"] = llama3_scaling_from_factors(freqs, config["rope_theta"], config["head_dim"], path)
    return reader, meta, config, build_tokenizer_json(meta)


def _output_parent(out: Path) -> Path:
    """Check the output directory can be created, before the slow part; returns its (existing) parent."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinillamaError(f"{out}: already exists; remove it or choose another output directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except (OSError, ValueError) as e:
        raise MinillamaError(f"{out.parent}: cannot create this directory ({' '.join(str(e).split())}); "
                             "choose another output directory") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise MinillamaError(f"{out.parent}: not writable; choose another output directory")
    return out.parent


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True,
                 keep_quantized: bool = False) -> Path:
    """Convert a llama-architecture GGUF file into a Hugging Face model directory; returns `out_dir`.

    keep_quantized: Q4_0, Q4_1 and Q8_0 matrices are written in quant.py's int4/int8 layouts, with the same
    values (no dequantizing), and config.json gets a `quantization_config`; `load_model` then runs them as they
    are. Other quantized types are refused by name. Default: every tensor dequantized to float.

    Everything is written to a temporary directory beside `out_dir` and renamed into place at the end,
    so an interrupted conversion never leaves a directory that looks like a complete model; folders that
    killed conversions left behind are removed on the next conversion to the same place.
    """
    path, out = Path(gguf_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinillamaError(f"{out}: already exists; remove it or choose another output directory")
    reader, meta, config, tokenizer_json = read_gguf(path)
    parent = _output_parent(out)
    prefix = f".{out.name}.partial-"
    remove_stale_dirs(parent, prefix)
    try:
        with locked_temp_dir(parent, prefix) as tmp:
            try:
                kept = _write_tensors(reader, config, tmp, progress, path, keep_quantized)
                if kept:
                    config["quantization_config"] = quantization_config(kept)
                _write_json(tmp / "config.json", config)
                _write_json(tmp / "generation_config.json", generation_config(meta))
                (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
                _write_json(tmp / "tokenizer_config.json", tokenizer_config(meta, config["max_position_embeddings"]))
                _apply_umask(tmp)
                if out.is_dir() and not any(out.iterdir()):
                    out.rmdir()  # empty (checked above); rename needs the name free
                os.replace(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except OSError as e:  # a full disk, a read-only place, or another conversion that finished first
        if out.is_dir() and any(out.iterdir()):
            raise MinillamaError(f"{out}: already exists (written by another conversion meanwhile)") from None
        raise MinillamaError(f"{out}: cannot write the converted model ({' '.join(str(e).split())})") from None
    return out
