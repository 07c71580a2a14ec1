"""minillama's own CPU kernels (minillama/kernels.cpp) against their PyTorch definitions (minillama/kernels.py),
the layouts they read, and the fallback to torch's kernels when they cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from minillama import kernels

pytestmark = pytest.mark.skipif(not kernels.load(), reason="no C++ compiler to build minillama/kernels.cpp")


def weights(N: int, K: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"q4": torch.randint(0, 16, (N, K), generator=g, dtype=torch.uint8),
            "q8": torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8),  # -128 too: a file may hold it
            "scales": torch.rand(N, K // 32, generator=g) * 0.02,
            "zeros": torch.randn(N, K // 32, generator=g) * 0.02}


@pytest.fixture(scope="module", params=list(kernels.BUILDS))
def ops(request):
    """Each build of kernels.cpp: the CPU's widest path (torch.ops.minillama), and the AVX2 and plain C++ paths
    built beside it under their own namespaces (on a CPU without AVX-512 or AVX2 they are the same code)."""
    return kernels.ops(request.param)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 17])  # whole and partial groups of the kernel's 4 rows
# 1, 3, 9 blocks (odd: AVX-512's last block alone), 18 and 48 (the model's 576 and 1536 inputs: 16 offsets at once)
@pytest.mark.parametrize("N, K", [(16, 32), (48, 96), (40, 288), (24, 576), (16, 1536)])
def test_ops_equal_their_definitions(ops, M, N, K):
    w = weights(N, K, seed=M * 1000 + K)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)) * 3
    qs = kernels.pack_int4(w["q4"])
    for passes in (1, 2):
        y = ops.int4_linear(x, qs, w["scales"], w["zeros"], passes)
        ref = kernels.int4_linear_reference(x, qs, w["scales"], w["zeros"], passes)
        # Integer dot products are exact on both sides: only the float sums' order differs.
        torch.testing.assert_close(y, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
        y = ops.int8_linear(x, w["q8"], w["scales"], passes)
        ref = kernels.int8_linear_reference(x, w["q8"], w["scales"], passes)
        torch.testing.assert_close(y, ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


def test_two_passes_are_as_exact_as_float_activations():
    w = weights(64, 576, seed=7)
    x = torch.randn(3, 576) * 3
    qs = kernels.pack_int4(w["q4"])
    exact = x @ kernels.dequantize_int4_reference(qs, w["scales"], w["zeros"]).t()
    one, two = (kernels.int4_linear_reference(x, qs, w["scales"], w["zeros"], p) for p in (1, 2))
    # the rest's own rounding is 1/127 of the first: two passes land ~100x closer to float activations
    assert (two - exact).abs().max() < (one - exact).abs().max() / 50
    assert (kernels.rest_after_quantizing(x).abs() <= kernels.quantize_activations(x)[1].repeat_interleave(32, 1) / 2
            + 1e-7).all()


def test_dequantize_ops_equal_their_definitions_bit_for_bit():
    w = weights(40, 288, seed=5)
    qs = kernels.pack_int4(w["q4"])
    assert torch.equal(torch.ops.minillama.int4_dequantize(qs, w["scales"], w["zeros"]),
                       kernels.dequantize_int4_reference(qs, w["scales"], w["zeros"]))
    assert torch.equal(torch.ops.minillama.int8_dequantize(w["q8"], w["scales"]),
                       kernels.dequantize_int8_reference(w["q8"], w["scales"]))


def test_definitions_are_the_dequantized_weights_times_quantized_activations():
    w = weights(24, 64, seed=1)
    x = torch.randn(3, 64)
    xq, xd, xs = kernels.quantize_activations(x)
    x_hat = (xq.float().reshape(3, 2, 32) * xd[..., None]).reshape(3, 64)  # what the kernels multiply
    assert (x_hat - x).abs().max() <= xd.max() / 2 + 1e-7  # half a step at most
    assert torch.equal(xs, xd * xq.float().reshape(3, 2, 32).sum(-1))
    q = w["q4"].float().reshape(24, 2, 32)
    w4 = ((q - 8) * w["scales"][..., None] + w["zeros"][..., None]).reshape(24, 64)
    torch.testing.assert_close(kernels.int4_linear_reference(x, kernels.pack_int4(w["q4"]), w["scales"], w["zeros"]),
                               x_hat @ w4.t(), atol=1e-5, rtol=1e-5)
    w8 = (w["q8"].float().reshape(24, 2, 32) * w["scales"][..., None]).reshape(24, 64)
    torch.testing.assert_close(kernels.int8_linear_reference(x, w["q8"], w["scales"]), x_hat @ w8.t(),
                               atol=1e-5, rtol=1e-5)


def test_zero_rows_and_large_values_stay_finite_and_exact(ops):
    w = weights(16, 64, seed=2)
    x = torch.zeros(3, 64)
    x[1, :32] = 1e30  # one block huge, the other zero
    x[2] = -1e-30
    qs = kernels.pack_int4(w["q4"])
    y = ops.int4_linear(x, qs, w["scales"], w["zeros"])
    assert torch.isfinite(y).all() and torch.equal(y[0], torch.zeros(16))
    ref = kernels.int4_linear_reference(x, qs, w["scales"], w["zeros"])
    for row, row_ref in zip(y, ref):  # each row at its own scale: 1e-5 of its largest output, as above
        torch.testing.assert_close(row, row_ref, atol=1e-5 * row_ref.abs().max().item(), rtol=0)


def test_int4_layout_is_llama_cpp_block_order_and_round_trips():
    q = torch.randint(0, 16, (4, 64), dtype=torch.uint8)
    qs = kernels.pack_int4(q)
    assert qs.shape == (4, 32)
    assert qs[0, 0] == q[0, 0] | (q[0, 16] << 4)  # byte i of a block: value i low, value i + 16 high
    assert qs[0, 16] == q[0, 32] | (q[0, 48] << 4)  # the second block
    assert torch.equal(kernels.unpack_int4(qs), q)
    assert torch.equal(kernels.per_block(torch.tensor([[1.0, 2.0]]), 64), torch.tensor([[1.0, 1, 2, 2]]))


def test_ops_refuse_wrong_shapes_with_a_message():
    w = weights(16, 64, seed=3)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        torch.ops.minillama.int8_linear(torch.randn(1, 48), w["q8"][:, :48].contiguous(), w["scales"][:, :1])
    with pytest.raises(RuntimeError, match="d: "):
        torch.ops.minillama.int8_linear(torch.randn(1, 64), w["q8"], w["scales"][:, :1].contiguous())


def test_compiled_graph_calls_the_op(monkeypatch):
    w = weights(32, 64, seed=4)
    qs = kernels.pack_int4(w["q4"])

    def f(x):
        return torch.ops.minillama.int4_linear(x, qs, w["scales"], w["zeros"]).relu()

    x = torch.randn(2, 64)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)  # traced through the fake (shape) function
    torch.testing.assert_close(compiled(x), f(x), rtol=0, atol=0)


def run_python(code: str, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_default_and_fallback_kernels_say_which_and_why(tmp_path):
    code = ("from minillama import kernels, quant; import torch; m = quant.quantize_linear(torch.nn.Linear(64, 32),"
            " 'int4', 32); print(kernels.available(), m.kernel, m(torch.randn(1, 64)).shape, '|', kernels.describe())")
    out = run_python(code, CXX=str(tmp_path / "no-such-compiler"), MINILLAMA_CACHE=str(tmp_path),
                     MINILLAMA_KERNELS="minillama")
    assert out.startswith("False torch torch.Size([1, 32]) |") and "compiler" in out.split("|")[1]
    out = run_python(code, MINILLAMA_KERNELS="torch")
    assert out.startswith("False torch") and "MINILLAMA_KERNELS=torch" in out
    out = run_python(code, MINILLAMA_KERNELS="minillama")
    assert out.startswith("True minillama")
    # the default: minillama's where the CPU has AVX2 or AVX-512 VNNI, torch's (saying why) on other CPUs
    out = run_python(code, MINILLAMA_KERNELS="")
    if torch.ops.minillama.isa() == "plain C++":
        assert out.startswith("False torch") and "no AVX2" in out
    else:
        assert out.startswith("True minillama") and torch.ops.minillama.isa() in out


def test_each_build_runs_the_widest_path_its_cpu_and_flags_allow():
    flags = set(kernels.cpu_flags().split())
    avx2 = {"avx2", "fma"} <= flags
    avx512 = avx2 and {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags
    assert kernels.ops("native").isa() == ("AVX-512 VNNI" if avx512 else "AVX2" if avx2 else "plain C++")
    assert kernels.ops("avx2").isa() == ("AVX2" if avx2 else "plain C++")
    assert kernels.ops("plain").isa() == "plain C++"
