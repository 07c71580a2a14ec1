"""The KV cache: keys and values of tokens already seen, so each new token costs one step.

Buffers are allocated once, at the full length, on the model's device and dtype. A forward writes its
new keys/values at slot `input_pos` and attends over them:
- `input_pos` an int (prefill, the eager decode step): write slots [input_pos, input_pos + T) and attend
  over the filled slots [0, input_pos + T) only;
- `input_pos` a tensor (the compiled decode step): write with `index_copy_` and attend over every slot,
  the empty ones masked. No shape then depends on the position, so one compiled graph (one CUDA graph)
  serves every step, and the buffers never move.
"""

from __future__ import annotations

import torch
from torch import nn

from minillama.memory import check_kv_cache


class LayerKVCache(nn.Module):
    """One decoder layer's keys and values."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)  # (B, Hkv, S_max, D)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: int | torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at slots [input_pos, input_pos + T); return the keys/values to attend to:
        (B, Hkv, input_pos + T, D) for an int position, all (B, Hkv, S_max, D) for a tensor one."""
        T = k.shape[2]
        if isinstance(input_pos, torch.Tensor):
            slots = input_pos + torch.arange(T, device=k.device)  # (T,)
            self.k.index_copy_(2, slots, k)
            self.v.index_copy_(2, slots, v)
            return self.k, self.v
        end = input_pos + T
        self.k[:, :, input_pos:end] = k
        self.v[:, :, input_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache(nn.Module):
    """A cache for every layer of a model. Make one with `model.new_cache(batch_size, max_seq_len)`."""

    def __init__(self, n_layers: int, batch_size: int, max_seq_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str | None = None):
        super().__init__()
        check_kv_cache(n_layers, batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device)  # before allocating
        self.max_seq_len = max_seq_len
        self.layers = nn.ModuleList(
            LayerKVCache(batch_size, max_seq_len, n_kv_heads, head_dim, dtype, device) for _ in range(n_layers)
        )

    @property
    def batch_size(self) -> int:
        return self.layers[0].k.shape[0]

    def __getitem__(self, i: int) -> LayerKVCache:
        return self.layers[i]
