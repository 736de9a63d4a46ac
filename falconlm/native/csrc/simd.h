// The vector layer under every native kernel: 16 float32 (or int32) lanes as one logical vector, mapped onto
// whatever the build targets, in the spirit of ggml's SIMD mappings:
//
//   AVX-512 (F, BW, VL)   one zmm register          int8 dots: vpdpbusd with VNNI, else vpmaddubsw + vpmaddwd
//   AVX2 + FMA            two ymm registers         int8 dots: vpdpbusd with AVX-VNNI, else vpmaddubsw + vpmaddwd
//   ARM NEON (AArch64)    four q registers          int8 dots: sdot with dotprod, else widening multiplies;
//                                                   two activation rows at once: smmla with i8mm
//   scalar                sixteen floats            the reference every other variant is tested against
//
// The kernels are written once against these types. Sixteen lanes match the weight layout (16 output rows per
// tile, quant_tiles.h) on every target. Reductions across lanes add in one fixed tree whatever the target
// (lane i + lane i+8, then + i+4, + i+2, + i+1), so a row's result never depends on how many rows share a call.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define FALCON_AVX512 1
#include <cpuid.h>
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define FALCON_AVX2 1
#include <cpuid.h>
#include <immintrin.h>
#elif defined(__aarch64__) && defined(__ARM_NEON)
#define FALCON_NEON 1
#include <arm_neon.h>
#else
#define FALCON_SCALAR 1
#endif

// bfloat16 pair dot products in hardware (vdpbf16ps); elsewhere bfloat16 is widened to float32 by a shift.
#if defined(FALCON_AVX512) && defined(__AVX512BF16__)
#define FALCON_BF16_DOT 1
#endif
// int8 dot products with an unsigned weight operand (vpdpbusd): int8 weights are then stored as q + 128.
#if (defined(FALCON_AVX512) && defined(__AVX512VNNI__)) || (defined(FALCON_AVX2) && defined(__AVXVNNI__))
#define FALCON_U8_DOT 1
#endif

namespace falcon {

// The build's instruction set, as the Python side reports it.
inline const char* isa_name() {
#if defined(FALCON_AVX512)
#if defined(FALCON_U8_DOT) && defined(FALCON_BF16_DOT)
  return "avx512+vnni+bf16";
#elif defined(FALCON_U8_DOT)
  return "avx512+vnni";
#else
  return "avx512";
#endif
#elif defined(FALCON_AVX2)
#if defined(FALCON_U8_DOT)
  return "avx2+avxvnni";
#else
  return "avx2";
#endif
#elif defined(FALCON_NEON)
#if defined(__ARM_FEATURE_DOTPROD) && defined(__ARM_FEATURE_MATMUL_INT8)
  return "neon+dotprod+i8mm";
#elif defined(__ARM_FEATURE_DOTPROD)
  return "neon+dotprod";
#else
  return "neon";
#endif
#else
  return "scalar";
#endif
}

inline float bf16_to_f32(uint16_t v) {
  uint32_t u = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

#if defined(FALCON_AVX512) || defined(FALCON_AVX2)
// Whether the CPU is AMD's or Hygon's (cpuid leaf 0's vendor): every such CPU with AVX-512 is a Zen 4 or later.
inline bool zen_cpu() {
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  return std::strcmp(vendor, "AuthenticAMD") == 0 || std::strcmp(vendor, "HygonGenuine") == 0;
}
#endif

inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }  // into L2 (and L3), not L1

// int8 weights are stored as q + 128 (unsigned) for every target, so one layout serves all; Q8_OFFSET is what
// dot_q8 leaves in its sums (128 * the activations' sum with an unsigned dot product, none elsewhere).
#if defined(FALCON_U8_DOT)
constexpr int32_t Q8_OFFSET = 128;
#else
constexpr int32_t Q8_OFFSET = 0;
#endif
// dot_q8(acc, w, x4, m4) takes four activation bytes x4 and, where Q8_MAGNITUDES, their magnitudes m4 (|x|, kept
// beside the activations when they are quantized): x86 without vpdpbusd multiplies |x| by q carrying x's sign
// (vpmaddubsw's unsigned operand must be |x|), and reading |x| rather than computing it for every row of every
// line took int8 matmuls of 16-128 rows from 96 to 118 GMAC/s on AVX-512 without VNNI, and about 5% further on
// AVX2 (2 threads). Elsewhere m4 is ignored (pass 0).
#if (defined(FALCON_AVX512) || defined(FALCON_AVX2)) && !defined(FALCON_U8_DOT)
constexpr bool Q8_MAGNITUDES = true;
#else
constexpr bool Q8_MAGNITUDES = false;
#endif

#if defined(FALCON_AVX512)
// ---------------------------------------------------------------------------------------------------- AVX-512
struct F32x16 { __m512 v; };
struct I32x16 { __m512i v; };

inline F32x16 zero() { return {_mm512_setzero_ps()}; }
inline F32x16 set1(float x) { return {_mm512_set1_ps(x)}; }
inline F32x16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void store(float* p, F32x16 a) { _mm512_storeu_ps(p, a.v); }
inline F32x16 load_bf16(const uint16_t* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline void store_bf16(uint16_t* p, F32x16 a) {  // round to nearest even; NaN stays NaN
  const __m512i u = _mm512_castps_si512(a.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
  const __mmask16 nan = _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}
inline F32x16 add(F32x16 a, F32x16 b) { return {_mm512_add_ps(a.v, b.v)}; }
inline F32x16 sub(F32x16 a, F32x16 b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline F32x16 mul(F32x16 a, F32x16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline F32x16 div(F32x16 a, F32x16 b) { return {_mm512_div_ps(a.v, b.v)}; }
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline F32x16 max(F32x16 a, F32x16 b) { return {_mm512_max_ps(a.v, b.v)}; }
inline F32x16 min(F32x16 a, F32x16 b) { return {_mm512_min_ps(a.v, b.v)}; }
inline F32x16 abs(F32x16 a) { return {_mm512_abs_ps(a.v)}; }
inline F32x16 round_even(F32x16 a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT)}; }
inline F32x16 pow2i(F32x16 n) {  // 2^n for whole n in [-126, 127]
  const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127));
  return {_mm512_castsi512_ps(_mm512_slli_epi32(e, 23))};
}
inline uint32_t mask_nan(F32x16 a) { return _mm512_cmp_ps_mask(a.v, a.v, _CMP_UNORD_Q); }
inline uint32_t mask_eq(F32x16 a, F32x16 b) { return _mm512_cmp_ps_mask(a.v, b.v, _CMP_EQ_OQ); }
inline float reduce_add(F32x16 a) {  // the fixed tree: + lane i+8, + i+4, + i+2, + i+1
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1)));
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}
inline float reduce_max(F32x16 a) { return _mm512_reduce_max_ps(a.v); }

// Lane i of the result is reduce_add(v[i]) (the same tree, so the same bits): four levels of shuffles and adds,
// each halving the number of vectors, about 30 instructions against 16 separate reductions of about 8 each.
inline F32x16 reduce_add16(const F32x16* v) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // 128-bit quarters 0+2 and 1+3: v[2i] in quarters 0-1, v[2i+1] in 2-3
    a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i].v, v[2 * i + 1].v, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(v[2 * i].v, v[2 * i + 1].v, _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 4; ++i)  // quarter t now holds four partial sums of v[4i + t]
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int i = 0; i < 2; ++i)  // quarter t: two partials of v[8i + t], then two of v[8i + 4 + t], interleaved
    c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[2 * i], b[2 * i + 1]), _mm512_unpackhi_ps(b[2 * i], b[2 * i + 1]));
  const __m512 d = _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return {_mm512_permutexvar_ps(order, d)};
}

inline I32x16 izero() { return {_mm512_setzero_si512()}; }
inline I32x16 iset1(int32_t x) { return {_mm512_set1_epi32(x)}; }
inline I32x16 iadd(I32x16 a, I32x16 b) { return {_mm512_add_epi32(a.v, b.v)}; }
inline I32x16 isub(I32x16 a, I32x16 b) { return {_mm512_sub_epi32(a.v, b.v)}; }
inline F32x16 to_float(I32x16 a) { return {_mm512_cvtepi32_ps(a.v)}; }
inline I32x16 to_int_even(F32x16 a) { return {_mm512_cvtps_epi32(a.v)}; }  // round to nearest even
inline int32_t ireduce_add(I32x16 a) { return _mm512_reduce_add_epi32(a.v); }
inline void store_i8(int8_t* p, I32x16 a) {  // saturating
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtsepi32_epi8(a.v));
}
// A 64-byte weight line as 16 int32 lanes (one output row's four bytes each), and one bit field of each lane.
inline I32x16 iload_line(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline I32x16 ibits(I32x16 a, int shift, int32_t mask) {  // (lane >> shift) & mask, a logical shift
  return {_mm512_and_si512(_mm512_srl_epi32(a.v, _mm_cvtsi32_si128(shift)), _mm512_set1_epi32(mask))};
}

// A 64-byte weight line: 16 lanes (output rows) x 4 bytes (columns).
struct Line { __m512i v; };
inline Line load_line(const uint8_t* p) { return {_mm512_loadu_si512(p)}; }
inline Line low_nibbles(Line l) { return {_mm512_and_si512(l.v, _mm512_set1_epi8(0x0f))}; }
inline Line high_nibbles(Line l) { return {_mm512_and_si512(_mm512_srli_epi16(l.v, 4), _mm512_set1_epi8(0x0f))}; }
#if defined(FALCON_U8_DOT)
inline I32x16 dot_u4(I32x16 acc, Line w, int32_t x4) { return {_mm512_dpbusd_epi32(acc.v, w.v, _mm512_set1_epi32(x4))}; }
inline I32x16 dot_q8(I32x16 acc, Line w, int32_t x4, int32_t) {
  return {_mm512_dpbusd_epi32(acc.v, w.v, _mm512_set1_epi32(x4))};
}
#else
#define FALCON_U4_SUM16 1  // int4 lines through u4_line below, in 16-bit sums: no dot_u4 here
struct U4Sum { __m512i v; };  // 16-bit sums (see U4_LINES below)
inline U4Sum u4_zero() { return {_mm512_setzero_si512()}; }
inline U4Sum u4_line(U4Sum acc, Line low, Line high, int32_t x_low, int32_t x_high) {
  const __m512i a = _mm512_maddubs_epi16(low.v, _mm512_set1_epi32(x_low));
  const __m512i b = _mm512_maddubs_epi16(high.v, _mm512_set1_epi32(x_high));
  return {_mm512_add_epi16(acc.v, _mm512_add_epi16(a, b))};
}
inline I32x16 widen_u4(I32x16 acc, U4Sum s) {
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(s.v, _mm512_set1_epi16(1)))};
}
// q in [-127, 127]: |x| times q carrying x's sign.
inline I32x16 dot_q8(I32x16 acc, Line w, int32_t x4, int32_t m4) {
  const __m512i q = _mm512_xor_si512(w.v, _mm512_set1_epi8(static_cast<char>(0x80)));
  const __m512i x = _mm512_set1_epi32(x4);
  const __m512i ax = _mm512_set1_epi32(m4);
  const __m512i sq = _mm512_mask_sub_epi8(q, _mm512_movepi8_mask(x), _mm512_setzero_si512(), q);
  const __m512i p = _mm512_maddubs_epi16(ax, sq);
  return {_mm512_add_epi32(acc.v, _mm512_madd_epi16(p, _mm512_set1_epi16(1)))};
}
#endif

// 32 bfloat16 values, in the form the dot product wants.
#if defined(FALCON_BF16_DOT)
struct BF16x32 { __m512i v; };
inline BF16x32 load_bf16x32(const uint16_t* p) { return {_mm512_loadu_si512(p)}; }
inline F32x16 dot_bf16(F32x16 acc, BF16x32 a, BF16x32 b) {  // lane i += a[2i] b[2i] + a[2i+1] b[2i+1]
  return {_mm512_dpbf16_ps(acc.v, reinterpret_cast<__m512bh&>(a.v), reinterpret_cast<__m512bh&>(b.v))};
}

// a then b rounded to bfloat16 into p[0, 32) as store_bf16 rounds them, in one conversion and one 64-byte store.
// The conversion flushes denormal inputs to zero where store_bf16 (and torch) keep them, so a pair holding one
// takes store_bf16 instead.
#define FALCON_BF16_PAIR 1
inline void store_bf16_pair(uint16_t* p, F32x16 a, F32x16 b) {
  const __m512i exponent = _mm512_set1_epi32(0x7f800000), mantissa = _mm512_set1_epi32(0x007fffff);
  const __m512i ua = _mm512_castps_si512(a.v), ub = _mm512_castps_si512(b.v);
  const __mmask16 denormal = (_mm512_testn_epi32_mask(ua, exponent) & _mm512_test_epi32_mask(ua, mantissa)) |
                             (_mm512_testn_epi32_mask(ub, exponent) & _mm512_test_epi32_mask(ub, mantissa));
  if (denormal) {
    store_bf16(p, a);
    store_bf16(p + 16, b);
    return;
  }
  const __m512bh both = _mm512_cvtne2ps_pbh(b.v, a.v);
  _mm512_storeu_si512(p, reinterpret_cast<const __m512i&>(both));
}
#endif

#elif defined(FALCON_AVX2)
// ------------------------------------------------------------------------------------------------------- AVX2
struct F32x16 { __m256 lo, hi; };
struct I32x16 { __m256i lo, hi; };

inline F32x16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline F32x16 set1(float x) { return {_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
inline F32x16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, F32x16 a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline __m256 widen8(const uint16_t* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline F32x16 load_bf16(const uint16_t* p) { return {widen8(p), widen8(p + 8)}; }
inline __m256i round_bf16_bits(__m256 a) {  // the bfloat16 bits in the low half of each lane
  const __m256i u = _mm256_castps_si256(a);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q));
  return _mm256_srli_epi32(_mm256_blendv_epi8(r, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan), 16);
}
inline void store_bf16(uint16_t* p, F32x16 a) {  // round to nearest even; NaN stays NaN
  const __m256i packed = _mm256_packus_epi32(round_bf16_bits(a.lo), round_bf16_bits(a.hi));  // lanes interleaved
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}
inline F32x16 add(F32x16 a, F32x16 b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline F32x16 sub(F32x16 a, F32x16 b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline F32x16 mul(F32x16 a, F32x16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline F32x16 div(F32x16 a, F32x16 b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline F32x16 max(F32x16 a, F32x16 b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline F32x16 min(F32x16 a, F32x16 b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline F32x16 abs(F32x16 a) {
  const __m256 m = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  return {_mm256_and_ps(a.lo, m), _mm256_and_ps(a.hi, m)};
}
inline F32x16 round_even(F32x16 a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
inline __m256 pow2i8(__m256 n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline F32x16 pow2i(F32x16 n) { return {pow2i8(n.lo), pow2i8(n.hi)}; }
inline uint32_t mask_nan(F32x16 a) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, a.lo, _CMP_UNORD_Q))) |
         static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, a.hi, _CMP_UNORD_Q))) << 8;
}
inline uint32_t mask_eq(F32x16 a, F32x16 b) {
  return static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, _CMP_EQ_OQ))) |
         static_cast<uint32_t>(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, _CMP_EQ_OQ))) << 8;
}
inline float reduce_add(F32x16 a) {  // the fixed tree: + lane i+8, + i+4, + i+2, + i+1
  const __m256 h = _mm256_add_ps(a.lo, a.hi);
  const __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  const __m128 p = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(p, _mm_movehdup_ps(p)));
}
inline float reduce_max(F32x16 a) {
  const __m256 h = _mm256_max_ps(a.lo, a.hi);
  __m128 q = _mm_max_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_max_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_max_ss(q, _mm_movehdup_ps(q)));
}

inline I32x16 izero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline I32x16 iset1(int32_t x) { return {_mm256_set1_epi32(x), _mm256_set1_epi32(x)}; }
inline I32x16 iadd(I32x16 a, I32x16 b) { return {_mm256_add_epi32(a.lo, b.lo), _mm256_add_epi32(a.hi, b.hi)}; }
inline I32x16 isub(I32x16 a, I32x16 b) { return {_mm256_sub_epi32(a.lo, b.lo), _mm256_sub_epi32(a.hi, b.hi)}; }
inline F32x16 to_float(I32x16 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline I32x16 to_int_even(F32x16 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
inline int32_t ireduce_add(I32x16 a) {
  const __m256i h = _mm256_add_epi32(a.lo, a.hi);
  __m128i q = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(1, 0, 3, 2)));
  q = _mm_add_epi32(q, _mm_shuffle_epi32(q, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(q);
}
inline void store_i8(int8_t* p, I32x16 a) {  // saturating
  const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(a.lo, a.hi), 0xD8);  // 16 int16 in order
  const __m128i b = _mm_packs_epi16(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), b);
}
// A 64-byte weight line as 16 int32 lanes (one output row's four bytes each), and one bit field of each lane.
inline I32x16 iload_line(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline I32x16 ibits(I32x16 a, int shift, int32_t mask) {  // (lane >> shift) & mask, a logical shift
  const __m128i n = _mm_cvtsi32_si128(shift);
  const __m256i m = _mm256_set1_epi32(mask);
  return {_mm256_and_si256(_mm256_srl_epi32(a.lo, n), m), _mm256_and_si256(_mm256_srl_epi32(a.hi, n), m)};
}

struct Line { __m256i lo, hi; };  // rows 0-7, rows 8-15
inline Line load_line(const uint8_t* p) {
  return {_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32))};
}
inline Line low_nibbles(Line l) {
  const __m256i m = _mm256_set1_epi8(0x0f);
  return {_mm256_and_si256(l.lo, m), _mm256_and_si256(l.hi, m)};
}
inline Line high_nibbles(Line l) {
  const __m256i m = _mm256_set1_epi8(0x0f);
  return {_mm256_and_si256(_mm256_srli_epi16(l.lo, 4), m), _mm256_and_si256(_mm256_srli_epi16(l.hi, 4), m)};
}
#if defined(FALCON_U8_DOT)
inline I32x16 dot_u4(I32x16 acc, Line w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  return {_mm256_dpbusd_avx_epi32(acc.lo, w.lo, x), _mm256_dpbusd_avx_epi32(acc.hi, w.hi, x)};
}
inline I32x16 dot_q8(I32x16 acc, Line w, int32_t x4, int32_t) { return dot_u4(acc, w, x4); }
#else
#define FALCON_U4_SUM16 1  // int4 lines through u4_line below, in 16-bit sums: no dot_u4 here
struct U4Sum { __m256i lo, hi; };  // 16-bit sums (see U4_LINES below)
inline U4Sum u4_zero() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline U4Sum u4_line(U4Sum acc, Line low, Line high, int32_t x_low, int32_t x_high) {
  const __m256i a = _mm256_set1_epi32(x_low), b = _mm256_set1_epi32(x_high);
  const __m256i lo = _mm256_add_epi16(_mm256_maddubs_epi16(low.lo, a), _mm256_maddubs_epi16(high.lo, b));
  const __m256i hi = _mm256_add_epi16(_mm256_maddubs_epi16(low.hi, a), _mm256_maddubs_epi16(high.hi, b));
  return {_mm256_add_epi16(acc.lo, lo), _mm256_add_epi16(acc.hi, hi)};
}
// One nibble half of a line (u4_line's low or high part alone): tiles of several rows take all rows' low
// halves, then all rows' high halves, so that only one half is live beside the sums (16 ymm registers).
#define FALCON_U4_HALVES 1
inline U4Sum u4_half(U4Sum acc, Line w, int32_t x4) {
  const __m256i x = _mm256_set1_epi32(x4);
  __m256i lo = _mm256_add_epi16(acc.lo, _mm256_maddubs_epi16(w.lo, x));
  __m256i hi = _mm256_add_epi16(acc.hi, _mm256_maddubs_epi16(w.hi, x));
  asm("" : "+x"(lo), "+x"(hi));  // the sums as they stand: keeps the compiler from regrouping the additions
  return {lo, hi};
}
inline I32x16 widen_u4(I32x16 acc, U4Sum s) {
  const __m256i one = _mm256_set1_epi16(1);
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(s.lo, one)),
          _mm256_add_epi32(acc.hi, _mm256_madd_epi16(s.hi, one))};
}
// q in [-127, 127]: |x| times q carrying x's sign.
inline I32x16 dot_q8(I32x16 acc, Line w, int32_t x4, int32_t m4) {
  const __m256i x = _mm256_set1_epi32(x4), one = _mm256_set1_epi16(1), flip = _mm256_set1_epi8(static_cast<char>(0x80));
  const __m256i ax = _mm256_set1_epi32(m4);
  const __m256i lo = _mm256_sign_epi8(_mm256_xor_si256(w.lo, flip), x);
  const __m256i hi = _mm256_sign_epi8(_mm256_xor_si256(w.hi, flip), x);
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, lo), one)),
          _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, hi), one))};
}
#endif

#elif defined(FALCON_NEON)
// ------------------------------------------------------------------------------------------------------- NEON
struct F32x16 { float32x4_t v[4]; };
struct I32x16 { int32x4_t v[4]; };

#define FALCON_EACH(expr) \
  F32x16 r;               \
  for (int i = 0; i < 4; ++i) r.v[i] = expr; \
  return r
#define FALCON_IEACH(expr) \
  I32x16 r;                \
  for (int i = 0; i < 4; ++i) r.v[i] = expr; \
  return r

inline F32x16 zero() { FALCON_EACH(vdupq_n_f32(0.f)); }
inline F32x16 set1(float x) { FALCON_EACH(vdupq_n_f32(x)); }
inline F32x16 load(const float* p) { FALCON_EACH(vld1q_f32(p + 4 * i)); }
inline void store(float* p, F32x16 a) {
  for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.v[i]);
}
inline F32x16 load_bf16(const uint16_t* p) { FALCON_EACH(vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p + 4 * i), 16))); }
inline void store_bf16(uint16_t* p, F32x16 a) {
  alignas(16) float f[16];
  store(f, a);
  for (int i = 0; i < 16; ++i) p[i] = f32_to_bf16(f[i]);
}
inline F32x16 add(F32x16 a, F32x16 b) { FALCON_EACH(vaddq_f32(a.v[i], b.v[i])); }
inline F32x16 sub(F32x16 a, F32x16 b) { FALCON_EACH(vsubq_f32(a.v[i], b.v[i])); }
inline F32x16 mul(F32x16 a, F32x16 b) { FALCON_EACH(vmulq_f32(a.v[i], b.v[i])); }
inline F32x16 div(F32x16 a, F32x16 b) { FALCON_EACH(vdivq_f32(a.v[i], b.v[i])); }
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) { FALCON_EACH(vfmaq_f32(c.v[i], a.v[i], b.v[i])); }
inline F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) { FALCON_EACH(vfmsq_f32(c.v[i], a.v[i], b.v[i])); }
inline F32x16 max(F32x16 a, F32x16 b) { FALCON_EACH(vmaxnmq_f32(a.v[i], b.v[i])); }
inline F32x16 min(F32x16 a, F32x16 b) { FALCON_EACH(vminnmq_f32(a.v[i], b.v[i])); }
inline F32x16 abs(F32x16 a) { FALCON_EACH(vabsq_f32(a.v[i])); }
inline F32x16 round_even(F32x16 a) { FALCON_EACH(vrndnq_f32(a.v[i])); }
inline F32x16 pow2i(F32x16 n) {
  FALCON_EACH(vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n.v[i]), vdupq_n_s32(127)), 23)));
}
inline uint32_t mask_bits(const uint32x4_t (&m)[4]) {
  alignas(16) uint32_t b[16];
  for (int i = 0; i < 4; ++i) vst1q_u32(b + 4 * i, m[i]);
  uint32_t out = 0;
  for (int i = 0; i < 16; ++i) out |= (b[i] ? 1u : 0u) << i;
  return out;
}
inline uint32_t mask_nan(F32x16 a) {
  uint32x4_t m[4];
  for (int i = 0; i < 4; ++i) m[i] = vmvnq_u32(vceqq_f32(a.v[i], a.v[i]));
  return mask_bits(m);
}
inline uint32_t mask_eq(F32x16 a, F32x16 b) {
  uint32x4_t m[4];
  for (int i = 0; i < 4; ++i) m[i] = vceqq_f32(a.v[i], b.v[i]);
  return mask_bits(m);
}
inline float reduce_add(F32x16 a) {  // the fixed tree: + lane i+8, + i+4, + i+2, + i+1
  const float32x4_t e = vaddq_f32(vaddq_f32(a.v[0], a.v[2]), vaddq_f32(a.v[1], a.v[3]));
  const float32x2_t p = vadd_f32(vget_low_f32(e), vget_high_f32(e));
  return vget_lane_f32(p, 0) + vget_lane_f32(p, 1);
}
inline float reduce_max(F32x16 a) {
  return vmaxvq_f32(vmaxq_f32(vmaxq_f32(a.v[0], a.v[2]), vmaxq_f32(a.v[1], a.v[3])));
}

inline I32x16 izero() { FALCON_IEACH(vdupq_n_s32(0)); }
inline I32x16 iset1(int32_t x) { FALCON_IEACH(vdupq_n_s32(x)); }
inline I32x16 iadd(I32x16 a, I32x16 b) { FALCON_IEACH(vaddq_s32(a.v[i], b.v[i])); }
inline I32x16 isub(I32x16 a, I32x16 b) { FALCON_IEACH(vsubq_s32(a.v[i], b.v[i])); }
inline F32x16 to_float(I32x16 a) { FALCON_EACH(vcvtq_f32_s32(a.v[i])); }
inline I32x16 to_int_even(F32x16 a) { FALCON_IEACH(vcvtnq_s32_f32(a.v[i])); }
inline int32_t ireduce_add(I32x16 a) {
  return vaddvq_s32(vaddq_s32(vaddq_s32(a.v[0], a.v[2]), vaddq_s32(a.v[1], a.v[3])));
}
inline void store_i8(int8_t* p, I32x16 a) {  // saturating
  const int16x8_t lo = vcombine_s16(vqmovn_s32(a.v[0]), vqmovn_s32(a.v[1]));
  const int16x8_t hi = vcombine_s16(vqmovn_s32(a.v[2]), vqmovn_s32(a.v[3]));
  vst1q_s8(p, vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)));
}
// A 64-byte weight line as 16 int32 lanes (one output row's four bytes each), and one bit field of each lane.
inline I32x16 iload_line(const uint8_t* p) { FALCON_IEACH(vreinterpretq_s32_u8(vld1q_u8(p + 16 * i))); }
inline I32x16 ibits(I32x16 a, int shift, int32_t mask) {  // (lane >> shift) & mask, a logical shift
  const int32x4_t n = vdupq_n_s32(-shift);
  FALCON_IEACH(vandq_s32(vreinterpretq_s32_u32(vshlq_u32(vreinterpretq_u32_s32(a.v[i]), n)), vdupq_n_s32(mask)));
}

struct Line { int8x16_t v[4]; };  // rows 4i..4i+3, as signed bytes
inline Line load_line(const uint8_t* p) {
  Line l;
  for (int i = 0; i < 4; ++i) l.v[i] = vreinterpretq_s8_u8(vld1q_u8(p + 16 * i));
  return l;
}
inline Line low_nibbles(Line l) {
  for (int i = 0; i < 4; ++i) l.v[i] = vandq_s8(l.v[i], vdupq_n_s8(0x0f));
  return l;
}
inline Line high_nibbles(Line l) {
  for (int i = 0; i < 4; ++i)
    l.v[i] = vreinterpretq_s8_u8(vshrq_n_u8(vreinterpretq_u8_s8(l.v[i]), 4));
  return l;
}
inline int32x4_t dot4(int32x4_t acc, int8x16_t w, int8x16_t x) {  // lane r += sum_j w[4r + j] x[j]
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, w, x);
#else
  const int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(x));
  const int16x8_t hi = vmull_s8(vget_high_s8(w), vget_high_s8(x));
  return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}
inline I32x16 dot_u4(I32x16 acc, Line w, int32_t x4) {  // weights 0..15 fit signed bytes
  const int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(x4));
  FALCON_IEACH(dot4(acc.v[i], w.v[i], x));
}
inline I32x16 dot_q8(I32x16 acc, Line w, int32_t x4, int32_t) {  // stored q + 128: flip the top bit back to q
  const int8x16_t x = vreinterpretq_s8_s32(vdupq_n_s32(x4));
  FALCON_IEACH(dot4(acc.v[i], veorq_s8(w.v[i], vdupq_n_s8(static_cast<int8_t>(0x80))), x));
}

#if defined(__ARM_FEATURE_MATMUL_INT8)
#define FALCON_I8MM 1
// Two activation rows at once (i8mm): one smmla multiplies a 2 x 8 block of weights (two output rows, eight
// columns) by the same eight columns of two activation rows, four sums per instruction where sdot gives one row.
// The sums are integers, so a row's result is the same whichever way it is computed.
struct I32Pairs { int32x4_t v[8]; };  // v[2i], v[2i + 1]: weight rows 4i..4i+3 x rows (a, b), interleaved

inline I32Pairs pzero() {
  I32Pairs r;
  for (int i = 0; i < 8; ++i) r.v[i] = vdupq_n_s32(0);
  return r;
}
inline Line signed_q8(Line w) {  // stored q + 128 -> q
  for (int i = 0; i < 4; ++i) w.v[i] = veorq_s8(w.v[i], vdupq_n_s8(static_cast<int8_t>(0x80)));
  return w;
}
inline int8x16_t two_rows(const int8_t* a, const int8_t* b) { return vcombine_s8(vld1_s8(a), vld1_s8(b)); }
// cols0: columns k..k+3 of the 16 weight rows, cols4: columns k+4..k+7; x2: those 8 columns of rows a, then b.
inline I32Pairs mmla8(I32Pairs acc, Line cols0, Line cols4, int8x16_t x2) {
  for (int i = 0; i < 4; ++i) {
    const int32x4_t lo = vreinterpretq_s32_s8(cols0.v[i]), hi = vreinterpretq_s32_s8(cols4.v[i]);
    acc.v[2 * i] = vmmlaq_s32(acc.v[2 * i], vreinterpretq_s8_s32(vzip1q_s32(lo, hi)), x2);  // rows 4i, 4i+1
    acc.v[2 * i + 1] = vmmlaq_s32(acc.v[2 * i + 1], vreinterpretq_s8_s32(vzip2q_s32(lo, hi)), x2);
  }
  return acc;
}
inline void unpair(const I32Pairs& p, I32x16& a, I32x16& b) {  // each smmla sum is [ra, rb, (r+1)a, (r+1)b]
  for (int i = 0; i < 4; ++i) {
    a.v[i] = vuzp1q_s32(p.v[2 * i], p.v[2 * i + 1]);
    b.v[i] = vuzp2q_s32(p.v[2 * i], p.v[2 * i + 1]);
  }
}
#endif
#undef FALCON_EACH
#undef FALCON_IEACH

#else
// ----------------------------------------------------------------------------------------------------- scalar
struct F32x16 { float v[16]; };
struct I32x16 { int32_t v[16]; };

#define FALCON_EACH(expr) \
  F32x16 r;               \
  for (int i = 0; i < 16; ++i) r.v[i] = expr; \
  return r
#define FALCON_IEACH(expr) \
  I32x16 r;                \
  for (int i = 0; i < 16; ++i) r.v[i] = expr; \
  return r

inline F32x16 zero() { FALCON_EACH(0.f); }
inline F32x16 set1(float x) { FALCON_EACH(x); }
inline F32x16 load(const float* p) { FALCON_EACH(p[i]); }
inline void store(float* p, F32x16 a) {
  for (int i = 0; i < 16; ++i) p[i] = a.v[i];
}
inline F32x16 load_bf16(const uint16_t* p) { FALCON_EACH(bf16_to_f32(p[i])); }
inline void store_bf16(uint16_t* p, F32x16 a) {
  for (int i = 0; i < 16; ++i) p[i] = f32_to_bf16(a.v[i]);
}
inline F32x16 add(F32x16 a, F32x16 b) { FALCON_EACH(a.v[i] + b.v[i]); }
inline F32x16 sub(F32x16 a, F32x16 b) { FALCON_EACH(a.v[i] - b.v[i]); }
inline F32x16 mul(F32x16 a, F32x16 b) { FALCON_EACH(a.v[i] * b.v[i]); }
inline F32x16 div(F32x16 a, F32x16 b) { FALCON_EACH(a.v[i] / b.v[i]); }
inline F32x16 fmadd(F32x16 a, F32x16 b, F32x16 c) { FALCON_EACH(std::fma(a.v[i], b.v[i], c.v[i])); }
inline F32x16 fnmadd(F32x16 a, F32x16 b, F32x16 c) { FALCON_EACH(std::fma(-a.v[i], b.v[i], c.v[i])); }
inline F32x16 max(F32x16 a, F32x16 b) { FALCON_EACH(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline F32x16 min(F32x16 a, F32x16 b) { FALCON_EACH(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
inline F32x16 abs(F32x16 a) { FALCON_EACH(std::fabs(a.v[i])); }
inline F32x16 round_even(F32x16 a) { FALCON_EACH(std::nearbyint(a.v[i])); }
inline F32x16 pow2i(F32x16 n) { FALCON_EACH(std::ldexp(1.f, static_cast<int>(n.v[i]))); }
inline uint32_t mask_nan(F32x16 a) {
  uint32_t m = 0;
  for (int i = 0; i < 16; ++i) m |= (a.v[i] != a.v[i] ? 1u : 0u) << i;
  return m;
}
inline uint32_t mask_eq(F32x16 a, F32x16 b) {
  uint32_t m = 0;
  for (int i = 0; i < 16; ++i) m |= (a.v[i] == b.v[i] ? 1u : 0u) << i;
  return m;
}
inline float reduce_add(F32x16 a) {  // the fixed tree: + lane i+8, + i+4, + i+2, + i+1
  float h[8], q[4];
  for (int i = 0; i < 8; ++i) h[i] = a.v[i] + a.v[i + 8];
  for (int i = 0; i < 4; ++i) q[i] = h[i] + h[i + 4];
  return (q[0] + q[2]) + (q[1] + q[3]);
}
inline float reduce_max(F32x16 a) {
  float m = a.v[0];
  for (int i = 1; i < 16; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}

inline I32x16 izero() { FALCON_IEACH(0); }
inline I32x16 iset1(int32_t x) { FALCON_IEACH(x); }
inline I32x16 iadd(I32x16 a, I32x16 b) { FALCON_IEACH(a.v[i] + b.v[i]); }
inline I32x16 isub(I32x16 a, I32x16 b) { FALCON_IEACH(a.v[i] - b.v[i]); }
inline F32x16 to_float(I32x16 a) { FALCON_EACH(static_cast<float>(a.v[i])); }
inline I32x16 to_int_even(F32x16 a) { FALCON_IEACH(static_cast<int32_t>(std::nearbyint(a.v[i]))); }
inline int32_t ireduce_add(I32x16 a) {
  int32_t s = 0;
  for (int i = 0; i < 16; ++i) s += a.v[i];
  return s;
}
inline void store_i8(int8_t* p, I32x16 a) {  // saturating
  for (int i = 0; i < 16; ++i) p[i] = static_cast<int8_t>(a.v[i] > 127 ? 127 : (a.v[i] < -128 ? -128 : a.v[i]));
}
// A 64-byte weight line as 16 int32 lanes (one output row's four bytes each), and one bit field of each lane.
inline I32x16 iload_line(const uint8_t* p) {
  I32x16 r;
  std::memcpy(r.v, p, 64);
  return r;
}
inline I32x16 ibits(I32x16 a, int shift, int32_t mask) {  // (lane >> shift) & mask, a logical shift
  FALCON_IEACH(static_cast<int32_t>(static_cast<uint32_t>(a.v[i]) >> shift) & mask);
}

struct Line { uint8_t v[64]; };
inline Line load_line(const uint8_t* p) {
  Line l;
  std::memcpy(l.v, p, 64);
  return l;
}
inline Line low_nibbles(Line l) {
  for (int i = 0; i < 64; ++i) l.v[i] &= 0x0f;
  return l;
}
inline Line high_nibbles(Line l) {
  for (int i = 0; i < 64; ++i) l.v[i] >>= 4;
  return l;
}
inline I32x16 dot_lanes(I32x16 acc, const Line& w, int32_t x4, int32_t offset) {
  int8_t x[4];
  std::memcpy(x, &x4, 4);
  for (int r = 0; r < 16; ++r)
    for (int j = 0; j < 4; ++j) acc.v[r] += (static_cast<int32_t>(w.v[4 * r + j]) - offset) * x[j];
  return acc;
}
inline I32x16 dot_u4(I32x16 acc, Line w, int32_t x4) { return dot_lanes(acc, w, x4, 0); }
inline I32x16 dot_q8(I32x16 acc, Line w, int32_t x4, int32_t) { return dot_lanes(acc, w, x4, 128); }
#undef FALCON_EACH
#undef FALCON_IEACH
#endif

#if !defined(FALCON_AVX512)
inline F32x16 reduce_add16(const F32x16* v) {  // lane i is reduce_add(v[i])
  alignas(64) float s[16];
  for (int i = 0; i < 16; ++i) s[i] = reduce_add(v[i]);
  return load(s);
}
#endif

// Sums of int4 weight lines times int8 activations for one row: u4_line adds a line's low nibbles times x_low's
// four bytes and its high nibbles times x_high's; widen_u4 adds the sums to 32-bit ones. On x86 without a byte dot
// product into 32 bits (vpdpbusd), each product pair is summed in 16 bits (vpmaddubsw) and widened (vpmaddwd):
// a pair is at most 2 x 15 x 128 = 3840 in magnitude, so the 16-bit lanes take U4_LINES = 4 lines (8 pairs,
// 30720) and one widening per 4 lines instead of one per product. Elsewhere the sums are two 32-bit chains (low
// and high nibbles) that a row does not wait on one after the other. Integer sums: the same bits either way.
#if defined(FALCON_U4_SUM16)
constexpr int64_t U4_LINES = 4;
#else
constexpr int64_t U4_LINES = 1 << 30;
struct U4Sum { I32x16 low, high; };
inline U4Sum u4_zero() { return {izero(), izero()}; }
inline U4Sum u4_line(U4Sum acc, Line low, Line high, int32_t x_low, int32_t x_high) {
  return {dot_u4(acc.low, low, x_low), dot_u4(acc.high, high, x_high)};
}
inline I32x16 widen_u4(I32x16 acc, U4Sum s) { return iadd(acc, iadd(s.low, s.high)); }
#endif
// u4_line on one chain (the high nibbles' products added after the low ones'), for register blocks of more than 2
// rows, whose rows are chains enough: there the second chains only cost registers. AVX-512 VNNI at 8 rows held 16
// zmm of them beside 16 of 32-bit and float sums and spilled. bench-194m int4 g64 (2 threads, in turn, prefill 512
// / batch 8 tok/s): AVX-512 VNNI 1774-1906 / 1744-1767 -> 2375-2385 / 1812-1840, AVX2 with AVX-VNNI 1097-1107 /
// 944-952 -> 1352-1401 / 1171-1192; batch 1 (one row, two chains) unchanged. Where sums are 16-bit, it is u4_line.
inline U4Sum u4_line_one_chain(U4Sum acc, Line low, Line high, int32_t x_low, int32_t x_high) {
#if defined(FALCON_U4_SUM16)
  return u4_line(acc, low, high, x_low, x_high);
#else
  return {dot_u4(dot_u4(acc.low, low, x_low), high, x_high), acc.high};
#endif
}

#if !defined(FALCON_BF16_PAIR)
inline void store_bf16_pair(uint16_t* p, F32x16 a, F32x16 b) {  // a then b into p[0, 32), as store_bf16 does
  store_bf16(p, a);
  store_bf16(p + 16, b);
}
#endif

#if !defined(FALCON_BF16_DOT)
// Without bfloat16 dot products: both halves widened to float32 (a shift), two fused multiply-adds.
struct BF16x32 { F32x16 lo, hi; };
inline BF16x32 load_bf16x32(const uint16_t* p) { return {load_bf16(p), load_bf16(p + 16)}; }
inline F32x16 dot_bf16(F32x16 acc, const BF16x32& a, const BF16x32& b) {
  return fmadd(a.hi, b.hi, fmadd(a.lo, b.lo, acc));
}
#endif

// e^x for x <= 0 (scores minus their maximum): 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2, p a degree-6 Taylor
// polynomial (relative error below 2e-7); very negative x gives about 0.
inline F32x16 exp_nonpositive(F32x16 x) {
  x = max(x, set1(-87.f));
  const F32x16 n = round_even(mul(x, set1(1.44269504f)));
  const F32x16 r = fnmadd(n, set1(0.693147181f), x);
  F32x16 p = set1(1.f / 720.f);
  for (float c : {1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = fmadd(p, r, set1(c));
  return mul(p, pow2i(n));
}

// 16 values of a float32 or bfloat16 array.
inline F32x16 load_any(const void* base, int64_t i, int bf16) {
  if (bf16) return load_bf16(static_cast<const uint16_t*>(base) + i);
  return load(static_cast<const float*>(base) + i);
}

inline void store_any(void* base, int64_t i, F32x16 v, int bf16) {
  if (bf16) {
    store_bf16(static_cast<uint16_t*>(base) + i, v);
  } else {
    store(static_cast<float*>(base) + i, v);
  }
}

}  // namespace falcon
