// bfloat16 matmuls y[M, N] = x[M, K] @ w[N, K].T, a row-wise argmax, and decode-step attention (attention.h).
//
// The matmul reads w in its own row-major layout, a few weight rows against a block of activation rows at a time
// (bf16_tiles.h), so decode steps pay nothing for packing the weight as a general GEMM does. Threads take the
// weight rows in contiguous shares (shares.h), so each streams its part of w once per block of activation rows;
// activation rows go in blocks small enough to stay in the core's cache. Every output element is one row's dot
// product summed in a fixed order, so a row's result is the same whatever else shares the call (batch-invariant).
// For prompts on CPUs without bfloat16 arithmetic, falcon_gemm_bf16 packs widened weight panels as a general GEMM
// does, and pays for it over hundreds of rows (bf16_panels.h).
//
// The argmax is the greedy pick over float32 / bfloat16 logits, which torch does element by element.

#include <omp.h>

#include "attention.h"
#include "bf16_panels.h"
#include "bf16_tiles.h"
#include "shares.h"
#include "simd.h"
#include <cmath>
#include <cstdint>
#include <vector>

using namespace falcon;
using namespace falcon::bf16;

// Independent multiply-add chains per thread in falcon_fma_probe: enough to cover the FMA latency at full rate.
#if defined(FALCON_AVX2)
constexpr int FMA_CHAINS = 6;  // 12 ymm registers of sums beside x and y (of 16)
#else
constexpr int FMA_CHAINS = 12;  // 12 zmm (AVX-512), 48 q registers (NEON)
#endif

extern "C" {

// The instruction set this library was built for.
const char* falcon_isa() { return isa_name(); }

// x: bfloat16 [M, K], rows ldx apart; w: bfloat16 [N, K] contiguous; y: bfloat16 [M, N] contiguous.
// K must be a multiple of 32.
void falcon_linear_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                        uint16_t* y, int nthreads) {
  const int64_t span = M == 1 ? LONE_NR : NR;  // weight rows per share of the threads' work: one register block
  const int64_t blocks = (N + span - 1) / span;
  static thread_local std::vector<float> widened;  // x in float32, when widen_first says so
  const bool widen = widen_first(M, K);
  if (widen && static_cast<int64_t>(widened.size()) < M * K) widened.resize(M * K);
  float* wide = widened.data();  // the calling thread's buffer: the region's other threads have their own
  Deals deals((M + M_BLOCK - 1) / M_BLOCK, nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    if (widen) {
#pragma omp for schedule(static)
      for (int64_t m = 0; m < M; ++m) widen_row(x + m * ldx, wide + m * K, K);
    }  // (the loop's end is a barrier)
    for (int64_t mb = 0; mb < M; mb += M_BLOCK) {
      const int64_t rows = M - mb < M_BLOCK ? M - mb : M_BLOCK;
      deals.take(mb / M_BLOCK, tid, shares_of(blocks, rows * span * K, nthreads), [&](int64_t b0, int64_t b1) {
        const int64_t n0 = b0 * span, n1 = b1 * span < N ? b1 * span : N;
        weight_rows_of(x + mb * ldx, ldx, widen ? wide + mb * K : nullptr, rows, w, K, n0, n1, y + mb * N, N);
      });
    }
  }
}

// The same product for many rows (prompts) where the CPU has no bfloat16 arithmetic: weight panels widened once
// and every row run against them (bf16_panels.h). Not batch-invariant against falcon_linear_bf16's order.
// x: bfloat16 [M, K], rows ldx apart; w: bfloat16 [N, K] contiguous; y: bfloat16 [M, N] contiguous.
void falcon_gemm_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                      uint16_t* y, int nthreads) {
  using namespace falcon::panels;
  // The calling thread's buffers, shared by the region: x in float32, and the float32 sums, padded to whole panels.
  static thread_local std::vector<float> widened, summed;
  const int64_t panels = (N + PANEL - 1) / PANEL, lds = panels * PANEL, rows = M < MC ? M : MC;
  if (static_cast<int64_t>(widened.size()) < rows * K) widened.resize(rows * K);
  if (static_cast<int64_t>(summed.size()) < rows * lds) summed.resize(rows * lds);
  float* wide = widened.data();
  float* sums = summed.data();
  Deals deals((M + MC - 1) / MC, nthreads);
#pragma omp parallel num_threads(nthreads)
  for (int64_t m0 = 0; m0 < M; m0 += MC) {  // chunks of MC rows, whose KC-column blocks stay in L2
    const int64_t mc = M - m0 < MC ? M - m0 : MC;
#pragma omp for schedule(static)
    for (int64_t m = 0; m < mc; ++m) widen_in_order(x + (m0 + m) * ldx, wide + m * K, K);
    deals.take(m0 / MC, omp_get_thread_num(), shares_of(panels, mc * PANEL * K, nthreads), [&](int64_t p0, int64_t p1) {
      panel_sums(wide, mc, K, w, N, p0, p1, sums, lds);
      for (int64_t m = 0; m < mc; ++m) {
        uint16_t* out = y + (m0 + m) * N;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t c0 = p * PANEL;
          if (c0 + PANEL <= N) {
            store_bf16(out + c0, load(sums + m * lds + c0));
          } else {
            for (int64_t c = c0; c < N; ++c) out[c] = f32_to_bf16(sums[m * lds + c]);
          }
        }
      }
    });
#pragma omp barrier
  }
}

// The sum of n 64-bit words, each thread reading one contiguous part front to back: a memory read-bandwidth probe
// (benchmarks compare the weights' streaming rate with it). Integer sums, so the compiler vectorizes them freely.
uint64_t falcon_read_words(const uint64_t* p, int64_t n, int nthreads) {
  uint64_t total = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(+ : total)
  for (int64_t i = 0; i < n; ++i) total += p[i];
  return total;
}

// Each thread runs `steps` rounds of FMA_CHAINS independent float32 multiply-add chains, a = a * x + y on 16
// lanes, the instruction the kernels' float32 sums use: an arithmetic-bound probe (benchmarks compare float32
// work such as widened bfloat16 matmuls with it), as falcon_read_words is for memory. Chains start at 1, 2, ...
// and the result is the sum of every lane of every thread's chains (with x = 1, y = 0: threads x 16 x the
// chains' starting sum), so the work cannot be left out.
double falcon_fma_probe(int64_t steps, float x, float y, int nthreads) {
  double total = 0;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
  {
    const F32x16 xv = set1(x), yv = set1(y);
    F32x16 a[FMA_CHAINS];
    for (int i = 0; i < FMA_CHAINS; ++i) a[i] = set1(static_cast<float>(i + 1));
    for (int64_t s = 0; s < steps; ++s)
      for (int i = 0; i < FMA_CHAINS; ++i) a[i] = fmadd(a[i], xv, yv);
    for (int i = 0; i < FMA_CHAINS; ++i) total += reduce_add(a[i]);
  }
  return total;
}

// The number of chains falcon_fma_probe runs per thread: multiply-adds per call = threads x steps x this x 16.
int64_t falcon_fma_probe_chains() { return FMA_CHAINS; }

// out[m] = the first index of the largest value of row m of x [M, N] (float32 or bfloat16, rows ldx apart).
// NaN counts as largest, as in torch.argmax.
void falcon_argmax_rows(const void* x, int x_bf16, int64_t M, int64_t N, int64_t ldx, int64_t* out, int nthreads) {
  const int64_t elem = x_bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 4)
  for (int64_t m = 0; m < M; ++m) {
    const void* row = static_cast<const char*>(x) + m * ldx * elem;
    auto at = [&](int64_t k) -> float {
      return x_bf16 ? bf16_to_f32(static_cast<const uint16_t*>(row)[k]) : static_cast<const float*>(row)[k];
    };
    // Pass 1: the maximum (NaN wins), 16 lanes at a time.
    F32x16 best = set1(-INFINITY);
    uint32_t nan = 0;
    int64_t k = 0;
    for (; k + 16 <= N; k += 16) {
      const F32x16 v = load_any(row, k, x_bf16);
      nan |= mask_nan(v);
      best = max(best, v);
    }
    float top = reduce_max(best);
    bool has_nan = nan != 0;
    for (int64_t j = k; j < N; ++j) {
      const float v = at(j);
      if (v != v) has_nan = true;
      else if (v > top) top = v;
    }
    // Pass 2: the first index holding it.
    const F32x16 target = set1(top);
    int64_t found = -1;
    for (k = 0; k + 16 <= N && found < 0; k += 16) {
      const F32x16 v = load_any(row, k, x_bf16);
      const uint32_t hit = has_nan ? mask_nan(v) : mask_eq(v, target);
      if (hit) found = k + __builtin_ctz(hit);
    }
    for (int64_t j = k; j < N && found < 0; ++j) {
      const float v = at(j);
      if (has_nan ? v != v : v == top) found = j;
    }
    out[m] = found < 0 ? 0 : found;
  }
}

// One query position per row against that row's cached keys and values (a decode step): softmax(q.k * scale) v.
// q, out: [R, Hq, d] contiguous, bfloat16 or float32 like the cache. K/V element (block b, position p, group g,
// dim i) is at b * sb + p * sp + g * sg + i; a row's positions 0..len-1 live in the blocks
// block_tables[r * tb + 0, 1, ...] of block_size positions each. Query heads g * Hq / G ... share group g.
// d must be a multiple of 16, at most 256. `bias` (or null): float32 [positions][Hq], rows bias_ld apart, added to
// the scaled scores (ALiBi), with 16 floats readable past the last row.
void falcon_decode_attention(const void* q, int bf16, int64_t R, int64_t Hq, int64_t G, int64_t d, const void* k,
                             const void* v, int64_t sb, int64_t sp, int64_t sg, int64_t block_size,
                             const int64_t* block_tables, int64_t tb, const int64_t* context_lens, float scale,
                             void* out, int nthreads, const float* bias, int64_t bias_ld) {
  const int64_t per_group = Hq / G;
  const CacheView cache{k, v, sb, sp, sg, block_size};
  const int64_t elem = bf16 ? 2 : 4;
  const int64_t vectors = head_vectors(per_group);  // a unit of work is one 16-head vector of a row's group
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (R * G * vectors > 1)
  for (int64_t u = 0; u < R * G * vectors; ++u) {
    const int64_t rg = u / vectors, r = rg / G, g = rg % G, vector = u % vectors;
    const int64_t at = ((r * Hq) + g * per_group) * d * elem;  // this group's first query head in q and out
    attend_group(static_cast<const char*>(q) + at, static_cast<char*>(out) + at, bf16, per_group, d, cache,
                 block_tables + r * tb, 0, context_lens[r], g, scale, nullptr, bias, bias_ld, {vector, vector + 1});
  }
}

}  // extern "C"
