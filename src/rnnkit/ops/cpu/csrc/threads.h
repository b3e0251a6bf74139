// Threads and buffers: the per-call buffers (kept for reuse, buffers.cpp), the OpenMP region
// the fused loops run in with the barrier its threads meet at (threads.cpp), and the split of
// an elementwise pass over the (B, H) grid.
#pragma once

#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace rnnkit_cpu {

using at::Tensor;

// A buffer that one call fills (uninitialised). From 1 MiB on it comes from a cache of blocks
// that earlier calls freed (at most 256 MiB kept), already mapped: a training loop reuses its
// memory each step rather than faulting it in afresh (buffers.cpp).
Tensor call_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts);

// The barrier the threads of one run_threads region meet at once per step. It spins for a
// bounded time, then sleeps on a futex. libgomp's `#pragma omp barrier` spins far longer
// (GOMP_SPINCOUNT, 300000 rounds unless set before torch loads): when a competing process
// takes the core of one thread, the other spins on its own core until the scheduler's time
// slice (milliseconds) gives the first its core back. Sleeping leaves the core idle, and the
// scheduler moves the waiting-to-run thread onto it.
class StepBarrier {
 public:
  explicit StepBarrier(int64_t threads) : threads_(threads) {}
  void wait() {
    const uint32_t phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == threads_) {
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(phase + 1, std::memory_order_seq_cst);
      if (sleepers_.load(std::memory_order_seq_cst) > 0) wake();
      return;
    }
    if (!spin(phase)) sleep(phase);
  }
  // After the region: tells contended_recently() whether its threads often had to sleep.
  void report() const;

 private:
  bool spin(uint32_t phase) const;  // true once the phase moved on; false after the bound
  void sleep(uint32_t phase);
  void wake();

  const int64_t threads_;
  alignas(64) std::atomic<int64_t> arrived_{0};
  alignas(64) std::atomic<uint32_t> phase_{0};  // the futex word: a 32-bit counter (rounds)
  std::atomic<int32_t> sleepers_{0};
  std::atomic<int64_t> slept_{0};  // waits that slept a millisecond or more
};

// Whether a recent region's threads slept at its barrier for a millisecond or more in more
// than a few of its steps (far longer than an uneven split of the work ever makes them wait:
// another process held a core). Cleared a second after the last such region, so that a machine that
// quietens gets its threads back.
bool contended_recently();

// The barrier of the run_threads region this thread runs in (nullptr outside one).
StepBarrier*& current_barrier();

// Waits for the other threads of the enclosing run_threads region; nothing outside one.
inline void step_barrier() {
  if (StepBarrier* barrier = current_barrier()) barrier->wait();
}

// Runs fn(thread) on `threads` OpenMP threads of one parallel region (fn may meet the others
// at step_barrier()), each marked to ATen as inside a parallel region so nested
// at::parallel_for runs serially; with one thread, or without OpenMP, runs fn(0) alone.
template <typename F>
void run_threads(int64_t threads, const F& fn) {
#ifdef _OPENMP
  if (threads > 1) {
    StepBarrier barrier(threads);
#pragma omp parallel num_threads(threads)
    {
      at::internal::ThreadIdGuard guard(omp_get_thread_num());
      StepBarrier*& current = current_barrier();
      StepBarrier* outer = current;
      // libgomp may grant fewer threads than asked (nested or limited): then no barrier.
      current = omp_get_num_threads() == threads ? &barrier : nullptr;
      fn(omp_get_thread_num());
      current = outer;
    }
    barrier.report();
    return;
  }
#endif
  fn(0);
}

// The fused loops' frame: on `threads` threads, step_fn(thread, step, from, to) runs the steps
// [step0, step1) in order, reading the state from `from` and writing the next one into `to`,
// which alternate between h and h_spare (`size` elements each); the threads meet at one
// barrier after each step. The final state ends in h.
template <typename T, typename F>
void double_buffered_steps(int64_t threads, int64_t step0, int64_t step1, T* h, T* h_spare,
                           int64_t size, const F& step_fn) {
  T* h_now = h;
  run_threads(threads, [&](int64_t thread) {
    T* from = h;
    for (int64_t step = step0; step < step1; ++step) {
      T* to = from == h ? h_spare : h;
      step_fn(thread, step, from, to);
      from = to;
      step_barrier();
    }
    if (thread == 0) h_now = from;
  });
  if (h_now != h) std::copy(h_now, h_now + size, h);
}

// Threads worth waking for one step of B x Hout x G*H multiply-adds: a 256 KiB W_hh (B=1,
// H=128) streams from L2 at about 1.8 us per core, so splitting it pays even with a barrier
// per step; a step far smaller than that runs on one thread. So do steps of up to 2^18
// multiply-adds (about 10 us on one core) while another process competes for the cores: a
// thread that loses its core then stalls the others at every barrier, and the split's gain
// is a few microseconds a step.
// The split loops need OpenMP (the build passes -fopenmp); without it, one thread.
inline int64_t lstm_threads(int64_t B, int64_t Hout, int64_t H, int64_t panels,
                            int64_t G = 4) {
#ifdef _OPENMP
  const int64_t step = B * Hout * G * H;
  if (at::in_parallel_region() || step < (int64_t(1) << 15)) return 1;
  if (step <= (int64_t(1) << 18) && contended_recently()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), panels));
#else
  return 1;
#endif
}

// Threads for a loop split by batch rows (layer norm): each takes at least 4 rows, so a
// thread's product keeps the micro-kernel's row blocks; a small batch runs on one thread.
inline int64_t norm_row_threads(int64_t B) {
#ifdef _OPENMP
  if (at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / 4));
#else
  return 1;
#endif
}

// Runs fn(b, j0, j1) over the (B, H) grid, split across threads only when the step is big
// enough to pay for waking them (a B=1, H=128 step is far below that).
template <typename F>
void for_rows(int64_t B, int64_t H, int64_t cost_per_element, const F& fn) {
  const int64_t grain = std::max<int64_t>(1, 16384 / cost_per_element);
  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    while (begin < end) {
      const int64_t b = begin / H;
      const int64_t j0 = begin % H;
      const int64_t j1 = std::min(H, j0 + (end - begin));
      fn(b, j0, j1);
      begin += j1 - j0;
    }
  });
}

}  // namespace rnnkit_cpu
