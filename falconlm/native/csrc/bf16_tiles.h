// bfloat16 weight-row blocks for few activation rows, shared by the bf16 matmul (bf16_gemm.cpp) and the fused
// decode layers (decode.cpp): y[m, n] = x[m, :] . w[n, :] for a block of C weight rows, w read in its own
// row-major layout, STEP columns per inner step, sums across lanes at the end in a fixed order. A row's result
// does not depend on the number of rows in the call, nor on the block it falls in.
#pragma once

#include "simd.h"
#include <cstdint>
#include <type_traits>

namespace falcon::bf16 {

inline void put(uint16_t* y, float v) { *y = f32_to_bf16(v); }
inline void put(float* y, float v) { *y = v; }

#if defined(FALCON_AVX2)
// AVX2: 16 columns per step, read as one 32-byte load and taken as two halves of 8 float32 lanes each: the even
// columns (the bits shifted up 16) and the odd ones (the low 16 bits cleared), one instruction per half where a
// zero-extension and a shift per 8 columns took two, so the FMA ports meet half the widening work. Activations
// in float32 are stored in the same even / odd order (widen_row), and lane i sums columns 16 j + 2 i and then
// 16 j + 2 i + 1 for j = 0, 1, ...: a fixed order whatever the rows. One ymm register of sums per (row, weight
// row): 4 rows x 3 weight rows of sums fit in the 16 registers beside the 3 weight halves and the activation
// half, and each activation load serves 3 weight rows. (With 16 lanes of sums per pair, two registers, only 4 x 1
// fit, and reloading the activations from L2 for every weight row held 8-16 rows to about half the FMA ports'
// rate: 43-60 GMAC/s against 62-83 for 4 x 3 on 2 threads of the stand-in.)
constexpr int STEP = 16;
constexpr int HALVES = 2;
constexpr int NR = 3;  // weight rows per register block
constexpr int MR = 4;  // activation rows per register block
struct Sums { __m256 v; };
struct Step { __m256 v; };  // one half of STEP columns as float32
inline Sums no_sums() { return {_mm256_setzero_ps()}; }
inline __m256 half_of(__m256i bits, int half) {  // bfloat16 pairs in 32-bit lanes: the even or the odd ones
  return _mm256_castsi256_ps(half == 0 ? _mm256_slli_epi32(bits, 16)
                                       : _mm256_and_si256(bits, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}
inline __m256i load_bits(const uint16_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline Step load_w(const uint16_t* p, int half) { return {half_of(load_bits(p), half)}; }
inline Step load_x(const uint16_t* p, int half) { return {half_of(load_bits(p), half)}; }
inline Step load_x(const float* p, int half) { return {_mm256_loadu_ps(p + 8 * half)}; }  // widen_row's order
inline Sums dot(Sums acc, Step x, Step w) { return {_mm256_fmadd_ps(x.v, w.v, acc.v)}; }
inline float total(Sums a) {  // the fixed tree: + lane i+4, + i+2, + i+1
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}
// out[i] = total(a[i]) for eight sums at once: the same tree, so the same bits (160 shapes against the one-by-one
// code), in 21 instructions where eight total() calls take 48. One thread on the Zen 4 stand-in, interleaved: 8
// rows against the 65024 x 1024 head 35.0-35.8 -> 38.0-39.6 GMAC/s, 16 rows 42.1-43.5 -> 43.1-43.5, the layers'
// shapes within 2% either way.
#define FALCON_TOTAL8 1
inline void total8(const Sums* a, float* out) {
  __m256 q[4];  // + lane i+4: [a0 | a1] low halves plus high halves, and so on
  for (int i = 0; i < 4; ++i)
    q[i] = _mm256_add_ps(_mm256_permute2f128_ps(a[2 * i].v, a[2 * i + 1].v, 0x20),
                         _mm256_permute2f128_ps(a[2 * i].v, a[2 * i + 1].v, 0x31));
  __m256 p[2];  // + lane i+2: lanes 0-1 of sums 4i and 4i + 2, then (upper half) of 4i + 1 and 4i + 3
  for (int i = 0; i < 2; ++i)
    p[i] = _mm256_add_ps(_mm256_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm256_shuffle_ps(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  // + lane i+1: the totals of sums 0, 2, 4, 6, then 1, 3, 5, 7
  const __m256 t = _mm256_add_ps(_mm256_shuffle_ps(p[0], p[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm256_shuffle_ps(p[0], p[1], _MM_SHUFFLE(3, 1, 3, 1)));
  alignas(32) float s[8];
  _mm256_store_ps(s, t);
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = s[i];
    out[2 * i + 1] = s[4 + i];
  }
}
// K bfloat16 values as float32 in load_x's order: each 16 columns as their 8 even ones, then their 8 odd ones.
inline void widen_row(const uint16_t* x, float* out, int64_t K) {
  for (int64_t k = 0; k < K; k += STEP) {
    const __m256i bits = load_bits(x + k);
    _mm256_storeu_ps(out + k, half_of(bits, 0));
    _mm256_storeu_ps(out + k + 8, half_of(bits, 1));
  }
}
#else
// Elsewhere: 32 columns per step into 16 lanes of sums, one vdpbf16ps where the CPU has it, else two float32
// FMAs on widened values (simd.h's dot_bf16).
constexpr int STEP = 32;
#if defined(FALCON_AVX512)
constexpr int NR = 2;
constexpr int MR = 8;  // 2 x 8 measured 20-45% faster than 4 x 4 for 8-16 rows
#else
constexpr int NR = 2;
constexpr int MR = 2;  // 32 q registers: 2 x 2 blocks of widened values keep the sums in registers
#endif
constexpr int HALVES = 1;
using Sums = F32x16;
using Step = BF16x32;
inline Sums no_sums() { return zero(); }
inline Step load_w(const uint16_t* p, int) { return load_bf16x32(p); }
inline Step load_x(const uint16_t* p, int) { return load_bf16x32(p); }
inline Step load_x(const float* p, int) {
#if defined(FALCON_BF16_DOT)
  return load_bf16x32(reinterpret_cast<const uint16_t*>(p));  // never called: widen_first() is false here
#else
  return {load(p), load(p + 16)};
#endif
}
inline Sums dot(Sums acc, const Step& x, const Step& w) { return dot_bf16(acc, x, w); }
inline float total(Sums a) { return reduce_add(a); }
inline void widen_row(const uint16_t* x, float* out, int64_t K) {  // K bfloat16 values as float32, in order
  for (int64_t k = 0; k < K; k += 16) store(out + k, load_bf16(x + k));
}
#endif

// Activations as the inner loop reads them: bfloat16 bits, or (AVX2) float32 widened once per call instead of
// again for every weight row they meet; the values, and so the sums, are the same. Widened rows double the bytes
// the inner loop rereads, so they pay only while the rows stay near the core (AVX2, 2 threads: 16 rows of
// K = 4096 73 -> 82 GMAC/s, 256 KiB of float32); on AVX-512 without BF16 they were slower (wider registers
// already amortize the widening).
#if defined(FALCON_AVX2)
constexpr int64_t WIDEN_MAX = 65536;  // activation elements (M x K) up to which widening first pays
#else
constexpr int64_t WIDEN_MAX = 0;
#endif
// Activation rows per pass over a weight, for many rows (64 x 4096 x 2 bytes = 512 KiB of activations).
constexpr int64_t M_BLOCK = 64;

// Whether M rows of K bfloat16 activations should be widened to float32 before a matmul.
inline bool widen_first(int64_t M, int64_t K) { return M * K <= WIDEN_MAX; }

// Each weight row's stream requests the same column of the next block's rows (C rows on: the block reads C rows
// side by side, which the hardware prefetchers follow badly), or PREFETCH elements on where that is nearer.
// Measured on 8-16 rows, 2 threads: a K = 1024 bf16 head 42-68 -> 68-73 GMAC/s on AVX2 (3-row blocks); a lone
// row needs the longer reach (1 row ahead: 71 -> 60 GMAC/s for 4 rows on AVX-512). The requests
// go to L2, whose queue holds more of them than L1's fill buffers: 16 rows against 48 weights of 8 MiB in turn
// (none left in cache) 64 -> 68-69 GMAC/s on AVX2, 8 rows 52-53 -> 57-61; two blocks ahead was slower.
constexpr int PREFETCH = 2048;
// Blocks of activation rows after the first meet the same weight rows, and so would request the same lines again.
// On AVX2 (4-row blocks), where the rows are long the weights have left L1 by the next block, which reads them
// back from L2, and the repeated requests only crowd L2's queue: from this K on, only the first block requests.
// 16 rows, 2 threads, weights streamed from memory, interleaved rounds on the stand-in: K = 4096 105-109 -> 113-119
// GMAC/s (six rounds) and 97-112 -> 110-113 (four); in the fused step of bench-194m's served load, the matmuls
// after attention (MLP-out has K = 4096) 3.54-3.61 -> 3.32-3.36 s. At K = 1024 the weights stay in L1 and skipping
// measured 1% slower; on AVX-512 (8-row blocks) it measured no faster at K = 4096. Those keep requesting.
#if defined(FALCON_AVX2)
constexpr int64_t FIRST_BLOCK_REQUESTS_K = 2048;
#else
constexpr int64_t FIRST_BLOCK_REQUESTS_K = INT64_MAX;
#endif
#if defined(FALCON_AVX2)
// One register of sums per pair is one chain of dependent FMAs: a lone weight row would wait on the FMA latency.
constexpr int64_t ONE_ROW_MAX = 0;
// A lone activation row (batch-1 decode) meets LONE_NR weight rows at a time instead of NR: as many chains of
// sums in flight, with no widened weight to keep (each is used once), and as many weight streams read side by
// side. 12 rather than 8, on the Zen 5 stand-in (bf16 batch-1 decode runs, libraries in turn, a probe read before
// and after each): bench-194m 62.5 -> 75.7 GB/s (77% -> 93% of the probe) and 60.9 -> 70.9 (75% -> 89%),
// bench-1b 51.3 -> 70.0 (71% -> 85%). 16 took 84-85% (16 sums and the operands outgrow the 16 ymm registers),
// 10 and 4 no more than 8. (AVX-512, one weight row at a time, read 93% there; 8-16 side by side 69-70%.)
constexpr int LONE_NR = 12;
#else
constexpr int LONE_NR = NR;
// Up to this many activation rows, weight rows go one at a time: two rows read in step are two interleaved streams
// inside one page, which the hardware prefetchers follow badly (a K = 1024 bf16 head streamed at about half the
// bandwidth of one row at a time). Above it the pair's reuse of activations wins.
constexpr int64_t ONE_ROW_MAX = 4;
#endif

// Never inlined: where GCC inlined it into a caller's loop (falcon_linear_bf16's work shares), the AVX-512 head of
// 8-20 rows ran 4-9% slower than the same block called (65024 x 1024, 2 threads, interleaved calls).
template <int R, int C, typename X, typename Out>
[[gnu::noinline]] void block(const X* x, int64_t ldx, int64_t m0, const uint16_t* w, int64_t K, int64_t n0, Out* y,
                             int64_t N) {
  const int64_t ahead = C * K > PREFETCH ? C * K : PREFETCH;
  Sums acc[R * C];
  for (int i = 0; i < R * C; ++i) acc[i] = no_sums();
  const bool request = m0 == 0 || K < FIRST_BLOCK_REQUESTS_K;
  for (int64_t k = 0; k < K; k += 32) {
    if (request)
      for (int c = 0; c < C; ++c) prefetch_l2(w + (n0 + c) * K + k + ahead);
    for (int s = 0; s < 32; s += STEP)
      for (int h = 0; h < HALVES; ++h) {
        Step wv[C];
        for (int c = 0; c < C; ++c) wv[c] = load_w(w + (n0 + c) * K + k + s, h);
        for (int r = 0; r < R; ++r) {
          const Step xv = load_x(x + (m0 + r) * ldx + k + s, h);
          for (int c = 0; c < C; ++c) acc[r * C + c] = dot(acc[r * C + c], xv, wv[c]);
        }
      }
  }
  alignas(64) float sums[R * C];
  if constexpr (R * C == 16 && std::is_same_v<Sums, F32x16>) {  // the 16 sums across lanes together
    store(sums, reduce_add16(acc));
  } else {
    int i = 0;
#if defined(FALCON_TOTAL8)
    for (; i + 8 <= R * C; i += 8) total8(acc + i, sums + i);
    if (R * C - i >= 4) {  // four or more left: padded to eight with empty sums
      Sums rest[8];
      float out[8];
      for (int j = 0; j < 8; ++j) rest[j] = i + j < R * C ? acc[i + j] : no_sums();
      total8(rest, out);
      for (int j = 0; i < R * C; ++i, ++j) sums[i] = out[j];
    }
#endif
    for (; i < R * C; ++i) sums[i] = total(acc[i]);
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) put(y + (m0 + r) * N + n0 + c, sums[r * C + c]);
}

// Every row of x against y[:, n0 : n0 + C]: blocks of MR rows, then the rest.
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

// y[:, n0 : n1] for the rows of x: NR weight rows at a time (a last 4 of NR = 3 as 2 + 2, so that no weight row
// is left alone on one chain of sums), LONE_NR for a lone row, or one after the other for few activation rows
// (ONE_ROW_MAX). A row's result is the same whichever way. (Spans of weight rows met by each block of activation
// rows in turn, to keep those in L1, measured no faster on AVX2 and 5% slower on AVX-512.)
template <typename X, typename Out>
inline void weight_rows(const X* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0, int64_t n1,
                        Out* y, int64_t N) {
  if (M <= ONE_ROW_MAX) {
    for (int64_t n = n0; n < n1; ++n) rows_block<1, X, Out>(x, ldx, M, w, K, n, y, N);
    return;
  }
  int64_t n = n0;
  if constexpr (LONE_NR != NR) {
    if (M == 1)
      for (; n + LONE_NR <= n1; n += LONE_NR) block<1, LONE_NR, X, Out>(x, ldx, 0, w, K, n, y, N);
  }
  while (n < n1) {
    const int64_t left = n1 - n;
    if constexpr (NR == 3) {
      if (left >= 3 && left != 4) {
        rows_block<3, X, Out>(x, ldx, M, w, K, n, y, N);
        n += 3;
        continue;
      }
    }
    if (left >= 2) {
      rows_block<2, X, Out>(x, ldx, M, w, K, n, y, N);
      n += 2;
    } else {
      rows_block<1, X, Out>(x, ldx, M, w, K, n, y, N);
      n += 1;
    }
  }
}

// weight_rows over activations held both ways: the float32 copy where there is one (xf not null, rows K apart),
// else the bfloat16 bits (rows ldx apart).
template <typename Out>
inline void weight_rows_of(const uint16_t* xb, int64_t ldx, const float* xf, int64_t M, const uint16_t* w, int64_t K,
                           int64_t n0, int64_t n1, Out* y, int64_t N) {
  if (xf != nullptr) {
    weight_rows(xf, K, M, w, K, n0, n1, y, N);
  } else {
    weight_rows(xb, ldx, M, w, K, n0, n1, y, N);
  }
}

}  // namespace falcon::bf16
