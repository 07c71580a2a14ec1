"""Weight-only int8 and int4 quantization: swaps of `nn.Linear` (and the tied embedding) that keep module names.

A decode step reads every weight once, so the bytes per weight set its speed; activations stay floating point.

    int8  symmetric, one scale per output channel or per group of G inputs:   w = q * scale,             q in -128..127
    int4  asymmetric, one scale and zero per group of G inputs (32/64/128):   w = (q - 8) * scale + zero, q in 0..15

Saved tensors (safetensors, under the module's path, e.g. `model.layers.0.mlp.up_proj.qweight`), N outputs, K inputs:
    int8  qweight (N, K) int8; scales (N, K/G) float32 (per channel: G = K, so (N, 1))
    int4  qweight (N, K/2) uint8, input 2j in the low 4 bits of byte j and input 2j+1 in the high 4 bits;
          scales, zeros (N, K/G) float32
    bias  as nn.Linear's, when the layer has one
config.json then holds `"quantization_config": {"quant_method": "minillama", ...}` (see `quantization_config`).
A tied head is saved once, as `model.embed_tokens.*`, like a float model's tied weight.

Kernels (CPU): torch's `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`, chosen by measurement
(docs/quantization.md). Both vectorize only for bfloat16 inputs (float32 inputs take a scalar loop 10-25x slower
than float32 F.linear), so the input is cast to bf16 and the scales are held in bf16. The int4 kernel wants its
weights rearranged by `_convert_weight_to_int4pack_for_cpu` (a layout private to torch that depends on the CPU's
vector width), so a module holds only that packed copy and rebuilds the portable nibbles when saved.
`reference_forward` (dequantize, then F.linear) is the readable definition the kernels are tested against.
Where minillama's own int8-activation ops build (kernels.py: a compiler, and AVX2 or AVX-512 VNNI) the modules
run them instead, in their own layout, for decode steps (two passes: `PASSES`), and dequantize then F.linear for
a prompt's chunk (`prompt_chunk`); MINILLAMA_KERNELS=torch keeps torch's.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minillama import kernels
from minillama.errors import MinillamaError, read_json_object
from minillama.kernels import QK

QUANT_METHOD = "minillama"
KERNEL_DTYPE = torch.bfloat16  # the activations' and scales' dtype inside torch's CPU kernels
# minillama's kernels multiply x = x_hat + rest in two int8 passes on a decode step (kernels.py): with one pass,
# as llama.cpp does, the default model's greedy replies part from float32's early (docs/quantization.md); with
# two they stay float32's, for the same read of the weights and more arithmetic. MINILLAMA_KERNEL_PASSES=1: one.
PASSES = 1 if os.environ.get("MINILLAMA_KERNEL_PASSES") == "1" else 2
INT4_GROUP_SIZES = (32, 64, 128)
aten = torch.ops.aten


# ---- Quantize and dequantize plain tensors (the reference definitions) -----------------------------

def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) int8 and scales (N, K/G) float32; symmetric, G = K when group_size is None."""
    N, K = w.shape
    G = group_size or K
    wg = w.float().reshape(N, K // G, G)
    scales = (wg.abs().amax(-1) / 127).clamp(min=1e-10).to(KERNEL_DTYPE).float()  # what the kernel will use
    q = (wg / scales[..., None]).round().clamp(-128, 127).to(torch.int8)
    return q.reshape(N, K), scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q (N, K) int8, scales (N, K/G) -> w (N, K) float32."""
    N, K = q.shape
    return (q.float().reshape(N, scales.shape[1], -1) * scales.float()[..., None]).reshape(N, K)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> q (N, K) uint8 in 0..15, scales and zeros (N, K/G) float32 (bf16-exact values).

    Each group's range [lo, hi] is cut into 15 steps; q = 0 maps to lo, hence zero = lo + 8 * scale.
    """
    N, K = w.shape
    wg = w.float().reshape(N, K // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-10).to(KERNEL_DTYPE).float()
    zeros = (lo + 8 * scales).to(KERNEL_DTYPE).float()
    q = ((wg - zeros[..., None]) / scales[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """q (N, K) in 0..15, scales and zeros (N, K/G) -> w (N, K) float32."""
    N, K = q.shape
    qg = q.float().reshape(N, scales.shape[1], -1)
    return ((qg - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(N, K)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8: input 2j in the low 4 bits, 2j+1 in the high 4 bits."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) values 0..15 in `dtype` (the inverse of `pack_nibbles`)."""
    q = torch.empty(packed.shape[0], 2 * packed.shape[1], dtype=dtype, device=packed.device)
    q[:, 0::2], q[:, 1::2] = packed & 15, packed >> 4
    return q


# ---- The modules -------------------------------------------------------------------------------------

def prompt_chunk(x: torch.Tensor) -> bool:
    """Whether x (..., T, K) holds more than one position: a prompt's chunk (or drafts to check). Such a call
    dequantizes and runs F.linear: float activations, the float matmul's blocking, and the same numbers however
    a prompt is cut into chunks; decode steps (T = 1, any number of rows) take the int8 kernels."""
    return x.dim() >= 2 and x.shape[-2] > 1


def kernel_for(in_features: int) -> str:
    """"minillama" (kernels.py's int8-activation ops) where they are built and K is whole blocks, else "torch"."""
    return "minillama" if in_features % QK == 0 and kernels.available() else "torch"


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + b, with q int8 per output channel (group_size None) or per group of inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        G = group_size or in_features
        self.in_features, self.out_features, self.group_size = in_features, out_features, G
        self.kernel = kernel_for(in_features)
        if self.kernel == "minillama":  # kernels.py: row-major, one float32 scale per block of 32 inputs
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device),
                                 persistent=False)  # (N, K)
            self.register_buffer("scales", torch.empty(out_features, in_features // QK, device=device),
                                 persistent=False)  # (N, K/32)
        else:  # torch's kernel: group-major, one contiguous (N, G) block and one scale per output per call
            self.register_buffer("qweight", torch.empty(in_features // G, out_features, G, dtype=torch.int8,
                                                        device=device), persistent=False)  # (K/G, N, G)
            self.register_buffer("scales", torch.empty(in_features // G, out_features, dtype=KERNEL_DTYPE,
                                                       device=device), persistent=False)  # (K/G, N)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.passes = PASSES

    def set_quantized(self, q: torch.Tensor, scales: torch.Tensor) -> None:
        """Take q (N, K) int8 and scales (N, K/G) in the saved layout."""
        N, K = q.shape
        # Fresh copies: torch's vector loads crashed on a tensor memory-mapped at an odd file offset.
        if self.kernel == "minillama":
            self.qweight = q.clone(memory_format=torch.contiguous_format)
            self.scales = kernels.per_block(scales, self.group_size)
        else:
            q = q.reshape(N, K // self.group_size, self.group_size).transpose(0, 1)  # (K/G, N, G)
            self.qweight = q.clone(memory_format=torch.contiguous_format)
            self.scales = scales.t().to(KERNEL_DTYPE, copy=True).contiguous()

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q (N, K) int8 and scales (N, K/G) float32: the saved layout."""
        if self.kernel == "minillama":
            return self.qweight, self.scales[:, :: self.group_size // QK].contiguous()
        return self.qweight.transpose(0, 1).reshape(self.out_features, -1), self.scales.t().float()

    def dequantize(self) -> torch.Tensor:
        if self.kernel == "minillama":  # in one pass (a long prompt's chunk does this per call)
            return torch.ops.minillama.int8_dequantize(self.qweight, self.scales)
        return dequantize_int8(*self.quantized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "minillama" and prompt_chunk(x):
            y = F.linear(x2.float(), self.dequantize())
        elif self.kernel == "minillama":
            y = torch.ops.minillama.int8_linear(x2.float().contiguous(), self.qweight, self.scales, self.passes)
        else:
            xg = x2.to(KERNEL_DTYPE)
            y = None
            for g in range(self.qweight.shape[0]):  # one call per channel (G = K), or per group, summed in fp32
                part = aten._weight_int8pack_mm(xg[:, g * self.group_size:(g + 1) * self.group_size].contiguous(),
                                                self.qweight[g], self.scales[g]).float()  # (M, N)
                y = part if y is None else y + part
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantize(), None if self.bias is None else self.bias.float()).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # the portable layout, under saved names
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"], destination[prefix + "scales"] = self.quantized()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        _load_quantized(self, ("qweight", "scales"), state_dict, prefix, missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        groups = "per channel" if self.group_size == self.in_features else f"group_size={self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, {groups}"


class Int8Embedding(Int8Linear):
    """An embedding table (V, C) held as int8 rows, like an `Int8Linear` with V outputs; a tied head shares it."""

    def __init__(self, num_embeddings: int, embedding_dim: int, group_size: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__(embedding_dim, num_embeddings, bias=False, group_size=group_size, device=device)
        self.out_dtype = dtype or torch.float32  # the activations' dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kernel == "minillama":
            q = self.qweight[ids].reshape(*ids.shape, -1, QK)  # (*ids, C/32, 32): the looked-up rows, by block
            w = q.float() * self.scales[ids][..., None]  # (*ids, C/32, 32)
            return w.reshape(*ids.shape, self.in_features).to(self.out_dtype)  # (*ids, C)
        q = self.qweight[:, ids]  # (K/G, *ids, G): the looked-up rows, group by group
        w = q.float() * self.scales[:, ids].float()[..., None]  # (K/G, *ids, G)
        return w.movedim(0, -2).reshape(*ids.shape, self.in_features).to(self.out_dtype)  # (*ids, C)

    def tied_head(self) -> Int8Linear:
        """The output head that reuses this table: the same int8 tensors, no copy."""
        head = Int8Linear(self.in_features, self.out_features, group_size=self.group_size, device="meta")
        head.kernel, head.qweight, head.scales = self.kernel, self.qweight, self.scales
        return head

    def extra_repr(self) -> str:
        groups = "per row" if self.group_size == self.in_features else f"group_size={self.group_size}"
        return f"{self.out_features}, {self.in_features}, int8, {groups}"


class Int4Linear(nn.Module):
    """y = x @ ((q - 8) * scale + zero)^T + b, 4-bit q with a scale and a zero per group of inputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int = 32,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.kernel = kernel_for(in_features)
        self.passes = PASSES
        # Two nibbles a byte: llama.cpp's order for kernels.py, or torch's private one (it depends on the CPU;
        # `quantized()` rebuilds the portable layout from either).
        self.register_buffer("packed", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device),
                             persistent=False)  # (N, K/2)
        if self.kernel == "minillama":  # float32 scale and zero per block of 32
            self.register_buffer("scales", torch.empty(out_features, in_features // QK, device=device),
                                 persistent=False)  # (N, K/32)
            self.register_buffer("zeros", torch.empty(out_features, in_features // QK, device=device),
                                 persistent=False)  # (N, K/32)
        else:  # torch's kernel: bf16 (scale, zero) pairs, group-major
            self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                                 dtype=KERNEL_DTYPE, device=device),
                                 persistent=False)  # (K/G, N, 2)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def set_quantized(self, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> None:
        """Take qweight (N, K/2) uint8 nibbles, scales and zeros (N, K/G), in the saved layout."""
        if self.kernel == "minillama":
            self.packed = kernels.pack_int4(unpack_nibbles(qweight))
            self.scales = kernels.per_block(scales, self.group_size)
            self.zeros = kernels.per_block(zeros, self.group_size)
            return
        q = unpack_nibbles(qweight, torch.int32)  # (N, K)
        self.packed = aten._convert_weight_to_int4pack_for_cpu(q, 1)
        self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(KERNEL_DTYPE).contiguous()

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """qweight (N, K/2) uint8, scales and zeros (N, K/G) float32: the saved layout.

        torch's packed layout is private, so its kernel itself unpacks it: with scale 1 and zero 0 it turns the
        identity matrix into the rows of q - 8, small integers that bf16 holds exactly.
        """
        if self.kernel == "minillama":
            every = self.group_size // QK
            return (pack_nibbles(kernels.unpack_int4(self.packed)), self.scales[:, ::every].contiguous(),
                    self.zeros[:, ::every].contiguous())
        ones = torch.zeros_like(self.scales_and_zeros)
        ones[..., 0] = 1
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE, device=self.packed.device)
        q = aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, ones).t() + 8  # (N, K)
        scales, zeros = self.scales_and_zeros.float().unbind(-1)  # (K/G, N) each
        return pack_nibbles(q.to(torch.uint8)), scales.t().contiguous(), zeros.t().contiguous()

    def dequantize(self) -> torch.Tensor:
        if self.kernel == "minillama":  # in one pass (a long prompt's chunk does this per call)
            return torch.ops.minillama.int4_dequantize(self.packed, self.scales, self.zeros)
        qweight, scales, zeros = self.quantized()
        return dequantize_int4(unpack_nibbles(qweight), scales, zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "minillama" and prompt_chunk(x):
            y = F.linear(x2.float(), self.dequantize())
        elif self.kernel == "minillama":
            y = torch.ops.minillama.int4_linear(x2.float().contiguous(), self.packed, self.scales, self.zeros,
                                                self.passes)
        else:
            y = aten._weight_int4pack_mm_for_cpu(x2.to(KERNEL_DTYPE), self.packed, self.group_size,
                                                 self.scales_and_zeros)  # (M, N)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantize(), None if self.bias is None else self.bias.float()).to(x.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, t in zip(("qweight", "scales", "zeros"), self.quantized()):
            destination[prefix + name] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        _load_quantized(self, ("qweight", "scales", "zeros"), state_dict, prefix, missing_keys)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4, "
                f"group_size={self.group_size}")


def _load_quantized(module: Int8Linear | Int4Linear, names: tuple[str, ...], state_dict: dict, prefix: str,
                    missing_keys: list[str]) -> None:
    """load_state_dict for the saved names: take them out of `state_dict` and convert to the module's layout."""
    keys = [prefix + n for n in names]
    if all(k in state_dict for k in keys):
        module.set_quantized(*(state_dict.pop(k) for k in keys))
    else:
        missing_keys.extend(k for k in keys if k not in state_dict)


# ---- Whole models --------------------------------------------------------------------------------------

MODES = ("int8", "int4")
# The head is int8 in groups of 32 inputs, like llama.cpp's Q8_0 output tensors: one scale per output channel
# moved SmolLM2's logits by up to 2.2 and changed its first greedy token (docs/quantization.md).
HEAD_GROUP_SIZE = 32


def check_shape(name: str, out_features: int, in_features: int, kind: str, group_size: int) -> None:
    """One-line errors for a matrix the format cannot hold, naming the tensor."""
    if kind == "int4" and group_size not in INT4_GROUP_SIZES:
        raise MinillamaError(f"{name}: int4 group size {group_size} is not supported; use 32, 64 or 128")
    if in_features % group_size:
        fits = [g for g in (32, 64, 128) if in_features % g == 0] or ["none of 32, 64, 128"]
        raise MinillamaError(f"{name}: its {in_features} inputs are not divisible by the group size {group_size}; "
                             f"choose one that divides {in_features} ({', '.join(map(str, fits))})")
    if kind == "int4" and out_features % 16:
        raise MinillamaError(f"{name}: int4 needs a multiple of 16 outputs (torch's CPU kernel), it has "
                             f"{out_features}; use int8")


def _require_cpu(device: torch.device) -> None:
    if device.type != "cpu":
        raise MinillamaError(f"int8/int4 weights run on the CPU only (torch's CPU kernels; none is wired in for "
                             f"{device.type} yet); load with device='cpu' (--device cpu)")


def quantize_linear(linear: nn.Linear, kind: str, group_size: int | None) -> Int8Linear | Int4Linear:
    """An Int8Linear / Int4Linear holding `linear`'s weight quantized (its bias is kept as it is)."""
    N, K = linear.weight.shape
    bias = linear.bias is not None
    if kind == "int8":
        module = Int8Linear(K, N, bias, group_size, device="meta")
        module.set_quantized(*quantize_int8(linear.weight, group_size))
    else:
        module = Int4Linear(K, N, bias, group_size, device="meta")
        q, scales, zeros = quantize_int4(linear.weight, group_size)
        module.set_quantized(pack_nibbles(q), scales, zeros)
    module.bias = linear.bias
    return module


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int | None = None, head: bool = True) -> nn.Module:
    """Swap the decoder's `nn.Linear`s for Int8Linear / Int4Linear in place, keeping their names; returns `model`.

    mode:       "int8" (per output channel unless group_size is given) or "int4" (groups of group_size, default 32).
    head:       also make the output head int8, in groups of 32 inputs (int8 even for mode int4: the head decides
                every token; docs/quantization.md measures it). A tied embedding then becomes the same int8 table
                (`Int8Embedding`); an untied one stays as it is. Norms always stay float.
    """
    if mode not in MODES:
        raise MinillamaError(f"unknown quantization {mode!r}; use int8 or int4")
    G = group_size or (32 if mode == "int4" else None)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"}
    for name, m in linears.items():
        _require_cpu(m.weight.device)
        check_shape(f"{name}.weight", *m.weight.shape, mode, G or m.in_features)
    for name, m in linears.items():
        model.set_submodule(name, quantize_linear(m, mode, G))
    if head and isinstance(model.lm_head, nn.Linear):
        embed = model.model.embed_tokens
        head_group = HEAD_GROUP_SIZE if model.lm_head.in_features % HEAD_GROUP_SIZE == 0 else None
        if model.lm_head.weight is embed.weight:  # tied: one int8 table serves both
            table = Int8Embedding(*embed.weight.shape, head_group, device="meta", dtype=embed.weight.dtype)
            table.set_quantized(*quantize_int8(embed.weight, head_group))
            model.model.embed_tokens, model.lm_head = table, table.tied_head()
        else:
            model.lm_head = quantize_linear(model.lm_head, "int8", head_group)
    return model


def formats(model: nn.Module) -> dict[str, str]:
    """{module name: "int8" | "int8-g32" | "int4-g32" ...} for every quantized module of a model."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (Int8Linear, Int4Linear)):
            kind = "int8" if isinstance(m, Int8Linear) else "int4"
            out[name] = kind if m.group_size == m.in_features else f"{kind}-g{m.group_size}"
    return out


def describe(model: nn.Module) -> str:
    """'int4-g32 x210, int8-g32 x1': each format and how many modules hold it ('' for float weights)."""
    return ", ".join(f"{fmt} x{n}" for fmt, n in Counter(formats(model).values()).most_common())


def quantization_config(module_formats: dict[str, str]) -> dict:
    """The `quantization_config` entry of config.json: the method, and a summary of `formats` by module path
    (layer numbers as `*`). The loader reads the formats from the tensors themselves; this is for readers."""
    summary: dict[str, str] = {}
    for name, fmt in module_formats.items():
        summary.setdefault(".".join("*" if part.isdigit() else part for part in name.split(".")), fmt)
    return {"quant_method": QUANT_METHOD, "format_version": 1, "modules": summary}


def read_quantization_config(config: dict, source: str) -> dict | None:
    """config.json's quantization_config when it is minillama's; None for a float checkpoint; else an error."""
    qc = config.get("quantization_config")
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD or qc.get("format_version") != 1:
        raise MinillamaError(f"{source}: quantization_config {method!r} is not supported (minillama reads its own "
                             "int8/int4 format, version 1); use a float copy of the model")
    return qc


# ---- Loading and saving ----------------------------------------------------------------------------------

def stored_formats(model: nn.Module, header: dict[str, dict]) -> dict[str, tuple[str, int]]:
    """The modules a checkpoint holds quantized, from its tensors' names, dtypes and shapes (a safetensors header):
    {module name: ("int8" | "int4", group size)}."""
    modules = dict(model.named_modules())
    found = {}
    for key, info in header.items():
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        module = modules.get(name)
        kind = {"I8": "int8", "U8": "int4"}.get(info.get("dtype"))
        scales = header.get(name + ".scales", {}).get("shape")
        if not isinstance(module, (nn.Linear, nn.Embedding)) or kind is None or not scales or len(scales) != 2:
            raise MinillamaError(f"{key}: not a quantized Linear or embedding of this model (needs an I8 or U8 "
                                 f"qweight, its scales, and a module named {name}); re-create the checkpoint")
        N, K = module.weight.shape
        if scales[1] <= 0 or K % scales[1]:
            raise MinillamaError(f"{name}.scales: shape {scales} does not split {K} inputs into equal groups")
        if isinstance(module, nn.Embedding) and kind != "int8":
            raise MinillamaError(f"{key}: embeddings are read as int8 only, this one is {kind}")
        check_shape(key, N, K, kind, K // scales[1])
        found[name] = (kind, K // scales[1])
    return found


def expected_shapes(model: nn.Module, stored: dict[str, tuple[str, int]]) -> dict[str, tuple[int, ...]]:
    """Every tensor name a checkpoint must hold, with its shape: the parameters, with each quantized module's
    weight replaced by its saved tensors."""
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    for name, (kind, G) in stored.items():
        N, K = expected.pop(name + ".weight")
        expected[name + ".qweight"] = (N, K) if kind == "int8" else (N, K // 2)
        expected[name + ".scales"] = (N, K // G)
        if kind == "int4":
            expected[name + ".zeros"] = (N, K // G)
    return expected


def use_stored_formats(model: nn.Module, stored: dict[str, tuple[str, int]], device: torch.device,
                       dtype: torch.dtype) -> None:
    """Swap the (meta) modules a checkpoint holds quantized for empty quantized ones; `load_state_dict` fills them."""
    _require_cpu(device)
    for name, (kind, G) in stored.items():
        m = model.get_submodule(name)
        if isinstance(m, nn.Embedding):
            new = Int8Embedding(m.num_embeddings, m.embedding_dim, G, device="meta", dtype=dtype)
        else:
            cls = Int8Linear if kind == "int8" else Int4Linear
            new = cls(m.in_features, m.out_features, m.bias is not None, G, device="meta", dtype=dtype)
        model.set_submodule(name, new)


def dequantize_state(state: dict[str, torch.Tensor], stored: dict[str, tuple[str, int]],
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A checkpoint's quantized tensors turned into float `.weight`s (the reference dequantization), in place."""
    for name, (kind, _) in stored.items():
        if kind == "int8":
            w = dequantize_int8(state.pop(name + ".qweight"), state.pop(name + ".scales"))
        else:
            q = unpack_nibbles(state.pop(name + ".qweight"))
            w = dequantize_int4(q, state.pop(name + ".scales"), state.pop(name + ".zeros"))
        state[name + ".weight"] = w.to(dtype)
    return state


def tie_head(model: nn.Module) -> None:
    """After loading a tied model: the head reuses the embedding, float or int8."""
    embed = model.model.embed_tokens
    if isinstance(embed, Int8Embedding):
        model.lm_head = embed.tied_head()
    else:
        model.lm_head.weight = embed.weight


def save_quantized(model: nn.Module, source_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a quantized model as a model directory: `model.safetensors` (saved names above), config.json with
    its `quantization_config`, and every other file of `source_dir` (tokenizer, generation config) copied."""
    from safetensors.torch import save_file

    source, out = Path(source_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for file in source.iterdir():
        if file.is_file() and file.name != "config.json" and not file.name.startswith("model"):
            shutil.copyfile(file, out / file.name)
    config = read_json_object(source / "config.json")
    config["quantization_config"] = quantization_config(formats(model))
    (out / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    state = model.state_dict()
    if model.config.tie_word_embeddings:  # saved once, under the embedding's name
        state = {k: v for k, v in state.items() if not k.startswith("lm_head.")}
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    return out
