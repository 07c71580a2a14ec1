"""The KV cache: keys and values of tokens already seen, so each new token costs one step.

Buffers are allocated once, at the full length, on the model's device and dtype. A forward writes its
new keys/values at slot `input_pos` and attends over them:
- `input_pos` an int (prefill, the eager decode step): write slots [input_pos, input_pos + T) and attend
  over the filled slots [0, input_pos + T) only;
- `input_pos` a tensor (the compiled decode step): write with `index_copy_` and attend over every slot,
  the empty ones masked. No shape then depends on the position, so one compiled graph (one CUDA graph)
  serves every step, and the buffers never move.
- `input_pos` a (B,) tensor: each row written at its own slot. The slot engine (engine.py) keeps one request
  per row, each with its own length, and runs a step over `CacheRows`: some rows of the cache, attended over
  their first `span` slots (the longest row's), the rest of each row masked.
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
        (B, Hkv, input_pos + T, D) for an int position, all (B, Hkv, S_max, D) for a tensor one, which is
        (1,) (every row at the same slots) or (B,) (each row at its own)."""
        if isinstance(input_pos, torch.Tensor):
            write_rows(self.k, slice(None), input_pos, k)
            write_rows(self.v, slice(None), input_pos, v)
            return self.k, self.v
        end = input_pos + k.shape[2]
        self.k[:, :, input_pos:end] = k
        self.v[:, :, input_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


def write_rows(buffer: torch.Tensor, rows: slice | torch.Tensor, input_pos: torch.Tensor, x: torch.Tensor) -> None:
    """Write x (B, Hkv, T, D) into rows `rows` of buffer (B_max, Hkv, S_max, D) at slots input_pos + [0, T):
    input_pos (1,) is one position for every row, (B,) one per row."""
    T = x.shape[2]
    slots = input_pos[:, None] + torch.arange(T, device=x.device)  # (1 or B, T)
    if isinstance(rows, slice) and slots.shape[0] == 1:  # one set of slots: a plain copy (static, to compile)
        (buffer if rows == slice(None) else buffer[rows]).index_copy_(2, slots[0], x)  # the compiled step's op
        return
    B = x.shape[0]
    row_ids = torch.arange(buffer.shape[0], device=x.device)[rows] if isinstance(rows, slice) else rows  # (B,)
    # Advanced indices on dims 0 and 2 put their (B, T) shape first: the values go in as (B, T, Hkv, D).
    buffer[row_ids[:, None].expand(B, T), :, slots.expand(B, T)] = x.transpose(1, 2)


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


class CacheRows:
    """Rows of a KVCache attended over their first `span` slots, each written at its own position: what one
    step of the slot engine reads and writes. The model sees a cache of len(rows) rows and `span` slots.

    rows: a slice when the step's requests sit in consecutive rows (the keys are then a view, no copy),
          else a (B,) index tensor (the keys are gathered).
    """

    def __init__(self, cache: KVCache, rows: slice | torch.Tensor, span: int):
        self.cache, self.rows, self.max_seq_len = cache, rows, span

    def __getitem__(self, i: int) -> LayerRows:
        return LayerRows(self.cache[i], self.rows, self.max_seq_len)


class LayerRows:
    """One layer's view of `CacheRows`."""

    def __init__(self, layer: LayerKVCache, rows: slice | torch.Tensor, span: int):
        self.layer, self.rows, self.span = layer, rows, span

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) at each row's slots input_pos[b] + [0, T); return (B, Hkv, span, D) each."""
        write_rows(self.layer.k, self.rows, input_pos, k)
        write_rows(self.layer.v, self.rows, input_pos, v)
        return self.layer.k[self.rows, :, :self.span], self.layer.v[self.rows, :, :self.span]
