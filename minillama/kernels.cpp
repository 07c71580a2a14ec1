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
// 16 bits) and one `madd` (pairs summed to 32 bits). With AVX-512 VNNI one `dpbusd` takes two blocks (64
// products summed in fours to 32 bits), and each row's block scales come spread, one per lane (`Activations`).
// Without either, the plain loops do the same sums. -DMINILLAMA_NO_AVX512 builds the AVX2 path on a CPU that
// has both (the tests hold each path to the reference).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && !defined(MINILLAMA_NO_AVX2)
#include <immintrin.h>
#define MINILLAMA_AVX2 1
#endif
#if defined(MINILLAMA_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    !defined(MINILLAMA_NO_AVX512)
#define MINILLAMA_AVX512 1
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
#ifdef MINILLAMA_AVX512
    {  // the same steps, 16 values at a time (roundscale: half to even)
      const __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.0f;
      const __m512 inv = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f), lo = _mm512_set1_ps(-127.0f),
                   hi = _mm512_set1_ps(127.0f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(
          _mm512_roundscale_ps(_mm512_mul_ps(v0, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(
          _mm512_roundscale_ps(_mm512_mul_ps(v1, inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), lo), hi));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * QK), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i * QK + 16), _mm512_cvtepi32_epi8(q1));
      xd[i] = d;
      xs[i] = d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
      continue;
    }
#endif
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
// w, d, z: the weight row's blocks; xq, xd, xs: the first of R activation rows (stride K, B); xe: their block
// scales spread to lanes (AVX-512 only, stride 8 B); out: R outputs, one per activation row, `stride` apart.

#ifdef MINILLAMA_AVX512
inline __m512 spread_pair(const float* d) {  // 16 lanes: d[0] in the first 8, d[1] in the last 8
  const __m512i idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(d)))));
}

inline int32_t hsum(__m256i v) { return _mm512_reduce_add_epi32(_mm512_zextsi256_si512(v)); }
#endif

// The sum over blocks of (z - 8 d) * xs: the int4 weights' offsets times each block's activation sum.
inline float int4_offset(const float* d, const float* z, const float* xs, int64_t B) {
  float offset = 0.0f;
  int64_t b = 0;
#ifdef MINILLAMA_AVX2
  __m256 zs = _mm256_setzero_ps(), ds = _mm256_setzero_ps();
  for (; b + 8 <= B; b += 8) {
    const __m256 s = _mm256_loadu_ps(xs + b);
    zs = _mm256_fmadd_ps(_mm256_loadu_ps(z + b), s, zs);
    ds = _mm256_fmadd_ps(_mm256_loadu_ps(d + b), s, ds);
  }
  offset = hsum(zs) - 8.0f * hsum(ds);
#endif
  for (; b < B; b++) offset += (z[b] - 8.0f * d[b]) * xs[b];
  return offset;
}

template <int R>
void int4_row(const uint8_t* w, const float* d, const float* z, const int8_t* xq, const float* xd,
              const float* xs, const float* xe, int64_t K, float* out, int64_t stride) {
  const int64_t B = K / QK;
#if defined(MINILLAMA_AVX512)
  // the 32 packed bytes of blocks b, b + 1 as qwords (0, 1, 0, 1, 2, 3, 2, 3), shifted by (0, 0, 4, 4, ...):
  // block b's low nibbles, its high nibbles, then block b + 1's: the order of the activations
  const __m512i low4 = _mm512_set1_epi8(0x0F), spread = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0),
                shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
  const int64_t P = B / 2;  // pairs of blocks
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; p++) {
    const __m512i packed = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + p * QK)));
    const __m512i q = _mm512_and_si512(_mm512_srlv_epi64(_mm512_permutexvar_epi64(spread, packed), shift), low4);
    const __m512 wd = spread_pair(d + 2 * p);
    for (int r = 0; r < R; r++) {
      const __m512i x = _mm512_loadu_si512(xq + r * K + p * 2 * QK);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);  // 16 sums of 4 products
      const __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(xe + r * 8 * B + p * 16));
      acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int64_t b = 0; b < B; b += 16) {  // the offsets (z - 8 d) * xs, 16 blocks at a time, into the same lanes
    const __mmask16 k = B - b >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (B - b)) - 1);
    const __m512 offset = _mm512_sub_ps(_mm512_maskz_loadu_ps(k, z + b),
                                        _mm512_mul_ps(_mm512_set1_ps(8.0f), _mm512_maskz_loadu_ps(k, d + b)));
    for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(offset, _mm512_maskz_loadu_ps(k, xs + r * B + b), acc[r]);
  }
  for (int r = 0; r < R; r++) {
    float total = _mm512_reduce_add_ps(acc[r]);
    if (B % 2) {  // an odd last block alone, in 256 bits
      const int64_t b = B - 1;
      const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + b * QK / 2));
      const __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), _mm256_set1_epi8(0x0F));
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QK));
      total += d[b] * xd[r * B + b] * static_cast<float>(hsum(_mm256_dpbusd_epi32(_mm256_setzero_si256(), q, x)));
    }
    out[r * stride] = total;
  }
#elif defined(MINILLAMA_AVX2)
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
  for (int r = 0; r < R; r++) out[r * stride] = hsum(acc[r]) + int4_offset(d, z, xs + r * B, B);
#else
  for (int r = 0; r < R; r++) {
    float total = 0.0f;
    for (int64_t b = 0; b < B; b++) {
      const uint8_t* p = w + b * QK / 2;
      const int8_t* x = xq + r * K + b * QK;
      int32_t dot = 0;
      for (int64_t i = 0; i < QK / 2; i++) dot += (p[i] & 15) * x[i] + (p[i] >> 4) * x[i + QK / 2];
      total += d[b] * xd[r * B + b] * static_cast<float>(dot);
    }
    out[r * stride] = total + int4_offset(d, z, xs + r * B, B);
  }
#endif
}

template <int R>
void int8_row(const int8_t* w, const float* d, const int8_t* xq, const float* xd, const float* xe, int64_t K,
              float* out, int64_t stride) {
  const int64_t B = K / QK;
#if defined(MINILLAMA_AVX512)
  const int64_t P = B / 2;
  __m512 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; p++) {
    const __m512i q = _mm512_loadu_si512(w + p * 2 * QK);
    const __m512i q_abs = _mm512_abs_epi8(q);  // |q| read as unsigned (|-128| = 128 fits)
    const __mmask64 negative = _mm512_movepi8_mask(q);
    const __m512 wd = spread_pair(d + 2 * p);
    for (int r = 0; r < R; r++) {
      const __m512i x = _mm512_loadu_si512(xq + r * K + p * 2 * QK);
      // |q| * (x with q's sign) = q * x; x is within -127..127, so flipping its sign never overflows
      const __m512i x_signed = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
      const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q_abs, x_signed);
      const __m512 scale = _mm512_mul_ps(wd, _mm512_loadu_ps(xe + r * 8 * B + p * 16));
      acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(dot), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    float total = _mm512_reduce_add_ps(acc[r]);
    if (B % 2) {
      const int64_t b = B - 1;
      const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * QK));
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + r * K + b * QK));
      const __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q));
      total += d[b] * xd[r * B + b] * static_cast<float>(hsum(dot));
    }
    out[r * stride] = total;
  }
#elif defined(MINILLAMA_AVX2)
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

// The activations quantized once per call: xq (rows, K) int8, xd and xs (rows, B) float32, and xe (rows, 8 B):
// each block's scale repeated 8 times, the lanes of its sums in AVX-512's `dpbusd`. With two passes, row r of x
// becomes rows 2r (x quantized) and 2r + 1 (what that left out, x - x_hat, quantized in turn). Scratch memory of
// the calling thread, reused from call to call (a decode step makes ~200 calls; a tensor each costs more than a
// small matrix's arithmetic).
struct Activations {
  int64_t rows;
  const int8_t* q;
  const float *d, *s, *e;
  Activations(const at::Tensor& x, int64_t passes) {
    const int64_t M = x.size(0), K = x.size(1), B = K / QK;
    rows = M * passes;
    thread_local std::vector<int8_t> q_buffer;
    thread_local std::vector<float> f_buffer, rest;
    q_buffer.resize(rows * K);
    f_buffer.resize(rows * B * 10);
    int8_t* xq = q_buffer.data();
    float *xd = f_buffer.data(), *xs = xd + rows * B, *xe = xs + rows * B;
    const float* v = x.data_ptr<float>();
    for (int64_t r = 0; r < M; r++) {
      const int64_t first = r * passes;
      quantize_rows(v + r * K, 1, K, xq + first * K, xd + first * B, xs + first * B);
      if (passes == 2) {
        rest.resize(K);
        for (int64_t j = 0; j < K; j++) rest[j] = v[r * K + j] - static_cast<float>(xq[first * K + j]) * xd[first * B + j / QK];
        quantize_rows(rest.data(), 1, K, xq + (first + 1) * K, xd + (first + 1) * B, xs + (first + 1) * B);
      }
    }
#ifdef MINILLAMA_AVX512
    for (int64_t i = 0; i < rows * B; i++)
      for (int j = 0; j < 8; j++) xe[i * 8 + j] = xd[i];
#endif
    q = xq, d = xd, s = xs, e = xe;
  }
};

// out (M, N) from the rows' results (rows, N): with two passes the rows are written to the calling thread's
// scratch and each row's pair summed into out.
struct Output {
  at::Tensor out;
  float* rows_out;
  int64_t passes;
  Output(const at::Tensor& x, int64_t N, int64_t passes) : out(at::empty({x.size(0), N}, x.options())), passes(passes) {
    thread_local std::vector<float> pairs;
    if (passes == 2) pairs.resize(2 * x.size(0) * N);
    rows_out = passes == 2 ? pairs.data() : out.data_ptr<float>();
  }
  at::Tensor finish() {
    if (passes == 2) {
      float* o = out.data_ptr<float>();
      const int64_t M = out.size(0), N = out.size(1);
      for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) o[m * N + n] = rows_out[2 * m * N + n] + rows_out[(2 * m + 1) * N + n];
    }
    return out;
  }
};

// Weight rows `ahead` rows on are fetched into the cache while this one is multiplied: each matrix is a new
// stream, and the hardware's prefetcher stops at every 4 KB page (a profile put a third of the time on the
// weight loads). Nothing is computed from it; it only changes when the bytes arrive.
constexpr int64_t AHEAD = 8;

inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
}

void check_passes(int64_t passes) { TORCH_CHECK(passes == 1 || passes == 2, "passes: 1 or 2, got ", passes); }

at::Tensor int4_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, const at::Tensor& z,
                       int64_t passes) {
  check(x, qs, d, QK / 2);
  check_passes(passes);
  TORCH_CHECK(qs.scalar_type() == at::kByte, "qs: uint8");
  TORCH_CHECK(z.sizes() == d.sizes() && z.scalar_type() == at::kFloat && z.is_contiguous(), "zeros: like scales");
  const int64_t K = x.size(1), N = qs.size(0), B = K / QK;
  const Activations a(x, passes);
  Output out(x, N, passes);
  const uint8_t* w = qs.data_ptr<uint8_t>();
  const float *wd = d.data_ptr<float>(), *wz = z.data_ptr<float>();
  const int8_t* xq = a.q;
  const float *xd = a.d, *xs = a.s, *xe = a.e;
  const int64_t E = 8 * B, rows = a.rows;
  float* o = out.rows_out;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {  // each thread a range of weight rows
    for (int64_t n = begin; n < end; n++) {
      const uint8_t* wn = w + n * K / 2;
      const float *dn = wd + n * B, *zn = wz + n * B;
      if (n + AHEAD < end) {
        prefetch(wn + AHEAD * K / 2, K / 2);
        prefetch(dn + AHEAD * B, B * 4);
        prefetch(zn + AHEAD * B, B * 4);
      }
      int64_t r = 0;
      for (; r + ROWS <= rows; r += ROWS)
        int4_row<ROWS>(wn, dn, zn, xq + r * K, xd + r * B, xs + r * B, xe + r * E, K, o + r * N + n, N);
      for (; r + 2 <= rows; r += 2)
        int4_row<2>(wn, dn, zn, xq + r * K, xd + r * B, xs + r * B, xe + r * E, K, o + r * N + n, N);
      for (; r < rows; r++)
        int4_row<1>(wn, dn, zn, xq + r * K, xd + r * B, xs + r * B, xe + r * E, K, o + r * N + n, N);
    }
  });
  return out.finish();
}

at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& qs, const at::Tensor& d, int64_t passes) {
  check(x, qs, d, QK);
  check_passes(passes);
  TORCH_CHECK(qs.scalar_type() == at::kChar, "qs: int8");
  const int64_t K = x.size(1), N = qs.size(0), B = K / QK;
  const Activations a(x, passes);
  Output out(x, N, passes);
  const int8_t* w = qs.data_ptr<int8_t>();
  const float* wd = d.data_ptr<float>();
  const int8_t* xq = a.q;
  const float *xd = a.d, *xe = a.e;
  const int64_t E = 8 * B, rows = a.rows;
  float* o = out.rows_out;
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; n++) {
      const int8_t* wn = w + n * K;
      const float* dn = wd + n * B;
      if (n + AHEAD < end) {
        prefetch(wn + AHEAD * K, K);
        prefetch(dn + AHEAD * B, B * 4);
      }
      int64_t r = 0;
      for (; r + ROWS <= rows; r += ROWS) int8_row<ROWS>(wn, dn, xq + r * K, xd + r * B, xe + r * E, K, o + r * N + n, N);
      for (; r + 2 <= rows; r += 2) int8_row<2>(wn, dn, xq + r * K, xd + r * B, xe + r * E, K, o + r * N + n, N);
      for (; r < rows; r++) int8_row<1>(wn, dn, xq + r * K, xd + r * B, xe + r * E, K, o + r * N + n, N);
    }
  });
  return out.finish();
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

std::string isa() {  // which inner loops this build runs
#if defined(MINILLAMA_AVX512)
  return "AVX-512 VNNI";
#elif defined(MINILLAMA_AVX2)
  return "AVX2";
#else
  return "plain C++";
#endif
}

}  // namespace

// The ops' namespace: torch.ops.minillama, or another for a second build in the same process (the tests load
// the AVX2 and plain paths beside the native one: -DMINILLAMA_NS=minillama_avx2 -DMINILLAMA_NO_AVX512).
#ifndef MINILLAMA_NS
#define MINILLAMA_NS minillama
#endif
#define MINILLAMA_LIBRARY(ns, lib) TORCH_LIBRARY(ns, lib)
#define MINILLAMA_LIBRARY_IMPL(ns, key, lib) TORCH_LIBRARY_IMPL(ns, key, lib)

MINILLAMA_LIBRARY(MINILLAMA_NS, lib) {
  lib.def("int4_linear(Tensor x, Tensor qs, Tensor scales, Tensor zeros, int passes=1) -> Tensor");
  lib.def("int8_linear(Tensor x, Tensor qs, Tensor scales, int passes=1) -> Tensor");
  lib.def("int4_dequantize(Tensor qs, Tensor scales, Tensor zeros) -> Tensor");
  lib.def("int8_dequantize(Tensor qs, Tensor scales) -> Tensor");
  lib.def("isa() -> str", &isa);
}

MINILLAMA_LIBRARY_IMPL(MINILLAMA_NS, CPU, lib) {
  lib.impl("int4_linear", &int4_linear);
  lib.impl("int8_linear", &int8_linear);
  lib.impl("int4_dequantize", &int4_dequantize);
  lib.impl("int8_dequantize", &int8_dequantize);
}
