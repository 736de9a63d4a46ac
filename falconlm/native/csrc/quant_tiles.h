// Quantized-weight tiles for x86 CPUs with AVX-512 VNNI, shared by the quantized matmuls (quant_gemm.cpp) and
// the fused decode layers (decode.cpp).
//
// Activations are quantized to int8 on the fly, in blocks of B columns (a scale and a sum of the int8 values per
// row and block), so each inner step is one vpdpbusd: 64 multiply-adds of unsigned weight bytes by signed
// activation bytes. Weights are re-tiled at load so that one 64-byte line holds 16 output rows x 4 columns
// (int8, stored as q + 128) or 16 rows x 8 columns (int4: low nibbles columns 0-3, high nibbles 4-7), and each
// 16-row tile is contiguous: a thread streams through its tiles front to back and every lane of an accumulator
// is a different output row, so no horizontal sums are needed.
#pragma once

#include <immintrin.h>

#include "bf16.h"
#include <cmath>
#include <cstdint>
#include <cstring>

namespace falcon {

constexpr int TILE = 16;  // output rows per tile (zmm lanes)
constexpr int MR = 4;     // activation rows per register block
constexpr int PREFETCH = 4096;  // bytes ahead of the weight stream to request

template <int R>
inline void store_rows(const __m512 (&acc)[MR], void* y, int64_t m0, int64_t N, int64_t n0, int y_bf16) {
  for (int r = 0; r < R; ++r) {
    if (y_bf16) {
      store_bf16x16(static_cast<uint16_t*>(y) + (m0 + r) * N + n0, acc[r]);
    } else {
      _mm512_storeu_ps(static_cast<float*>(y) + (m0 + r) * N + n0, acc[r]);
    }
  }
}

// One tile of 16 int8 rows against R activation rows.
template <int R>
inline void tile_w8(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m0, int64_t K, int64_t B,
                    const uint8_t* w, const float* wscale, void* y, int64_t N, int64_t n0, int y_bf16) {
  const int64_t nb = K / B;
  __m512 facc[MR];
  for (int r = 0; r < R; ++r) facc[r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i iacc[MR];
    for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
    const uint8_t* wb = w + b * B * TILE;
    for (int64_t k = 0; k < B; k += 4) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + k * TILE + PREFETCH), _MM_HINT_T0);
      __m512i wv = _mm512_loadu_si512(wb + k * TILE);
      for (int r = 0; r < R; ++r) {
        int32_t xv;
        std::memcpy(&xv, xq + (m0 + r) * K + b * B + k, 4);
        iacc[r] = _mm512_dpbusd_epi32(iacc[r], wv, _mm512_set1_epi32(xv));
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * nb + b;
      __m512i fixed = _mm512_sub_epi32(iacc[r], _mm512_set1_epi32(128 * xsum[i]));
      facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(fixed), _mm512_set1_ps(xs[i]), facc[r]);
    }
  }
  const __m512 sw = _mm512_loadu_ps(wscale + n0);
  for (int r = 0; r < R; ++r) facc[r] = _mm512_mul_ps(facc[r], sw);
  store_rows<R>(facc, y, m0, N, n0, y_bf16);
}

// One tile of 16 int4 rows against R activation rows: activation blocks of B columns inside weight groups of G.
template <int R>
inline void tile_w4(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m0, int64_t K, int64_t B,
                    int64_t G, const uint8_t* w, const uint16_t* sz, void* y, int64_t N, int64_t n0, int y_bf16) {
  const int64_t nb = K / B;
  __m512 facc[MR];
  for (int r = 0; r < R; ++r) facc[r] = _mm512_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  for (int64_t b = 0; b < nb; ++b) {
    __m512i iacc[MR];
    for (int r = 0; r < R; ++r) iacc[r] = _mm512_setzero_si512();
    const uint8_t* wb = w + b * (B / 2) * TILE;
    for (int64_t k = 0; k < B; k += 8) {
      _mm_prefetch(reinterpret_cast<const char*>(wb + (k / 2) * TILE + PREFETCH), _MM_HINT_T0);
      __m512i packed = _mm512_loadu_si512(wb + (k / 2) * TILE);
      __m512i w0 = _mm512_and_si512(packed, low);
      __m512i w1 = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
      for (int r = 0; r < R; ++r) {
        int32_t x0, x1;
        const int8_t* xp = xq + (m0 + r) * K + b * B + k;
        std::memcpy(&x0, xp, 4);
        std::memcpy(&x1, xp + 4, 4);
        iacc[r] = _mm512_dpbusd_epi32(iacc[r], w0, _mm512_set1_epi32(x0));
        iacc[r] = _mm512_dpbusd_epi32(iacc[r], w1, _mm512_set1_epi32(x1));
      }
    }
    const uint16_t* group = sz + (b * B / G) * 2 * TILE;  // this block's weight group: scale, then zero
    const __m512 scale = load_bf16x16(group);
    const __m512 zero = load_bf16x16(group + TILE);
    for (int r = 0; r < R; ++r) {
      const int64_t i = (m0 + r) * nb + b;
      // sum_k w x = xs * (scale * (sum q xq - 8 sum xq) + zero * sum xq)
      __m512i centred = _mm512_sub_epi32(iacc[r], _mm512_set1_epi32(8 * xsum[i]));
      __m512 part = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(centred),
                                    _mm512_mul_ps(zero, _mm512_set1_ps(static_cast<float>(xsum[i]))));
      facc[r] = _mm512_fmadd_ps(part, _mm512_set1_ps(xs[i]), facc[r]);
    }
  }
  store_rows<R>(facc, y, m0, N, n0, y_bf16);
}

// One row block: x[k0, k0 + B) (float32 or bfloat16) -> int8, returns the scale; columns >= n are zero.
inline float quantize_block(const void* x, int x_bf16, int64_t n, int64_t B, int8_t* q, int32_t* qsum) {
  auto at = [&](int64_t k) -> float {
    return x_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(x)[k]) : static_cast<const float*>(x)[k];
  };
  auto load16 = [&](int64_t k) -> __m512 {
    return x_bf16 ? load_bf16x16(static_cast<const uint16_t*>(x) + k) : _mm512_loadu_ps(static_cast<const float*>(x) + k);
  };
  if (n == B) {  // the whole block is real: 16 lanes at a time
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < B; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(k)));
    const float m = _mm512_reduce_max_ps(amax);
    const __m512 inv = _mm512_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m512i sum = _mm512_setzero_si512();
    for (int64_t k = 0; k < B; k += 16) {
      __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(load16(k), inv));  // round to nearest even
      sum = _mm512_add_epi32(sum, v);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), _mm512_cvtsepi32_epi8(v));
    }
    *qsum = _mm512_reduce_add_epi32(sum);
    return m / 127.f;
  }
  float m = 0.f;
  for (int64_t k = 0; k < n; ++k) m = std::fmax(m, std::fabs(at(k)));
  const float inv = m > 0.f ? 127.f / m : 0.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < B; ++k) {
    const int32_t v = k < n ? static_cast<int32_t>(std::nearbyint(at(k) * inv)) : 0;
    q[k] = static_cast<int8_t>(v);
    sum += v;
  }
  *qsum = sum;
  return m / 127.f;
}

// Rows m..m + rows - 1 (at most MR) of y[:, 16t : 16t + 16] for tile t of a weight of K (padded) columns:
// bits 8, scales float32 [N]; bits 4, scales bfloat16 [N / 16][K / G][2][16]. y: [.., N], bfloat16 or float32.
inline void weight_tile(const int8_t* xq, const float* xs, const int32_t* xsum, int64_t m, int rows, int64_t K,
                        int64_t B, int64_t G, int bits, const uint8_t* w, const void* scales, int64_t t, void* y,
                        int64_t N, int y_bf16) {
  if (bits == 8) {
    const uint8_t* wt = w + t * K * TILE;
    const float* ws = static_cast<const float*>(scales);
    switch (rows) {
      case 4: tile_w8<4>(xq, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 3: tile_w8<3>(xq, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      case 2: tile_w8<2>(xq, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
      default: tile_w8<1>(xq, xs, xsum, m, K, B, wt, ws, y, N, t * TILE, y_bf16); break;
    }
    return;
  }
  const uint8_t* wt = w + t * (K / 2) * TILE;
  const uint16_t* st = static_cast<const uint16_t*>(scales) + t * (K / G) * 2 * TILE;
  switch (rows) {
    case 4: tile_w4<4>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 3: tile_w4<3>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    case 2: tile_w4<2>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
    default: tile_w4<1>(xq, xs, xsum, m, K, B, G, wt, st, y, N, t * TILE, y_bf16); break;
  }
}

}  // namespace falcon
