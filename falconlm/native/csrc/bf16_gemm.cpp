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
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace falcon;

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

template <int R, int C>
inline void block(const uint16_t* x, int64_t ldx, int64_t m0, const uint16_t* w, int64_t K, int64_t n0,
                  uint16_t* y, int64_t N) {
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
      for (int c = 0; c < C; ++c) y[(m0 + r) * N + n0 + c] = f32_to_bf16(sums[r * C + c]);
  } else {
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) y[(m0 + r) * N + n0 + c] = f32_to_bf16(_mm512_reduce_add_ps(acc[r][c]));
  }
}

template <int C>
inline void rows_block(const uint16_t* x, int64_t ldx, int64_t M, const uint16_t* w, int64_t K, int64_t n0,
                       uint16_t* y, int64_t N) {
  int64_t m = 0;
  for (; m + MR <= M; m += MR) block<MR, C>(x, ldx, m, w, K, n0, y, N);
  switch (M - m) {
    case 7: block<7, C>(x, ldx, m, w, K, n0, y, N); break;
    case 6: block<6, C>(x, ldx, m, w, K, n0, y, N); break;
    case 5: block<5, C>(x, ldx, m, w, K, n0, y, N); break;
    case 4: block<4, C>(x, ldx, m, w, K, n0, y, N); break;
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
