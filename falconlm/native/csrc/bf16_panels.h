// A bfloat16 GEMM for many activation rows (prompts) on CPUs without bfloat16 arithmetic: y = x @ w.T with x
// [M, K] and w [N, K] bfloat16, summed in float32.
//
// The row-dot tiles of bf16_tiles.h widen each weight vector again for every block of activation rows; that pays
// for a decode step's few rows, not for a prompt's hundreds. Here, as in a classic GEMM, each thread copies a
// panel of PANEL weight rows by KC columns into a float32 buffer laid out column by column (widened and
// transposed once), then runs every activation row against it in blocks of MR rows: per column, one load of the
// panel's PANEL weights and MR broadcasts of activations feed MR x PANEL multiply-adds, all in registers. Sums
// stay in float32 across the KC blocks (in a small buffer between them) and are rounded once at the end.
//
// Each output element sums its K products in column order, one lane each, so a row's result does not depend on
// the other rows; but the order differs from the row-dot tiles', so the two are not interchangeable for
// batch-invariant results (the --deterministic path never comes here).
#pragma once

#include "simd.h"
#include <cstdint>
#include <vector>

namespace falcon::panels {

constexpr int PANEL = 16;  // weight rows per panel: one F32x16 per panel column
constexpr int KC = 256;    // columns per panel block: 16 KiB of float32, L1-resident
constexpr int64_t MC = 256;  // activation rows per chunk: MC x KC float32 (256 KiB) stays in L2
constexpr int64_t GROUP = 32;  // panels whose sums stay near the core together: MC x 512 float32 (512 KiB)
#if defined(FALCON_AVX512)
constexpr int MR = 12;  // 12 zmm sums beside the panel vector (of 32)
#elif defined(FALCON_NEON)
constexpr int MR = 6;  // 6 x 4 q registers of sums, 4 for the panel vector (of 32)
#else
constexpr int MR = 6;  // AVX2: 6 x 2 ymm sums, 2 for the panel vector (of 16); MKL's sgemm blocks the same way
#endif

// out[k] = x[k] as float32 for k < K, in column order: the activations as the panels' register blocks read them.
inline void widen_in_order(const uint16_t* x, float* out, int64_t K) {
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) store(out + k, load_bf16(x + k));
  for (; k < K; ++k) out[k] = bf16_to_f32(x[k]);
}

// panel[c * PANEL + j] = w[n0 + j, k0 + c] as float32 for c < kc (rows past n1 are zeros).
inline void pack(const uint16_t* w, int64_t K, int64_t n0, int64_t n1, int64_t k0, int64_t kc, float* panel) {
#if defined(__AVX2__)
  if (n1 - n0 == PANEL && kc % 8 == 0) {
    for (int64_t c = 0; c < kc; c += 8) {
      for (int half = 0; half < 2; ++half) {  // an 8 x 8 transpose of widened rows n0 + 8 half ...
        __m256 r[8];
        for (int i = 0; i < 8; ++i) {
          const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n0 + half * 8 + i) * K + k0 + c));
          r[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
        }
        const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
        const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
        const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
        const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
        const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
        const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
        const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
        const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        const __m256 cols[8] = {
            _mm256_permute2f128_ps(s0, s4, 0x20), _mm256_permute2f128_ps(s1, s5, 0x20),
            _mm256_permute2f128_ps(s2, s6, 0x20), _mm256_permute2f128_ps(s3, s7, 0x20),
            _mm256_permute2f128_ps(s0, s4, 0x31), _mm256_permute2f128_ps(s1, s5, 0x31),
            _mm256_permute2f128_ps(s2, s6, 0x31), _mm256_permute2f128_ps(s3, s7, 0x31)};
        for (int i = 0; i < 8; ++i) _mm256_storeu_ps(panel + (c + i) * PANEL + half * 8, cols[i]);
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < PANEL; ++j)
    for (int64_t c = 0; c < kc; ++c)
      panel[c * PANEL + j] = n0 + j < n1 ? bf16_to_f32(w[(n0 + j) * K + k0 + c]) : 0.0f;
}

// sums[r * lds] += x[m0 + r, k0 : k0 + kc] @ panel for R rows of float32 activations (rows K apart); first:
// sums start from zero.
template <int R>
inline void rows_times_panel(const float* x, int64_t K, int64_t m0, int64_t k0, int64_t kc, const float* panel,
                             float* sums, int64_t lds, bool first) {
  F32x16 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = first ? zero() : load(sums + r * lds);
  const float* xr = x + m0 * K + k0;
  for (int64_t c = 0; c < kc; ++c) {
    const F32x16 wv = load(panel + c * PANEL);
    for (int r = 0; r < R; ++r) acc[r] = fmadd(set1(xr[r * K + c]), wv, acc[r]);
  }
  for (int r = 0; r < R; ++r) store(sums + r * lds, acc[r]);
}

// rows_times_panel for the last `left` (< MR) rows.
template <int R = MR - 1>
inline void rest_times_panel(int64_t left, const float* x, int64_t K, int64_t m0, int64_t k0, int64_t kc,
                             const float* panel, float* sums, int64_t lds, bool first) {
  if constexpr (R > 0) {
    if (left == R) {
      rows_times_panel<R>(x, K, m0, k0, kc, panel, sums, lds, first);
    } else {
      rest_times_panel<R - 1>(left, x, K, m0, k0, kc, panel, sums, lds, first);
    }
  }
}

// Float32 sums of M rows of x (float32, rows K apart) against the weight panels p0 .. p1 - 1 (rows p * PANEL ...,
// at most N): sums[m * lds + n] for those columns n. Each calling thread packs into a panel block of its own.
// Panels go in groups of GROUP, and within a group KC-column blocks go outermost, so that only M x KC
// activations and the group's M x GROUP * PANEL sums need to stay near the core.
inline void panel_sums(const float* x, int64_t M, int64_t K, const uint16_t* w, int64_t N, int64_t p0, int64_t p1,
                       float* sums, int64_t lds) {
  static thread_local std::vector<float> block(KC * PANEL);
  float* panel = block.data();
  for (int64_t g0 = p0; g0 < p1; g0 += GROUP) {
    const int64_t g1 = g0 + GROUP < p1 ? g0 + GROUP : p1;
    for (int64_t k0 = 0; k0 < K; k0 += KC) {
      const int64_t kc = K - k0 < KC ? K - k0 : KC;
      for (int64_t p = g0; p < g1; ++p) {
        const int64_t n0 = p * PANEL, n1 = n0 + PANEL < N ? n0 + PANEL : N;
        pack(w, K, n0, n1, k0, kc, panel);
        // The block packed next, into L2 while this one computes: the next panel's; after the group's last panel,
        // the group's first at the next columns; after the last columns, the next panel's first (the next group,
        // or most likely this thread's next share).
        int64_t next = p + 1, next_k0 = k0;
        if (next == g1) {
          next = k0 + KC < K ? g0 : g1;
          next_k0 = k0 + KC < K ? k0 + KC : 0;
        }
        if ((next + 1) * PANEL <= N)
          for (int64_t j = 0; j < PANEL; ++j)
            for (int64_t c = next_k0; c < next_k0 + KC && c < K; c += 32) prefetch_l2(w + (next * PANEL + j) * K + c);
        int64_t m = 0;
        for (; m + MR <= M; m += MR)
          rows_times_panel<MR>(x, K, m, k0, kc, panel, sums + m * lds + n0, lds, k0 == 0);
        if (m < M) rest_times_panel(M - m, x, K, m, k0, kc, panel, sums + m * lds + n0, lds, k0 == 0);
      }
    }
  }
}

}  // namespace falcon::panels
