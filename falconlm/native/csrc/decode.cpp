// A whole decode step of Falcon (every layout) or Falcon3 (every layer, one new token per row) in one call, over
// int8 / int4 weights in the tiled layout of quant_tiles.h or bfloat16 weights, for every instruction set of simd.h.
//
// At batch 1 a token is about fifty small matmuls and a few hundred small element-wise ops; through torch each op
// costs microseconds of dispatch and each matmul a fork and join of the threads, which adds up to as much time
// as the matmuls' own memory traffic. Here the threads enter one OpenMP parallel region for the whole step and
// meet at four barriers per layer:
//
//   1. the previous layer's residual add, then LayerNorm(s), as int8 blocks (or bfloat16) for the next matmuls;
//   2. the QKV and MLP-in matmuls (their 16-row weight tiles dealt out to the threads in shares, shares.h);
//   3. per row and KV group: rotary on the group's queries and key, the new K/V stored in the cache, attention
//      (attention.h); the MLP's GELU; both results quantized for the output matmuls. A row longer than
//      PART_KEYS positions is attended in parts of that size, shared between the threads, then combined (two
//      more barriers). Rows may also be the tokens of one prompt chunk, each attending up to itself (the engine's
//      deterministic mode runs every token through this one path): then all K/V are stored before any attends.
//      A group of more than 16 query heads is attended by 16-head vectors, which threads share (one more barrier);
//   4. the attention-out and MLP-out matmuls, in shares too, added to the residual as the next layer starts.
//
// Sequential blocks run the same phases in their own order: the norm, the QKV matmul(s), attention, the
// attention-out matmul; then the attention's output added to the residual and the MLP's norm, the MLP-in matmul(s),
// the activation, and the MLP-out matmul: eight barriers a layer. Those are Falcon3's (the Llama layout,
// Shape::llama: RMSNorm, separate q / k / v, SwiGLU over gate and up) and falcon-rw's (Shape::sequential:
// LayerNorm, a KV group per head, ALiBi's score bias instead of rotary, and a bias after every matmul, added where
// its output is read). Falcon's parallel layers (Falcon-7B, 40B, 180B, Falcon2-11B) and bias-free Falcon3 layers
// run here too; the residual stream stays in float32. Quantized weights are in the tiled layout of quant_tiles.h
// (falconlm/quant/kernels/native.py), with activations quantized to int8 blocks; bfloat16 weights are read in
// place (bf16_tiles.h), with activations rounded to bfloat16. falcon_prompt_layers runs the same layers for
// prompt-chunk tokens, a row each, with bfloat16 matmuls through the weight panels of bf16_panels.h (widened once
// for all the rows).

#include <omp.h>

#include "attention.h"
#include "bf16_panels.h"
#include "bf16_tiles.h"
#include "decode_structs.h"
#include "quant_tiles.h"
#include "shares.h"
#include "simd.h"
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

using namespace falcon;

constexpr int64_t BLOCK = ACTIVATION_BLOCK;
// The GELU is shared out in units of a row's activation blocks: GELU_UNITS_PER_THREAD units per thread in all,
// at least GELU_MIN_BLOCKS blocks each and no more than a row. Every unit costs a grab of the loop's shared counter,
// which crosses cores (about 0.1 us, as much as GELU on 8 blocks). Replaying bench-194m's served load (AVX2
// stand-in, 2 threads, four runs each), a unit per row instead of one per 8 blocks took the phase that holds the GELU
// (with rotary, cache stores and attention) from 0.41-0.71 to 0.25-0.29 s for prompts and from 0.89-1.19 to
// 0.85-0.92 s for decode steps.
constexpr int64_t GELU_UNITS_PER_THREAD = 4;
constexpr int64_t GELU_MIN_BLOCKS = 8;
// A row longer than this is attended in parts of this many positions, which threads share, then combined. Fixed,
// so that a row's sums run in the same order whatever the batch and the number of threads.
constexpr int64_t PART_KEYS = 512;

struct Activations {  // R rows of K columns for a matmul's input, in the form its weight wants
  // int8 weights (bits 8 or 4): int8 blocks of BLOCK columns, a scale and a sum per block;
  // bfloat16 weights (bits 16): the values rounded to bfloat16, and for the weight panels (prompt rows) those
  // values widened to float32 in column order.
  std::vector<int8_t> q, magnitude;  // magnitude: |q| where dot_q8 reads it (Q8_MAGNITUDES), int8 weights only
  std::vector<float> s;
  std::vector<int32_t> sum;
  std::vector<uint16_t> xb;
  std::vector<float> xf;  // the same values widened, in the row blocks' order (bf16::widen_first) or in column order
  int64_t K = 0, nb = 0, bits = 8;
  bool widen = false, panels = false, with_magnitudes = false;

  void resize(int64_t R, int64_t k, int64_t weight_bits, bool weight_panels) {
    K = k;
    nb = k / BLOCK;
    bits = weight_bits == 16 ? 16 : 8;
    with_magnitudes = Q8_MAGNITUDES && weight_bits == 8;
    if (bits == 16) {
      panels = weight_panels;
      widen = !panels && bf16::widen_first(R, K);
      if (static_cast<int64_t>(xb.size()) < R * K) xb.resize(R * K);
      if ((widen || panels) && static_cast<int64_t>(xf.size()) < R * K) xf.resize(R * K);
      return;
    }
    if (static_cast<int64_t>(q.size()) < R * K) q.resize(R * K);
    if (with_magnitudes && static_cast<int64_t>(magnitude.size()) < R * K) magnitude.resize(R * K);
    if (static_cast<int64_t>(s.size()) < R * nb) {
      s.resize(R * nb);
      sum.resize(R * nb);
    }
  }

  // Block b of row r from x (float32 or bfloat16), n <= BLOCK real values (the rest of the block is zero).
  void store_block(int64_t r, int64_t b, const void* x, int x_bf16, int64_t n) {
    if (bits == 16) {
      uint16_t* dst = xb.data() + r * K + b * BLOCK;
      if (n == BLOCK && x_bf16) {
        std::memcpy(dst, x, BLOCK * sizeof(uint16_t));
      } else if (n == BLOCK) {  // whole vectors, rounded as f32_to_bf16 rounds
        for (int64_t k = 0; k < BLOCK; k += 16) store_bf16(dst + k, load(static_cast<const float*>(x) + k));
      } else {  // a partial block (padding columns): element by element, zeros past n
        for (int64_t k = 0; k < BLOCK; ++k)
          dst[k] = k >= n   ? 0
                   : x_bf16 ? static_cast<const uint16_t*>(x)[k]
                            : f32_to_bf16(static_cast<const float*>(x)[k]);
      }
      if (panels) {
        panels::widen_in_order(dst, xf.data() + r * K + b * BLOCK, BLOCK);
      } else if (widen) {
        bf16::widen_row(dst, xf.data() + r * K + b * BLOCK, BLOCK);
      }
      return;
    }
    s[r * nb + b] = quantize_block(x, x_bf16, n, BLOCK, q.data() + r * K + b * BLOCK, sum.data() + r * nb + b,
                                   with_magnitudes ? magnitude.data() + r * K + b * BLOCK : nullptr);
  }

  void store_row(int64_t r, const float* x, int64_t k_real) {
    for (int64_t b = 0; b < nb; ++b) {
      const int64_t n = k_real - b * BLOCK;
      store_block(r, b, x + b * BLOCK, 0, n < 0 ? 0 : (n < BLOCK ? n : BLOCK));
    }
  }
};

struct Buffers {
  std::vector<float> ln_attn, ln_mlp, qkv, up, gate, out_attn, out_mlp;
  std::vector<float> q, part_stats, part_acc;  // long rows' attention: queries, then each part's results
  std::vector<Partial> parts;
  std::vector<int64_t> part_start;
  std::vector<int64_t> slot;  // each row's place among the last layer's output rows (-1: none), see run_layers
  Activations a_qkv, a_up, a_dense, a_down;
};

void resize(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// erf for 16 float32 lanes: x clamped to [-4, 4], then an odd rational function of x (degree 13 over degree 8),
// absolute error below 5e-7.
inline F32x16 erf16(F32x16 x) {
  x = min(max(x, set1(-4.f)), set1(4.f));
  const F32x16 x2 = mul(x, x);
  F32x16 p = set1(-2.72614225801306e-10f);
  for (float c : {2.77068142495902e-08f, -2.10102402082508e-06f, -5.69250639462346e-05f, -7.34990630326855e-04f,
                  -2.95459980854025e-03f, -1.60960333262415e-02f})
    p = fmadd(p, x2, set1(c));
  F32x16 q = set1(-1.45660718464996e-05f);
  for (float c : {-2.13374055278905e-04f, -1.68282697438203e-03f, -7.37332916720468e-03f, -1.42647390514189e-02f})
    q = fmadd(q, x2, set1(c));
  return div(mul(x, p), q);
}

inline F32x16 gelu16(F32x16 v) {
  return mul(mul(set1(0.5f), v), add(set1(1.f), erf16(mul(v, set1(0.70710678118654752f)))));
}

// The exact GELU, x * (1 + erf(x / sqrt 2)) / 2, of n values (any count) from x into y.
void gelu(const float* x, int64_t n, float* y) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) store(y + i, gelu16(load(x + i)));
  if (i < n) {  // the tail through a zero-padded copy
    alignas(64) float tail[16] = {};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    store(tail, gelu16(load(tail)));
    std::memcpy(y + i, tail, (n - i) * sizeof(float));
  }
}

// SwiGLU's silu(gate) * up of n values into y.
void swiglu(const float* gate, const float* up, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// Rotate one head vector v[d] in place by a position's cos / sin [d] (NeoX halves: x1 cos - x2 sin, x2 cos + x1 sin).
void rotate(float* v, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = v[i], b = v[i + h];
    v[i] = a * cos[i] - b * sin[i];
    v[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

void store_vector(const float* src, void* dst, int bf16, int64_t n) {
  if (bf16) {
    for (int64_t i = 0; i < n; ++i) static_cast<uint16_t*>(dst)[i] = f32_to_bf16(src[i]);
  } else {
    std::memcpy(dst, src, n * sizeof(float));
  }
}

static_assert(TILE == panels::PANEL, "a thread's share of tiles is also its share of weight panels");

// Rows 0..R-1 of y[:, 16 t0 : 16 t1] for tiles t0 .. t1-1 of W against activations a. bfloat16 weights go as one
// range of rows, so that the register blocks (bf16::NR rows) meet a range's end once rather than every tile's;
// or, for prompt rows (a.panels), as the weight panels of bf16_panels.h, each widened once for all the rows.
void matmul_tiles(const Weight& W, const Activations& a, int64_t t0, int64_t t1, int64_t R, float* y) {
  if (t0 >= t1) return;
  if (W.bits == 16 && a.panels) {
    const uint16_t* w = reinterpret_cast<const uint16_t*>(W.w);
    for (int64_t m = 0; m < R; m += panels::MC) {  // chunks of rows whose column blocks stay in L2
      const int64_t rows = R - m < panels::MC ? R - m : panels::MC;
      panels::panel_sums(a.xf.data() + m * a.K, rows, a.K, w, W.n, t0, t1, y + m * W.n, W.n);
    }
    return;
  }
  if (W.bits == 16) {  // many rows (a prompt chunk's tokens) in blocks that stay in cache, as bf16_gemm.cpp does
    const uint16_t* w = reinterpret_cast<const uint16_t*>(W.w);
    for (int64_t m = 0; m < R; m += bf16::M_BLOCK) {
      const int64_t rows = R - m < bf16::M_BLOCK ? R - m : bf16::M_BLOCK, at = m * a.K;
      bf16::weight_rows_of(a.xb.data() + at, a.K, a.widen ? a.xf.data() + at : nullptr, rows, w, a.K, t0 * TILE,
                           t1 * TILE, y + m * W.n, W.n);
    }
    return;
  }
  for (int64_t t = t0; t < t1; ++t)
    for (int64_t m = 0; m < R; m += MR) {
      const int rows = static_cast<int>(R - m < MR ? R - m : MR);
      weight_tile(a.q.data(), a.magnitude.data(), a.s.data(), a.sum.data(), m, rows, a.K, BLOCK, W.group,
                  static_cast<int>(W.bits), W.w, W.scales, t, y, W.n, 0);
    }
}

// Whether two of the R rows start in the same cache block: rows of one request (or of requests sharing a cached
// prompt prefix, where this only costs a barrier).
bool rows_share_blocks(const Rows* rows, int64_t R) {
  std::vector<int64_t> first(R);
  for (int64_t r = 0; r < R; ++r) first[r] = rows->block_tables[r * rows->tb];
  std::sort(first.begin(), first.end());
  return std::adjacent_find(first.begin(), first.end()) != first.end();
}

struct ThreadScratch {  // one per thread: a group's queries and attention output in the cache's dtype
  std::vector<float> q;
  std::vector<float> out;
  std::vector<float> gelu;
};

// Every layer of `shape` on x [R, hidden] (see falcon_decode_layers); `prompt_panels`: bfloat16 matmuls through
// weight panels (falcon_prompt_layers). `out_rows` (n_out distinct rows; n_out < 0: every row): the rows whose
// output is read. The others' last layer stops once their K/V are stored (see falcon_prompt_layers).
void run_layers(const Shape* shape, const Layer* layers, const Rows* rows, float* x, int64_t R, const float* cos,
                const float* sin, int nthreads, bool prompt_panels, const int64_t* out_rows, int64_t n_out) {
  const int64_t H = shape->hidden, Hq = shape->heads, G = shape->groups, d = shape->head_dim;
  const int64_t per_group = Hq / G, group_width = (per_group + 2) * d;
  const int bf16 = static_cast<int>(shape->kv_bf16);
  const int64_t elem = bf16 ? 2 : 4;
  const float eps = static_cast<float>(shape->eps), scale = 1.f / std::sqrt(static_cast<float>(d));
  const Layer& first = layers[0];  // every layer has the same shapes
  const bool llama = shape->llama != 0;
  const bool sequential = llama || shape->sequential != 0;  // the MLP reads the residual after the attention's add
  const bool rotary = rows->alibi == nullptr;                // else ALiBi's score bias, and no cos / sin
  // Falcon: one QKV output per row, [n_qkv]; the Llama layout: q, k and v outputs, each [R][its n] in turn.
  const int64_t n_q = first.qkv.n, n_k = llama ? first.k.n : 0, n_v = llama ? first.v.n : 0;
  const int64_t n_qkv = n_q + n_k + n_v, n_up = first.up.n;

  static thread_local Buffers caller;
  Buffers& buf = caller;  // the calling thread's, shared by every thread of the region below
  resize(buf.ln_attn, R * H);
  resize(buf.ln_mlp, R * H);
  resize(buf.qkv, R * n_qkv);
  resize(buf.up, R * n_up);
  if (llama) resize(buf.gate, R * n_up);
  resize(buf.out_attn, R * H);
  resize(buf.out_mlp, R * H);
  buf.a_qkv.resize(R, first.qkv.k, first.qkv.bits, prompt_panels);
  buf.a_up.resize(R, first.up.k, first.up.bits, prompt_panels);
  buf.a_dense.resize(R, first.dense.k, first.dense.bits, prompt_panels);
  buf.a_down.resize(R, first.down.k, first.down.bits, prompt_panels);
  for (int64_t r = 0; r < R; ++r)  // the attention output's padding columns, if any, stay zero
    for (int64_t b = Hq * d / BLOCK; b < buf.a_dense.nb; ++b) buf.a_dense.store_block(r, b, nullptr, 0, 0);

  const int64_t qkv_tiles = n_qkv / TILE, up_tiles = n_up / TILE, out_tiles = H / TILE;
  const int64_t in_tiles = sequential ? qkv_tiles : qkv_tiles + up_tiles;  // sequential: MLP-in comes later
  // bfloat16 register blocks of bf16::NR weight rows end on a share's end only if it holds whole blocks.
  const int64_t bf16_align =
      first.qkv.bits == 16 && !prompt_panels ? bf16::NR / std::gcd<int64_t>(TILE, bf16::NR) : 1;
  const Shares in_shares = shares_of(in_tiles, R * TILE * first.qkv.k, nthreads, bf16_align);
  const Shares dense_shares = shares_of(out_tiles, R * TILE * first.dense.k, nthreads, bf16_align);
  const Shares down_shares = shares_of(out_tiles, R * TILE * first.down.k, nthreads, bf16_align);
  const Shares mlp_in_shares =  // sequential blocks': Llama's gate and up, falcon-rw's up
      shares_of((llama ? 2 : 1) * up_tiles, R * TILE * first.up.k, nthreads, bf16_align);
  // The last layer's output rows go through its attention, MLP and output matmuls at their place among them,
  // slot[r]; every row stores its K/V. Elsewhere a row's place is its own index.
  std::vector<int64_t>& slot = buf.slot;
  const bool all_out = n_out < 0;
  slot.assign(R, -1);
  int64_t kept = 0;  // places given, at most R: a row named twice or out of range takes none
  for (int64_t j = 0; j < (all_out ? R : n_out); ++j) {
    const int64_t r = all_out ? j : out_rows[j];
    if (r >= 0 && r < R && slot[r] < 0) slot[r] = kept++;
  }
  // A matmul's output element k with its bias, if any.
  auto biased = [](const float* out, const float* bias, int64_t k) { return bias ? out[k] + bias[k] : out[k]; };
  // x[r] += MLP-out + attention-out (the parallel branches) of the row at place j of layer P's outputs; in a
  // sequential block the attention's was added before the MLP's input norm, so only the MLP's is left.
  auto add_branches = [&](int64_t r, int64_t j, const Layer& P) {
    const float *mlp = buf.out_mlp.data() + j * H, *attn = buf.out_attn.data() + j * H;
    for (int64_t k = 0; k < H; ++k)
      x[r * H + k] += sequential ? biased(mlp, P.down_b, k) : biased(mlp, P.down_b, k) + biased(attn, P.dense_b, k);
  };
  // Row r's query heads of KV group g, its key and its value in the QKV outputs.
  float* const q_out = buf.qkv.data();
  float* const k_out = q_out + R * n_q;
  float* const v_out = k_out + R * n_k;
  auto group_queries = [&](int64_t r, int64_t g) {
    return llama ? q_out + r * n_q + g * per_group * d : q_out + r * n_qkv + g * group_width;
  };
  auto group_key = [&](int64_t r, int64_t g) {
    return llama ? k_out + r * n_k + g * d : q_out + r * n_qkv + g * group_width + per_group * d;
  };
  auto group_value = [&](int64_t r, int64_t g) {
    return llama ? v_out + r * n_v + g * d : q_out + r * n_qkv + g * group_width + (per_group + 1) * d;
  };
  const int64_t attention_units = R * G;
  std::vector<int64_t>& part_start = buf.part_start;  // (row, group) rg's parts are part_start[rg] .. [rg + 1]
  part_start.assign(attention_units + 1, 0);
  for (int64_t rg = 0; rg < attention_units; ++rg) {
    const int64_t length = rows->context_lens[rg / G], parts = (length + PART_KEYS - 1) / PART_KEYS;
    part_start[rg + 1] = part_start[rg] + (parts > 1 ? parts : 0);
  }
  const int64_t total_parts = part_start[attention_units];
  // Rows of one request (a prompt chunk's tokens, each a row up to itself) read the K/V that the others write in
  // this same step: then every row's K/V is stored before any row attends, in a loop of its own.
  const bool store_first = rows_share_blocks(rows, R);
  // A group of more than 16 query heads is attended as 16-head vectors, shared between the threads (at batch 1,
  // one thread would otherwise attend alone while the others wait): then it is prepared first, attended after.
  const int64_t vectors = head_vectors(per_group);
  const bool attend_after = store_first || vectors > 1;
  if (total_parts > 0 || attend_after) resize(buf.q, attention_units * per_group * d);
  if (total_parts > 0) {
    resize(buf.part_stats, 2 * total_parts * per_group);
    resize(buf.part_acc, total_parts * per_group * d);
    buf.parts.resize(total_parts);
    for (int64_t u = 0; u < total_parts; ++u)
      buf.parts[u] = Partial{buf.part_stats.data() + 2 * u * per_group, buf.part_stats.data() + (2 * u + 1) * per_group,
                             buf.part_acc.data() + u * per_group * d};
  }
  const int64_t down_blocks = buf.a_down.nb;  // the MLP-out matmul's input blocks per row: where the GELU goes
  const int64_t wanted = (GELU_UNITS_PER_THREAD * nthreads + R - 1) / std::max<int64_t>(R, 1);  // units per row
  const int64_t units_per_row = std::clamp<int64_t>(wanted, 1, (down_blocks + GELU_MIN_BLOCKS - 1) / GELU_MIN_BLOCKS);
  const int64_t gelu_blocks = (down_blocks + units_per_row - 1) / units_per_row;  // per unit
  const int64_t gelu_chunks = (down_blocks + gelu_blocks - 1) / gelu_blocks;    // units per row, as rounded

  // The matmuls' shares: QKV and MLP-in, attention-out, MLP-out; in a sequential block QKV, attention-out, MLP-in
  // (Llama's gate and up), MLP-out.
  const int64_t phases = sequential ? 4 : 3;
  Deals deals(phases * shape->layers, nthreads);
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t tid = omp_get_thread_num(), nt = omp_get_num_threads();
    static thread_local ThreadScratch ts;
    resize(ts.q, group_width);  // as bytes: enough for per_group heads in either dtype
    resize(ts.out, per_group * d);
    resize(ts.gelu, BLOCK);
    for (int64_t li = 0; li < shape->layers; ++li) {
      const Layer& L = layers[li];
      const bool last = li + 1 == shape->layers;
      const int64_t RL = last ? kept : R;  // the rows past QKV: the last layer's output rows, else all
      auto at = [&](int64_t r) { return last ? slot[r] : r; };  // a row's place among them (-1: none)
      const int64_t gelu_units = sequential ? 0 : RL * gelu_chunks;  // (a sequential block's comes later)
      // 1. The previous layer's residual add, then LayerNorm(s), in the QKV and MLP-in matmuls' input form.
      for (int64_t r = tid; r < R; r += nt) {
        if (li > 0) add_branches(r, r, layers[li - 1]);
        float* a = buf.ln_attn.data() + r * H;
        if (llama) {
          rms_norm(x + r * H, H, L.ln_attn_w, eps, a);
        } else {
          layer_norm(x + r * H, H, L.ln_attn_w, L.ln_attn_b, eps, a);
        }
        buf.a_qkv.store_row(r, a, H);
        const int64_t j = at(r);
        if (j < 0 || sequential) continue;
        if (L.ln_mlp_w != nullptr) {
          float* m = buf.ln_mlp.data() + j * H;
          layer_norm(x + r * H, H, L.ln_mlp_w, L.ln_mlp_b, eps, m);
          buf.a_up.store_row(j, m, H);
        } else {
          buf.a_up.store_row(j, a, H);
        }
      }
#pragma omp barrier
      // 2. QKV and MLP-in matmuls, QKV's tiles then MLP-in's, dealt out in shares (shares.h).
      deals.take(phases * li, tid, in_shares, [&](int64_t lo, int64_t hi) {
        if (llama) {  // q, k, v: each weight's tiles in turn, into its own outputs
          const int64_t qt = n_q / TILE, kt = n_k / TILE;
          matmul_tiles(L.qkv, buf.a_qkv, lo, std::min(hi, qt), R, q_out);
          matmul_tiles(L.k, buf.a_qkv, std::max(lo, qt) - qt, std::min(hi, qt + kt) - qt, R, k_out);
          matmul_tiles(L.v, buf.a_qkv, std::max(lo, qt + kt) - qt - kt, hi - qt - kt, R, v_out);
          return;
        }
        matmul_tiles(L.qkv, buf.a_qkv, lo, std::min(hi, qkv_tiles), R, buf.qkv.data());
        matmul_tiles(L.up, buf.a_up, std::max(lo, qkv_tiles) - qkv_tiles, hi - qkv_tiles, RL, buf.up.data());
      });
#pragma omp barrier
      // 3. Attention per (row, KV group) and the GELU in chunks, shared out as threads come free.
      const CacheView cache{static_cast<const char*>(rows->k) + li * rows->layer_stride * elem,
                            static_cast<const char*>(rows->v) + li * rows->layer_stride * elem,
                            rows->sb, rows->sp, rows->sg, rows->block_size};
      // The QKV bias (Falcon's, side by side as the outputs), rotary on the group's queries and key (not with
      // ALiBi), its new K/V into the cache, its queries (cache dtype) to q.
      auto prepare_group = [&](int64_t r, int64_t g, void* q) {
        const int64_t pos = rows->context_lens[r] - 1;
        float* const queries = group_queries(r, g);
        float* const key = group_key(r, g);
        if (L.qkv_b != nullptr && !llama) {
          const float* bias = L.qkv_b + g * group_width;
          for (int64_t k = 0; k < group_width; ++k) queries[k] += bias[k];
        }
        if (rotary) {
          for (int64_t j = 0; j < per_group; ++j) rotate(queries + j * d, cos + r * d, sin + r * d, d);
          rotate(key, cos + r * d, sin + r * d, d);
        }
        const int64_t* table = rows->block_tables + r * rows->tb;
        const int64_t at = li * rows->layer_stride + table[pos / rows->block_size] * rows->sb +
                           (pos % rows->block_size) * rows->sp + g * rows->sg;
        store_vector(key, static_cast<char*>(rows->k) + at * elem, bf16, d);
        store_vector(group_value(r, g), static_cast<char*>(rows->v) + at * elem, bf16, d);
        store_vector(queries, q, bf16, per_group * d);
      };
      // The MLP's activation (GELU; SwiGLU in the Llama layout) of one unit of blocks, into the MLP-out's input.
      auto gelu_chunk = [&](int64_t unit) {
        const int64_t r = unit / gelu_chunks, c = unit % gelu_chunks, k_real = L.down.k_real;
        for (int64_t b = c * gelu_blocks; b < (c + 1) * gelu_blocks && b < down_blocks; ++b) {
          const int64_t n = k_real - b * BLOCK < 0 ? 0 : (k_real - b * BLOCK < BLOCK ? k_real - b * BLOCK : BLOCK);
          const int64_t at = r * n_up + b * BLOCK;
          if (llama) {
            swiglu(buf.gate.data() + at, buf.up.data() + at, n, ts.gelu.data());
          } else {
            if (L.up_b != nullptr)
              for (int64_t k = 0; k < n; ++k) buf.up[at + k] += L.up_b[b * BLOCK + k];
            gelu(buf.up.data() + at, n, ts.gelu.data());
          }
          buf.a_down.store_block(r, b, ts.gelu.data(), 0, n);
        }
      };
      // Heads j0 .. j1 - 1 of out ([per_group][d]) into the attention-out matmul's input.
      auto quantize_heads = [&](int64_t r, int64_t g, const void* out, int out_bf16, int64_t j0, int64_t j1) {
        const int64_t b0 = (g * per_group + j0) * d / BLOCK, size = out_bf16 ? 2 : 4;
        const char* from = static_cast<const char*>(out) + j0 * d * size;
        for (int64_t b = 0; b < (j1 - j0) * d / BLOCK; ++b)
          buf.a_dense.store_block(r, b0 + b, from + b * BLOCK * size, out_bf16, BLOCK);
      };
      auto split = [&](int64_t rg) { return part_start[rg + 1] > part_start[rg]; };
      auto queries = [&](int64_t rg) { return reinterpret_cast<char*>(buf.q.data()) + rg * per_group * d * elem; };
      auto attend_whole = [&](int64_t r, int64_t g, const void* q, int64_t vector) {  // one 16-head vector
        attend_group(q, ts.out.data(), bf16, per_group, d, cache, rows->block_tables + r * rows->tb, 0,
                     rows->context_lens[r], g, scale, nullptr, rows->alibi, rows->alibi_ld, {vector, vector + 1});
        quantize_heads(at(r), g, ts.out.data(), bf16, vector * 16, std::min(per_group, (vector + 1) * 16));
      };
      // A short row: prepare, attend, quantize in one unit. A long one (or any, with attend_after): prepared
      // here, attended below (in parts, if long; else by 16-head vectors).
#pragma omp for schedule(dynamic, 1)
      for (int64_t u = 0; u < attention_units + gelu_units; ++u) {
        if (u >= attention_units) {
          gelu_chunk(u - attention_units);
        } else if (split(u) || attend_after) {
          prepare_group(u / G, u % G, queries(u));
        } else if (at(u / G) < 0) {
          prepare_group(u / G, u % G, ts.q.data());  // its K/V stored, nothing to attend for
        } else {
          prepare_group(u / G, u % G, ts.q.data());
          attend_whole(u / G, u % G, ts.q.data(), 0);  // (the group's only vector: attend_after is false)
        }
      }  // (each loop's end is a barrier)
      if (attend_after) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < attention_units * vectors; ++u) {
          const int64_t rg = u / vectors;
          if (!split(rg) && at(rg / G) >= 0) attend_whole(rg / G, rg % G, queries(rg), u % vectors);
        }
      }
      if (total_parts > 0) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < total_parts; ++u) {
          const int64_t rg = std::upper_bound(part_start.begin(), part_start.end(), u) - part_start.begin() - 1;
          const int64_t r = rg / G, begin = (u - part_start[rg]) * PART_KEYS;
          if (at(r) < 0) continue;
          const int64_t end = std::min(begin + PART_KEYS, rows->context_lens[r]);
          attend_group(queries(rg), nullptr, bf16, per_group, d, cache, rows->block_tables + r * rows->tb, begin,
                       end, rg % G, scale, &buf.parts[u], rows->alibi, rows->alibi_ld);
        }
#pragma omp for schedule(static)
        for (int64_t rg = 0; rg < attention_units; ++rg) {
          if (!split(rg) || at(rg / G) < 0) continue;
          combine_parts(&buf.parts[part_start[rg]], part_start[rg + 1] - part_start[rg], per_group, d, ts.out.data());
          quantize_heads(at(rg / G), rg % G, ts.out.data(), 0, 0, per_group);
        }
      }
      // 4. Attention-out and MLP-out matmuls, added to the residual at the next layer's start (or below, after
      // the last). One weight after the other, not a tile of each in turn: with int4, that made four streams at
      // once (two weights and their scales), which read about 10% slower than two.
      deals.take(phases * li + 1, tid, dense_shares, [&](int64_t lo, int64_t hi) {
        matmul_tiles(L.dense, buf.a_dense, lo, hi, RL, buf.out_attn.data());
      });
      if (sequential) {
        // 5. The attention's output added to the residual, then the MLP's norm; 6. the MLP-in matmuls (Llama's
        // gate and up); 7. the activation in chunks, as int8 blocks (or bfloat16) for the MLP-out matmul below.
#pragma omp barrier
        for (int64_t r = tid; r < R; r += nt) {
          const int64_t j = at(r);
          if (j < 0) continue;
          const float* attn = buf.out_attn.data() + j * H;
          for (int64_t k = 0; k < H; ++k) x[r * H + k] += biased(attn, L.dense_b, k);
          float* m = buf.ln_mlp.data() + j * H;
          if (llama) {
            rms_norm(x + r * H, H, L.ln_mlp_w, eps, m);
          } else {
            layer_norm(x + r * H, H, L.ln_mlp_w, L.ln_mlp_b, eps, m);
          }
          buf.a_up.store_row(j, m, H);
        }
#pragma omp barrier
        deals.take(phases * li + 2, tid, mlp_in_shares, [&](int64_t lo, int64_t hi) {
          if (!llama) {
            matmul_tiles(L.up, buf.a_up, lo, hi, RL, buf.up.data());
            return;
          }
          matmul_tiles(L.gate, buf.a_up, lo, std::min(hi, up_tiles), RL, buf.gate.data());
          matmul_tiles(L.up, buf.a_up, std::max(lo, up_tiles) - up_tiles, hi - up_tiles, RL, buf.up.data());
        });
#pragma omp barrier
#pragma omp for schedule(dynamic, 1)
        for (int64_t unit = 0; unit < RL * gelu_chunks; ++unit) gelu_chunk(unit);
      }
      deals.take(phases * li + phases - 1, tid, down_shares, [&](int64_t lo, int64_t hi) {
        matmul_tiles(L.down, buf.a_down, lo, hi, RL, buf.out_mlp.data());
      });
#pragma omp barrier
    }
    for (int64_t r = tid; r < R; r += nt)
      if (slot[r] >= 0) add_branches(r, slot[r], layers[shape->layers - 1]);  // the last layer's output rows
  }
}

}  // namespace

extern "C" {

// Runs every layer of `shape` on x [R, hidden] (float32, the residual stream, updated in place) for one new
// token per row: row r is at position context_lens[r] - 1 with rotary cos / sin [R, head_dim] (float32), and
// its new K/V are written at that position of `rows`' cache before it attends. out_rows / n_out as for
// falcon_prompt_layers below (n_out < 0: every row, as for a decode step's rows).
void falcon_decode_layers(const Shape* shape, const Layer* layers, const Rows* rows, float* x, int64_t R,
                          const float* cos, const float* sin, int nthreads, const int64_t* out_rows, int64_t n_out) {
  run_layers(shape, layers, rows, x, R, cos, sin, nthreads, false, out_rows, n_out);
}

// The same for the tokens of prompt chunks, a row each (each up to itself): bfloat16 matmuls run through weight
// panels widened once for all the rows, as falcon_gemm_bf16 does, rather than the decode rows' row blocks. Each
// row's sums still run in one fixed order (the panels'), whatever the other rows; that order differs from
// falcon_decode_layers'. Quantized weights run as there.
//
// Only the rows in out_rows (n_out distinct row indices; n_out < 0: every row) leave with their hidden state
// after every layer: the rows whose logits are read, a chunk's last token or none, unless the prompt is scored.
// The others' last layer stores their K/V and stops, as llama.cpp's graph drops the tokens it outputs nothing for:
// attention, the MLP and the output matmuls run for the output rows alone, and those rows' results are the same
// bits as with every row (each row is summed alone). The other rows of x hold their state before the last layer.
void falcon_prompt_layers(const Shape* shape, const Layer* layers, const Rows* rows, float* x, int64_t R,
                          const float* cos, const float* sin, int nthreads, const int64_t* out_rows, int64_t n_out) {
  run_layers(shape, layers, rows, x, R, cos, sin, nthreads, true, out_rows, n_out);
}

// Sizes and field offsets of the structs that falconlm/native/decode.py mirrors with ctypes, in declaration
// order ([sizeof, offsetof each field] per struct): the Python side compares them when the library loads.
int64_t falcon_struct_layout(int64_t* out) {
  int64_t n = 0;
#define FALCON_FIELDS(S, ...)                                    \
  out[n++] = sizeof(S);                                          \
  for (int64_t offset : {__VA_ARGS__}) out[n++] = offset;
  FALCON_FIELDS(Weight, offsetof(Weight, w), offsetof(Weight, scales), offsetof(Weight, n), offsetof(Weight, k),
                offsetof(Weight, k_real), offsetof(Weight, group), offsetof(Weight, bits))
  FALCON_FIELDS(Layer, offsetof(Layer, qkv), offsetof(Layer, dense), offsetof(Layer, up), offsetof(Layer, down),
                offsetof(Layer, ln_attn_w), offsetof(Layer, ln_attn_b), offsetof(Layer, ln_mlp_w),
                offsetof(Layer, ln_mlp_b), offsetof(Layer, k), offsetof(Layer, v), offsetof(Layer, gate),
                offsetof(Layer, qkv_b), offsetof(Layer, dense_b), offsetof(Layer, up_b), offsetof(Layer, down_b))
  FALCON_FIELDS(Shape, offsetof(Shape, layers), offsetof(Shape, hidden), offsetof(Shape, heads),
                offsetof(Shape, groups), offsetof(Shape, head_dim), offsetof(Shape, eps), offsetof(Shape, kv_bf16),
                offsetof(Shape, llama), offsetof(Shape, sequential))
  FALCON_FIELDS(Rows, offsetof(Rows, k), offsetof(Rows, v), offsetof(Rows, layer_stride), offsetof(Rows, sb),
                offsetof(Rows, sp), offsetof(Rows, sg), offsetof(Rows, block_size), offsetof(Rows, block_tables),
                offsetof(Rows, tb), offsetof(Rows, context_lens), offsetof(Rows, alibi), offsetof(Rows, alibi_ld))
  FALCON_FIELDS(Run, offsetof(Run, embed), offsetof(Run, head), offsetof(Run, norm_w), offsetof(Run, norm_b),
                offsetof(Run, norm_eps), offsetof(Run, cos), offsetof(Run, sin), offsetof(Run, table_rows),
                offsetof(Run, stops), offsetof(Run, stops_per_row), offsetof(Run, act_bf16))
#undef FALCON_FIELDS
  return n;
}

}  // extern "C"
