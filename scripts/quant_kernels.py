"""Time the candidate weight-only kernels on SmolLM2-135M's matmuls, on this CPU.

    python scripts/quant_kernels.py --tokens 1 --threads 2      # a decode step's matmuls
    python scripts/quant_kernels.py --tokens 128                # a prefill chunk's

One "forward" is the 210 layer matmuls (30 layers x q, k, v, o, gate, up, down) and then the 49152 x 576 head,
each candidate on its own freshly made weights, so they stream from memory as in a real decode step (a single
matrix re-used in a loop sits in the cache and flatters float32). The best of --repeats runs is kept: the
machine is shared. Figures and the choice they led to: docs/quantization.md.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from minillama import quant

LAYER = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]  # (N, K)
HEAD = (49152, 576)
aten = torch.ops.aten


def candidate(name: str, N: int, K: int):
    """A function x (M, K) float32 -> (M, N) for one freshly made (N, K) weight, in the candidate's format."""
    w = torch.randn(N, K) * 0.05
    linear = torch.nn.Linear(K, N, bias=False)
    linear.weight.data = w
    if name == "float32 F.linear":
        return lambda x: F.linear(x, w)
    if name == "bfloat16 F.linear":
        wb = w.bfloat16()
        return lambda x: F.linear(x.bfloat16(), wb).float()
    if name == "int8 _weight_int8pack_mm (float32 input)":
        q, scales = quant.quantize_int8(w)
        return lambda x: aten._weight_int8pack_mm(x, q, scales[:, 0])
    if name == "int8 dequantize + F.linear":
        q, scales = quant.quantize_int8(w)
        return lambda x: F.linear(x, quant.dequantize_int8(q, scales))
    if name == "int8 Int8Linear (bf16 input)":
        return quant.quantize_linear(linear, "int8", None)
    if name == "int8-g32 Int8Linear (bf16 input)":
        return quant.quantize_linear(linear, "int8", 32)
    if name.startswith("int4-g") and "Int4Linear" in name:
        return quant.quantize_linear(linear, "int4", int(name.split()[0][6:]))
    if name == "int4-g32 _weight_int4pack_mm_for_cpu (float32 input)":
        module = quant.quantize_linear(linear, "int4", 32)
        sz = module.scales_and_zeros.float()
        return lambda x: aten._weight_int4pack_mm_for_cpu(x, module.packed, 32, sz)
    if name == "int4-g32 dequantize + F.linear":
        module = quant.quantize_linear(linear, "int4", 32)
        qweight, scales, zeros = module.quantized()
        q = quant.unpack_nibbles(qweight)
        return lambda x: F.linear(x, quant.dequantize_int4(q, scales, zeros))
    raise ValueError(name)


CANDIDATES = ["float32 F.linear", "bfloat16 F.linear", "int8 Int8Linear (bf16 input)",
              "int8-g32 Int8Linear (bf16 input)", "int4-g32 Int4Linear (bf16 input)", "int4-g64 Int4Linear (bf16 input)",
              "int8 _weight_int8pack_mm (float32 input)", "int4-g32 _weight_int4pack_mm_for_cpu (float32 input)",
              "int8 dequantize + F.linear", "int4-g32 dequantize + F.linear"]


def best_ms(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1, help="rows of x: 1 for a decode step (default)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated, from: " + ", ".join(CANDIDATES))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x = {K: torch.randn(args.tokens, K) for K in (576, 1536)}
    print(f"{args.tokens} token(s), {args.threads} thread(s), best of {args.repeats}")
    base = None
    for name in args.candidates.split(","):
        slow = "float32 input" in name or "dequantize" in name  # ~10x slower: one layer's worth, scaled
        layers = [candidate(name, N, K) for N, K in (LAYER if slow else LAYER * 30)]
        layer_ms = best_ms(lambda: [f(x[f_K]) for f, (_, f_K) in zip(layers, LAYER * 30)], args.repeats)
        layer_ms *= 30 if slow else 1
        del layers
        head = candidate(name, *HEAD)
        head_ms = best_ms(lambda: head(x[576]), args.repeats)
        total = layer_ms + head_ms
        base = base or total
        print(f"{name:52s} layers {layer_ms:8.2f} ms  head {head_ms:7.2f} ms  total {total:8.2f} ms  "
              f"{base / total:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
