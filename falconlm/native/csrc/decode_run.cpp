// A decode run: several greedy decode steps of the same rows in one call, each step's input the tokens the step
// before chose (vLLM's multi-step scheduling, with the sampling done here too). Each step is what the engine's
// single step computes, through the same entry points: the token embedding, every layer (falcon_decode_layers),
// the final LayerNorm (falcon_final_norm), the output head (falcon_linear_bf16 or falcon_qlinear) and the
// argmax (falcon_argmax_rows), so a row's tokens are the same bits whether the engine runs its steps one by one
// or in runs. What a run spares is the Python between steps: at batch 1 about 0.5 ms a step on bench-1b, run
// right after the weights have streamed through the caches.

#include <cstdint>
#include <cstring>
#include <vector>

#include "decode_structs.h"
#include "simd.h"

extern "C" {
void falcon_decode_layers(const falcon::Shape* shape, const falcon::Layer* layers, const falcon::Rows* rows,
                          float* x, int64_t R, const float* cos, const float* sin, int nthreads,
                          const int64_t* out_rows, int64_t n_out);
void falcon_qlinear(const void* x, int x_bf16, int64_t M, int64_t k_real, int64_t ldx, int64_t K, int64_t B,
                    int64_t G, int bits, const uint8_t* w, const void* scales, int64_t N, void* y, int y_bf16,
                    int nthreads);
void falcon_qrows(const uint8_t* w, const void* scales, int bits, int64_t K, int64_t k_real, int64_t G,
                  const int64_t* ids, int64_t R, void* y, int y_bf16);
void falcon_linear_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t ldx, const uint16_t* w, int64_t N,
                        uint16_t* y, int nthreads);
void falcon_argmax_rows(const void* x, int x_bf16, int64_t M, int64_t N, int64_t ldx, int64_t* out, int nthreads);
}

namespace {

using namespace falcon;

// The final LayerNorm (RMSNorm where b is null) of rows x [R, H] (float32) into y [R, H], bfloat16 (rounded to
// nearest even) or float32.
void final_norm(const float* x, int64_t R, int64_t H, const float* w, const float* b, float eps, void* y,
                int y_bf16) {
  std::vector<float> row(y_bf16 ? H : 0);
  for (int64_t r = 0; r < R; ++r) {
    float* out = y_bf16 ? row.data() : static_cast<float*>(y) + r * H;
    if (b == nullptr) {
      rms_norm(x + r * H, H, w, eps, out);
    } else {
      layer_norm(x + r * H, H, w, b, eps, out);
    }
    if (y_bf16)
      for (int64_t i = 0; i < H; ++i) static_cast<uint16_t*>(y)[r * H + i] = f32_to_bf16(row[i]);
  }
}

// Rows ids[0 .. R) of the embedding into x [R, H] (float32): as the model's embedding gives them in the
// activations' dtype, then widened.
void embed_rows(const Weight& E, const int64_t* ids, int64_t R, int64_t H, int act_bf16, float* x,
                std::vector<uint16_t>& scratch) {
  if (E.bits == 32) {
    for (int64_t r = 0; r < R; ++r)
      std::memcpy(x + r * H, reinterpret_cast<const float*>(E.w) + ids[r] * H, H * sizeof(float));
    return;
  }
  const uint16_t* rows = reinterpret_cast<const uint16_t*>(E.w);
  if (E.bits != 16) {  // a tied head's tiles, dequantized as its embedding does
    scratch.resize(R * H * (act_bf16 ? 1 : 2));
    falcon_qrows(E.w, E.scales, static_cast<int>(E.bits), E.k, E.k_real, E.group, ids, R, scratch.data(), act_bf16);
    if (!act_bf16) {
      std::memcpy(x, scratch.data(), R * H * sizeof(float));
      return;
    }
    rows = scratch.data();
  }
  for (int64_t r = 0; r < R; ++r) {
    const uint16_t* row = E.bits == 16 ? rows + ids[r] * H : rows + r * H;
    for (int64_t i = 0; i < H; ++i) x[r * H + i] = bf16_to_f32(row[i]);
  }
}

}  // namespace

extern "C" {

// The final LayerNorm (Falcon3's RMSNorm: b null) of the residual stream x [R, H] (float32) into y [R, H]
// (bfloat16 when y_bf16, else float32): what follows the layers in every fused step, single or in a run.
void falcon_final_norm(const float* x, int64_t R, int64_t H, const float* w, const float* b, double eps, void* y,
                       int y_bf16) {
  final_norm(x, R, H, w, b, static_cast<float>(eps), y, y_bf16);
}

// Up to `steps` greedy decode steps of R rows. tokens [steps + 1][R]: row block 0 holds each row's input token,
// at position rows->context_lens[r] - 1 (whose KV the first step writes); step s writes block s + 1, the argmax of
// its logits, which is step s + 1's input one position on. Every position a run reaches must have its cache slot
// in the rows' block tables and its rotary row in the run's tables (for ALiBi, cos / sin null: its row in the
// rows' bias table, whose rows table_rows counts). The run stops after the first step in which
// a row chose one of its stop tokens; returns how many steps ran.
int64_t falcon_decode_run(const Shape* shape, const Layer* layers, const Rows* rows, const Run* run, int64_t R,
                          int64_t steps, int64_t* tokens, int nthreads) {
  const int64_t H = shape->hidden, d = shape->head_dim, V = run->head.n;
  const int act_bf16 = static_cast<int>(run->act_bf16), elem = act_bf16 ? 2 : 4;
  std::vector<int64_t> lengths(rows->context_lens, rows->context_lens + R);
  Rows at = *rows;
  at.context_lens = lengths.data();
  std::vector<float> x(R * H), cos(R * d), sin(R * d);
  std::vector<uint16_t> scratch;
  std::vector<char> act(R * H * elem), logits(R * V * elem);
  for (int64_t s = 0; s < steps; ++s) {
    for (int64_t r = 0; r < R; ++r)
      if (lengths[r] > run->table_rows) return s;  // (the caller grows the tables first)
    embed_rows(run->embed, tokens + s * R, R, H, act_bf16, x.data(), scratch);
    for (int64_t r = 0; r < R && run->cos != nullptr; ++r) {  // (ALiBi: no rotary)
      const int64_t pos = lengths[r] - 1;
      std::memcpy(cos.data() + r * d, run->cos + pos * d, d * sizeof(float));
      std::memcpy(sin.data() + r * d, run->sin + pos * d, d * sizeof(float));
    }
    falcon_decode_layers(shape, layers, &at, x.data(), R, cos.data(), sin.data(), nthreads, nullptr, -1);
    final_norm(x.data(), R, H, run->norm_w, run->norm_b, static_cast<float>(run->norm_eps), act.data(), act_bf16);
    const Weight& W = run->head;
    if (W.bits == 16) {
      falcon_linear_bf16(reinterpret_cast<const uint16_t*>(act.data()), R, H, H,
                         reinterpret_cast<const uint16_t*>(W.w), V, reinterpret_cast<uint16_t*>(logits.data()),
                         nthreads);
    } else {
      falcon_qlinear(act.data(), act_bf16, R, W.k_real, W.k_real, W.k, ACTIVATION_BLOCK, W.group,
                     static_cast<int>(W.bits), W.w, W.scales, V, logits.data(), act_bf16, nthreads);
    }
    int64_t* chosen = tokens + (s + 1) * R;
    falcon_argmax_rows(logits.data(), act_bf16, R, V, V, chosen, nthreads);
    bool stop = false;
    for (int64_t r = 0; r < R; ++r) {
      for (int64_t j = 0; j < run->stops_per_row; ++j) stop |= run->stops[r * run->stops_per_row + j] == chosen[r];
      ++lengths[r];
    }
    if (stop) return s + 1;
  }
  return steps;
}

}  // extern "C"
