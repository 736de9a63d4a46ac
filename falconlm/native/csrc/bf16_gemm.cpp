// bfloat16 matmuls for few rows on x86 CPUs with AVX-512 BF16: y[M, N] = x[M, K] @ w[N, K].T.
//
// Meant for decode steps (M up to a few dozen rows), where a general GEMM spends its time packing the weight:
// this one reads w in its own row-major layout, once per block of activation rows. Each inner step is one
// vdpbf16ps: 32 bfloat16 products summed pairwise into 16 float32 lanes; a block of 2 weight rows x 8
// activation rows of accumulators is summed across lanes at the end. Threads split the weight rows into
// contiguous ranges, so each streams its part of w from memory once per call.
//
// Also a row-wise argmax for float32 / bfloat16 logits (the greedy pick), which torch does element by element.

#include <immintrin.h>
#include <omp.h>

#include "attention.h"
#include "bf16.h"
#include "bf16_tiles.h"
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

using namespace falcon;
using namespace falcon::bf16;

extern "C" {

// x: bfloat16 [M, K], rows ldx apart; w: bfloat16 [N, K] contiguous; y: bfloat16 [M, N] contiguous.
// K must be a multiple of 32.
void falcon_linear_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                        uint16_t* y, int nthreads) {
  const int64_t blocks = (N + NR - 1) / NR;
#pragma omp parallel for num_threads(nthreads) schedule(static)
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t n0 = b * NR;
    if (N - n0 >= NR) {
      rows_block<NR>(x, ldx, M, w, K, n0, y, N);
    } else {
      rows_block<1>(x, ldx, M, w, K, n0, y, N);
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
    auto load = [&](int64_t k) -> __m512 { return x_bf16 ? load_bf16x16(xb + k) : _mm512_loadu_ps(xf + k); };
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

// ---- decode attention ---------------------------------------------------------------------------------------
extern "C" {

// One query position per row against that row's cached keys and values (a decode step): softmax(q.k * scale) v.
// q, out: [R, Hq, d] contiguous, bfloat16 or float32 like the cache. K/V element (block b, position p, group g,
// dim i) is at b * sb + p * sp + g * sg + i; a row's positions 0..len-1 live in the blocks
// block_tables[r * tb + 0, 1, ...] of block_size positions each. Query heads g * Hq / G ... share group g.
// d must be a multiple of 16, at most 256.
void falcon_decode_attention(const void* q, int bf16, int64_t R, int64_t Hq, int64_t G, int64_t d, const void* k,
                             const void* v, int64_t sb, int64_t sp, int64_t sg, int64_t block_size,
                             const int64_t* block_tables, int64_t tb, const int64_t* context_lens, float scale,
                             void* out, int nthreads) {
  const int64_t per_group = Hq / G;
  const CacheView cache{k, v, sb, sp, sg, block_size};
  const int64_t elem = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (R * G > 1)
  for (int64_t rg = 0; rg < R * G; ++rg) {
    const int64_t r = rg / G, g = rg % G;
    const int64_t at = ((r * Hq) + g * per_group) * d * elem;  // this group's first query head in q and out
    attend_group(static_cast<const char*>(q) + at, static_cast<char*>(out) + at, bf16, per_group, d, cache,
                 block_tables + r * tb, 0, context_lens[r], g, scale);
  }
}

}  // extern "C"
