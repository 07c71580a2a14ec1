// minillama's CPU kernels: rows of 8-bit activations times 4-bit or 8-bit weight blocks (GGUF's Q4_1 / Q8_0).
//
// Built by minillama/kernels.py at first use (g++, the compiler torch.compile already needs on a CPU) and
// registered as torch.library ops; kernels.py holds the readable PyTorch reference of each op and the tests
// hold these to it. The idea is llama.cpp's: quantize each activation row to int8 in blocks of 32 (one float
// scale per block), multiply integers by integers, and turn each block's integer sum into a float once.
//
// Shapes: M activation rows, N outputs, K inputs, B = K / 32 blocks; a weight row is B blocks of 32.
//   x       (M, K) float32                 the activations
//   int4:   qs (N, K/2) uint8, scales and zeros (N, B) float32: byte i of a block holds weight i (low 4 bits)
//           and weight i + 16 (high 4 bits), each q in 0..15; a weight is (q - 8) * scale + zero
//   int8:   qs (N, K) int8, scales (N, B) float32: a weight is q * scale
//   out     (M, N) float32
// Per block b of weight row n and activation row r (xq int8, xd its scale, xs = xd * sum(xq)):
//   int4:  d[n,b] * xd[r,b] * sum_i(q_i * xq_i) + (z[n,b] - 8 d[n,b]) * xs[r,b]     (d: scale, z: zero)
//   int8:  d[n,b] * xd[r,b] * sum_i(q_i * xq_i)
// With AVX2 the 32 products of a block are one `maddubs` (unsigned 8-bit times signed 8-bit, pairs summed to
// 16 bits) and one `madd` (pairs summed to 32 bits); without it, the plain loops below do the same sums.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MINILLAMA_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // values per block
constexpr int ROWS = 4;     // activation rows that share one unpacked weight block

// ---- Activations: (M, K) float -> int8 blocks, a scale per block, and each block's scaled sum ----------
// Exactly the reference's float32 steps (amax / 127, then x * (1 / d) rounded half to even), so the int8
// values are the same bits.
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* xq, float* xd, float* xs) {
  const int64_t B = K / QK;
  for (int64_t i = 0; i < M * B; i++) {
    const float* v = x + i * QK;
    float amax = 0.0f;
    for (int64_t j = 0; j < QK; j++) amax = std::fmax(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int64_t j = 0; j < QK; j++) {
      float q = std::nearbyint(v[j] * inv);  // the default rounding mode: half to even, as torch.round
      q = std::fmin(std::fmax(q, -127.0f), 127.0f);
      xq[i * QK + j] = static_cast<int8_t>(q);
      sum += static_cast<int32_t>(q);
    }
    xd[i] = d;
    xs[i] = d * static_cast<float>(sum);
  }
}

#ifdef MINILLAMA_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// ---- One weight row against R activation rows ------------------------------------------------------------
// w, d, z: the weight row's blocks; xq, xd, xs: the first of R activation rows (stride K, B); out: R outputs,
// one per activation row, `stride` apart.
template <int R>
void int4_row(const uint8_t* w, const float* d, const float* z, const int8_t* xq, const float* xd,
              const float* xs, int64_t K, float* out, int64_t stride) {
  const int64_t B = K / QK;
#ifdef MINILLAMA_AVX2
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; b++) {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * QK / 2));
    // 32 unsigned weights: the low nibbles (weights 0..15), then the high nibbles (weights 16..31)
    const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low4);
    const __m256 wd = _mm256_broadcast_ss(d + b);
    for (int r = 0; r < R; r++) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QK));
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), ones);  // 8 sums of 4 products
      const __m256 scale = _mm256_mul_ps(wd, _mm256_broadcast_ss(xd + r * B + b));
      acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {  // the offsets: sum over blocks of (z - 8 d) * xs, 8 blocks at a time
    __m256 zs = _mm256_setzero_ps(), ds = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 8 <= B; b += 8) {
      const __m256 s = _mm256_loadu_ps(xs + r * B + b);
      zs = _mm256_fmadd_ps(_mm256_loadu_ps(z + b), s, zs);
      ds = _mm256_fmadd_ps(_mm256_loadu_ps(d + b), s, ds);
    }
    float offset = hsum(zs) - 8.0f * hsum(ds);
    for (; b < B; b++) offset += (z[b] - 8.0f * d[b]) * xs[r * B + b];
    out[r * stride] = hsum(acc[r]) + offset;
  }
#else
  for (int r = 0; r < R; r++) {
    float total = 0.0f;
    for (int64_t b = 0; b < B; b++) {
      const uint8_t* p = w + b * QK / 2;
      const int8_t* x = xq + r * K + b * QK;
      int32_t dot = 0;
      for (int64_t i = 0; i < QK / 2; i++) dot += (p[i] & 15) * x[i] + (p[i] >> 4) * x[i + QK / 2];
      total += d[b] * xd[r * B + b] * static_cast<float>(dot) + (z[b] - 8.0f * d[b]) * xs[r * B + b];
    }
    out[r * stride] = total;
  }
#endif
}

template <int R>
void int8_row(const int8_t* w, const float* d, const int8_t* xq, const float* xd, int64_t K, float* out,
              int64_t stride) {
  const int64_t B = K / QK;
#ifdef MINILLAMA_AVX2
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < B; b++) {
    const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * QK));
    const __m256i q_abs = _mm256_sign_epi8(q, q);  // |q| read as unsigned (|-128| = 128 fits)
    const __m256 wd = _mm256_broadcast_ss(d + b);
    for (int r = 0; r < R; r++) {
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QK));
      // |q| * (x with q's sign) = q * x; x is within -127..127, so flipping its sign never overflows
      const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(q_abs, _mm256_sign_epi8(x, q)), ones);
      const __m256 scale = _mm256_mul_ps(wd, _mm256_broadcast_ss(xd + r * B + b));
      acc[r] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) out[r * stride] = hsum(acc[r]);
#else
  for (int r = 0; r < R; r++) {
    float total = 0.0f;
    for (int64_t b = 0; b < B; b++) {
      const int8_t* p = w + b * QK;
      const int8_t* x = xq + r * K + b * QK;
      int32_t dot = 0;
      for (int64_t i = 0; i < QK; i++) dot += p[i] * x[i];
      total += d[b] * xd[r * B + b] * static_cast<float>(dot);
    }
    out[r * stride] = total;
  }
#endif
}

// ---- The ops: quantize the activations once, then the weight rows in parallel (torch's threads) --------
void check(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t packed_per_block) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), "x: (M, K) contiguous float32");
  const int64_t K = x.size(1), N = qs.size(0), B = K / QK;
  TORCH_CHECK(K % QK == 0, "K must be a multiple of 32, got ", K);
  TORCH_CHECK(qs.dim() == 2 && qs.is_contiguous() && qs.size(1) == B * packed_per_block, "qs: wrong shape");
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kFloat && d.is_contiguous() && d.size(0) == N &&
              d.size(1) == B, "d: (N, K/32) contiguous float32");
}

// The activations quantized once per call: xq (M, K) int8, xd and xs (M, B) float32.
struct Activations {
  at::Tensor q, d, s;
  explicit Activations(const at::Tensor& x) {
    const int64_t M = x.size(0), K = x.size(1);
    q = at::empty({M, K}, x.options().dtype(at::kChar));
    d = at::empty({M, K / QK}, x.options());
    s = at::empty({M, K / QK}, x.options());
    quantize_rows(x.data_ptr<float>(), M, K, q.data_ptr<int8_t>(), d.data_ptr<float>(), s.data_ptr<float>());
  }
};

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& z) {
  check(x, qs, d, QK / 2);
  TORCH_CHECK(qs.scalar_type() == at::kByte, "qs: uint8");
  TORCH_CHECK(z.sizes() == d.sizes() && z.scalar_type() == at::kFloat && z.is_contiguous(), "zeros: like scales");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), B = K / QK;
  const Activations a(x);
  auto out = at::empty({M, N}, x.options());
  const uint8_t* w = qs.data_ptr<uint8_t>();
  const float *wd = d.data_ptr<float>(), *wz = z.data_ptr<float>();
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float *xd = a.d.data_ptr<float>(), *xs = a.s.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {  // each thread a range of weight rows
    for (int64_t n = begin; n < end; n++) {
      const uint8_t* wn = w + n * K / 2;
      int64_t r = 0;
      for (; r + ROWS <= M; r += ROWS)
        int4_row<ROWS>(wn, wd + n * B, wz + n * B, xq + r * K, xd + r * B, xs + r * B, K, o + r * N + n, N);
      for (; r < M; r++)
        int4_row<1>(wn, wd + n * B, wz + n * B, xq + r * K, xd + r * B, xs + r * B, K, o + r * N + n, N);
    }
  });
  return out;
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d) {
  check(x, qs, d, QK);
  TORCH_CHECK(qs.scalar_type() == at::kChar, "qs: int8");
  const int64_t M = x.size(0), K = x.size(1), N = qs.size(0), B = K / QK;
  const Activations a(x);
  auto out = at::empty({M, N}, x.options());
  const int8_t* w = qs.data_ptr<int8_t>();
  const float* wd = d.data_ptr<float>();
  const int8_t* xq = a.q.data_ptr<int8_t>();
  const float* xd = a.d.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      int64_t r = 0;
      for (; r + ROWS <= M; r += ROWS) int8_row<ROWS>(w + n * K, wd + n * B, xq + r * K, xd + r * B, K, o + r * N + n, N);
      for (; r < M; r++) int8_row<1>(w + n * K, wd + n * B, xq + r * K, xd + r * B, K, o + r * N + n, N);
    }
  });
  return out;
}

// The weights as float32 (N, K), for a prompt's chunk of many rows, which a float matmul serves best: one pass,
// the same float32 steps as the reference (-ffp-contract=off keeps q * scale + zero two roundings).
at::Tensor int4_dequantize(const at::Tensor& qs, const at::Tensor& d, const at::Tensor& z) {
  const int64_t N = qs.size(0), K = 2 * qs.size(1), B = K / QK;
  TORCH_CHECK(qs.scalar_type() == at::kByte && qs.is_contiguous() && d.sizes() == z.sizes() && d.size(0) == N &&
              d.size(1) == B && d.is_contiguous() && z.is_contiguous(), "int4_dequantize: wrong layout");
  auto out = at::empty({N, K}, d.options());
  const uint8_t* w = qs.data_ptr<uint8_t>();
  const float *wd = d.data_ptr<float>(), *wz = z.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++) {  // block i: 16 bytes in, 32 floats out
      const uint8_t* p = w + i * QK / 2;
      float* out_block = o + i * QK;
      for (int64_t j = 0; j < QK / 2; j++) {
        out_block[j] = static_cast<float>((p[j] & 15) - 8) * wd[i] + wz[i];
        out_block[j + QK / 2] = static_cast<float>((p[j] >> 4) - 8) * wd[i] + wz[i];
      }
    }
  });
  return out;
}

at::Tensor int8_dequantize(const at::Tensor& qs, const at::Tensor& d) {
  const int64_t N = qs.size(0), K = qs.size(1), B = K / QK;
  TORCH_CHECK(qs.scalar_type() == at::kChar && qs.is_contiguous() && K % QK == 0 && d.size(0) == N &&
              d.size(1) == B && d.is_contiguous(), "int8_dequantize: wrong layout");
  auto out = at::empty({N, K}, d.options());
  const int8_t* w = qs.data_ptr<int8_t>();
  const float* wd = d.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * B, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i++)
      for (int64_t j = 0; j < QK; j++) o[i * QK + j] = static_cast<float>(w[i * QK + j]) * wd[i];
  });
  return out;
}

bool uses_avx2() {
#ifdef MINILLAMA_AVX2
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(minillama, lib) {
  lib.def("int4_linear(Tensor x, Tensor qs, Tensor scales, Tensor zeros) -> Tensor");
  lib.def("int8_linear(Tensor x, Tensor qs, Tensor scales) -> Tensor");
  lib.def("int4_dequantize(Tensor qs, Tensor scales, Tensor zeros) -> Tensor");
  lib.def("int8_dequantize(Tensor qs, Tensor scales) -> Tensor");
  lib.def("uses_avx2() -> bool", &uses_avx2);
}

TORCH_LIBRARY_IMPL(minillama, CPU, lib) {
  lib.impl("int4_linear", &int4_linear);
  lib.impl("int8_linear", &int8_linear);
  lib.impl("int4_dequantize", &int4_dequantize);
  lib.impl("int8_dequantize", &int8_dequantize);
}
