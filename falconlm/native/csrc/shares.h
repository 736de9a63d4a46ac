// Work shares: how a matmul's weight rows are dealt out to the threads of a parallel region.
//
// Each thread owns a contiguous run of the rows, as in a static split, and takes it in shares, one after the
// other; a thread that has finished its own run then takes the shares its neighbours have not started. A served
// model shares its cores with the server's event loop: when the OS gives one core to it for a while, the other
// threads take over the rest of that core's run, so the call is late by about half the time lost instead of all
// of it. With nothing in the way, every thread streams its own run from start to end, as before. Shares hold
// about SHARE_MACS multiply-adds (tens of microseconds), so the last share taken costs little waiting.
//
// Where a share ends changes which thread computes an output, never how: every output is one sum in a fixed
// order (bf16_tiles.h, bf16_panels.h, quant_tiles.h), so results do not depend on the shares nor the threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>

namespace falcon {

constexpr int64_t SHARE_MACS = int64_t{1} << 22;
constexpr int64_t SHARES_PER_RUN = 4;

// units 0 .. units - 1 (weight tiles or register blocks): thread t of n owns the run [run_start(t, n),
// run_start(t + 1, n)), which it takes in shares of `size` from its start. Runs and shares hold whole groups of
// `align` units (a register block that spans several), except at the end.
struct Shares {
  int64_t units, size, align;
  int64_t run_start(int64_t t, int64_t n) const {
    const int64_t groups = (units + align - 1) / align;
    return std::min(units, groups * t / n * align);
  }
};

// Shares of `units` that cost macs_per_unit multiply-adds each, at least SHARES_PER_RUN to a thread's run.
inline Shares shares_of(int64_t units, int64_t macs_per_unit, int nthreads, int64_t align = 1) {
  const int64_t most = (units + SHARES_PER_RUN * nthreads - 1) / (SHARES_PER_RUN * std::max(1, nthreads));
  int64_t size = std::clamp<int64_t>(SHARE_MACS / std::max<int64_t>(1, macs_per_unit), 1, std::max<int64_t>(1, most));
  size = (size + align - 1) / align * align;
  return {units, size, align};
}

// How many shares each thread's run has taken, for every phase (a loop over shares) of one parallel region:
// zero to begin with, one counter per cache line.
class Deals {
 public:
  Deals(int64_t phases, int threads) : threads_(threads), taken_(new Counter[phases * threads]) {}

  // Run fn(begin, end) for shares of `shares` in phase `phase`, as thread `tid` of this region: its own run, then
  // what is left of the others'. Not a barrier: the phase's results are complete after the next one.
  template <typename Fn>
  void take(int64_t phase, int tid, const Shares& shares, Fn&& fn) {
    Counter* taken = taken_.get() + phase * threads_;
    for (int i = 0; i < threads_; ++i) {
      const int owner = (tid + i) % threads_;
      const int64_t start = shares.run_start(owner, threads_), end = shares.run_start(owner + 1, threads_);
      for (;;) {
        const int64_t begin = start + taken[owner].n.fetch_add(1, std::memory_order_relaxed) * shares.size;
        if (begin >= end) break;
        fn(begin, std::min(begin + shares.size, end));
      }
    }
  }

 private:
  struct alignas(64) Counter {
    std::atomic<int64_t> n{0};
  };
  int threads_;
  std::unique_ptr<Counter[]> taken_;
};

}  // namespace falcon
