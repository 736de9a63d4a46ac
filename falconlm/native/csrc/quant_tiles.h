// Quantized-weight tiles, shared by the quantized matmuls (quant_gemm.cpp) and the fused decode layers
// (decode.cpp), for every target of simd.h.
//
// Activations are quantized to int8 on the fly, in blocks of B columns (a scale and a sum of the int8 values per
// row and block), so each inner step is one 4-byte dot product per lane (vpdpbusd, vpmaddubsw + vpmaddwd, sdot):
// 64 multiply-adds of weight bytes by activation bytes. Weights are re-tiled at load so that one 64-byte line
// holds 16 output rows x 4 columns (int8, stored as q + 128) or 16 rows x 8 columns (int4: low nibbles columns
// 0-3, high nibbles 4-7), and each 16-row tile is contiguous: a thread streams through its tiles front to back and
// every lane of an accumulator is a different output row, so no sums across lanes are needed. Integer sums are
// exact and each row's float sums run over its blocks in order, so a row's result does not depend on the others.
#pragma once

#include "simd.h"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace falcon {

constexpr int TILE = 16;  // output rows per tile (vector lanes)
#if defined(FALCON_AVX512)
// One zmm per 16 lanes: 8 rows of integer and float sums are 16 of the 32 registers. Against 4 rows, on the Xeon
// with AVX-512 VNNI (2 threads, bench-194m): batch 8 +15-20% (int8 and int4 g64), int8 prompts through this
// kernel +6-10%, int4 prompts unchanged.
constexpr int MR = 8;
#elif defined(FALCON_SCALAR) || defined(FALCON_I8MM)
constexpr int MR = 4;  // activation rows per register block (with i8mm: two pairs of rows)
#elif defined(FALCON_AVX2)
// Two ymm per 16 lanes: 4 rows of sums are 8 registers, beside two weight lines (4). Each line loaded, and its
// top bit flipped, serves twice the rows of MR = 2: on the AVX2 stand-in bench-194m prompts went 735-756 ->
// 794-797 tok/s (int8), 839-852 -> 922-925 (int4 g64) and 1038 -> 1239 (int8, AVX-VNNI); batch 8 +6-13%.
constexpr int MR = 4;
#else
constexpr int MR = 2;  // four q registers per 16 lanes: fewer rows keep the sums in registers
#endif
// Each line of the weight stream is requested twice: into L2 `l2` bytes ahead, then into L1 `l1` bytes ahead
// (stream_ahead()). Requests into L1 alone, 4096 ahead, held batch-1 decode below what memory gives, as the L1
// fill buffers they occupy run out; with both (4096 and 1024), bench-1b int4 g64 steps went 27.8-28.4 -> 25.1-25.6
// ms and int8 39.5-40.0 -> 37.3-38.7 on AVX-512 (Intel, 2 threads, A/B in turn), and bench-194m batch 1 rose 10%
// (int4, AVX-512) to 40% (int8, the AVX2 stand-in). Into L2 alone was as good from memory and 5% slower from L3.
//
// AMD's cores reach twice as far into L2 and six times as far into L1. On a Zen 4 EPYC (the AVX2 stand-in, 2
// threads, bench-1b's int8 shapes at one row, interleaved with the old distances) 8192 into L2 took 26.0-26.8 ->
// 28.1-29.0 GB/s while the read probe gave 31-33, and the whole bench-1b int8 step 27-29 -> 35-37 GB/s while it
// gave 46-56. Into L1 6144 ahead on a Zen 5 EPYC (AVX2 stand-in, bench-1b batch-1 steps, libraries in turn):
// int8 61.2-61.9 -> 66.1-67.1 GB/s where the probe read 68-69, 46.4-47.1 -> 47.5-48.1 where it read 51-52; int4
// g64 within 1-3%; 4096 gave most of it, 7168 and 12288 into L2 no more. The AVX-512 build on the Zen 5 (libraries
// in turn, probes beside each): bench-1b int8 layers 15.5 -> 14.2 ms and 16.0 -> 15.2, bench-194m int8 1.96 ->
// 1.73 ms, int4 g64 unchanged. The AVX2 build takes the far distances on every CPU, as it always has (none was
// measured on an Intel CPU without AVX-512); the AVX-512 build takes them on AMD (and Hygon, Zen inside) only.
// Longer still was tried on the Zen 4 (AVX2 stand-in, bench-1b int8 batch-1 steps, distances in turn in one
// process): 12288-24576 into L2 and 0-12288 into L1 all read 67-75% of the probe in fast minutes, as 8192 /
// 6144 does, and 16384 lost 7% in slow ones, although it lifted a lone 127 MiB head stream from 74-80% to
// 81-120%. Nor did dropping a tenth of the AVX2 dot product's instructions move it (README).
// On a real AVX2-only Zen 3 EPYC (bench-1b batch-1 steps, distances in turn in one process, a probe beside each):
// int8 read 76-80% of the probe with these and 82-85% with NEAR_AHEAD, int4 g64 84% and 83%; the ranges overlapped
// (70-96%) on that noisy machine, so a per-family choice was left for a quieter one.
struct StreamAhead {
  int l2, l1;  // bytes ahead of the line being read
};
constexpr StreamAhead NEAR_AHEAD{4096, 1024};
constexpr StreamAhead FAR_AHEAD{8192, 6144};
#if defined(FALCON_AVX2)
inline StreamAhead stream_ahead() { return FAR_AHEAD; }
#elif defined(FALCON_AVX512)
inline const StreamAhead STREAM_AHEAD = zen_cpu() ? FAR_AHEAD : NEAR_AHEAD;  // set once, as the library loads
inline StreamAhead stream_ahead() { return STREAM_AHEAD; }
#else
inline StreamAhead stream_ahead() { return NEAR_AHEAD; }
#endif
inline void prefetch_stream(const uint8_t* p, StreamAhead ahead) {
  prefetch_l2(p + ahead.l2);
  prefetch(p + ahead.l1);
}

inline int32_t four_bytes(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// The magnitudes of activation bytes i .. i + 3 for dot_q8 where it reads them (Q8_MAGNITUDES), else 0.
inline int32_t four_magnitudes(const int8_t* xm, int64_t i) {
  if constexpr (Q8_MAGNITUDES) return four_bytes(xm + i);
  return 0;
}

// Activation columns per int8 scale, as llama.cpp's q8_0 (falconlm/quant/kernels/native.py's ACTIVATION_BLOCK):
// the block every caller passes. The tiles below take it as a compile-time constant, so that a block's lines unroll
// (any other width runs the same code with the width read at run time).
constexpr int64_t ACTIVATION_BLOCK = 32;

template <int R>
inline void store_rows(const F32x16 (&acc)[MR], void* y, int64_t m0, int64_t N, int64_t n0, int y_bf16) {
  for (int r = 0; r < R; ++r) store_any(y, (m0 + r) * N + n0, acc[r], y_bf16);
}

// One tile of 16 int8 rows against R activation rows (xm: their magnitudes, see Q8_MAGNITUDES): activation blocks
// of B columns (FIXED_B when not 0, as tile_w4_blocks).
template <int R, int64_t FIXED_B>
inline void tile_w8_blocks(const int8_t* xq, const int8_t* xm, const float* xs, const int32_t* xsum, int64_t m0,
                           int64_t K, int64_t block, const uint8_t* w, const float* wscale, void* y, int64_t N,
                           int64_t n0, int y_bf16) {
  const int64_t B = FIXED_B > 0 ? FIXED_B : block;
  const int64_t nb = K / B;
  const StreamAhead ahead = stream_ahead();
  F32x16 facc[MR];
  for (int r = 0; r < R; ++r) facc[r] = zero();
  for (int64_t b = 0; b < nb; ++b) {
    I32x16 iacc[MR];
    for (int r = 0; r < R; ++r) iacc[r] = izero();
    const uint8_t* wb = w + b * B * TILE;
#if defined(FALCON_I8MM)
    if constexpr (R >= 2) {  // pairs of rows through smmla, an odd last row through sdot
      I32Pairs pacc[R / 2];
      for (int p = 0; p < R / 2; ++p) pacc[p] = pzero();
      for (int64_t k = 0; k < B; k += 8) {
        prefetch_stream(wb + k * TILE, ahead);
        prefetch_stream(wb + (k + 4) * TILE, ahead);
        const Line w0 = load_line(wb + k * TILE), w4 = load_line(wb + (k + 4) * TILE);
        const Line s0 = signed_q8(w0), s4 = signed_q8(w4);
        const int8_t* xk = xq + m0 * K + b * B + k;
        for (int p = 0; p < R / 2; ++p)
          pacc[p] = mmla8(pacc[p], s0, s4, two_rows(xk + 2 * p * K, xk + (2 * p + 1) * K));
        if constexpr (R % 2 == 1) {
          const int64_t i = (m0 + R - 1) * K + b * B + k;
          iacc[R - 1] = dot_q8(dot_q8(iacc[R - 1], w0, four_bytes(xq + i), four_magnitudes(xm, i)), w4,
                               four_bytes(xq + i + 4), four_magnitudes(xm, i + 4));
        }
      }
      for (int p = 0; p < R / 2; ++p) unpair(pacc[p], iacc[2 * p], iacc[2 * p + 1]);
    } else
#endif
    {
      // A second chain of sums per row (the odd lines) for one or two rows, which would wait on one chain's
      // latency; from three rows on, the rows' chains are enough and the registers are better spent on rows.
      I32x16 odd[MR];
      for (int r = 0; r < R; ++r) odd[r] = izero();
      for (int64_t k = 0; k < B; k += 8) {
        prefetch_stream(wb + k * TILE, ahead);
        prefetch_stream(wb + (k + 4) * TILE, ahead);
        const Line w0 = load_line(wb + k * TILE), w4 = load_line(wb + (k + 4) * TILE);
        for (int r = 0; r < R; ++r) {
          const int64_t i = (m0 + r) * K + b * B + k;
          iacc[r] = dot_q8(iacc[r], w0, four_bytes(xq + i), four_magnitudes(xm, i));
          I32x16& second = R >= 3 ? iacc[r] : odd[r];
          second = dot_q8(second, w4, four_bytes(xq + i + 4), four_magnitudes(xm, i + 4));
        }
      }
      for (int r = 0; r < R; ++r) iacc[r] = iadd(iacc[r], odd[r]);  // integer sums: exact in any order
    }
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * nb + b;
      const I32x16 fixed = isub(iacc[r], iset1(Q8_OFFSET * xsum[i]));
      facc[r] = fmadd(to_float(fixed), set1(xs[i]), facc[r]);
    }
  }
  const F32x16 sw = load(wscale + n0);
  for (int r = 0; r < R; ++r) facc[r] = mul(facc[r], sw);
  store_rows<R>(facc, y, m0, N, n0, y_bf16);
}

template <int R>
inline void tile_w8(const int8_t* xq, const int8_t* xm, const float* xs, const int32_t* xsum, int64_t m0, int64_t K,
                    int64_t B, const uint8_t* w, const float* wscale, void* y, int64_t N, int64_t n0, int y_bf16) {
  if (B == ACTIVATION_BLOCK) {
    tile_w8_blocks<R, ACTIVATION_BLOCK>(xq, xm, xs, xsum, m0, K, B, w, wscale, y, N, n0, y_bf16);
  } else {
    tile_w8_blocks<R, 0>(xq, xm, xs, xsum, m0, K, B, w, wscale, y, N, n0, y_bf16);
  }
}

// One tile of 16 int4 rows against R activation rows: activation blocks of B columns (FIXED_B when not 0) inside
// weight groups of G, a multiple of B. Each group's scale and zero point are widened once for all its blocks (they
// were found again for every block of 4 lines, through an integer division), and with the block width known to the
// compiler a block's lines unroll. A lone row against int4 g64 tiles held in L3 (2048 and 8192 x 2048, 2 threads,
// both libraries in turn in one process, best of 30, the same bits): AVX-512 VNNI 49 / 75 -> 65 / 96 GB/s and AVX2
// 49 / 56 -> 59 / 70 on the Zen 4 EPYC; 8 rows 8-14% faster. The int8 tiles gained 2-7% from the unrolling alone.
template <int R, int64_t FIXED_B>
inline void tile_w4_blocks(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m0, int64_t K,
                           int64_t block, int64_t G, const uint8_t* w, const uint16_t* sz, void* y, int64_t N,
                           int64_t n0, int y_bf16) {
  const int64_t B = FIXED_B > 0 ? FIXED_B : block;
  const int64_t nb = K / B, blocks_per_group = G / B;
  const StreamAhead ahead = stream_ahead();
  F32x16 facc[MR];
  for (int r = 0; r < R; ++r) facc[r] = zero();
  F32x16 scale = zero(), zero_point = zero();  // block b's weight group's
  const uint16_t* group = sz;
  int64_t left = 0;  // blocks of the current group still to come
  for (int64_t b = 0; b < nb; ++b) {
    if (left == 0) {  // a new group: scale, then zero point
      if (b > 0) group += 2 * TILE;
      scale = load_bf16(group);
      zero_point = load_bf16(group + TILE);
      left = blocks_per_group;
    }
    --left;
    I32x16 iacc[MR];
    for (int r = 0; r < R; ++r) iacc[r] = izero();
    const uint8_t* wb = w + b * (B / 2) * TILE;
#if defined(FALCON_I8MM)
    I32Pairs pacc[R / 2 > 0 ? R / 2 : 1];  // pairs of rows through smmla, an odd last row through sdot
    for (int p = 0; p < R / 2; ++p) pacc[p] = pzero();
#endif
    for (int64_t k0 = 0; k0 < B; k0 += 8 * U4_LINES) {  // runs of lines whose sums u4_line may keep (simd.h)
      U4Sum sums[MR];
      for (int r = 0; r < R; ++r) sums[r] = u4_zero();
      for (int64_t k = k0; k < B && k < k0 + 8 * U4_LINES; k += 8) {
        prefetch_stream(wb + (k / 2) * TILE, ahead);
        const Line packed = load_line(wb + (k / 2) * TILE);
        const Line w0 = low_nibbles(packed), w1 = high_nibbles(packed);
        int r = 0;
#if defined(FALCON_I8MM)
        for (; r + 1 < R; r += 2) {
          const int8_t* xp = xq + (m0 + r) * K + b * B + k;
          pacc[r / 2] = mmla8(pacc[r / 2], w0, w1, two_rows(xp, xp + K));
        }
#endif
#if defined(FALCON_U4_HALVES)
        for (int q = r; q < R; ++q) sums[q] = u4_half(sums[q], w0, four_bytes(xq + (m0 + q) * K + b * B + k));
        for (int q = r; q < R; ++q) sums[q] = u4_half(sums[q], w1, four_bytes(xq + (m0 + q) * K + b * B + k + 4));
#else
        for (; r < R; ++r) {
          const int8_t* xp = xq + (m0 + r) * K + b * B + k;
          if constexpr (R > 2) {  // the rows are chains enough (simd.h)
            sums[r] = u4_line_one_chain(sums[r], w0, w1, four_bytes(xp), four_bytes(xp + 4));
          } else {
            sums[r] = u4_line(sums[r], w0, w1, four_bytes(xp), four_bytes(xp + 4));
          }
        }
#endif
      }
      for (int r = 0; r < R; ++r) iacc[r] = widen_u4(iacc[r], sums[r]);  // integer sums: exact in any order
    }
#if defined(FALCON_I8MM)
    for (int p = 0; p < R / 2; ++p) unpair(pacc[p], iacc[2 * p], iacc[2 * p + 1]);
#endif
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * nb + b;
      // sum_k w x = xs * (scale * (sum q xq - 8 sum xq) + zero * sum xq)
      const I32x16 centred = isub(iacc[r], iset1(8 * xsum[i]));
      const F32x16 part = fmadd(scale, to_float(centred), mul(zero_point, set1(static_cast<float>(xsum[i]))));
      facc[r] = fmadd(part, set1(xs[i]), facc[r]);
    }
  }
  store_rows<R>(facc, y, m0, N, n0, y_bf16);
}

template <int R>
inline void tile_w4(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m0, int64_t K, int64_t B,
                    int64_t G, const uint8_t* w, const uint16_t* sz, void* y, int64_t N, int64_t n0, int y_bf16) {
  if (B == ACTIVATION_BLOCK) {
    tile_w4_blocks<R, ACTIVATION_BLOCK>(xq, xs, xsum, m0, K, B, G, w, sz, y, N, n0, y_bf16);
  } else {
    tile_w4_blocks<R, 0>(xq, xs, xsum, m0, K, B, G, w, sz, y, N, n0, y_bf16);
  }
}

// One row block: x[k0, k0 + B) (float32 or bfloat16) -> int8, returns the scale; columns >= n are zero.
// B is a multiple of 16. With `magnitude`, |q| goes there too (what dot_q8 reads where Q8_MAGNITUDES).
inline float quantize_block(const void* x, int x_bf16, int64_t n, int64_t B, int8_t* q, int32_t* qsum,
                            int8_t* magnitude = nullptr) {
  if (n < B) {  // a partial block: its real values into a zero-padded float32 copy
    static thread_local std::vector<float> padded;
    padded.assign(B, 0.f);
    for (int64_t k = 0; k < n; ++k)
      padded[k] = x_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[k]) : static_cast<const float*>(x)[k];
    return quantize_block(padded.data(), 0, B, B, q, qsum, magnitude);
  }
  F32x16 amax = zero();
  for (int64_t k = 0; k < B; k += 16) amax = max(amax, abs(load_any(x, k, x_bf16)));
  const float m = reduce_max(amax);
  const F32x16 inv = set1(m > 0.f ? 127.f / m : 0.f);
  I32x16 sum = izero();
  for (int64_t k = 0; k < B; k += 16) {
    const I32x16 v = to_int_even(mul(load_any(x, k, x_bf16), inv));
    sum = iadd(sum, v);
    store_i8(q + k, v);
  }
  *qsum = ireduce_add(sum);
  if (magnitude != nullptr)  // q is at most 127 in magnitude: no overflow
    for (int64_t k = 0; k < B; ++k) magnitude[k] = static_cast<int8_t>(q[k] < 0 ? -q[k] : q[k]);
  return m / 127.f;
}

// Rows m..m + rows - 1 (at most MR) of y[:, 16t : 16t + 16] for tile t of a weight of K (padded) columns:
// bits 8, scales float32 [N]; bits 4, scales bfloat16 [N / 16][K / G][2][16]. y: [.., N], bfloat16 or float32.
inline void weight_tile(const int8_t* xq, const int8_t* xm, const float* xs, const int32_t* xsum, int64_t m,
                        int rows, int64_t K, int64_t B, int64_t G, int bits, const uint8_t* w, const void* scales,
                        int64_t t, void* y, int64_t N, int y_bf16) {
  // rows <= MR always; the cases above MR are clamped only so that they compile where MR is smaller.
  if (bits == 8) {
    const uint8_t* wt = w + t * K * TILE;
    const float* ws = static_cast<const float*>(scales);
    switch (rows) {
      case 8: tile_w8<MR < 8 ? MR : 8>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 7: tile_w8<MR < 7 ? MR : 7>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 6: tile_w8<MR < 6 ? MR : 6>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 5: tile_w8<MR < 5 ? MR : 5>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 4: tile_w8<MR < 4 ? MR : 4>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 3: tile_w8<MR < 3 ? MR : 3>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 2: tile_w8<2>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      default: tile_w8<1>(xq, xm, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
    }
    return;
  }
  const uint8_t* wt = w + t * (K / 2) * TILE;
  const uint16_t* st = static_cast<const uint16_t*>(scales) + t * (K / G) * 2 * TILE;
  switch (rows) {
    case 8: tile_w4<MR < 8 ? MR : 8>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 7: tile_w4<MR < 7 ? MR : 7>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 6: tile_w4<MR < 6 ? MR : 6>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 5: tile_w4<MR < 5 ? MR : 5>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 4: tile_w4<MR < 4 ? MR : 4>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 3: tile_w4<MR < 3 ? MR : 3>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 2: tile_w4<2>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    default: tile_w4<1>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
  }
}

}  // namespace falcon
