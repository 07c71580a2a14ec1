"""The KV cache: keys and values of tokens already seen, so each new token costs one step.

Buffers are allocated once, at the full length, on the model's device and dtype; a forward
writes its new keys/values at slot `input_pos` and attends over slots [0, input_pos + T).
Because the buffers never move, a compiled decode step can replay them with CUDA graphs.
"""

from __future__ import annotations

import torch
from torch import nn


class LayerKVCache(nn.Module):
    """One decoder layer's keys and values."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, S_max, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots [input_pos, input_pos + T); return all keys/values so far."""
        end = input_pos + k.shape[2]
        self.k[:, :, input_pos:end] = k
        self.v[:, :, input_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]  # (B, Hkv, S, D) with S = input_pos + T


class KVCache(nn.Module):
    """A cache for every layer of a model. Make one with `model.new_cache(batch_size, max_seq_len)`."""

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.layers = nn.ModuleList(
            LayerKVCache(batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device) for _ in range(n_layers)
        )

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]
