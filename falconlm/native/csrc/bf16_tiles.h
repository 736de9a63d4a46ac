// bfloat16 weight-row blocks for few activation rows (AVX-512 BF16), shared by the bf16 matmul (bf16_gemm.cpp)
// and the fused decode layers (decode.cpp): y[m, n] = x[m, :] . w[n, :] for a block of C weight rows, w read in
// its own row-major layout, each inner step one vdpbf16ps, sums across lanes at the end.
#pragma once

#include <immintrin.h>

#include "attention.h"  // as_bh
#include "bf16.h"
#include <cstdint>

namespace falcon::bf16 {

inline void put(uint16_t* y, float v) { *y = f32_to_bf16(v); }
inline void put(float* y, float v) { *y = v; }

constexpr int NR = 2;  // weight rows per register block
constexpr int MR = 8;  // activation rows per register block (2 x 8 measured 20-45% faster than 4 x 4 for 8-16 rows)
constexpr int PREFETCH = 2048;  // elements ahead of each weight row's stream to request

// Lane i of the result is the sum of the 16 lanes of v[i]: four levels of shuffles and adds, each halving the
// number of vectors (about 30 instructions against 16 separate reductions of about 8 each).
inline __m512 sum_lanes16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 128-bit quarters 0+2 and 1+3: v[2i] in quarters 0-1, v[2i+1] in 2-3
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // quarter t now holds four partial sums of v[4i + t]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // quarter t: two partials of v[8i + t], then two of v[8i + 4 + t], interleaved
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  // Quarter t, element e: the sum of v[4e + t].
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, d);
}

template <int R, int C, typename Out>
inline void block(const uint16_t* x, int64_t ldx, int64_t m0, const uint16_t* w, int64_t K, int64_t n0, Out* y,
                  int64_t N) {
  __m512 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[C];
    for (int c = 0; c < C; ++c) {
      _mm_prefetch(reinterpret_cast<const char*>(w + (n0 + c) * K + k + PREFETCH), _MM_HINT_T0);
      wv[c] = _mm512_loadu_si512(w + (n0 + c) * K + k);
    }
    for (int r = 0; r < R; ++r) {
      const __m512i xv = _mm512_loadu_si512(x + (m0 + r) * ldx + k);
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], as_bh(xv), as_bh(wv[c]));
    }
  }
  if constexpr (R * C == 16) {  // a full block: the 16 sums across lanes in one shuffle tree
    alignas(64) float sums[16];
    _mm512_store_ps(sums, sum_lanes16(&acc[0][0]));
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) put(y + (m0 + r) * N + n0 + c, sums[r * C + c]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) put(y + (m0 + r) * N + n0 + c, _mm512_reduce_add_ps(acc[r][c]));
  }
}

template <int C, typename Out>
inline void rows_block(const uint16_t* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0,
                       Out* y, int64_t N) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) block<MR, C, Out>(x, ldx, m, w, K, n0, y, N);
  switch (M - m) {
    case 7: block<7, C, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 6: block<6, C, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 5: block<5, C, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 4: block<4, C, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 3: block<3, C, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 2: block<2, C, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 1: block<1, C, Out>(x, ldx, m, w, K, n0, y, N); break;
    default: break;
  }
}


}  // namespace falcon::bf16
