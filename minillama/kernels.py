"""minillama's own CPU kernels, and their readable definitions: int8 activations times 4- or 8-bit weight blocks.

torch's weight-only CPU kernels turn the weights back into floats for every group of 4 activation rows, so a
16-row engine step unpacks each matrix 4 times, and their float32 path is a scalar loop (docs/quantization.md).
llama.cpp instead quantizes each activation row to int8 in blocks of 32 and multiplies integers: one unpack
of a weight block serves every row, and its 32 products are two AVX2 instructions (`maddubs` + `madd`).
`kernels.cpp` does the same for minillama's int4 and int8 formats (GGUF's Q4_1 and Q8_0 blocks are both), as two
`torch.library` ops, M rows, K inputs, N outputs, B = K / 32 blocks:

    torch.ops.minillama.int4_linear(x, qs, scales, zeros, passes)   w = (q - 8) * scale + zero, q in 0..15
    torch.ops.minillama.int8_linear(x, qs, scales, passes)          w = q * scale, q int8
        x (M, K) float32 -> (M, N) float32; scales, zeros (N, B) float32, one per block of 32 inputs;
        passes=2 also multiplies what the int8 activations left out (x - x_hat, itself int8): as exact as
        float activations in practice, and as fast where a step is bound by reading the weights
    torch.ops.minillama.int4_dequantize(qs, scales, zeros), int8_dequantize(qs, scales) -> w (N, K) float32
        for a prompt's many rows, which a float matmul serves best (`dequantize_int4_reference`)

`int4_linear_reference` and `int8_linear_reference` below define them in PyTorch, step for step;
tests/test_kernels.py holds the ops to them. The C++ is compiled at first use with g++ (which torch.compile
needs on a CPU anyway), `-march=native`, into minillama's cache directory, keyed by the source, torch's version,
the compiler and the CPU's flags; later processes load the cached library in milliseconds. quant.py's modules
run them by default on a CPU with AVX2 or AVX-512 VNNI; without a compiler, on other CPUs, or with
`MINILLAMA_KERNELS=torch`, `available()` is False and quant.py keeps torch's kernels.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

QK = 32  # values per block, llama.cpp's QK4_1 / QK8_0
SOURCE = Path(__file__).with_name("kernels.cpp")


# ---- The definitions ---------------------------------------------------------------------------------------

def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) float32 -> xq (M, K) int8, xd (M, B) scales, xs (M, B) = xd * sum of the block's xq.

    Symmetric blocks of 32: xd = max|x| / 127, xq = round(x * (1 / xd)), half to even (llama.cpp's Q8_1)."""
    M, K = x.shape
    xb = x.float().reshape(M, K // QK, QK)
    xd = xb.abs().amax(-1) / 127
    inv = torch.where(xd > 0, 1 / xd, torch.zeros_like(xd))
    xq = torch.round(xb * inv[..., None]).clamp(-127, 127)
    return xq.to(torch.int8).reshape(M, K), xd, xd * xq.sum(-1)


def rest_after_quantizing(x: torch.Tensor) -> torch.Tensor:
    """x - x_hat: what int8 activations leave out of x (M, K), at most half a step of each block."""
    xq, xd, _ = quantize_activations(x)
    M, K = xq.shape
    return x.float() - (xq.float().reshape(M, K // QK, QK) * xd[..., None]).reshape(M, K)


def int4_linear_reference(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                          passes: int = 1) -> torch.Tensor:
    """y (M, N) = x (M, K) times the weights (q - 8) * scale + zero, with x quantized by `quantize_activations`.

    Per block: scale * xd * sum(q * xq), plus (zero - 8 * scale) * xs, the weights' offset times the block's sum.
    With passes=2, plus the same product for the rest the first quantization left out (`rest_after_quantizing`):
    x = x_hat + rest, and the rest's own int8 rounding is ~1/127 of the first's."""
    if passes == 2:
        return int4_linear_reference(x, qs, scales, zeros) + int4_linear_reference(rest_after_quantizing(x), qs,
                                                                                   scales, zeros)
    xq, xd, xs = quantize_activations(x)
    M, K = xq.shape
    q = unpack_int4(qs).float().reshape(-1, K // QK, QK)  # (N, B, 32)
    dots = torch.einsum("mbi,nbi->mnb", xq.float().reshape(M, K // QK, QK), q)  # integers, exact in float32
    return (dots * scales[None] * xd[:, None]).sum(-1) + xs @ (zeros - 8 * scales).t()  # (M, N)


def int8_linear_reference(x: torch.Tensor, qs: torch.Tensor, scales: torch.Tensor, passes: int = 1) -> torch.Tensor:
    """y (M, N) = x (M, K) times the weights q * scale, with x quantized by `quantize_activations` (passes: as
    `int4_linear_reference`)."""
    if passes == 2:
        return int8_linear_reference(x, qs, scales) + int8_linear_reference(rest_after_quantizing(x), qs, scales)
    xq, xd, _ = quantize_activations(x)
    M, K = xq.shape
    dots = torch.einsum("mbi,nbi->mnb", xq.float().reshape(M, K // QK, QK), qs.float().reshape(-1, K // QK, QK))
    return (dots * scales[None] * xd[:, None]).sum(-1)


def dequantize_int4_reference(qs: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """w (N, K) float32 = (q - 8) * scale + zero, block by block."""
    q = unpack_int4(qs).reshape(qs.shape[0], -1, QK).float()  # (N, B, 32)
    return ((q - 8) * scales[..., None] + zeros[..., None]).reshape(qs.shape[0], -1)


def dequantize_int8_reference(qs: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """w (N, K) float32 = q * scale, block by block."""
    return (qs.reshape(qs.shape[0], -1, QK).float() * scales[..., None]).reshape(qs.shape)


# ---- The layouts -------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, llama.cpp's order: in each block of 32, byte i holds value i in its
    low 4 bits and value i + 16 in its high 4 bits (one shift and mask unpack a block into 32 bytes)."""
    N, K = q.shape
    blocks = q.to(torch.uint8).reshape(N, K // QK, 2, QK // 2)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(qs: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N, K) values 0..15 (the inverse of `pack_int4`)."""
    N = qs.shape[0]
    blocks = qs.reshape(N, -1, QK // 2)
    return torch.stack([blocks & 15, blocks >> 4], dim=2).reshape(N, -1)


def per_block(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K/G) per-group values -> (N, K/32) float32: a group of 64 or 128 is 2 or 4 blocks with its values."""
    return t.float().repeat_interleave(group_size // QK, dim=1).contiguous()


# ---- Building and loading the ops ----------------------------------------------------------------------------

_loaded: bool | None = None  # None: not tried yet
_why_not = ""


def available() -> bool:
    """Whether quant.py's modules run these ops: where they build and the CPU has AVX2 or AVX-512 VNNI, unless
    MINILLAMA_KERNELS=torch; with MINILLAMA_KERNELS=minillama also the plain C++ loops of other CPUs."""
    global _why_not
    choice = os.environ.get("MINILLAMA_KERNELS", "").lower()
    if choice == "torch":
        _why_not = "MINILLAMA_KERNELS=torch"
        return False
    if not load():
        return False
    if choice != "minillama" and torch.ops.minillama.isa() == "plain C++":
        _why_not = "no AVX2 on this CPU; MINILLAMA_KERNELS=minillama runs minillama's plain C++ loops"
        return False
    return True


def load() -> bool:
    """Whether the ops are registered: built (or found in the cache) and loaded in this process."""
    global _loaded, _why_not
    if _loaded is None:
        _loaded = False
        if not hasattr(torch.ops, "minillama") or not hasattr(torch.ops.minillama, "int4_dequantize"):
            try:
                torch.ops.load_library(str(build()))
                _loaded = True
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                _why_not = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        else:
            _loaded = True
        if _loaded:
            _register_fakes()
    return _loaded


def describe() -> str:
    """One line for banners: which kernels the int8/int4 modules run."""
    if available():
        return f"minillama's int8-activation kernels ({torch.ops.minillama.isa()})"
    return f"torch's weight-only kernels ({_why_not})"


def compiler() -> str | None:
    """$CXX, else g++ or c++ on the PATH; None when there is none."""
    return shutil.which(os.environ.get("CXX") or "g++") or (None if os.environ.get("CXX") else shutil.which("c++"))


# Builds of the same source: the CPU's own best path under torch.ops.minillama, and the narrower paths under
# their own namespaces, so that tests on a wider CPU hold each path to the reference in one process.
BUILDS = {"native": [], "avx2": ["-DMINILLAMA_NO_AVX512", "-DMINILLAMA_NS=minillama_avx2"],
          "plain": ["-DMINILLAMA_NO_AVX2", "-DMINILLAMA_NS=minillama_plain"]}


def ops(build_name: str = "native"):
    """The ops of one build (`BUILDS`), built and loaded if need be: torch.ops.minillama for "native"."""
    if build_name == "native":
        if not load():
            raise OSError(_why_not)
        return torch.ops.minillama
    namespace = "minillama_" + build_name
    if not hasattr(getattr(torch.ops, namespace), "isa"):
        torch.ops.load_library(str(build(build_name)))
    return getattr(torch.ops, namespace)


def build(build_name: str = "native") -> Path:
    """The compiled library, from the cache or built now (~10 s); raises OSError/SubprocessError when it cannot."""
    from torch.utils import cpp_extension

    from minillama.hub import cache_dir

    cxx = compiler()
    if cxx is None:
        raise OSError(f"no C++ compiler found ({os.environ.get('CXX') or 'g++'}; install g++, or set CXX)")
    source = SOURCE.read_bytes()
    defines = BUILDS[build_name]
    key = hashlib.sha256(source + torch.__version__.encode() + cpu_flags().encode() + cxx.encode()
                         + " ".join(defines).encode()).hexdigest()[:16]
    out = cache_dir() / "kernels" / f"minillama_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    libs = cpp_extension.library_paths()[0]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        built = Path(tmp) / out.name
        cmd = [cxx, "-O3", "-march=native", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-w", *defines,
               f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *(f"-I{p}" for p in cpp_extension.include_paths()), str(SOURCE),
               f"-L{libs}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{libs}", "-o", str(built)]
        if sys.stderr.isatty():
            print("minillama: compiling its CPU kernels once (about 10 s) ...", file=sys.stderr, flush=True)
        result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            raise OSError(f"compiling {SOURCE.name} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        os.replace(built, out)  # atomic: another process building the same key sees all or nothing
    return out


def cpu_flags() -> str:
    """The CPU's feature flags (/proc/cpuinfo), part of the cache key: `-march=native` code for one CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _register_fakes() -> None:
    """Shapes for torch.compile, which traces the ops without running them."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("minillama::int4_linear")
    def _(x, qs, scales, zeros, passes=1):
        return x.new_empty(x.shape[0], qs.shape[0])

    @torch.library.register_fake("minillama::int8_linear")
    def _(x, qs, scales, passes=1):
        return x.new_empty(x.shape[0], qs.shape[0])

    @torch.library.register_fake("minillama::int4_dequantize")
    def _(qs, scales, zeros):
        return scales.new_empty(qs.shape[0], 2 * qs.shape[1])

    @torch.library.register_fake("minillama::int8_dequantize")
    def _(qs, scales):
        return scales.new_empty(qs.shape)

    _register_fakes.done = True
