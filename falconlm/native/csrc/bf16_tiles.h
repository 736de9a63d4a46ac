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

constexpr int NR = 2;  // weight rows per register block
#if defined(FALCON_AVX512)
constexpr int MR = 8;  // activation rows per register block (2 x 8 measured 20-45% faster than 4 x 4 for 8-16 rows)
#else
constexpr int MR = 2;  // 16 ymm / 32 q registers: 2 x 2 blocks of widened values keep the sums in registers
#endif
constexpr int PREFETCH = 2048;  // elements ahead of each weight row's stream to request
// Up to this many activation rows, weight rows go one at a time: two rows read in step are two interleaved streams
// inside one page, which the hardware prefetchers follow badly (a K = 1024 bf16 head streamed at about half the
// bandwidth of one row at a time, on AVX2 and AVX-512 alike). Above it the pair's reuse of activations wins.
constexpr int64_t ONE_ROW_MAX = 4;

template <int R, int C, typename Out>
inline void block(const uint16_t* x, int64_t ldx, int64_t m0, const uint16_t* w, int64_t K, int64_t n0, Out* y,
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
      const BF16x32 xv = load_bf16x32(x + (m0 + r) * ldx + k);
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

// y[:, n0 : n0 + NR] for the rows of x (or y[:, n0] alone when n0 is the last weight row): the NR weight rows
// together, or one after the other for few activation rows (ONE_ROW_MAX). A row's result is the same either way.
template <typename Out>
inline void weight_pair(const uint16_t* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0,
                        Out* y, int64_t N) {
  if (N - n0 >= NR && M > ONE_ROW_MAX) {
    rows_block<NR>(x, ldx, M, w, K, n0, y, N);
    return;
  }
  for (int64_t n = n0; n < n0 + NR && n < N; ++n) rows_block<1>(x, ldx, M, w, K, n, y, N);
}

}  // namespace falcon::bf16
