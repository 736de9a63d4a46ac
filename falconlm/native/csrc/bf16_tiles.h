// bfloat16 weight-row blocks for few activation rows, shared by the bf16 matmul (bf16_gemm.cpp) and the fused
// decode layers (decode.cpp): y[m, n] = x[m, :] . w[n, :] for a block of C weight rows, w read in its own
// row-major layout, 32 columns per inner step (one vdpbf16ps where the CPU has it, else two float32 FMAs on
// widened values), sums across lanes at the end in simd.h's fixed order: a row's result does not depend on the
// number of rows in the call.
#pragma once

#include "simd.h"
#include <cstdint>

namespace falcon::bf16 {

inline void put(uint16_t* y, float v) { *y = f32_to_bf16(v); }
inline void put(float* y, float v) { *y = v; }

#if defined(FALCON_AVX512)
constexpr int NR = 2;  // weight rows per register block
constexpr int MR = 8;  // activation rows per register block (2 x 8 measured 20-45% faster than 4 x 4 for 8-16 rows)
#elif defined(FALCON_AVX2)
constexpr int NR = 1;  // 16 ymm registers: 4 rows' sums (8) and one widened weight row (4) fit, and each widening
constexpr int MR = 4;  // of the weight then serves 4 activation rows instead of 2
#else
constexpr int NR = 2;
constexpr int MR = 2;  // 32 q registers: 2 x 2 blocks of widened values keep the sums in registers
#endif

// Activations as the inner loop reads them: bfloat16 bits, or (AVX2) float32 widened once per call instead of
// again for every weight row they meet; the values, and so the sums, are the same. Widened rows double the bytes
// the inner loop rereads for each weight row, so they pay only while all of them stay near the core: measured on
// AVX2 (2 threads), 1.2-1.7x for 4-16 rows of K = 1024 and 4-8 rows of K = 4096, 0.9x for 16 rows of K = 4096;
// on AVX-512 without BF16 they were slower (wider registers already amortize the widening).
inline BF16x32 load_x(const uint16_t* p) { return load_bf16x32(p); }
inline BF16x32 load_x(const float* p) {
#if defined(FALCON_BF16_DOT)
  return load_bf16x32(reinterpret_cast<const uint16_t*>(p));  // never called: widen_first() is false here
#else
  return {load(p), load(p + 16)};
#endif
}
#if defined(FALCON_AVX2)
constexpr int64_t WIDEN_MAX = 32768;  // activation elements (M x K) up to which widening first pays
#else
constexpr int64_t WIDEN_MAX = 0;
#endif
// Whether M rows of K bfloat16 activations should be widened to float32 before a matmul.
inline bool widen_first(int64_t M, int64_t K) { return M * K <= WIDEN_MAX; }

constexpr int PREFETCH = 2048;  // elements ahead of each weight row's stream to request
// Up to this many activation rows, weight rows go one at a time: two rows read in step are two interleaved streams
// inside one page, which the hardware prefetchers follow badly (a K = 1024 bf16 head streamed at about half the
// bandwidth of one row at a time, on AVX2 and AVX-512 alike). Above it the pair's reuse of activations wins.
constexpr int64_t ONE_ROW_MAX = 4;

template <int R, int C, typename X, typename Out>
inline void block(const X* x, int64_t ldx, int64_t m0, const uint16_t* w, int64_t K, int64_t n0, Out* y,
                  int64_t N) {
  F32x16 acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = zero();
  for (int64_t k = 0; k < K; k += 32) {
    BF16x32 wv[C];
    for (int c = 0; c < C; ++c) {
      prefetch(w + (n0 + c) * K + k + PREFETCH);
      wv[c] = load_bf16x32(w + (n0 + c) * K + k);
    }
    for (int r = 0; r < R; ++r) {
      const BF16x32 xv = load_x(x + (m0 + r) * ldx + k);
      for (int c = 0; c < C; ++c) acc[r * C + c] = dot_bf16(acc[r * C + c], xv, wv[c]);
    }
  }
  if constexpr (R * C == 16) {  // a full block: the 16 sums across lanes together
    alignas(64) float sums[16];
    store(sums, reduce_add16(acc));
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) put(y + (m0 + r) * N + n0 + c, sums[r * C + c]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) put(y + (m0 + r) * N + n0 + c, reduce_add(acc[r * C + c]));
  }
}

template <int C, typename X, typename Out>
inline void rows_block(const X* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0,
                       Out* y, int64_t N) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) block<MR, C, X, Out>(x, ldx, m, w, K, n0, y, N);
  switch (M - m) {
    case 7: block<7, C, X, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 6: block<6, C, X, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 5: block<5, C, X, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 4: block<4, C, X, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 3: block<3, C, X, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 2: block<2, C, X, Out>(x, ldx, m, w, K, n0, y, N); break;
    case 1: block<1, C, X, Out>(x, ldx, m, w, K, n0, y, N); break;
    default: break;
  }
}

// y[:, n0 : n0 + NR] for the rows of x (or y[:, n0] alone when n0 is the last weight row): the NR weight rows
// together, or one after the other for few activation rows (ONE_ROW_MAX). A row's result is the same either way.
template <typename X, typename Out>
inline void weight_pair(const X* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0,
                        Out* y, int64_t N) {
  if (NR > 1 && N - n0 >= NR && M > ONE_ROW_MAX) {
    rows_block<NR, X, Out>(x, ldx, M, w, K, n0, y, N);
    return;
  }
  for (int64_t n = n0; n < n0 + NR && n < N; ++n) rows_block<1, X, Out>(x, ldx, M, w, K, n, y, N);
}

}  // namespace falcon::bf16
