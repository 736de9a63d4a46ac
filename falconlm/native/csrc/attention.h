// Decode-step attention, shared by the bf16 kernels and the fused decode layers: one query position of one
// row and KV group against that row's cached keys and values, read in place from a (paged) cache.
//
// Written against simd.h; a bfloat16 cache's scores use vdpbf16ps where the CPU has it, else widened keys.
#pragma once

#include "simd.h"
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace falcon {

// Register blocks, sized so that the sums stay in registers (a compile-time count of each, so the loops unroll):
// KEY_BLOCK keys' scores for 16 heads; HEAD_BLOCK heads' weighted sums over CHUNK_GROUP 16-lane chunks of d.
// (A 16-lane vector is 2 ymm registers of AVX2's 16, 4 q registers of NEON's 32, 1 zmm register of AVX-512's 32.)
// Against a runtime-sized block kept in memory: 16 rows x 16 heads of 264 bfloat16 positions, 2 threads,
// AVX2 186 -> 122 us, AVX-512 without / with BF16 177 -> 91 / 133 -> 67 us.
#if defined(FALCON_AVX512)
constexpr int KEY_BLOCK = 8;
constexpr int HEAD_BLOCK = 8;   // 8 x 2 zmm sums beside 2 for the values
constexpr int CHUNK_GROUP = 2;
#else
// 6 keys: 6 vectors of sums beside the queries' vector (AVX2: 12 + 2 of 16 ymm, NEON: 24 + 4 of 32 q registers),
// each query load serving 6 keys; 4 keys took 5-6% longer over the whole attention (AVX2 stand-in, 2 threads,
// 16 rows x 16 heads at 264 and 1000 positions, and 71 heads at 264).
constexpr int KEY_BLOCK = 6;
constexpr int HEAD_BLOCK = 6;   // 6 vectors of sums beside the values' vector
constexpr int CHUNK_GROUP = 1;
#endif

struct AttentionScratch {  // one per thread, grown as needed
  std::vector<float> qt;         // [d][heads per group, padded to 16]: the group's queries, transposed and scaled
  std::vector<uint32_t> qpairs;  // bfloat16 cache: [d / 2][heads, padded] pairs of query elements
  std::vector<float> scores;     // [L][heads, padded]: scores, then softmax numerators
  std::vector<float> key;        // [KEY_BLOCK][d]: keys in float32
  std::vector<int64_t> offsets;  // [L]: where each position's vector starts in the cache
};


// Where a cache's K/V live: element (block b, position p, group g, dim i) is at b * sb + p * sp + g * sg + i
// of k and v (bfloat16 or float32), positions in blocks of block_size.
struct CacheView {
  const void* k;
  const void* v;
  int64_t sb, sp, sg, block_size;
};

// A part of a group's attention, over some of the positions: per head the largest score, the sum of
// exp(score - largest) and the values weighted by those, not yet divided by the sum. Parts over disjoint position
// ranges combine into the whole (combine_parts), so that several threads can share one long row.
struct Partial {
  float* max;  // [per_group]
  float* sum;  // [per_group]
  float* acc;  // [per_group][d]
};

inline F32x16 load_value(const uint16_t* p) { return load_bf16(p); }
inline F32x16 load_value(const float* p) { return load(p); }

// The weighted sums of values for heads j0 .. j_end-1 (of one 16-head vector of scores): for each head and
// element of d, the L positions' values times their softmax numerators (scores[p * hp + head]), added in
// position order, then divided by the head's sum (sums[head - j0]) into out, or kept undivided in part.
// HEAD_BLOCK heads by CHUNK_GROUP 16-lane chunks at a time, fixed counts so that the sums stay in registers; the
// blocks read HEAD_BLOCK scores at every position (scores holds that many past its end).
template <typename T>
inline void weighted_values(const T* v, const int64_t* offsets, int64_t L, const float* scores, int64_t hp,
                            int64_t j0, int64_t j_end, const float* sums, int64_t chunks, int64_t d, void* out,
                            int bf16, const Partial* part) {
  for (int64_t jb = j0; jb < j_end; jb += HEAD_BLOCK) {
    const int64_t nh = j_end - jb < HEAD_BLOCK ? j_end - jb : HEAD_BLOCK;
    for (int64_t u0 = 0; u0 < chunks; u0 += CHUNK_GROUP) {
      const int64_t nu = chunks - u0 < CHUNK_GROUP ? chunks - u0 : CHUNK_GROUP;
      F32x16 acc[HEAD_BLOCK][CHUNK_GROUP];
#pragma GCC unroll 16
      for (int j = 0; j < HEAD_BLOCK; ++j)
#pragma GCC unroll 4
        for (int u = 0; u < CHUNK_GROUP; ++u) acc[j][u] = zero();
      for (int64_t p = 0; p < L; ++p) {
        const T* row = v + offsets[p] + u0 * 16;
        F32x16 val[CHUNK_GROUP];
#pragma GCC unroll 4
        for (int u = 0; u < CHUNK_GROUP; ++u) val[u] = load_value(row + (u < nu ? u : 0) * 16);
        const float* w = scores + p * hp + jb;
#pragma GCC unroll 16
        for (int j = 0; j < HEAD_BLOCK; ++j) {
          const F32x16 wj = set1(w[j]);
#pragma GCC unroll 4
          for (int u = 0; u < CHUNK_GROUP; ++u) acc[j][u] = fmadd(wj, val[u], acc[j][u]);
        }
      }
      // (Constant indices into acc, as everywhere: a variable one would keep the sums in memory.)
#pragma GCC unroll 16
      for (int j = 0; j < HEAD_BLOCK; ++j)
#pragma GCC unroll 4
        for (int u = 0; u < CHUNK_GROUP; ++u) {
          if (j >= nh || u >= nu) continue;
          const int64_t at = (jb + j) * d + (u0 + u) * 16;
          if (part != nullptr) {
            store(part->acc + at, acc[j][u]);
          } else {
            store_any(out, at, mul(acc[j][u], set1(1.f / sums[jb + j - j0])), bf16);
          }
        }
    }
  }
}

// In the pass of a group's first 16-head vector (whichever thread takes it), keys are requested KEY_BLOCK *
// KEYS_AHEAD positions before their scores, and values as their keys' scores are taken: a row's blocks lie anywhere
// in the cache, where the hardware prefetchers lose the stream at every block's end, and a decode step's K/V have
// rarely stayed in cache while its weights streamed through. 16 rows of 264 bfloat16 positions, 12 layers' caches
// in turn, 2 threads, caches flushed between calls: 16 heads AVX2 139-190 -> 114-123 us, AVX-512 with BF16
// 101-159 -> 64-71 us; 71 heads AVX2 576 -> 537 us, AVX-512 322 -> 284 us. One cache called again and again (hot):
// within 1%. (Written out in the loop: as a function, even always inlined, GCC's loop took as long as with none.)
constexpr int64_t KEYS_AHEAD = 2;

// softmax(q k^T * scale + bias) v for the per_group query heads of group g at q ([per_group][d], the cache's
// dtype) over positions begin..end-1 (end > begin), whose blocks are table[0], table[1], ...; written to out
// ([per_group][d], the cache's dtype), or as a Partial when `part` is given. `bias`, when given, is an additive
// score bias by position and query head (ALiBi): position p's heads side by side at bias + p * bias_ld, with 16
// floats readable past the last head. d must be a multiple of 16, at most 256. Scores, softmax and sums in float32.
// Only the query heads of `vectors` (16-head vectors v.first .. v.last - 1, by default all) are computed, so that
// threads can share a group of many heads (Falcon-7B's 71 share one key); each head's sums are the same either way.
struct HeadVectors {
  int64_t first = 0, last = INT64_MAX;
};
// The 16-head vectors that per_group query heads fill (the last one padded).
inline int64_t head_vectors(int64_t per_group) { return (per_group + 15) / 16; }
inline void attend_group(const void* q, void* out, int bf16, int64_t per_group, int64_t d, const CacheView& c,
                         const int64_t* table, int64_t begin, int64_t end, int64_t g, float scale,
                         const Partial* part = nullptr, const float* bias = nullptr, int64_t bias_ld = 0,
                         HeadVectors vectors = {}) {
  const int64_t L = end - begin;
  static thread_local AttentionScratch s;
  const int64_t chunks = d / 16;
  const int64_t hp = head_vectors(per_group) * 16;  // heads padded to whole 16-lane vectors
  const int64_t j_first = std::min(vectors.first * 16, hp), j_last = std::min(vectors.last, hp / 16) * 16;
  // Scores, and HEAD_BLOCK zeros after them: the weighted sums read a whole head block's scores at every position.
  if (static_cast<int64_t>(s.scores.size()) < L * hp + HEAD_BLOCK) s.scores.resize(L * hp + HEAD_BLOCK);
  std::fill(s.scores.begin() + L * hp, s.scores.begin() + L * hp + HEAD_BLOCK, 0.f);
  if (static_cast<int64_t>(s.key.size()) < KEY_BLOCK * d) s.key.resize(KEY_BLOCK * d);
  if (static_cast<int64_t>(s.offsets.size()) < L) s.offsets.resize(L);
  auto at = [&](const void* base, int64_t i) -> float {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
  };
#if defined(FALCON_BF16_DOT)
  const bool pairs = bf16 != 0;  // bfloat16 scores as pair dot products (vdpbf16ps)
#else
  const bool pairs = false;  // keys widened to float32
#endif
  if (pairs) {  // [d / 2][hp] pairs of bfloat16 query elements, unscaled (the scale is applied in float32)
    if (static_cast<int64_t>(s.qpairs.size()) < d / 2 * hp) s.qpairs.resize(d / 2 * hp);
    const uint16_t* qb = static_cast<const uint16_t*>(q);
    for (int64_t i = 0; i < d; i += 2)
      for (int64_t j = j_first; j < j_last; ++j)
        s.qpairs[(i / 2) * hp + j] = j < per_group ? static_cast<uint32_t>(qb[j * d + i]) |
                                                         static_cast<uint32_t>(qb[j * d + i + 1]) << 16
                                                   : 0u;
  } else {
    if (static_cast<int64_t>(s.qt.size()) < d * hp) s.qt.resize(d * hp);
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = j_first; j < j_last; ++j) s.qt[i * hp + j] = j < per_group ? at(q, j * d + i) * scale : 0.f;
  }
  for (int64_t i = 0; i < L;) {  // block by block: one division per block, not per position
    const int64_t p = begin + i, within = p % c.block_size;
    const int64_t n = std::min(c.block_size - within, L - i), at = table[p / c.block_size] * c.sb + g * c.sg;
    for (int64_t j = 0; j < n; ++j) s.offsets[i + j] = at + (within + j) * c.sp;
    i += n;
  }
  // Scores with the heads in the lanes: each key element is broadcast against 16 heads' query elements, so no
  // sum across lanes is needed; the running maximum is kept per lane (per head) as well.
  for (int64_t j0 = j_first; j0 < j_last; j0 += 16) {
    F32x16 top = set1(-INFINITY);
    for (int64_t p0 = 0; p0 < L; p0 += KEY_BLOCK) {  // KEY_BLOCK keys at a time: independent sums
      const int64_t nk = L - p0 < KEY_BLOCK ? L - p0 : KEY_BLOCK;
      if (j0 == 0) {  // requests for the keys KEYS_AHEAD blocks on, and for this block's values
        const int64_t elem = bf16 ? 2 : 4, ahead = p0 + KEYS_AHEAD * KEY_BLOCK;
        const char* keys = static_cast<const char*>(c.k);
        const char* values = static_cast<const char*>(c.v);
        for (int64_t t = 0; t < KEY_BLOCK && ahead + t < L; ++t)
          for (int64_t i = 0; i < d * elem; i += 64) prefetch(keys + s.offsets[ahead + t] * elem + i);
        for (int64_t t = 0; t < nk; ++t)
          for (int64_t i = 0; i < d * elem; i += 64) prefetch(values + s.offsets[p0 + t] * elem + i);
      }
      F32x16 acc[KEY_BLOCK];
      for (int t = 0; t < KEY_BLOCK; ++t) acc[t] = zero();
#if defined(FALCON_BF16_DOT)
      if (pairs) {  // one vdpbf16ps adds two elements of 16 heads' dot products
        const uint16_t* keys[KEY_BLOCK];
        for (int t = 0; t < KEY_BLOCK; ++t) keys[t] = static_cast<const uint16_t*>(c.k) + s.offsets[p0 + (t < nk ? t : 0)];
        for (int64_t i = 0; i < d; i += 2) {
          const BF16x32 qv{_mm512_loadu_si512(&s.qpairs[(i / 2) * hp + j0])};
          for (int t = 0; t < KEY_BLOCK; ++t) {
            int32_t pair;
            std::memcpy(&pair, keys[t] + i, 4);
            acc[t] = dot_bf16(acc[t], qv, BF16x32{_mm512_set1_epi32(pair)});
          }
        }
        for (int t = 0; t < KEY_BLOCK; ++t) acc[t] = mul(acc[t], set1(scale));
      }
#endif
      if (!pairs) {
        for (int64_t t = 0; t < nk; ++t)
          for (int64_t u = 0; u < chunks; ++u) store(&s.key[t * d + u * 16], load_any(c.k, s.offsets[p0 + t] + u * 16, bf16));
        for (int64_t i = 0; i < d; ++i) {
          const F32x16 qv = load(&s.qt[i * hp + j0]);
          for (int t = 0; t < KEY_BLOCK; ++t) acc[t] = fmadd(qv, set1(s.key[t * d + i]), acc[t]);
        }
      }
#pragma GCC unroll 16
      for (int t = 0; t < KEY_BLOCK; ++t) {
        if (t >= nk) continue;
        if (bias != nullptr)  // 16 heads' biases at this position, side by side
          acc[t] = add(acc[t], load(bias + (begin + p0 + t) * bias_ld + g * per_group + j0));
        store(&s.scores[(p0 + t) * hp + j0], acc[t]);
        top = max(top, acc[t]);
      }
    }
    // Softmax numerators in place, and their sums per head.
    F32x16 total = zero();
    for (int64_t p = 0; p < L; ++p) {
      const F32x16 e = exp_nonpositive(sub(load(&s.scores[p * hp + j0]), top));
      store(&s.scores[p * hp + j0], e);
      total = add(total, e);
    }
    alignas(64) float sums[16];
    store(sums, total);
    if (part != nullptr) {
      alignas(64) float tops[16];
      store(tops, top);
      for (int64_t j = j0; j < j0 + 16 && j < per_group; ++j) {
        part->max[j] = tops[j - j0];
        part->sum[j] = sums[j - j0];
      }
    }
    // Weighted values, HEAD_BLOCK heads by CHUNK_GROUP 16-lane chunks of d at a time.
    const int64_t j_end = j0 + 16 < per_group ? j0 + 16 : per_group;
    if (bf16) {
      weighted_values(static_cast<const uint16_t*>(c.v), s.offsets.data(), L, s.scores.data(), hp, j0, j_end, sums,
                      chunks, d, out, bf16, part);
    } else {
      weighted_values(static_cast<const float*>(c.v), s.offsets.data(), L, s.scores.data(), hp, j0, j_end, sums,
                      chunks, d, out, bf16, part);
    }
  }
}

// The attention output out[per_group][d] (float32) from n Partials of one group over disjoint position ranges.
inline void combine_parts(const Partial* parts, int64_t n, int64_t per_group, int64_t d, float* out) {
  for (int64_t j = 0; j < per_group; ++j) {
    float top = -INFINITY;
    for (int64_t i = 0; i < n; ++i) top = std::fmax(top, parts[i].max[j]);
    float total = 0.f;
    for (int64_t k = 0; k < d; ++k) out[j * d + k] = 0.f;
    for (int64_t i = 0; i < n; ++i) {
      const float w = std::exp(parts[i].max[j] - top);
      total += w * parts[i].sum[j];
      for (int64_t k = 0; k < d; ++k) out[j * d + k] += w * parts[i].acc[j * d + k];
    }
    for (int64_t k = 0; k < d; ++k) out[j * d + k] /= total;
  }
}

}  // namespace falcon
