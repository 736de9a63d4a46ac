// Quantized matmuls y[M, N] = x[M, K] @ W[N, K].T, W int8 or int4, over the tiles of quant_tiles.h (which
// describes the layouts and the int8 activations).
//
// Built at first use by falconlm/native (g++, then ctypes), once per instruction set; see
// falconlm/quant/kernels/native.py for the layouts' Python side. The OpenMP runtime is the one torch has already
// loaded (same soname).

#include <omp.h>

#include "quant_tiles.h"
#include "shares.h"
#include <cstdint>
#include <vector>

namespace {

using namespace falcon;

// tile(t, m, rows) for every weight tile t and activation rows m .. m + rows - 1, the tiles in shares (shares.h);
// k: the weight's columns (for the shares' size).
template <typename Tile>
void run_tiles(int64_t M, int64_t N, int64_t k, int nthreads, Tile tile) {
  const int64_t tiles = N / TILE;
  constexpr int64_t M_BLOCK = 64;  // activation rows kept hot in L1/L2 while a thread walks its tiles
  Deals deals((M + M_BLOCK - 1) / M_BLOCK, nthreads);
#pragma omp parallel num_threads(nthreads)
  for (int64_t mb = 0; mb < M; mb += M_BLOCK) {
    const int64_t m_end = mb + M_BLOCK < M ? mb + M_BLOCK : M;
    const Shares shares = shares_of(tiles, (m_end - mb) * TILE * k, nthreads);
    deals.take(mb / M_BLOCK, omp_get_thread_num(), shares, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        int64_t m = mb;
        for (; m + MR <= m_end; m += MR) tile(t, m, MR);
        if (m < m_end) tile(t, m, static_cast<int>(m_end - m));
      }
    });
  }
}

struct TiledWeight {  // a weight in the layouts of falcon_qlinear below
  const uint8_t* w;
  const void* scales;
  int bits;
  int64_t K, G;
};

template <int T>
inline void store_row(uint16_t* y, const F32x16 (&v)[T]) {
  if constexpr (T == 2) {
    store_bf16_pair(y, v[0], v[1]);
  } else {
    store_bf16(y, v[0]);
  }
}

// Columns [k0, k1) (k0 a multiple of 8) of T tiles side by side, from tile t, dequantized as falcon_qrows does it
// into y[k][0, 16 T) (rows n apart): a line of a tile holds 16 rows x 4 columns (int8) or 8 (int4).
template <int T>
void dequantize_tiles(const TiledWeight& W, int64_t t, int64_t k0, int64_t k1, uint16_t* y, int64_t n) {
  F32x16 v[T];
  if (W.bits == 8) {
    const uint8_t* tile = W.w + t * W.K * TILE;
    F32x16 scale[T];
    for (int i = 0; i < T; ++i) scale[i] = load(static_cast<const float*>(W.scales) + (t + i) * TILE);
    for (int64_t c = k0 / 4; c * 4 < k1; ++c) {
      I32x16 line[T];
      for (int i = 0; i < T; ++i) line[i] = iload_line(tile + i * W.K * TILE + c * 64);
      for (int j = 0; j < 4 && c * 4 + j < k1; ++j) {
        for (int i = 0; i < T; ++i) v[i] = mul(to_float(isub(ibits(line[i], 8 * j, 0xff), iset1(128))), scale[i]);
        store_row<T>(y + (c * 4 + j) * n, v);
      }
    }
    return;
  }
  const uint8_t* tile = W.w + t * (W.K / 2) * TILE;
  const uint16_t* sz = static_cast<const uint16_t*>(W.scales) + t * (W.K / W.G) * 2 * TILE;
  for (int64_t c = k0 / 8; c * 8 < k1; ++c) {
    const int64_t g = c * 8 / W.G;
    F32x16 scale[T], zero[T];
    I32x16 line[T];
    for (int i = 0; i < T; ++i) {
      const uint16_t* group = sz + i * (W.K / W.G) * 2 * TILE + g * 2 * TILE;  // scale, then zero
      scale[i] = load_bf16(group);
      zero[i] = load_bf16(group + TILE);
      line[i] = iload_line(tile + i * (W.K / 2) * TILE + c * 64);
    }
    for (int j = 0; j < 8 && c * 8 + j < k1; ++j) {  // byte j % 4: low nibble column j, high nibble j + 4
      for (int i = 0; i < T; ++i)
        v[i] = add(mul(to_float(isub(ibits(line[i], 8 * (j % 4) + 4 * (j / 4), 0x0f), iset1(8))), scale[i]), zero[i]);
      store_row<T>(y + (c * 8 + j) * n, v);
    }
  }
}

struct Scratch {  // one per calling thread, grown as needed
  std::vector<int8_t> xq, xm;  // the int8 activations and, where dot_q8 reads them, their magnitudes
  std::vector<float> xs;
  std::vector<int32_t> xsum;
};

}  // namespace

extern "C" {

// How far ahead the quantized matmuls request their weight stream, in bytes: {into L2, into L1} (quant_tiles.h).
void falcon_stream_ahead(int32_t* out) {
  const StreamAhead ahead = stream_ahead();
  out[0] = ahead.l2;
  out[1] = ahead.l1;
}

// y[M, N] = x[M, :k_real] @ W.T. x: float32 or bfloat16, rows ldx elements apart; K: the weight's (padded)
// width, B: the activation block (a scale per B columns), G: int4's group size (a multiple of B).
// y: [M, N] contiguous, bfloat16 or float32.
// bits 8: w uint8 [N / 16][K / 4][16][4] (q + 128), scales float32 [N].
// bits 4: w uint8 [N / 16][K / 8][16][4] (low nibble column c, high nibble c + 4, see the top),
//         scales bfloat16 [N / 16][K / G][2][16] (scale, zero).
void falcon_qlinear(const void* x, int x_bf16, int64_t M, int64_t k_real, int64_t ldx, int64_t K, int64_t B,
                    int64_t G, int bits, const uint8_t* w, const void* scales, int64_t N, void* y, int y_bf16,
                    int nthreads) {
  static thread_local Scratch s;
  const int64_t nb = K / B;
  const bool with_magnitudes = Q8_MAGNITUDES && bits == 8;
  if (static_cast<int64_t>(s.xq.size()) < M * K) s.xq.resize(M * K);
  if (with_magnitudes && static_cast<int64_t>(s.xm.size()) < M * K) s.xm.resize(M * K);
  if (static_cast<int64_t>(s.xs.size()) < M * nb) {
    s.xs.resize(M * nb);
    s.xsum.resize(M * nb);
  }
  int8_t* xq = s.xq.data();
  int8_t* xm = with_magnitudes ? s.xm.data() : nullptr;
  float* xs = s.xs.data();
  int32_t* xsum = s.xsum.data();
  const int elem = x_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 8)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t k0 = b * B;
      const int64_t n = k_real - k0 < B ? (k_real - k0 > 0 ? k_real - k0 : 0) : B;
      const char* src = static_cast<const char*>(x) + (m * ldx + k0) * elem;
      xs[m * nb + b] = quantize_block(src, x_bf16, n, B, xq + m * K + k0, xsum + m * nb + b,
                                      with_magnitudes ? xm + m * K + k0 : nullptr);
    }
  }
  run_tiles(M, N, K, nthreads, [&](int64_t t, int64_t m, int rows) {
    weight_tile(xq, xm, xs, xsum, m, rows, K, B, G, bits, w, scales, t, y, N, y_bf16);
  });
}

// Rows ids[0 .. R) of a tiled weight (the layouts above; K its padded width), dequantized to y [R, k_real]
// (bfloat16 or float32): an embedding that reads its tied head's tiles. Each value as the torch dequantization
// computes it in float32 ((q - 128) * scale; (q - 8) * scale + zero), then rounded once to y's dtype.
void falcon_qrows(const uint8_t* w, const void* scales, int bits, int64_t K, int64_t k_real, int64_t G,
                  const int64_t* ids, int64_t R, void* y, int y_bf16) {
  for (int64_t r = 0; r < R; ++r) {
    const int64_t n = ids[r], tile = n / TILE, lane = n % TILE;
    auto put = [&](int64_t k, float v) {
      if (y_bf16) {
        static_cast<uint16_t*>(y)[r * k_real + k] = f32_to_bf16(v);
      } else {
        static_cast<float*>(y)[r * k_real + k] = v;
      }
    };
    if (bits == 8) {
      const uint8_t* row = w + tile * K * TILE + lane * 4;  // then a 64-byte line per 4 columns
      const float scale = static_cast<const float*>(scales)[n];
      for (int64_t k = 0; k < k_real; ++k) put(k, static_cast<float>(row[(k / 4) * 64 + k % 4] - 128) * scale);
      continue;
    }
    const uint8_t* row = w + tile * (K / 2) * TILE + lane * 4;
    const uint16_t* sz = static_cast<const uint16_t*>(scales) + tile * (K / G) * 2 * TILE + lane;
    for (int64_t k = 0; k < k_real; ++k) {
      const uint8_t byte = row[(k / 8) * 64 + k % 4];
      const int q = k % 8 < 4 ? byte & 0x0F : byte >> 4;
      const float scaled = static_cast<float>(q - 8) * bf16_to_f32(sz[(k / G) * 2 * TILE]);
      put(k, scaled + bf16_to_f32(sz[(k / G) * 2 * TILE + TILE]));
    }
  }
}

// Weight rows [n0, n0 + n) (n0 and n a multiple of 16) of a tiled weight (the layouts above), dequantized and
// transposed to y bfloat16 [k_real, n]: the operand of a bfloat16 GEMM for prompt-sized batches on CPUs whose
// GEMMs multiply bfloat16 fast (AMX), where that beats the int8 dot products. Each value is computed as
// falcon_qrows computes it, sixteen rows at a time: a weight line gives 16 values of y per byte. Each thread
// takes a run of tiles and walks them a block of columns at a time, so y is written a row segment at a time, two
// tiles side by side: 32 values, one conversion and one whole 64-byte line of y per store_bf16_pair. On 2 AMX
// cores that took 9.8-11.3 G values/s, against 7.3 for one tile at a time (half-line stores, software rounding).
void falcon_qdequant_t(const uint8_t* w, const void* scales, int bits, int64_t K, int64_t k_real, int64_t G,
                       int64_t n0, int64_t n, uint16_t* y, int nthreads) {
  constexpr int64_t COLUMNS = 64;  // columns of a block: y rows written across the thread's tiles in turn
  const int64_t t0 = n0 / TILE, tiles = n / TILE;
  const TiledWeight weight{w, scales, bits, K, G};
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t threads = omp_get_num_threads(), per = (tiles + threads - 1) / threads;
    const int64_t first = t0 + omp_get_thread_num() * per, last = first + per < t0 + tiles ? first + per : t0 + tiles;
    for (int64_t k0 = 0; k0 < k_real; k0 += COLUMNS) {
      const int64_t k1 = k0 + COLUMNS < k_real ? k0 + COLUMNS : k_real;
      int64_t t = first;
      for (; t + 1 < last; t += 2) dequantize_tiles<2>(weight, t, k0, k1, y + (t - t0) * TILE, n);
      if (t < last) dequantize_tiles<1>(weight, t, k0, k1, y + (t - t0) * TILE, n);
    }
  }
}

}  // extern "C"
