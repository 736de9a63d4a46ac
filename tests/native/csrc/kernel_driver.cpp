// A command-line driver for the native kernels, so that a cross-compiled build (the ARM NEON variant under
// qemu-user) can be checked against the scalar reference run through ctypes. Reads one case from a file and
// writes the result to another:
//
//   kernel_driver linear    IN OUT   IN: M K N, x bf16 [M, K], w bf16 [N, K]             OUT: y bf16 [M, N]
//   kernel_driver qlinear   IN OUT   IN: bits M K N G, x f32 [M, K], w, scales (sizes)  OUT: y f32 [M, N]
//   kernel_driver argmax    IN OUT   IN: M N, x f32 [M, N]                               OUT: i64 [M]
//   kernel_driver attention IN OUT   IN: R Hq G d blocks block_size width, q, k, v f32, tables, lens i64
//                                    OUT: f32 [R, Hq, d]
//
// Every header field is an int64; arrays follow in the order listed. Prints the build's instruction set.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" {
const char* falcon_isa();
void falcon_linear_bf16(const uint16_t*, int64_t, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, int);
void falcon_qlinear(const void*, int, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int, const uint8_t*,
                    const void*, int64_t, void*, int, int);
void falcon_argmax_rows(const void*, int, int64_t, int64_t, int64_t, int64_t*, int);
void falcon_decode_attention(const void*, int, int64_t, int64_t, int64_t, int64_t, const void*, const void*, int64_t,
                             int64_t, int64_t, int64_t, const int64_t*, int64_t, const int64_t*, float, void*, int);
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
  if (op == "linear") {
    const int64_t M = r.field(), K = r.field(), N = r.field();
    const uint16_t* x = r.array<uint16_t>(M * K);
    const uint16_t* w = r.array<uint16_t>(N * K);
    std::vector<uint16_t> y(M * N);
    falcon_linear_bf16(x, M, K, K, w, N, y.data(), 2);
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
                            1.f / std::sqrt(static_cast<float>(d)), out.data(), 2);
    write(argv[3], out);
  } else {
    std::fprintf(stderr, "unknown op %s\n", op.c_str());
    return 2;
  }
  return 0;
}
