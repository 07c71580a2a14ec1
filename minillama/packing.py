"""Packed weights for the CPU: `nn.Linear` swapped for `PackedLinear`, whose weight lives in oneDNN's layout.

A bs=1 decode step multiplies one vector by every weight matrix, so its speed is the speed of reading the
weights. On this project's 2-core test machine MKL's `x @ W.T` streamed SmolLM2-135M's layers at ~20 GB/s;
oneDNN's linear on a weight reordered once into its own blocked layout streamed them at ~30 GB/s, and the
49152 x 576 head went from 7.3 ms to 2.7 ms (docs/benchmarks.md).

`pack_linears(model)` swaps every Linear of the decoder and the head in place. The module names stay
(`model.layers.0.self_attn.q_proj`), `state_dict()` gives the weights back in their usual layout under the
usual keys, and the packed copy is the only copy: the model holds each matrix once. Every forward uses it,
prefill and decode alike. The price is float rounding: oneDNN sums in another order than MKL (~1e-6
relative), so the exact-parity tools (diff, dump, the parity tests) run on unpacked models.
"""

from __future__ import annotations

import torch
from torch import nn


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """oneDNN packing: a CPU float32 model, a torch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """A float32 (out, in) matrix reordered into oneDNN's blocked layout (an opaque mkldnn tensor, (out, in))."""
    if weight.is_mkldnn:
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


class PackedLinear(nn.Module):
    """y = x W^T + b with W (out, in) held in oneDNN's blocked layout: a drop-in for an `nn.Linear`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(pack_weight(weight), requires_grad=False)  # opaque (out, in)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> PackedLinear:
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")

    def dense_weight(self) -> torch.Tensor:
        """The weight in the usual (out, in) layout: a fresh copy."""
        return self.weight.to_dense()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Checkpoints hold plain tensors: unpack on the way out.
        destination[prefix + "weight"] = self.dense_weight()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" not in state_dict:
            missing_keys.append(prefix + "weight")
            return
        weight = state_dict[prefix + "weight"]
        if tuple(weight.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {prefix}weight: {tuple(weight.shape)} vs "
                              f"{(self.out_features, self.in_features)}")
            return
        with torch.no_grad():
            self.weight = nn.Parameter(pack_weight(weight.float()), requires_grad=False)
            if self.bias is not None:
                self.bias.copy_(state_dict[prefix + "bias"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


@torch.no_grad()
def pack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` under `model` for a `PackedLinear` holding the same weight (CPU, float32).

    A tied head (lm_head sharing the embedding matrix) gets a packed copy of its own, since the embedding
    lookup needs the plain rows: that one matrix is then held twice. Returns how many Linears were swapped.
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                if not (child.weight.is_mkldnn or can_pack(child.weight.device, child.weight.dtype)):
                    raise ValueError(f"{name}.{child_name}: packing needs a CPU float32 weight with oneDNN, "
                                     f"got {child.weight.dtype} on {child.weight.device}")
                setattr(module, child_name, PackedLinear.from_linear(child))
                swapped += 1
    return swapped


@torch.no_grad()
def unpack_linears(model: nn.Module) -> int:
    """Undo `pack_linears`: every `PackedLinear` becomes an `nn.Linear` again (the tied head is re-tied)."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, PackedLinear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device="meta")
                linear.weight = nn.Parameter(child.dense_weight(), requires_grad=False)
                if child.bias is not None:
                    linear.bias = nn.Parameter(child.bias.detach().clone(), requires_grad=False)
                setattr(module, child_name, linear)
                swapped += 1
    config = getattr(model, "config", None)
    if swapped and config is not None and config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return swapped


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(m, PackedLinear) for m in model.modules())
