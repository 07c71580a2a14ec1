"""The Llama decoder, written out by hand.

Module and parameter names are the Hugging Face checkpoint keys (`model.layers.0.self_attn.q_proj.weight`,
...), so a checkpoint loads with a strict `load_state_dict`, and `print(model)` reads like transformers'.

Shape notation, used in every comment below:
    B   batch size
    T   new tokens in this forward (the prompt in prefill, 1 in a decode step)
    S   keys attended to: cached + new tokens (S = input_pos + T)
    C   hidden size (the residual stream's width)
    H   query heads          Hkv  key/value heads (H // Hkv query heads share one)
    D   head dim             V    vocabulary size
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from minillama.config import LlamaConfig
from minillama.kv_cache import KVCache, LayerKVCache


class Observable(nn.Module):
    """A module whose forward passes values computed inside it through `observe`, where
    `minillama.capture` can record them and `minillama.intervene` can replace them.

    `observer` stays None unless one of them is active: `observe` then returns x itself, at no measurable cost.
    """

    observer: Callable[[nn.Module, str, torch.Tensor], torch.Tensor] | None = None

    def observe(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x, or what the active observer replaces it with."""
        return x if self.observer is None else self.observer(self, name, x)


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size))  # (C,)
        self.variance_epsilon = eps
        nn.init.ones_(self.weight)  # a fresh norm scales by 1 (like nn.LayerNorm: empty, then init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 even for a bf16 model, cast back, and only then scale by the weight:
        # this is transformers' exact order, and multiplying before the cast gives different bits.
        input_dtype = x.dtype
        x = x.float()
        variance = x.pow(2).mean(-1, keepdim=True)  # (B, T, 1)
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * x.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


# ---- Rotary position embedding (RoPE) -------------------------------------------------------------
# Each pair of channels (i, i + D/2) of q and k is rotated by the angle position * inv_freq[i].
# The scalings below stretch the low frequencies so a model sees longer contexts than it trained on.

def default_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    """inv_freq[i] = 1 / theta^(2i/D): one rotation speed per channel pair, (D/2,), fp32."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim))


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1+ scaling: slow (long-wavelength) channels are divided by `factor`, fast ones kept,
    and those in between blended smoothly."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # wavelength longer than the low band edge: scale down by factor
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    # between the band edges: interpolate between scaled and unscaled
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def dynamic_ntk_theta(theta: float, factor: float, seq_len: int, max_position_embeddings: int,
                      head_dim: int) -> float:
    """Dynamic NTK scaling: past the trained length, raise the base so the slowest channel still fits."""
    seq_len = max(seq_len, max_position_embeddings)
    return theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config: LlamaConfig, device: torch.device | str | None = None):
        super().__init__()
        self.config = config
        inv_freq = default_inv_freq(config.rope_theta, config.head_dim)
        if config.rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, **config.rope_scaling)
        elif config.rope_type == "linear":
            inv_freq = inv_freq / config.rope_scaling["factor"]
        # Computed on the CPU, then moved: the same bits on every device, and cheap under a meta context.
        device = torch.get_default_device() if device is None else device
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)  # (D/2,) fp32

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for the given positions (B, T), each (B, T, D) in the activations' dtype."""
        inv_freq = self.inv_freq
        seq_len = None if self.config.rope_type != "dynamic" else int(position_ids.max()) + 1
        if seq_len is not None and seq_len > self.config.max_position_embeddings:
            theta = dynamic_ntk_theta(self.config.rope_theta, self.config.rope_scaling["factor"], seq_len,
                                      self.config.max_position_embeddings, self.config.head_dim)
            inv_freq = default_inv_freq(theta, self.config.head_dim).to(inv_freq.device)
        # Angles in fp32 (a bf16 angle at position 8000 is off by whole radians), autocast or not.
        with torch.autocast(device_type=position_ids.device.type, enabled=False):
            freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]  # (B, T, D/2)
            emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D): channel i and i + D/2 share an angle
            return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, heads, T, D) by the angles in cos/sin (B, T, D)."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): the same angle for every head
    return x * cos + rotate_half(x) * sin


# ---- Attention ------------------------------------------------------------------------------------

def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, Hkv, S, D) -> (B, H, S, D): query head h reads key/value head h // n_rep."""
    B, Hkv, S, D = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(B, Hkv, n_rep, S, D).reshape(B, Hkv * n_rep, S, D)


def attention_mask(q_slots: torch.Tensor, S: int, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, T, S), True where a query may attend to a key.

    Query t of row b sits at cache slot q_slots[b, t] ((B or 1, T): rows of a slot engine each have their own
    length) and sees slots up to and including its own (causal, aligned to its own slot: a chunk after cached
    tokens sees them all); slots past it are later tokens, empty, or another request's leftovers. With left
    padding, `key_padding_mask` (B, S) marks real tokens; a padding query then sees only itself, so no softmax
    row is empty (its output is never used).
    """
    q_slot = q_slots[:, :, None]  # (B or 1, T, 1)
    k_slot = torch.arange(S, device=q_slots.device)[None, None, :]  # (1, 1, S)
    mask = (k_slot <= q_slot)[:, None]  # (B or 1, 1, T, S)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :S].bool()  # (B, 1, T, S)
        mask = mask | (k_slot == q_slot)[:, None]
    return mask


class LlamaAttention(Observable):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        C, H, Hkv, D = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads, self.num_key_value_heads, self.head_dim = H, Hkv, D
        self.scaling = D**-0.5
        self.attn_implementation = "sdpa"  # or "eager": the explicit reference path below
        self.q_proj = nn.Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=config.attention_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerKVCache | None, input_pos: int | torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_key_value_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        q, k = apply_rotary_pos_emb(q, cos, sin), apply_rotary_pos_emb(k, cos, sin)
        q, k = self.observe("q_rot", q), self.observe("k_rot", k)  # before the cache: patched keys are stored
        if cache is not None:
            k, v = cache.update(input_pos, k, v)  # (B, Hkv, S, D): earlier tokens' keys/values too

        if self.attn_implementation == "eager":
            y = self.eager_attention(q, k, v, mask)
        elif mask is None:  # plain causal attention from slot 0, or one query that sees every key
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, scale=self.scaling, enable_gqa=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H * D): heads side by side again
        return self.o_proj(y)

    def eager_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        mask: torch.Tensor) -> torch.Tensor:
        """The readable reference: scores, mask, fp32 softmax, weighted sum of values."""
        n_rep = self.num_heads // self.num_key_value_heads
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)  # (B, H, S, D)
        scores = (q @ k.transpose(2, 3)) * self.scaling  # (B, H, T, S)
        scores = scores.masked_fill(~mask, float("-inf"))
        scores = self.observe("attn_scores", scores)
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # (B, H, T, S), rows sum to 1
        weights = self.observe("attn_weights", weights)
        return weights @ v  # (B, H, T, D)


class LlamaMLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        C, F_ = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(C, F_, bias=config.mlp_bias)
        self.up_proj = nn.Linear(C, F_, bias=config.mlp_bias)
        self.down_proj = nn.Linear(F_, C, bias=config.mlp_bias)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # SwiGLU: the SiLU-activated gate decides, channel by channel, how much of `up` passes.
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(Observable):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: LayerKVCache | None, input_pos: int | torch.Tensor) -> torch.Tensor:
        residual = x  # (B, T, C)
        x = self.input_layernorm(x)
        x = self.self_attn(x, cos, sin, mask, cache, input_pos)
        x = self.observe("resid_mid", residual + x)

        residual = x
        x = self.post_attention_layernorm(x)
        x = self.mlp(x)
        return residual + x  # (B, T, C)


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)  # (V, C)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None, input_pos: int | torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # (B, T, C)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (B, T, D) each, shared by all layers
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, None if cache is None else cache[i], input_pos)
        return self.norm(x)  # (B, T, C)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)  # (V, C)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # one tensor, two uses

    def forward(self, input_ids: torch.Tensor, *, cache: KVCache | None = None,
                input_pos: int | torch.Tensor = 0, position_ids: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """Logits (B, T, V) for input_ids (B, T).

        cache:            keys/values of earlier tokens; this call appends T more at slot `input_pos`.
        input_pos:        how many tokens are already in the cache (0 without one). A tensor instead of an
                          int makes every shape independent of the position (all cache slots are attended,
                          the empty ones masked): (1,) for one position, what a compiled decode step needs,
                          or (B,) for one per row, what the slot engine needs (see kv_cache.py).
        position_ids:     RoPE positions (B, T); default input_pos + [0, T). Left-padded batches pass their own.
        key_padding_mask: (B, S) True for real tokens, False for padding; default: all real.
        logits_to_keep:   only the last this many positions get logits (B, logits_to_keep, V); 0 keeps all.
                          Generation needs just the last one, and a 128K-vocabulary head over a long
                          prompt would otherwise cost ~0.5 MB per token.
        """
        B, T = input_ids.shape
        static = isinstance(input_pos, torch.Tensor)
        if static and cache is None:
            raise ValueError("a tensor input_pos needs the cache whose slots it indexes")
        if not static and cache is None and input_pos != 0:
            raise ValueError("input_pos > 0 needs the cache that holds the earlier tokens")
        if not static and cache is not None and input_pos + T > cache.max_seq_len:
            raise ValueError(f"{input_pos + T} tokens do not fit a cache of {cache.max_seq_len}")
        new = torch.arange(T, device=input_ids.device)  # (T,)
        # Cache slots of the new tokens (B or 1, T): the same for every row, or each row's own with a (B,) input_pos.
        slots = input_pos[:, None] + new if static else (input_pos + new)[None]
        if position_ids is None:
            position_ids = slots.expand(B, T)
        eager = self.model.layers[0].self_attn.attn_implementation == "eager"
        # SDPA's own causal kernels are right when the keys are exactly [0, input_pos + T) and there is no
        # padding: a prompt from slot 0, or one new token that sees every key. Otherwise, an explicit mask.
        plain_causal = not static and key_padding_mask is None and (input_pos == 0 or T == 1)
        S = cache.max_seq_len if static else input_pos + T
        mask = None if plain_causal and not eager else attention_mask(slots, S, key_padding_mask)
        x = self.model(input_ids, position_ids, mask, cache, input_pos)  # (B, T, C)
        if logits_to_keep:
            x = x[:, -logits_to_keep:]
        return self.lm_head(x)  # (B, T, V)

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> KVCache:
        """An empty KV cache on the model's device and dtype (default length: the model's context), with as
        many key/value heads as the attention holds (fewer than the config's on a tensor-parallel rank)."""
        c, w = self.config, self.model.norm.weight
        n_kv_heads = self.model.layers[0].self_attn.num_key_value_heads
        return KVCache(c.num_hidden_layers, batch_size, max_seq_len or c.max_position_embeddings, n_kv_heads,
                       c.head_dim, dtype=w.dtype, device=w.device)

    def set_attn_implementation(self, name: str) -> None:
        """"sdpa" (default, fused kernels) or "eager" (explicit scores and fp32 softmax)."""
        if name not in ("sdpa", "eager"):
            raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {name!r}")
        for layer in self.model.layers:
            layer.self_attn.attn_implementation = name

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device  # (a norm: never packed, quantized or sharded)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype
