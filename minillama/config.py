"""The model's hyperparameters, read from a Hugging Face `config.json`.

One dataclass, one function that builds it (`LlamaConfig.from_dict`). Both spellings of the RoPE
settings are read: transformers 4.x (`rope_theta` + `rope_scaling`, whose type key is `rope_type`
or the older `type`) and transformers 5.x (`rope_parameters`, holding the theta too).
Every value is checked before anything is allocated; a bad one raises `MinillamaError` (a
`ValueError`) that names the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minillama.errors import MinillamaError, read_json_object

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "dynamic")
SUPPORTED_ACTIVATIONS = ("silu",)

# Sizes past these are not a real Llama; refusing them early avoids allocating terabytes.
_LIMITS = {
    "vocab_size": 4_000_000,
    "hidden_size": 65_536,
    "intermediate_size": 1_048_576,
    "num_hidden_layers": 1_024,
    "num_attention_heads": 1_024,
    "num_key_value_heads": 1_024,
    "head_dim": 4_096,
    "max_position_embeddings": 16_777_216,
}


@dataclass
class LlamaConfig:
    vocab_size: int  # number of token ids (rows of the embedding table)
    hidden_size: int  # C: width of the residual stream
    intermediate_size: int  # width of the SwiGLU MLP's hidden layer
    num_hidden_layers: int  # L: number of decoder layers
    num_attention_heads: int  # H: query heads
    num_key_value_heads: int  # Hkv: key/value heads (GQA when < H, MHA when == H)
    head_dim: int  # D: width of one head; may differ from C // H when config.json says so
    max_position_embeddings: int = 2048  # context length the model was trained for
    rms_norm_eps: float = 1e-6  # epsilon inside RMSNorm's rsqrt
    rope_theta: float = 10000.0  # RoPE base
    rope_type: str = "default"  # default | llama3 | linear | dynamic
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # the type's parameters (factor, ...)
    attention_bias: bool = False  # q/k/v/o projections carry a bias
    mlp_bias: bool = False  # gate/up/down projections carry a bias
    tie_word_embeddings: bool = False  # lm_head reuses embed_tokens' weight
    hidden_act: str = "silu"  # the MLP's activation
    torch_dtype: str | None = None  # the dtype the checkpoint was saved in ("bfloat16", ...)
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    @property
    def n_rep(self) -> int:
        """How many query heads share one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def context_length(self) -> int:
        """The longest sequence (prompt + generated tokens) the model may see."""
        return self.max_position_embeddings

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> LlamaConfig:
        """Build a config from a parsed config.json; `source` names the file in errors."""
        if not isinstance(d, dict):
            raise MinillamaError(f"{source}: expected a JSON object, got {type(d).__name__}")

        fields = _Fields(d, source)
        fail, integer, number, boolean, optional_id = (fields.fail, fields.integer, fields.number, fields.boolean,
                                                       fields.optional_id)
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise fail("model_type", f"is {model_type!r}; minillama supports {', '.join(SUPPORTED_MODEL_TYPES)}")

        hidden_size = integer("hidden_size")
        n_heads = integer("num_attention_heads")
        n_kv_heads = integer("num_key_value_heads", n_heads)
        if d.get("head_dim") is not None:
            head_dim = integer("head_dim")
        elif hidden_size % n_heads:
            raise fail("hidden_size", f"({hidden_size}) is not divisible by num_attention_heads ({n_heads})")
        else:
            head_dim = hidden_size // n_heads
        if head_dim % 2:
            raise fail("head_dim", f"must be even for RoPE, got {head_dim}")
        if n_heads % n_kv_heads:
            raise fail("num_key_value_heads", f"({n_kv_heads}) must divide num_attention_heads ({n_heads})")

        hidden_act = d.get("hidden_act", "silu")
        if hidden_act not in SUPPORTED_ACTIVATIONS:
            raise fail("hidden_act", f"is {hidden_act!r}; minillama supports {', '.join(SUPPORTED_ACTIVATIONS)}")

        max_pos = integer("max_position_embeddings", 2048)
        rope_theta, rope_type, rope_scaling = _read_rope(d, fail, number)
        if rope_type == "llama3" and "original_max_position_embeddings" in rope_scaling:
            original = rope_scaling["original_max_position_embeddings"]
            if original != int(original) or original > _LIMITS["max_position_embeddings"]:  # 1e300 overflowed torch
                raise fail("rope_scaling.original_max_position_embeddings",
                           f"must be a whole number of positions up to {_LIMITS['max_position_embeddings']:,}, "
                           f"got {original:g}")
            rope_scaling["original_max_position_embeddings"] = int(original)

        dtype = d.get("torch_dtype", d.get("dtype"))
        if dtype is not None and not isinstance(dtype, str):
            raise fail("torch_dtype", f"must be a dtype name such as \"bfloat16\", got {dtype!r}")

        return cls(
            vocab_size=integer("vocab_size"),
            hidden_size=hidden_size,
            intermediate_size=integer("intermediate_size"),
            num_hidden_layers=integer("num_hidden_layers"),
            num_attention_heads=n_heads,
            num_key_value_heads=n_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max_pos,
            rms_norm_eps=number("rms_norm_eps", d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_type=rope_type,
            rope_scaling=rope_scaling,
            attention_bias=boolean("attention_bias", False),
            mlp_bias=boolean("mlp_bias", False),
            tie_word_embeddings=boolean("tie_word_embeddings", False),
            hidden_act=hidden_act,
            torch_dtype=dtype,
            bos_token_id=optional_id("bos_token_id"),
            eos_token_id=optional_id("eos_token_id"),
            pad_token_id=optional_id("pad_token_id"),
        )

    @classmethod
    def from_file(cls, path: str | Path) -> LlamaConfig:
        """Read `config.json` (or the directory holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise MinillamaError(f"{path}: not found; a model directory needs a config.json")
        d = read_json_object(path)
        return cls.from_dict(d, source=str(path))


# Parameters each rope type needs, beyond rope_theta.
_ROPE_PARAMS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}



class _Fields:
    """Reads the fields of a parsed config.json, each checked, with errors that name the file and the field."""

    def __init__(self, d: dict[str, Any], source: str):
        self.d, self.source = d, source

    def fail(self, name: str, why: str) -> MinillamaError:
        return MinillamaError(f"{self.source}: field '{name}' {why}")

    def integer(self, name: str, default: int | None = None) -> int:
        value = self.d.get(name, default)
        if value is None:
            raise self.fail(name, "is missing; a Llama config.json must set it")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(name, f"must be an integer, got {value!r}")
        if value <= 0:
            raise self.fail(name, f"must be positive, got {value}")
        if value > _LIMITS.get(name, math.inf):
            raise self.fail(name, f"is {value}, larger than any real model (limit {_LIMITS[name]})")
        return value

    def number(self, name: str, value: Any, positive: bool = True) -> float:
        # An int past float's range (10**400 in the file) is not finite either; isfinite would overflow.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
                value if isinstance(value, float) or abs(value) < 2**1023 else math.inf):
            raise self.fail(name, f"must be a finite number, got {str(value)[:40]}")
        if positive and value <= 0:
            raise self.fail(name, f"must be positive, got {value}")
        return float(value)

    def boolean(self, name: str, default: bool) -> bool:
        value = self.d.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(name, f"must be true or false, got {value!r}")
        return value

    def optional_id(self, name: str) -> Any:
        value = self.d.get(name)
        ids = value if isinstance(value, list) else [value]
        if any(v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0) for v in ids):
            raise self.fail(name, f"must be a token id or a list of ids, got {str(value)[:40]}")
        limit = _LIMITS["vocab_size"]  # an id past any vocabulary would overflow int64 further on (10**400)
        if any(v is not None and v >= limit for v in ids):
            raise self.fail(name, f"holds an id past any vocabulary (limit {limit:,}), got {str(value)[:40]}")
        return value


def check_generation_file(model_dir: str | Path) -> None:
    """Range-check the token ids of a model directory's generation_config.json as it is read, naming the field
    (GenerationConfig takes any non-negative int, and an id like 10**400 broke generation with OverflowError)."""
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        fields = _Fields(read_json_object(path), str(path))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            fields.optional_id(name)

def _read_rope(d: dict, fail, number) -> tuple[float, str, dict[str, Any]]:
    """Return (theta, rope type, that type's parameters) from either config spelling."""
    if d.get("rope_parameters") is not None:  # transformers 5.x: one dict holds everything
        params, name = d["rope_parameters"], "rope_parameters"
        if not isinstance(params, dict):
            raise fail(name, f"must be an object, got {params!r}")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
    else:  # transformers 4.x: rope_theta at the top, scaling (if any) in rope_scaling
        params, name = d.get("rope_scaling") or {}, "rope_scaling"
        if not isinstance(params, dict):
            raise fail(name, f"must be an object or null, got {params!r}")
        theta = d.get("rope_theta", 10000.0)
    theta = number("rope_theta", theta)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise fail(f"{name}.rope_type", f"is {rope_type!r}; minillama supports {', '.join(SUPPORTED_ROPE_TYPES)}")
    scaling = {}
    for key in _ROPE_PARAMS[rope_type]:
        if key not in params:
            raise fail(f"{name}.{key}", f"is missing; rope type {rope_type!r} needs it")
        scaling[key] = number(f"{name}.{key}", params[key])
    return theta, rope_type, scaling
