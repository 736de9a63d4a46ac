// bfloat16 matmuls for few rows on x86 CPUs with AVX-512 BF16: y[M, N] = x[M, K] @ w[N, K].T.
//
// Meant for decode steps (M up to a few dozen rows), where a general GEMM spends its time packing the weight:
// this one reads w in its own row-major layout, once per block of activation rows. Each inner step is one
// vdpbf16ps: 32 bfloat16 products summed pairwise into 16 float32 lanes; a 4 x 4 block of (weight row,
// activation row) accumulators is summed across lanes at the end. Threads split the weight rows into
// contiguous ranges, so each streams its part of w from memory once per call.
//
// Also a row-wise argmax for float32 / bfloat16 logits (the greedy pick), which torch does element by element.

#include <immintrin.h>
#include <omp.h>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr int NR = 4;  // weight rows per register block
constexpr int MR = 4;  // activation rows per register block

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <int R, int C>
inline void block(const uint16_t* x, int64_t ldx, int64_t m0, const uint16_t* w, int64_t K, int64_t n0,
                  uint16_t* y, int64_t N) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[C];
    for (int c = 0; c < C; ++c) wv[c] = _mm512_loadu_si512(w + (n0 + c) * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_loadu_si512(x + (m0 + r) * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(xv), as_bh(wv[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      y[(m0 + r) * N + n0 + c] = f32_to_bf16(_mm512_reduce_add_ps(acc[r][c]));
    }
}

template <int C>
inline void rows_block(const uint16_t* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0,
                       uint16_t* y, int64_t N) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) block<MR, C>(x, ldx, m, w, K, n0, y, N);
  switch (M - m) {
    case 3: block<3, C>(x, ldx, m, w, K, n0, y, N); break;
    case 2: block<2, C>(x, ldx, m, w, K, n0, y, N); break;
    case 1: block<1, C>(x, ldx, m, w, K, n0, y, N); break;
    default: break;
  }
}

}  // namespace

extern "C" {

// x: bfloat16 [M, K], rows ldx apart; w: bfloat16 [N, K] contiguous; y: bfloat16 [M, N] contiguous.
// K must be a multiple of 32.
void falcon_linear_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                        uint16_t* y, int nthreads) {
  const int64_t blocks = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * NR;
    switch (N - n0 < NR ? N - n0 : NR) {
      case 4: rows_block<4>(x, ldx, M, w, K, n0, y, N); break;
      case 3: rows_block<3>(x, ldx, M, w, K, n0, y, N); break;
      case 2: rows_block<2>(x, ldx, M, w, K, n0, y, N); break;
      default: rows_block<1>(x, ldx, M, w, K, n0, y, N); break;
    }
  }
}

// out[m] = the first index of the largest value of row m of x [M, N] (float32 or bfloat16, rows ldx apart).
// NaN counts as largest, as in torch.argmax.
void falcon_argmax_rows(const void* x, int x_bf16, int64_t M, int64_t N, int64_t ldx, int64_t* out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 4)
  for (int64_t m = 0; m < M; ++m) {
    const float* xf = static_cast<const float*>(x) + m * ldx;
    const uint16_t* xb = static_cast<const uint16_t*>(x) + m * ldx;
    auto load = [&](int64_t k) -> __m512 {
      if (x_bf16) {
        __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      }
      return _mm512_loadu_ps(xf + k);
    };
    auto at = [&](int64_t k) -> float { return x_bf16 ? bf16_to_f32(xb[k]) : xf[k]; };
    // Pass 1: the maximum (NaN wins), 16 lanes at a time.
    __m512 best = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    int64_t k = 0;
    for (; k + 16 <= N; k += 16) {
      const __m512 v = load(k);
      nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
      best = _mm512_max_ps(best, v);
    }
    float top = _mm512_reduce_max_ps(best);
    bool has_nan = nan != 0;
    for (int64_t j = k; j < N; ++j) {
      const float v = at(j);
      if (v != v) has_nan = true;
      else if (v > top) top = v;
    }
    // Pass 2: the first index holding it.
    const __m512 target = _mm512_set1_ps(top);
    int64_t found = -1;
    for (k = 0; k + 16 <= N && found < 0; k += 16) {
      const __m512 v = load(k);
      const __mmask16 hit = has_nan ? _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) : _mm512_cmp_ps_mask(v, target, _CMP_EQ_OQ);
      if (hit) found = k + __builtin_ctz(hit);
    }
    for (int64_t j = k; j < N && found < 0; ++j) {
      const float v = at(j);
      if (has_nan ? v != v : v == top) found = j;
    }
    if (found < 0) found = 0;
    out[m] = found;
  }
}

}  // extern "C"
