// The fused decode step's interface (decode.cpp, decode_run.cpp): the structs that falconlm/native/decode.py
// mirrors with ctypes (falcon_struct_layout checks the two agree), and the LayerNorm both files run.
#pragma once

#include <cmath>
#include <cstdint>

#include "quant_tiles.h"  // ACTIVATION_BLOCK
#include "simd.h"

namespace falcon {

struct Weight {  // bits 8 / 4: VNNI-tiled (quant_tiles.h), k padded; bits 16: bfloat16 [n][k] row-major, no scales
  const uint8_t* w;
  const void* scales;
  int64_t n, k, k_real, group, bits;
};

// Falcon: qkv is the fused QKV projection (each KV group's queries, key and value side by side), up / down the
// MLP's. The Llama layout (Falcon3): qkv is q_proj, up is up_proj, and k, v, gate hold k_proj, v_proj and gate_proj.
struct Layer {
  Weight qkv, dense, up, down;
  const float *ln_attn_w, *ln_attn_b;  // float32 [hidden]; the biases null for RMSNorm
  const float *ln_mlp_w, *ln_mlp_b;    // null when the layer has one LayerNorm for both branches
  Weight k, v, gate;                   // the Llama layout's (unread in Falcon's)
  const float *qkv_b, *dense_b, *up_b, *down_b;  // Falcon's matmul biases, float32 [n] (falcon-rw); null: none
};

struct Shape {
  int64_t layers, hidden, heads, groups, head_dim;
  double eps;
  int64_t kv_bf16;  // the cache's dtype: bfloat16 (1) or float32 (0)
  int64_t llama;    // the Llama layout (1): RMSNorm, attention then a SwiGLU MLP, each added to the residual
  int64_t sequential;  // Falcon's sequential block (falcon-rw, 1): LayerNorm, attention, added; LayerNorm, MLP, added
};

struct Rows {  // where each row's K/V live (see CacheView), and the row lengths after this step
  void* k;
  void* v;
  int64_t layer_stride, sb, sp, sg, block_size;
  const int64_t* block_tables;
  int64_t tb;
  const int64_t* context_lens;
  const float* alibi;  // ALiBi models: the score bias, float32 [positions][alibi_ld] by key position and query head
  int64_t alibi_ld;    // (16 floats readable past the last head); null for rotary models, whose cos / sin are given
};

// What a decode run (falcon_decode_run) needs beyond the layers: the token embedding, the final LayerNorm, the
// output head, the rotary tables and each row's stop tokens.
struct Run {
  Weight embed;  // bits 16 / 32: a bfloat16 / float32 table [n][k_real]; bits 8 / 4: a tied head's tiles
  Weight head;   // bits 16: bfloat16 [n][k] (falcon_linear_bf16); bits 8 / 4: tiles (falcon_qlinear)
  const float *norm_w, *norm_b;  // the final LayerNorm, float32 [hidden] (RMSNorm: norm_b null), and its epsilon
  double norm_eps;
  const float *cos, *sin;        // rotary tables, float32 [table_rows][head_dim]: row p for position p (ALiBi:
  int64_t table_rows;            // null, and table_rows counts the rows' bias table's positions)
  const int64_t* stops;  // [R][stops_per_row] token ids that end a row's request (-1: none)
  int64_t stops_per_row;
  int64_t act_bf16;  // the activations' dtype (embedding rows, the head's input and logits): bfloat16 (1) / float32
};

// y = (x - mean) / sqrt(var + eps) * w + b over H (a multiple of 16) float32 values.
inline void layer_norm(const float* x, int64_t H, const float* w, const float* b, float eps, float* y) {
  F32x16 acc = zero();
  for (int64_t i = 0; i < H; i += 16) acc = add(acc, load(x + i));
  const F32x16 m = set1(reduce_add(acc) / static_cast<float>(H));
  acc = zero();
  for (int64_t i = 0; i < H; i += 16) {
    const F32x16 c = sub(load(x + i), m);
    acc = fmadd(c, c, acc);
  }
  const F32x16 inv = set1(1.f / std::sqrt(reduce_add(acc) / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < H; i += 16)
    store(y + i, fmadd(mul(sub(load(x + i), m), inv), load(w + i), load(b + i)));
}

// y = x / sqrt(mean(x^2) + eps) * w over H (a multiple of 16) float32 values: RMSNorm.
inline void rms_norm(const float* x, int64_t H, const float* w, float eps, float* y) {
  F32x16 acc = zero();
  for (int64_t i = 0; i < H; i += 16) {
    const F32x16 v = load(x + i);
    acc = fmadd(v, v, acc);
  }
  const F32x16 inv = set1(1.f / std::sqrt(reduce_add(acc) / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < H; i += 16) store(y + i, mul(mul(load(x + i), inv), load(w + i)));
}

}  // namespace falcon
