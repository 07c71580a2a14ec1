"""Perplexity: exp of the mean negative log-likelihood of each token given every token before it.

How surprised a model is by a text, on average per token; lower is better. Quantized weights are judged by how
far it moves from the float model's on the same text (docs/quantization.md).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from minillama.kv_cache import KVCache


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: Sequence[int] | torch.Tensor, chunk: int = 512) -> float:
    """Perplexity of `ids` (T,) under `model`, each token conditioned on the whole text before it.

    The text goes through the KV cache `chunk` tokens at a time, so the logits held at once are (chunk, V),
    never (T, V). Needs T <= the model's context length.
    """
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)  # (1, T)
    T, config = ids.shape[1], model.config
    norm = model.model.norm.weight  # a norm is never quantized: it tells the activations' dtype and device
    cache = KVCache(config.num_hidden_layers, 1, T, config.num_key_value_heads, config.head_dim,
                    dtype=norm.dtype, device=norm.device)
    ids = ids.to(norm.device)
    nll, count = 0.0, 0
    for start in range(0, T - 1, chunk):
        x = ids[:, start:start + chunk]  # (1, t)
        targets = ids[0, start + 1:start + 1 + x.shape[1]]  # the next token of each position that has one
        logits = model(x, cache=cache, input_pos=start)[0, :len(targets)].float()  # (t', V)
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
    return math.exp(nll / count)
