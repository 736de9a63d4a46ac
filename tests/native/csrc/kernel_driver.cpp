// A command-line driver for the native kernels, so that a cross-compiled build (the ARM NEON variant under
// qemu-user) can be checked against the scalar reference run through ctypes. Reads one case from a file and
// writes the result to another:
//
//   kernel_driver linear    IN OUT   IN: M K N, x bf16 [M, K], w bf16 [N, K]             OUT: y bf16 [M, N]
//   kernel_driver qlinear   IN OUT   IN: bits M K N G, x f32 [M, K], w, scales (sizes)  OUT: y f32 [M, N]
//   kernel_driver argmax    IN OUT   IN: M N, x f32 [M, N]                               OUT: i64 [M]
//   kernel_driver attention IN OUT   IN: R Hq G d blocks block_size width, q, k, v f32, tables, lens i64
//                                    OUT: f32 [R, Hq, d]
//   kernel_driver decode    IN OUT   IN: L H Hq G d blocks block_size R tb kv_bf16 two_ln, then per layer and
//                                    matrix (qkv dense up down) bits n k k_real group w_bytes s_bytes, w, scales,
//                                    then per layer ln_attn_w ln_attn_b (and ln_mlp_w ln_mlp_b when two_ln) f32 [H],
//                                    k, v [L, blocks, block_size, G, d] (bf16 bits when kv_bf16, else f32), tables
//                                    i64 [R, tb], lens i64 [R], cos, sin f32 [R, d], x f32 [R, H]
//                                    OUT: x f32 [R, H], then k, v in the cache's dtype (falcon_decode_layers, eps 1e-5)
//
// Every header field is an int64; arrays follow in the order listed (decode's headers are
// interleaved with them). Prints the build's instruction set.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "decode_structs.h"  // the fused step's structs (falconlm/native/csrc)

using falcon::Layer;
using falcon::Rows;
using falcon::Shape;
using falcon::Weight;

extern "C" {
const char* falcon_isa();
void falcon_linear_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int);
void falcon_gemm_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int);
void falcon_qlinear(const void*, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, const uint8_t*,
                    const void*, int64_t, void*, int, int);
void falcon_argmax_rows(const void*, int, int64_t, int64_t, int64_t, int64_t*, int);
void falcon_decode_layers(const Shape*, const Layer*, const Rows*, float*, int64_t, const float*, const float*, int,
                          const int64_t*, int64_t);
void falcon_decode_attention(const void*, int, int64_t, int64_t, int64_t, int64_t, const void*, const void*, int64_t,
                             int64_t, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, float, void*, int,
                             const float*, int64_t);
}

namespace {

struct Reader {
  std::vector<char> bytes;
  size_t at = 0;
  int64_t field() {
    int64_t v;
    std::memcpy(&v, bytes.data() + at, 8);
    at += 8;
    return v;
  }
  template <typename T>
  const T* array(int64_t n) {
    const T* p = reinterpret_cast<const T*>(bytes.data() + at);
    at += n * sizeof(T);
    return p;
  }
};

template <typename T>
void write(const char* path, const std::vector<T>& out) {
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(out.data()), out.size() * sizeof(T));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: kernel_driver OP IN OUT\n");
    return 2;
  }
  std::ifstream in(argv[2], std::ios::binary);
  Reader r{std::vector<char>(std::istreambuf_iterator<char>(in), {})};
  const std::string op = argv[1];
  std::printf("%s\n", falcon_isa());
  if (op == "linear" || op == "gemm") {
    const int64_t M = r.field(), K = r.field(), N = r.field();
    const uint16_t* x = r.array<uint16_t>(M * K);
    const uint16_t* w = r.array<uint16_t>(N * K);
    std::vector<uint16_t> y(M * N);
    (op == "linear" ? falcon_linear_bf16 : falcon_gemm_bf16)(x, M, K, K, w, N, y.data(), 2);
    write(argv[3], y);
  } else if (op == "qlinear") {
    const int64_t bits = r.field(), M = r.field(), K = r.field(), N = r.field(), G = r.field();
    const int64_t w_bytes = r.field(), s_bytes = r.field();
    const float* x = r.array<float>(M * K);
    const uint8_t* w = r.array<uint8_t>(w_bytes);
    const char* scales = r.array<char>(s_bytes);
    std::vector<float> y(M * N);
    falcon_qlinear(x, 0, M, K, K, K, 32, G, static_cast<int>(bits), w, scales, N, y.data(), 0, 2);
    write(argv[3], y);
  } else if (op == "argmax") {
    const int64_t M = r.field(), N = r.field();
    const float* x = r.array<float>(M * N);
    std::vector<int64_t> out(M);
    falcon_argmax_rows(x, 0, M, N, N, out.data(), 2);
    write(argv[3], out);
  } else if (op == "attention") {
    const int64_t R = r.field(), Hq = r.field(), G = r.field(), d = r.field(), blocks = r.field();
    const int64_t block_size = r.field(), width = r.field();
    const float* q = r.array<float>(R * Hq * d);
    const float* k = r.array<float>(blocks * block_size * G * d);
    const float* v = r.array<float>(blocks * block_size * G * d);
    const int64_t* tables = r.array<int64_t>(R * width);
    const int64_t* lens = r.array<int64_t>(R);
    std::vector<float> out(R * Hq * d);
    falcon_decode_attention(q, 0, R, Hq, G, d, k, v, block_size * G * d, G * d, d, block_size, tables, width, lens,
                            1.f / std::sqrt(static_cast<float>(d)), out.data(), 2, nullptr, 0);
    write(argv[3], out);
  } else if (op == "decode") {
    const int64_t L = r.field(), H = r.field(), Hq = r.field(), G = r.field(), d = r.field();
    const int64_t blocks = r.field(), block_size = r.field(), R = r.field(), tb = r.field();
    const int64_t kv_bf16 = r.field(), two_ln = r.field();
    std::vector<Layer> layers(L);
    for (Layer& layer : layers) {
      for (Weight* w : {&layer.qkv, &layer.dense, &layer.up, &layer.down}) {
        w->bits = r.field(), w->n = r.field(), w->k = r.field(), w->k_real = r.field(), w->group = r.field();
        const int64_t w_bytes = r.field(), s_bytes = r.field();
        w->w = r.array<uint8_t>(w_bytes);
        w->scales = s_bytes ? r.array<char>(s_bytes) : nullptr;
      }
    }
    for (Layer& layer : layers) {
      layer.ln_attn_w = r.array<float>(H), layer.ln_attn_b = r.array<float>(H);
      layer.ln_mlp_w = two_ln ? r.array<float>(H) : nullptr;
      layer.ln_mlp_b = two_ln ? r.array<float>(H) : nullptr;
    }
    const int64_t cache = L * blocks * block_size * G * d, cache_bytes = cache * (kv_bf16 ? 2 : 4);
    std::vector<float> x(R * H);
    std::vector<char> kv(2 * cache_bytes);
    std::memcpy(kv.data(), r.array<char>(2 * cache_bytes), 2 * cache_bytes);  // k then v
    const int64_t* tables = r.array<int64_t>(R * tb);
    const int64_t* lens = r.array<int64_t>(R);
    const float* cos = r.array<float>(R * d);
    const float* sin = r.array<float>(R * d);
    std::memcpy(x.data(), r.array<float>(R * H), R * H * sizeof(float));
    const Shape shape{L, H, Hq, G, d, 1e-5, kv_bf16};
    const Rows rows{kv.data(), kv.data() + cache_bytes, blocks * block_size * G * d, block_size * G * d, G * d, d,
                    block_size, tables, tb, lens};
    falcon_decode_layers(&shape, layers.data(), &rows, x.data(), R, cos, sin, 2, nullptr, -1);
    std::ofstream(argv[3], std::ios::binary)
        .write(reinterpret_cast<const char*>(x.data()), x.size() * sizeof(float))
        .write(kv.data(), kv.size());
  } else {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    return 2;
  }
  return 0;
}
