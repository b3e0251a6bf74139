// Threads and buffers: the per-call buffers (kept for reuse, buffers.cpp), the OpenMP region
// the fused loops run in, and the split of an elementwise pass over the (B, H) grid.
#pragma once

#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace rnnkit_cpu {

using at::Tensor;

// A buffer that one call fills (uninitialised). From 1 MiB on it comes from a cache of blocks
// that earlier calls freed (at most 256 MiB kept), already mapped: a training loop reuses its
// memory each step rather than faulting it in afresh (buffers.cpp).
Tensor call_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts);

// Runs fn(thread) on `threads` OpenMP threads of one parallel region (fn may meet the others
// at `#pragma omp barrier`), each marked to ATen as inside a parallel region so nested
// at::parallel_for runs serially; with one thread, or without OpenMP, runs fn(0) alone.
template <typename F>
void run_threads(int64_t threads, const F& fn) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      at::internal::ThreadIdGuard guard(omp_get_thread_num());
      fn(omp_get_thread_num());
    }
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
#ifdef _OPENMP
      if (threads > 1) {
#pragma omp barrier
      }
#endif
    }
    if (thread == 0) h_now = from;
  });
  if (h_now != h) std::copy(h_now, h_now + size, h);
}

// Threads worth waking for one step of B x Hout x G*H multiply-adds: a 256 KiB W_hh (B=1,
// H=128) streams from L2 at about 1.8 us per core, so splitting it pays even with a barrier
// per step; a step far smaller than that runs on one thread.
// The split loops need OpenMP (the build passes -fopenmp); without it, one thread.
inline int64_t lstm_threads(int64_t B, int64_t Hout, int64_t H, int64_t panels,
                            int64_t G = 4) {
#ifdef _OPENMP
  if (at::in_parallel_region() || B * Hout * G * H < (int64_t(1) << 15)) return 1;
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
