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

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

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
namespace {

constexpr int MAX_CHUNKS = 16;  // head_dim up to 256, in 16-lane chunks
constexpr int HEAD_BLOCK = 4;   // query heads whose weighted sums are built together
constexpr int KEY_BLOCK = 8;    // keys whose scores are built together

// e^x for x <= 0 (scores minus their maximum), float32 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2,
// p a degree-6 Taylor polynomial (relative error below 2e-7); very negative x gives 0.
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
  const __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147181f), x);
  __m512 p = _mm512_set1_ps(1.f / 720.f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load16(const void* base, int64_t i, int bf16) {
  if (bf16) return load_bf16x16(static_cast<const uint16_t*>(base) + i);
  return _mm512_loadu_ps(static_cast<const float*>(base) + i);
}

inline void store16(void* base, int64_t i, __m512 v, int bf16) {
  if (bf16) {
    store_bf16x16(static_cast<uint16_t*>(base) + i, v);
  } else {
    _mm512_storeu_ps(static_cast<float*>(base) + i, v);
  }
}

struct AttentionScratch {
  std::vector<float> qt;         // [d][heads per group, padded to 16]: the group's queries, transposed and scaled
  std::vector<uint32_t> qpairs;  // bfloat16 cache: [d / 2][heads, padded] pairs of query elements
  std::vector<float> scores;     // [L][heads, padded]: scores, then softmax numerators
  std::vector<float> key;        // [KEY_BLOCK][d]: keys in float32
  std::vector<int64_t> offsets;  // [L]: where each position's vector starts in the cache
};

}  // namespace

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
  const int64_t chunks = d / 16;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (R * G > 1)
  for (int64_t rg = 0; rg < R * G; ++rg) {
    static thread_local AttentionScratch s;
    const int64_t r = rg / G, g = rg % G, L = context_lens[r];
    const int64_t hp = (per_group + 15) / 16 * 16;  // heads padded to whole 16-lane vectors
    if (!bf16 && static_cast<int64_t>(s.qt.size()) < d * hp) s.qt.resize(d * hp);
    if (static_cast<int64_t>(s.scores.size()) < L * hp) s.scores.resize(L * hp);
    if (static_cast<int64_t>(s.key.size()) < KEY_BLOCK * d) s.key.resize(KEY_BLOCK * d);
    if (static_cast<int64_t>(s.offsets.size()) < L) s.offsets.resize(L);
    const int64_t head0 = r * Hq + g * per_group;  // this group's first query head in q and out
    auto at = [&](const void* base, int64_t i) -> float {
      return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
    };
    if (bf16) {  // [d / 2][hp] pairs of bfloat16 query elements, unscaled (the scale is applied in float32)
      if (static_cast<int64_t>(s.qpairs.size()) < d / 2 * hp) s.qpairs.resize(d / 2 * hp);
      const uint16_t* qb = static_cast<const uint16_t*>(q);
      for (int64_t i = 0; i < d; i += 2)
        for (int64_t j = 0; j < hp; ++j)
          s.qpairs[(i / 2) * hp + j] = j < per_group ? static_cast<uint32_t>(qb[(head0 + j) * d + i]) |
                                                           static_cast<uint32_t>(qb[(head0 + j) * d + i + 1]) << 16
                                                     : 0u;
    } else {
      for (int64_t i = 0; i < d; ++i)
        for (int64_t j = 0; j < hp; ++j) s.qt[i * hp + j] = j < per_group ? at(q, (head0 + j) * d + i) * scale : 0.f;
    }
    for (int64_t p = 0; p < L; ++p)
      s.offsets[p] = block_tables[r * tb + p / block_size] * sb + (p % block_size) * sp + g * sg;
    // Scores with the heads in the lanes: each key element is broadcast against 16 heads' query elements, so no
    // sum across lanes is needed; the running maximum is kept per lane (per head) as well.
    for (int64_t j0 = 0; j0 < hp; j0 += 16) {
      __m512 top = _mm512_set1_ps(-INFINITY);
      for (int64_t p0 = 0; p0 < L; p0 += KEY_BLOCK) {  // KEY_BLOCK keys at a time: independent sums
        const int64_t nk = L - p0 < KEY_BLOCK ? L - p0 : KEY_BLOCK;
        __m512 acc[KEY_BLOCK];
        for (int t = 0; t < KEY_BLOCK; ++t) acc[t] = _mm512_setzero_ps();
        if (bf16) {  // bfloat16 pairs: one vdpbf16ps adds two elements of 16 heads' dot products
          const uint16_t* keys[KEY_BLOCK];
          for (int t = 0; t < KEY_BLOCK; ++t) keys[t] = static_cast<const uint16_t*>(k) + s.offsets[p0 + (t < nk ? t : 0)];
          for (int64_t i = 0; i < d; i += 2) {
            const __m512i qv = _mm512_loadu_si512(&s.qpairs[(i / 2) * hp + j0]);
            for (int t = 0; t < KEY_BLOCK; ++t) {
              int32_t pair;
              std::memcpy(&pair, keys[t] + i, 4);
              acc[t] = _mm512_dpbf16_ps(acc[t], as_bh(qv), as_bh(_mm512_set1_epi32(pair)));
            }
          }
          for (int t = 0; t < KEY_BLOCK; ++t) acc[t] = _mm512_mul_ps(acc[t], _mm512_set1_ps(scale));
        } else {
          for (int64_t t = 0; t < nk; ++t)
            for (int64_t c = 0; c < chunks; ++c)
              _mm512_storeu_ps(&s.key[t * d + c * 16], load16(k, s.offsets[p0 + t] + c * 16, bf16));
          for (int64_t i = 0; i < d; ++i) {
            const __m512 qv = _mm512_loadu_ps(&s.qt[i * hp + j0]);
            for (int t = 0; t < KEY_BLOCK; ++t) acc[t] = _mm512_fmadd_ps(qv, _mm512_set1_ps(s.key[t * d + i]), acc[t]);
          }
        }
        for (int64_t t = 0; t < nk; ++t) {
          _mm512_storeu_ps(&s.scores[(p0 + t) * hp + j0], acc[t]);
          top = _mm512_max_ps(top, acc[t]);
        }
      }
      // Softmax numerators in place, and their sums per head.
      __m512 total = _mm512_setzero_ps();
      for (int64_t p = 0; p < L; ++p) {
        const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(&s.scores[p * hp + j0]), top));
        _mm512_storeu_ps(&s.scores[p * hp + j0], e);
        total = _mm512_add_ps(total, e);
      }
      alignas(64) float sums[16];
      _mm512_store_ps(sums, total);
      // Weighted values, HEAD_BLOCK heads at a time, d in 16-lane chunks.
      const int64_t j_end = j0 + 16 < per_group ? j0 + 16 : per_group;
      for (int64_t jb = j0; jb < j_end; jb += HEAD_BLOCK) {
        const int64_t nh = j_end - jb < HEAD_BLOCK ? j_end - jb : HEAD_BLOCK;
        __m512 acc[HEAD_BLOCK][MAX_CHUNKS];
        for (int64_t j = 0; j < nh; ++j)
          for (int64_t c = 0; c < chunks; ++c) acc[j][c] = _mm512_setzero_ps();
        for (int64_t p = 0; p < L; ++p) {
          __m512 val[MAX_CHUNKS];
          for (int64_t c = 0; c < chunks; ++c) val[c] = load16(v, s.offsets[p] + c * 16, bf16);
          for (int64_t j = 0; j < nh; ++j) {
            const __m512 w = _mm512_set1_ps(s.scores[p * hp + jb + j]);
            for (int64_t c = 0; c < chunks; ++c) acc[j][c] = _mm512_fmadd_ps(w, val[c], acc[j][c]);
          }
        }
        for (int64_t j = 0; j < nh; ++j) {
          const __m512 inv = _mm512_set1_ps(1.f / sums[jb + j - j0]);
          for (int64_t c = 0; c < chunks; ++c) store16(out, (head0 + jb + j) * d + c * 16, _mm512_mul_ps(acc[j][c], inv), bf16);
        }
      }
    }
  }
}

}  // extern "C"
