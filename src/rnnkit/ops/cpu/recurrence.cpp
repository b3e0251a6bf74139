// rnnkit's compiled CPU recurrence: the whole time loop of one layer in one direction,
// forward and backward (BPTT), for RNN (named activations), GRU (both formulations) and
// LSTM (optionally projected), in float32 and float64; and the layers' input projection.
//
// The math is exactly rnnkit.cells' step functions; rnnkit.ops.reference is the twin the
// tests hold this file equal to. Per step there is one product with W_hh (two for GRU with
// reset_after=False, one more for the LSTM projection) into preallocated buffers, then one
// fused elementwise pass. Backward computes the per-step gate gradients and leaves dW_hh to
// one big product after the loop. All products run on the register-blocked kernels below
// (matmul, vector_matrix), not on BLAS: they skip the per-call overhead that dominates small
// steps, and use the full vector width where the bundled MKL does not (AMD CPUs).
//
// Layout (row-major, as the Python side passes it): gates_x (T, B, G*H), h0 (B, Hout),
// c0 (B, H), weight_hh (G*H, Hout), bias_hh (G*H), weight_hr (Hout, H), lengths (B,) int64.
// A row b is "active" at time t when t < lengths[b]; inactive rows hold their state and
// write zero output, so a reverse pass starts at each sequence's own last step.
//
// The ops are declared (schema, fake and autograd) in rnnkit/ops/cpu/_ops.py; this file only
// adds their CPU kernels.

// Pick ATen's widest vector code the compiler targets (the build uses -march=native), before
// including it: Vectorized<T> then maps to AVX512 or AVX2 registers, with SLEEF's exp/tanh/erf.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif

#include <cstdlib>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

using at::Tensor;

namespace {

// A buffer that one call fills: at::empty, with its 2 MiB-aligned interior advised as
// transparent huge pages when it is large. glibc maps every buffer over 32 MiB afresh on each
// call, and under a hypervisor each first touch of a 4 KiB page faults at about 1 us: a
// (100, 64, 2048) float buffer took 13 ms to fill fresh, and 2.4 ms advised (measured here).
// The advice is only advice: where transparent huge pages are off, nothing changes.
Tensor call_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  Tensor t = at::empty(sizes, opts);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (t.nbytes() >= 8 * kHuge) {
    const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
    const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
    const uintptr_t last = (begin + t.nbytes()) & ~(kHuge - 1);
    if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#endif
  return t;
}

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

enum Mode : int64_t { kRNN = 0, kGRU = 1, kLSTM = 2 };
enum Activation : int64_t {
  kTanh = 0,
  kRelu = 1,
  kIdentity = 2,
  kSigmoid = 3,
  kSilu = 4,
  kGelu = 5,
  kSoftsign = 6,
  kHardtanh = 7,
};

// ---------------------------------------------------------------------------------------
// Elementwise math, on whole vectors. Each activation gives its value and its derivative at
// the same point, with torch's conventions at the kinks (relu'(0) = 0, hardtanh'(+-1) = 0).

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> sigmoid(const Vec<T>& x) {
  return Vec<T>(T(1)) / (Vec<T>(T(1)) + x.neg().exp());
}

// tanh. In float32, 1 - 2 / (exp(2x) + 1): one SLEEF exp instead of its slower tanh, within
// 1e-7 of tanh (float64 keeps SLEEF's 1-ulp tanh).
template <typename T>
inline Vec<T> tanh(const Vec<T>& x) {
  if constexpr (std::is_same_v<T, float>) {
    const Vec<T> one(T(1));
    return one - Vec<T>(T(2)) / ((x + x).exp() + one);
  } else {
    return x.tanh();
  }
}

// Activations whose derivative cannot be read off their output; only these save it.
constexpr bool keeps_derivative(int64_t activation) {
  return activation == kSilu || activation == kGelu;
}

template <int A, typename T>
inline Vec<T> activate(const Vec<T>& x, Vec<T>& derivative) {
  const Vec<T> one(T(1)), zero(T(0));
  if constexpr (A == kTanh) {
    const Vec<T> y = tanh(x);
    derivative = one - y * y;
    return y;
  } else if constexpr (A == kRelu) {
    derivative = x.gt(zero);
    return at::vec::maximum(x, zero);
  } else if constexpr (A == kIdentity) {
    derivative = one;
    return x;
  } else if constexpr (A == kSigmoid) {
    const Vec<T> y = sigmoid(x);
    derivative = y * (one - y);
    return y;
  } else if constexpr (A == kSilu) {
    const Vec<T> s = sigmoid(x);
    derivative = s * (one + x * (one - s));
    return x * s;
  } else if constexpr (A == kGelu) {
    const Vec<T> cdf = Vec<T>(T(0.5)) * (one + (x * Vec<T>(T(M_SQRT1_2))).erf());
    const Vec<T> pdf = (Vec<T>(T(-0.5)) * x * x).exp() * Vec<T>(T(0.5 * M_2_SQRTPI * M_SQRT1_2));
    derivative = cdf + x * pdf;
    return x * cdf;
  } else if constexpr (A == kSoftsign) {
    const Vec<T> denominator = one + x.abs();
    derivative = one / (denominator * denominator);
    return x / denominator;
  } else {
    static_assert(A == kHardtanh);
    derivative = x.gt(Vec<T>(T(-1))) * x.lt(one);
    return at::vec::clamp(x, Vec<T>(T(-1)), one);
  }
}

// The derivative at the point that produced output y (activations without a saved one).
template <int A, typename T>
inline Vec<T> derivative_from_output(const Vec<T>& y) {
  const Vec<T> one(T(1));
  if constexpr (A == kTanh) {
    return one - y * y;
  } else if constexpr (A == kRelu) {
    return y.gt(Vec<T>(T(0)));
  } else if constexpr (A == kIdentity) {
    return one;
  } else if constexpr (A == kSigmoid) {
    return y * (one - y);
  } else if constexpr (A == kSoftsign) {
    const Vec<T> rest = one - y.abs();  // = 1 / (1 + |x|)
    return rest * rest;
  } else if constexpr (A == kHardtanh) {
    return y.gt(Vec<T>(T(-1))) * y.lt(one);
  } else {
    static_assert(A == kSilu || A == kGelu, "this activation saves its derivative");
    return one;
  }
}

template <typename F>
void dispatch_activation(int64_t activation, F&& body) {
  switch (activation) {
    case kTanh: return body(std::integral_constant<int, kTanh>{});
    case kRelu: return body(std::integral_constant<int, kRelu>{});
    case kIdentity: return body(std::integral_constant<int, kIdentity>{});
    case kSigmoid: return body(std::integral_constant<int, kSigmoid>{});
    case kSilu: return body(std::integral_constant<int, kSilu>{});
    case kGelu: return body(std::integral_constant<int, kGelu>{});
    case kSoftsign: return body(std::integral_constant<int, kSoftsign>{});
    case kHardtanh: return body(std::integral_constant<int, kHardtanh>{});
    default: TORCH_CHECK(false, "rnnkit: unknown activation code ", activation);
  }
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

// Calls fn(j, count) over [j0, j1) in whole vectors, then one partial vector.
template <typename T, typename F>
inline void for_vectors(int64_t j0, int64_t j1, const F& fn) {
  constexpr int64_t width = Vec<T>::size();
  int64_t j = j0;
  for (; j + width <= j1; j += width) fn(j, width);
  if (j < j1) fn(j, j1 - j);
}

// y (N) = x (K, stride xs) M (K x N, k-major, leading dimension ldm) [+ y]: broadcast x[k]
// and FMA into eight vector accumulators per block of columns (eight hide the FMA latency).
template <typename T>
void vector_matrix(int64_t K, int64_t N, const T* x, int64_t xs, const T* M, int64_t ldm,
                   bool accumulate, T* y) {
  using V = Vec<T>;
  constexpr int64_t width = V::size();
  constexpr int64_t block = 8 * width;
  int64_t n0 = 0;
  for (; n0 + block <= N; n0 += block) {
    V acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = accumulate ? V::loadu(y + n0 + i * width) : V(T(0));
    for (int64_t k = 0; k < K; ++k) {
      const V xk(x[k * xs]);
      const T* row = M + k * ldm + n0;
      for (int i = 0; i < 8; ++i) acc[i] = at::vec::fmadd(xk, V::loadu(row + i * width), acc[i]);
    }
    for (int i = 0; i < 8; ++i) acc[i].store(y + n0 + i * width);
  }
  // Four vectors: even and odd k in separate accumulators, still eight chains.
  for (; n0 + 4 * width <= N; n0 += 4 * width) {
    V acc[2][4];
    for (int i = 0; i < 4; ++i) {
      acc[0][i] = accumulate ? V::loadu(y + n0 + i * width) : V(T(0));
      acc[1][i] = V(T(0));
    }
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
      for (int q = 0; q < 2; ++q) {
        const V xk(x[(k + q) * xs]);
        const T* row = M + (k + q) * ldm + n0;
        for (int i = 0; i < 4; ++i) {
          acc[q][i] = at::vec::fmadd(xk, V::loadu(row + i * width), acc[q][i]);
        }
      }
    }
    for (; k < K; ++k) {
      const V xk(x[k * xs]);
      for (int i = 0; i < 4; ++i) {
        acc[0][i] = at::vec::fmadd(xk, V::loadu(M + k * ldm + n0 + i * width), acc[0][i]);
      }
    }
    for (int i = 0; i < 4; ++i) (acc[0][i] + acc[1][i]).store(y + n0 + i * width);
  }
  for (; n0 < N; n0 += width) {
    const int64_t count = std::min(width, N - n0);
    V acc = accumulate ? V::loadu(y + n0, count) : V(T(0));
    for (int64_t k = 0; k < K; ++k) {
      acc = at::vec::fmadd(V(x[k * xs]), V::loadu(M + k * ldm + n0, count), acc);
    }
    acc.store(y + n0, count);
  }
}

// Vectors per column panel of the register-blocked kernel.
template <typename T>
constexpr int panel_vectors() {
  return Vec<T>::size() * sizeof(T) >= 64 ? 4 : 2;
}

// Rows per register block: 6 x 4 accumulators (plus 4 panel vectors and a broadcast) fit the
// 32 AVX512 registers; with 16 registers 4 x 2 do.
template <typename T>
constexpr int panel_rows() {
  return Vec<T>::size() * sizeof(T) >= 64 ? 6 : 4;
}

// Calls fn(std::integral_constant<int, R>{}, r) for the register blocks of rows [r0, r_end):
// whole blocks of panel_rows<T>() rows, then one block of the remaining rows.
template <typename T, typename F>
inline void for_row_blocks(int64_t r0, int64_t r_end, const F& fn) {
  constexpr int rows = panel_rows<T>();
  int64_t r = r0;
  for (; r + rows <= r_end; r += rows) fn(std::integral_constant<int, rows>{}, r);
  switch (r_end - r) {
    case 5: fn(std::integral_constant<int, 5>{}, r); break;
    case 4: fn(std::integral_constant<int, 4>{}, r); break;
    case 3: fn(std::integral_constant<int, 3>{}, r); break;
    case 2: fn(std::integral_constant<int, 2>{}, r); break;
    case 1: fn(std::integral_constant<int, 1>{}, r); break;
    default: break;
  }
}

// C (R x NV vectors) = A (R x K; element (r, k) at A[r * ars + k * aks]) M (K x NV vectors,
// k-major) [+ C, else + init (NV vectors, one row broadcast to all rows), else + 0], with
// every accumulator in a register.
template <typename T, int R>
inline void panel_kernel(int64_t K, const T* A, int64_t ars, int64_t aks, const T* M,
                         int64_t ldm, bool accumulate, T* C, int64_t ldc,
                         const T* init = nullptr) {
  using V = Vec<T>;
  constexpr int NV = panel_vectors<T>();
  constexpr int64_t width = V::size();
  V acc[R][NV];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = accumulate ? V::loadu(C + r * ldc + v * width)
                             : (init ? V::loadu(init + v * width) : V(T(0)));
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    V m[NV];
    for (int v = 0; v < NV; ++v) m[v] = V::loadu(M + k * ldm + v * width);
    for (int r = 0; r < R; ++r) {
      const V a(A[r * ars + k * aks]);
      for (int v = 0; v < NV; ++v) acc[r][v] = at::vec::fmadd(a, m[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < NV; ++v) acc[r][v].store(C + r * ldc + v * width);
  }
}

// C (R x N) = A (R x K, strided as in panel_kernel) M (K x N, k-major) [+ C], on ATen's
// vector registers: no BLAS call overhead per step, and full-width FMAs also where the
// bundled BLAS runs a narrower code path. Column panels are shared between threads when the
// product is large enough; K is cut into chunks whose panel stays in cache across row blocks.
template <typename T>
struct Packed;

template <typename T>
Packed<T> pack(int64_t K, int64_t N, const T* M, int64_t ldm, bool wanted, Tensor& storage);

template <typename T>
void matmul(int64_t R, int64_t K, int64_t N, const T* A, int64_t ars, int64_t aks, const T* M,
            int64_t ldm, bool accumulate, T* C, int64_t ldc, const Packed<T>* packed = nullptr,
            const T* bias = nullptr) {
  if (R == 0 || N == 0) return;
  if (accumulate) bias = nullptr;
  if (K == 0) {
    if (!accumulate) {
      for (int64_t r = 0; r < R; ++r) {
        if (bias) {
          std::copy(bias, bias + N, C + r * ldc);
        } else {
          std::fill(C + r * ldc, C + r * ldc + N, T(0));
        }
      }
    }
    return;
  }
  constexpr int64_t panel = panel_vectors<T>() * Vec<T>::size();
  // A panel's slice of M, k_chunk x panel, stays in L1/L2. C is written once per chunk, so a
  // K up to 1024 (a 256 KiB float32 slice, still in L2) is left whole.
  const int64_t k_chunk = K <= 1024 ? K : 256;
  constexpr int64_t r_chunk = 120;  // rows of A kept in L2 while the panels pass over them
  const int64_t panels = N / panel;
  const int64_t work = std::max<int64_t>(1, R * K * panel);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / work);
  // One tile: rows [r0, r_end) of C against panels [p0, p1).
  auto tile = [&](int64_t r0, int64_t r_end, int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n0 = p * panel;
      for (int64_t k0 = 0; k0 < K; k0 += k_chunk) {
        const int64_t kc = std::min(k_chunk, K - k0);
        const bool acc = accumulate || k0 > 0;
        const T* init = (!acc && bias) ? bias + n0 : nullptr;
        // A packed panel is contiguous (stride `panel`), which the prefetchers stream.
        const T* Mk = packed ? packed->panel(p, k0) : M + k0 * ldm + n0;
        const int64_t ldk = packed ? panel : ldm;
        for_row_blocks<T>(r0, r_end, [&](auto rows, int64_t r) {
          panel_kernel<T, decltype(rows)::value>(kc, A + r * ars + k0 * aks, ars, aks, Mk, ldk,
                                                 acc, C + r * ldc + n0, ldc, init);
        });
      }
    }
  };
  // Tall products whose A is read down its columns (ars == 1: the weight gradients, dW =
  // dY^T X): each k of a row block lands on a new cache line, aks elements on, and at such
  // power-of-two strides the lines of A (and of an unpacked M) crowd into a few L1 sets. So
  // each tile first copies its rows of A, a k chunk at a time, into k-major blocks, and M is
  // packed into panels once; the kernel then streams both.
  auto gathered_tile = [&](int64_t r0, int64_t r_end, const Packed<T>& m) {
    std::vector<T> block(static_cast<size_t>((r_end - r0) * std::min(k_chunk, K)));
    for (int64_t k0 = 0; k0 < K; k0 += k_chunk) {
      const int64_t kc = std::min(k_chunk, K - k0);
      // The register block of R rows from r at block[(r - r0) * kc], element (i, k) at k*R + i.
      for_row_blocks<T>(r0, r_end, [&](auto rows, int64_t r) {
        constexpr int R = decltype(rows)::value;
        T* out = block.data() + (r - r0) * kc;
        for (int64_t k = 0; k < kc; ++k) {
          const T* src = A + r + (k0 + k) * aks;
          for (int i = 0; i < R; ++i) out[k * R + i] = src[i];
        }
      });
      const bool acc = accumulate || k0 > 0;
      for (int64_t p = 0; p < panels; ++p) {
        const int64_t n0 = p * panel;
        const T* init = (!acc && bias) ? bias + n0 : nullptr;
        const T* Mk = m.panel(p, k0);
        for_row_blocks<T>(r0, r_end, [&](auto rows, int64_t r) {
          constexpr int R = decltype(rows)::value;
          panel_kernel<T, R>(kc, block.data() + (r - r0) * kc, 1, R, Mk, panel, acc,
                             C + r * ldc + n0, ldc, init);
        });
      }
    }
  };
  const int64_t row_chunks = (R + r_chunk - 1) / r_chunk;
  const int64_t threads = at::get_num_threads();
  // Only long products gain from it (dW at K = 6400: 280-320 -> 350-400 GFLOP/s); at K up to
  // 1024 the copies cost more than they save (an LSTM B=1, T=500 training step: +11%).
  if (row_chunks >= 2 * threads && ars == 1 && aks != 1 && panels > 0 && K > 1024) {
    Tensor storage;
    const Packed<T> m = packed ? *packed : pack<T>(K, N, M, ldm, true, storage);
    const int64_t chunks = (row_chunks + threads - 1) / threads * threads;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) gathered_tile(R * c / chunks, R * (c + 1) / chunks, m);
    });
  } else if (row_chunks >= 2 * threads) {
    // Tall products (input projection, its gradients): threads take rows, so each streams
    // only its share of A while the packed panels are shared. Equal chunks, a multiple of
    // the threads in number, so none waits on a last odd chunk.
    const int64_t chunks = (row_chunks + threads - 1) / threads * threads;
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) tile(R * c / chunks, R * (c + 1) / chunks, 0, panels);
    });
  } else {
    // One step's product: few rows, so threads take column panels.
    at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
      for (int64_t r0 = 0; r0 < R; r0 += r_chunk) tile(r0, std::min(R, r0 + r_chunk), p0, p1);
    });
  }
  if (panels * panel < N) {
    const int64_t n0 = panels * panel;
    at::parallel_for(0, R, std::max<int64_t>(1, grain * 4), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        if (bias) std::copy(bias + n0, bias + N, C + r * ldc + n0);
        vector_matrix<T>(K, N - n0, A + r * ars, aks, M + n0, ldm, accumulate || bias,
                         C + r * ldc + n0);
      }
    });
  }
}

// A k-major weight matrix (K x N) used at every step, with a panel-major copy of its full
// column panels ([panel][k][column], made once per call) for the register-blocked kernel.
template <typename T>
struct Packed {
  const T* M = nullptr;
  int64_t ldm = 0;
  const T* panels = nullptr;  // nullptr: not packed
  int64_t K = 0;              // rows per packed panel

  static constexpr int64_t width = panel_vectors<T>() * Vec<T>::size();
  const T* panel(int64_t p, int64_t k) const { return panels + (p * K + k) * width; }
  // The same matrix without its first k rows.
  Packed rows_from(int64_t k) const {
    return {M + k * ldm, ldm, panels ? panels + k * width : nullptr, K};
  }
  // The same matrix from column panel p on.
  Packed cols_from(int64_t p) const {
    return {M + p * width, ldm, panels ? panels + p * K * width : nullptr, K};
  }
};

template <typename T>
Packed<T> pack(int64_t K, int64_t N, const T* M, int64_t ldm, bool wanted, Tensor& storage) {
  constexpr int64_t width = Packed<T>::width;
  const int64_t count = N / width;
  if (!wanted || count == 0) return {M, ldm, nullptr, K};
  storage = call_buffer({count * K * width},
                        at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* out = storage.data_ptr<T>();
  at::parallel_for(0, count, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t k = 0; k < K; ++k) {
        std::copy(M + k * ldm + p * width, M + k * ldm + (p + 1) * width, out + (p * K + k) * width);
      }
    }
  });
  return {M, ldm, out, K};
}

// One step's product, y (B x N) = x (B x K) W (K x N) [+ y].
template <typename T>
void step_mm(int64_t B, int64_t K, int64_t N, const T* x, int64_t ldx, const Packed<T>& w,
             bool accumulate, T* y, int64_t ldy) {
  if (B == 1) {
    vector_matrix<T>(K, N, x, 1, w.M, w.ldm, accumulate, y);
    return;
  }
  matmul<T>(B, K, N, x, ldx, 1, w.M, w.ldm, accumulate, y, ldy, w.panels ? &w : nullptr);
}

struct Shape {
  int64_t T, B, H, Hout, G;
};

// Where a step's previous state lives: the initial state at a sequence's first step, else
// the output (or saved cell) of the neighbouring time step.
struct Steps {
  int64_t T;
  bool reverse;
  const int64_t* lengths;  // nullptr: every sequence is T long

  bool active(int64_t t, int64_t b) const { return lengths == nullptr || t < lengths[b]; }
  bool first(int64_t t, int64_t b) const {
    if (!reverse) return t == 0;
    return t == (lengths == nullptr ? T : lengths[b]) - 1;
  }
  int64_t previous(int64_t t) const { return reverse ? t + 1 : t - 1; }
};

// ---------------------------------------------------------------------------------------
// The LSTM step fused into its product. W_hh is packed once per call gate-interleaved: panel
// p holds, for each k, the four gates' columns of hidden units [p*U, (p+1)*U) (U = one
// vector), so a register block of R batch rows x 4 vectors ends holding all four
// pre-activations of U units, seeded with gates_x + b_hh. The cell math runs on the
// registers and writes h, c, the output and the saved gates directly: one pass, one parallel
// region per step, no (B, 4H) product buffer. Threads take panels (hidden units), so every
// thread reads the whole previous h: it is double-buffered.

template <typename T>
struct LstmStep {
  int64_t H, Hout, GH;
  const T* gx;     // this step's gates_x, (B, 4H)
  const T* bias;   // (4H)
  const T* h_in;   // previous state, (B, Hout)
  T* h_out;        // next state (B, H); nullptr with a projection (h is set after it)
  T* out;          // this step's output rows (B, H); unused with a projection
  T* m;            // with a projection: o * tanh(c), (B, H); else nullptr
  T* c;            // cell state (B, H), updated in place (each unit has one owner)
  T* cells;        // saved cell (B, H) or nullptr
  T* gates;        // saved activations (B, 4H) or nullptr
  const Steps* steps;
  int64_t t;
  // gx laid out per panel, (B, H / U, 4, U), as the in-loop projection writes it; else (B, 4H).
  bool interleaved = false;
};

template <typename T>
constexpr int64_t lstm_unit() {
  return Vec<T>::size();
}

// acc[r][g] += sum_k h[r, k] panel[k][g] for R rows of h (row stride Hout) and the G gates
// of U units in a gate-interleaved panel (Hout, G, U): one register block of the fused step.
template <typename T, int R, int G>
inline void gate_products(int64_t Hout, const T* h, const T* panel, Vec<T> (&acc)[R][G]) {
  using V = Vec<T>;
  constexpr int64_t U = Vec<T>::size();
  // Few rows have few accumulator chains: split k S ways to hide the FMA latency, up to about
  // 24 chains with 32 AVX512 registers (12 with AVX2's 16), beside G weights and a broadcast.
  constexpr int chains = Vec<T>::size() * sizeof(T) >= 64 ? 24 : 12;
  constexpr int S = std::max(1, std::min(4, chains / (R * G)));
  V part[S][R][G];
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) {
      part[0][r][g] = acc[r][g];
      for (int q = 1; q < S; ++q) part[q][r][g] = V(T(0));
    }
  }
  int64_t k = 0;
  if constexpr (S > 1) {
    for (; k + S <= Hout; k += S) {
      for (int q = 0; q < S; ++q) {
        const T* w = panel + (k + q) * G * U;
        V m[G];
        for (int g = 0; g < G; ++g) m[g] = V::loadu(w + g * U);
        for (int r = 0; r < R; ++r) {
          const V a(h[r * Hout + k + q]);
          for (int g = 0; g < G; ++g) part[q][r][g] = at::vec::fmadd(a, m[g], part[q][r][g]);
        }
      }
    }
  }
  for (; k < Hout; ++k) {
    const T* w = panel + k * G * U;
    V m[G];
    for (int g = 0; g < G; ++g) m[g] = V::loadu(w + g * U);
    for (int r = 0; r < R; ++r) {
      const V a(h[r * Hout + k]);
      for (int g = 0; g < G; ++g) part[0][r][g] = at::vec::fmadd(a, m[g], part[0][r][g]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) {
      for (int q = 1; q < S; ++q) part[0][r][g] = part[0][r][g] + part[q][r][g];
      acc[r][g] = part[0][r][g];
    }
  }
}

// Rows b0 .. b0+R of units u0 .. u0+U; panel is (Hout, 4, U).
template <typename T, int R>
inline void lstm_block(const LstmStep<T>& s, const T* panel, int64_t b0, int64_t u0) {
  using V = Vec<T>;
  constexpr int64_t U = lstm_unit<T>();
  const int64_t H = s.H, Hout = s.Hout;
  V acc[R][4];
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < 4; ++g) {
      const int64_t gx_at = s.interleaved ? 4 * u0 + g * U : g * H + u0;
      acc[r][g] = V::loadu(s.gx + (b0 + r) * s.GH + gx_at) + V::loadu(s.bias + g * H + u0);
    }
  }
  gate_products<T, R, 4>(Hout, s.h_in + b0 * Hout, panel, acc);
  const V zero(T(0));
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r;
    const bool on = s.steps->active(s.t, b);
    const V i = sigmoid(acc[r][0]), f = sigmoid(acc[r][1]);
    const V gg = tanh<T>(acc[r][2]), o = sigmoid(acc[r][3]);
    const int64_t at = b * H + u0;
    const V c_old = V::loadu(s.c + at);
    const V c_new = f * c_old + i * gg;
    const V y = o * tanh<T>(c_new);
    if (s.gates) {
      T* g = s.gates + b * 4 * H + u0;
      i.store(g), f.store(g + H), gg.store(g + 2 * H), o.store(g + 3 * H);
    }
    const V c_kept = on ? c_new : c_old;
    c_kept.store(s.c + at);
    if (s.cells) c_kept.store(s.cells + at);
    if (s.m) {
      y.store(s.m + at);
    } else {
      (on ? y : V::loadu(s.h_in + b * Hout + u0)).store(s.h_out + at);
      (on ? y : zero).store(s.out + at);
    }
  }
}

// The GRU step (reset after the product, torch's formulation) fused the same way: panel p
// holds, for each k, the r, z and n weights of hidden units [p*U, (p+1)*U), so a register
// block ends with r and z's pre-activations (seeded with gates_x + b_hh) and W_hn h + b_hn;
// the candidate and the new state are computed on the registers and written once.
template <typename T>
struct GruStep {
  int64_t H;
  const T* gx;     // this step's gates_x, (B, 3H)
  const T* bias;   // b_hh, (3H)
  const T* h_in;   // previous state, (B, H)
  T* h_out;        // next state, (B, H)
  T* out;          // this step's output rows, (B, H)
  T* gates;        // saved r, z, n, W_hn h + b_hn, (B, 4H), or nullptr
  const Steps* steps;
  int64_t t;
};

// Rows b0 .. b0+R of units u0 .. u0+U; panel is (H, 3, U).
template <typename T, int R>
inline void gru_block(const GruStep<T>& s, const T* panel, int64_t b0, int64_t u0) {
  using V = Vec<T>;
  const int64_t H = s.H;
  V acc[R][3];
  for (int r = 0; r < R; ++r) {
    const T* gx = s.gx + (b0 + r) * 3 * H + u0;
    acc[r][0] = V::loadu(gx) + V::loadu(s.bias + u0);
    acc[r][1] = V::loadu(gx + H) + V::loadu(s.bias + H + u0);
    acc[r][2] = V::loadu(s.bias + 2 * H + u0);
  }
  gate_products<T, R, 3>(H, s.h_in + b0 * H, panel, acc);
  const V zero(T(0)), one(T(1));
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r, at = b * H + u0;
    const V reset = sigmoid(acc[r][0]), update = sigmoid(acc[r][1]);
    const V cand = tanh<T>(V::loadu(s.gx + b * 3 * H + 2 * H + u0) + reset * acc[r][2]);
    const V h_old = V::loadu(s.h_in + at);
    const V y = (one - update) * cand + update * h_old;
    if (s.gates) {
      T* g = s.gates + b * 4 * H + u0;
      reset.store(g), update.store(g + H), cand.store(g + 2 * H), acc[r][2].store(g + 3 * H);
    }
    const bool on = s.steps->active(s.t, b);
    (on ? y : h_old).store(s.h_out + at);
    (on ? y : zero).store(s.out + at);
  }
}

// Panels [p0, p1) of one fused step, all B rows, for a block kernel of either cell.
template <typename T, typename Block>
void fused_panels(int64_t B, const T* packed, int64_t panel_size, int64_t p0, int64_t p1,
                  const Block& block) {
  constexpr int64_t U = Vec<T>::size();
  for (int64_t p = p0; p < p1; ++p) {
    const T* panel = packed + p * panel_size;
    for_row_blocks<T>(0, B, [&](auto rows, int64_t b) { block(rows, panel, b, p * U); });
  }
}

// Panels [p0, p1) of one fused LSTM step, all B rows; packed is (H / U panels, Hout, 4, U).
template <typename T>
void lstm_panels(const LstmStep<T>& s, int64_t B, const T* packed, int64_t p0, int64_t p1) {
  fused_panels<T>(B, packed, s.Hout * 4 * Vec<T>::size(), p0, p1,
                  [&](auto rows, const T* panel, int64_t b, int64_t u0) {
                    lstm_block<T, decltype(rows)::value>(s, panel, b, u0);
                  });
}

template <typename T>
void gru_panels(const GruStep<T>& s, int64_t B, const T* packed, int64_t p0, int64_t p1) {
  fused_panels<T>(B, packed, s.H * 3 * Vec<T>::size(), p0, p1,
                  [&](auto rows, const T* panel, int64_t b, int64_t u0) {
                    gru_block<T, decltype(rows)::value>(s, panel, b, u0);
                  });
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

// One fused LSTM step over all B rows.
template <typename T>
void lstm_step(const LstmStep<T>& s, int64_t B, const T* packed) {
  const int64_t panels = s.H / lstm_unit<T>();
  const int64_t threads = lstm_threads(B, s.Hout, s.H, panels);
  at::parallel_for(0, panels, (panels + threads - 1) / threads, [&](int64_t p0, int64_t p1) {
    lstm_panels<T>(s, B, packed, p0, p1);
  });
}

// W_hh (G*H x Hout, as stored) into the gate-interleaved panels the fused steps read,
// transposing it on the way: panel p, row k, gate g, lane i holds W_hh[g * H + p * U + i, k].
template <typename T>
const T* pack_gates(int64_t G, int64_t H, int64_t Hout, const T* w, Tensor& storage) {
  constexpr int64_t U = lstm_unit<T>();
  const int64_t panels = H / U;
  storage = call_buffer({panels * Hout * G * U},
                      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* out = storage.data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* panel = out + p * Hout * G * U;
      // Contiguous writes (i innermost) from U row streams, which stay in L1 meanwhile.
      for (int64_t g = 0; g < G; ++g) {
        const T* rows = w + (g * H + p * U) * Hout;
        for (int64_t k = 0; k < Hout; ++k) {
          T* dst = panel + (k * G + g) * U;
          for (int64_t i = 0; i < U; ++i) dst[i] = rows[i * Hout + k];
        }
      }
    }
  });
  return out;
}

// A weight as stored, N x K row-major, straight into the panels of its transpose (K x N,
// k-major) that matmul reads; N must be whole panels.
template <typename T>
Packed<T> pack_transposed(int64_t K, int64_t N, const T* w, Tensor& storage) {
  constexpr int64_t width = Packed<T>::width;
  const int64_t panels = N / width;
  storage = call_buffer({panels * K * width},
                      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* out = storage.data_ptr<T>();
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      T* panel = out + p * K * width;
      const T* rows = w + p * width * K;
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t c = 0; c < width; ++c) panel[k * width + c] = rows[c * K + k];
      }
    }
  });
  return {nullptr, width, out, K};
}

// ---------------------------------------------------------------------------------------
// Forward

template <typename T>
void forward_kernel(const Shape& s, const Steps& steps, int64_t mode, int64_t activation,
                    bool reset_after, const T* gates_x, T* h, T* c, const Packed<T>& rec,
                    const Packed<T>& rec_n, const T* bias, const Packed<T>& proj, bool project,
                    T* output, T* gates, int64_t gates_stride,
                    T* cells, int64_t cells_stride, T* projected, int64_t projected_stride,
                    T* hh, T* proj_out, const T* fused_packed, T* h_spare,
                    int64_t step0 = 0, int64_t step1 = -1, int64_t gx_t0 = 0) {
  // Steps [step0, step1) of the loop (all by default); gates_x holds times from gx_t0 on
  // (the chunked inference path computes it a few steps at a time).
  if (step1 < 0) step1 = s.T;
  using V = Vec<T>;
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = s.G * s.H;
  const V zero(T(0)), one(T(1));
  // W_hh packed gate-interleaved: the fused LSTM step, or the fused GRU step (reset after).
  const T* lstm_packed = mode == kLSTM ? fused_packed : nullptr;
  if (fused_packed && !project) {
    // The whole loop in one parallel region: each thread owns a fixed share of the hidden
    // units (W_hh panels, which stay in its core's cache) and meets the others at one barrier
    // per step, instead of a fork and join per step.
    const int64_t panels = H / lstm_unit<T>();
    const int64_t threads = lstm_threads(B, Hout, H, panels, s.G);
    const bool save = gates_stride != 0;  // zero: inference, nothing is kept per step
    double_buffered_steps(threads, step0, step1, h, h_spare, B * Hout,
                          [&](int64_t thread, int64_t step, T* from, T* to) {
      const int64_t p0 = panels * thread / threads, p1 = panels * (thread + 1) / threads;
      const int64_t t = steps.reverse ? T_ - 1 - step : step;
      const T* gx = gates_x + (t - gx_t0) * B * GH;
      T* saved = save ? gates + t * gates_stride : nullptr;
      if (mode == kLSTM) {
        const LstmStep<T> st{H, Hout, GH, gx, bias, from, to, output + t * B * Hout, nullptr, c,
                             save ? cells + t * cells_stride : nullptr, saved, &steps, t};
        lstm_panels<T>(st, B, fused_packed, p0, p1);
      } else {
        const GruStep<T> st{H, gx, bias, from, to, output + t * B * Hout, saved, &steps, t};
        gru_panels<T>(st, B, fused_packed, p0, p1);
      }
    });
    return;
  }
  for (int64_t step = step0; step < step1; ++step) {
    const int64_t t = steps.reverse ? T_ - 1 - step : step;
    const T* gx = gates_x + (t - gx_t0) * B * GH;
    T* out = output + t * B * Hout;
    T* saved = gates + t * gates_stride;
    if (mode == kRNN) {
      step_mm<T>(B, Hout, GH, h, Hout, rec, false, hh, GH);
      dispatch_activation(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
          const bool on = steps.active(t, b);
          const T *x = gx + b * GH, *r = hh + b * GH;
          T *hb = h + b * H, *ob = out + b * H, *db = saved + b * H;
          for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
            V derivative;
            const V y = activate<A, T>(
                V::loadu(x + j, n) + V::loadu(r + j, n) + V::loadu(bias + j, n), derivative);
            if constexpr (keeps_derivative(A)) derivative.store(db + j, n);
            if (on) y.store(hb + j, n);
            (on ? y : zero).store(ob + j, n);
          });
        });
      });
    } else if (mode == kGRU && reset_after) {
      step_mm<T>(B, Hout, GH, h, Hout, rec, false, hh, GH);
      for_rows(B, H, 32, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T *x = gx + b * GH, *rec = hh + b * GH;
        T *g = saved + b * 4 * H, *hb = h + b * H, *ob = out + b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          auto pre = [&](int64_t k) {
            return V::loadu(x + k * H + j, n) + V::loadu(rec + k * H + j, n) +
                   V::loadu(bias + k * H + j, n);
          };
          const V r = sigmoid(pre(0)), z = sigmoid(pre(1));
          const V hn = V::loadu(rec + 2 * H + j, n) + V::loadu(bias + 2 * H + j, n);
          const V cand = tanh<T>(V::loadu(x + 2 * H + j, n) + r * hn);
          const V y = (one - z) * cand + z * V::loadu(hb + j, n);
          r.store(g + j, n), z.store(g + H + j, n), cand.store(g + 2 * H + j, n);
          hn.store(g + 3 * H + j, n);
          if (on) y.store(hb + j, n);
          (on ? y : zero).store(ob + j, n);
        });
      });
    } else if (mode == kGRU) {
      // The reset comes before the matmul: the candidate needs W_hn (r * h), a second GEMM.
      step_mm<T>(B, Hout, 2 * H, h, Hout, rec, false, hh, GH);
      for_rows(B, H, 16, [&](int64_t b, int64_t j0, int64_t j1) {
        const T *x = gx + b * GH, *rec = hh + b * GH, *hb = h + b * H;
        T* g = saved + b * 4 * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          auto pre = [&](int64_t k) {
            return V::loadu(x + k * H + j, n) + V::loadu(rec + k * H + j, n) +
                   V::loadu(bias + k * H + j, n);
          };
          const V r = sigmoid(pre(0));
          r.store(g + j, n);
          sigmoid(pre(1)).store(g + H + j, n);
          (r * V::loadu(hb + j, n)).store(g + 3 * H + j, n);
        });
      });
      step_mm<T>(B, H, H, saved + 3 * H, 4 * H, rec_n, false, hh + 2 * H, GH);
      for_rows(B, H, 16, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T *x = gx + b * GH, *rec = hh + b * GH;
        T *g = saved + b * 4 * H, *hb = h + b * H, *ob = out + b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          const V cand = tanh<T>(V::loadu(x + 2 * H + j, n) + V::loadu(rec + 2 * H + j, n) +
                                 V::loadu(bias + 2 * H + j, n));
          const V z = V::loadu(g + H + j, n);
          const V y = (one - z) * cand + z * V::loadu(hb + j, n);
          cand.store(g + 2 * H + j, n);
          if (on) y.store(hb + j, n);
          (on ? y : zero).store(ob + j, n);
        });
      });
    } else if (lstm_packed) {
      // Projected (the loop above serves the rest): the fused cell step writes o * tanh(c)
      // into m, and h = W_hr m follows below.
      const bool save = gates_stride != 0;  // zero: inference, nothing is kept per step
      const LstmStep<T> st{H, Hout, GH, gx, bias, h, nullptr, out,
                           projected + t * projected_stride, c,
                           save ? cells + t * cells_stride : nullptr, save ? saved : nullptr,
                           &steps, t};
      lstm_step<T>(st, B, lstm_packed);
    } else {
      step_mm<T>(B, Hout, GH, h, Hout, rec, false, hh, GH);
      T* cell_out = cells + t * cells_stride;
      T* m = projected + t * projected_stride;
      for_rows(B, H, 40, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T *x = gx + b * GH, *rec = hh + b * GH;
        T *g = saved + b * 4 * H, *cb = c + b * H, *co = cell_out + b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          auto pre = [&](int64_t k) {
            return V::loadu(x + k * H + j, n) + V::loadu(rec + k * H + j, n) +
                   V::loadu(bias + k * H + j, n);
          };
          const V i = sigmoid(pre(0)), f = sigmoid(pre(1)), gg = tanh<T>(pre(2));
          const V o = sigmoid(pre(3));
          const V c_old = V::loadu(cb + j, n);
          const V c_new = f * c_old + i * gg;
          const V y = o * tanh<T>(c_new);
          i.store(g + j, n), f.store(g + H + j, n), gg.store(g + 2 * H + j, n);
          o.store(g + 3 * H + j, n);
          const V c_kept = on ? c_new : c_old;
          c_kept.store(cb + j, n);
          c_kept.store(co + j, n);
          if (project) {
            y.store(m + b * H + j, n);
          } else {
            if (on) y.store(h + b * H + j, n);
            (on ? y : zero).store(out + b * H + j, n);
          }
        });
      });
    }
    if (mode == kLSTM && project) {  // h = W_hr (o * tanh(c)), for the rows still running
      step_mm<T>(B, H, Hout, projected + t * projected_stride, H, proj, false, proj_out, Hout);
      for (int64_t b = 0; b < B; ++b) {
        const bool on = steps.active(t, b);
        for (int64_t j = 0; j < Hout; ++j) {
          if (on) h[b * Hout + j] = proj_out[b * Hout + j];
          out[b * Hout + j] = on ? proj_out[b * Hout + j] : T(0);
        }
      }
    }
  }
}

Tensor optional_or_empty(const std::optional<Tensor>& t) {
  return t.has_value() ? t->contiguous() : Tensor();
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward(
    const Tensor& gates_x_in, const Tensor& h0, const std::optional<Tensor>& c0,
    const Tensor& weight_hh_in, const std::optional<Tensor>& bias_hh_in,
    const std::optional<Tensor>& weight_hr_in, const std::optional<Tensor>& lengths_in,
    int64_t mode, int64_t activation, bool reset_after, bool reverse, bool training) {
  TORCH_CHECK(gates_x_in.dim() == 3, "rnnkit: gates_x must be (T, B, G*H)");
  const Tensor gates_x = gates_x_in.contiguous();
  const Tensor weight_hh = weight_hh_in.contiguous();
  const Tensor weight_hr = optional_or_empty(weight_hr_in);
  const Tensor lengths = optional_or_empty(lengths_in);
  // Without bias_hh the kernels add zeros: one branch less in every elementwise loop.
  const Tensor bias_hh = bias_hh_in.has_value() ? bias_hh_in->contiguous()
                                                : at::zeros({weight_hh.size(0)}, gates_x.options());
  const int64_t G = mode == kRNN ? 1 : (mode == kGRU ? 3 : 4);
  Shape s{gates_x.size(0), gates_x.size(1), gates_x.size(2) / G, h0.size(1), G};
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout;
  const auto opts = gates_x.options();

  Tensor h = h0.contiguous().clone();
  Tensor c = mode == kLSTM ? c0->contiguous().clone() : at::empty({0}, opts);
  Tensor output = call_buffer({T_, B, Hout}, opts);
  const int64_t saved_width = mode == kRNN ? (keeps_derivative(activation) ? H : 0) : 4 * H;
  // When no backward will follow, the per-step buffers are one step deep and reused.
  const int64_t depth = training ? T_ : 1;
  Tensor gates = call_buffer({depth, B, saved_width}, opts);
  const bool lstm = mode == kLSTM, project = weight_hr.defined();
  Tensor cells = call_buffer({lstm ? depth : 0, B, H}, opts);
  Tensor projected = call_buffer({project ? depth : 0, B, H}, opts);
  Tensor hh = at::empty({B, G * H}, opts);
  Tensor proj_out = at::empty({project ? B : 0, Hout}, opts);
  const int64_t stride = training ? B : 0;  // rows per time step in the saved buffers

  Steps steps{T_, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  // LSTM, and GRU with the reset after the product, with whole vectors of hidden units run
  // the fused step (else the general path), which packs W_hh gate-interleaved; the other step
  // kernels read W_hh^T, W_hr^T (k-major copies).
  const int64_t unit = gates_x.scalar_type() == at::kFloat ? Vec<float>::size()
                                                           : Vec<double>::size();
  const bool fused = (lstm || (mode == kGRU && reset_after)) && H > 0 && Hout > 0 &&
                     H % unit == 0;
  const Tensor w_t = fused ? Tensor() : weight_hh.t().contiguous();
  const Tensor w_hr_t = project ? weight_hr.t().contiguous() : weight_hr;
  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "rnnkit_cpu_recurrence_forward", [&] {
    using T = scalar_t;
    const bool blocked = B > 1;
    Tensor packed_rec, packed_rec_n, packed_proj;
    const T* wt = fused ? nullptr : w_t.data_ptr<T>();
    const Packed<T> rec = fused ? Packed<T>{} : pack<T>(Hout, G * H, wt, G * H, blocked, packed_rec);
    const Packed<T> rec_n = mode == kGRU && !reset_after
                                ? pack<T>(H, H, wt + 2 * H, G * H, blocked, packed_rec_n)
                                : Packed<T>{};
    const Packed<T> proj = project ? pack<T>(H, Hout, w_hr_t.data_ptr<T>(), Hout, blocked,
                                             packed_proj)
                                   : Packed<T>{};
    Tensor packed_gates;
    const T* gate_panels =
        fused ? pack_gates<T>(G, H, Hout, weight_hh.data_ptr<T>(), packed_gates) : nullptr;
    Tensor h_spare = fused && !project ? at::empty_like(h) : Tensor();
    forward_kernel<T>(s, steps, mode, activation, reset_after, gates_x.data_ptr<T>(),
                      h.data_ptr<T>(), lstm ? c.data_ptr<T>() : nullptr, rec, rec_n,
                      bias_hh.data_ptr<T>(), proj, project, output.data_ptr<T>(),
                      gates.data_ptr<T>(), stride * saved_width,
                      lstm ? cells.data_ptr<T>() : nullptr, stride * H,
                      project ? projected.data_ptr<T>() : nullptr, stride * H,
                      hh.data_ptr<T>(), project ? proj_out.data_ptr<T>() : nullptr, gate_panels,
                      h_spare.defined() ? h_spare.data_ptr<T>() : nullptr);
  });
  if (!training) {
    gates = at::empty({0}, opts);
    cells = at::empty({0}, opts);
    projected = at::empty({0}, opts);
  }
  return {output, h, c, gates, cells, projected};
}

// ---------------------------------------------------------------------------------------
// Backward

template <typename T>
void backward_kernel(const Shape& s, const Steps& steps, int64_t mode, int64_t activation,
                     bool reset_after, const T* grad_output, T* dh, T* dc, const T* h0,
                     const T* c0, const Packed<T>& rec, const Packed<T>& proj, bool project,
                     const T* output, const T* gates, const T* cells, T* dgx, T* dhh, T* carry,
                     T* dhs, T* dm) {
  using V = Vec<T>;
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = s.G * s.H;
  const int64_t W = mode == kRNN ? (keeps_derivative(activation) ? H : 0) : 4 * H;
  const V zero(T(0)), one(T(1));
  auto previous_h = [&](int64_t t, int64_t b) {
    return steps.first(t, b) ? h0 + b * Hout : output + (steps.previous(t) * B + b) * Hout;
  };
  auto previous_c = [&](int64_t t, int64_t b) {
    return steps.first(t, b) ? c0 + b * H : cells + (steps.previous(t) * B + b) * H;
  };
  // LSTM: the gate gradients of units [j0, j1) in row b at time t, into dgx, and the cell's
  // gradient carried to t - 1; without a projection also carry, the part of dh_{t-1} that
  // does not come from the product with W_hh (dh itself for a row past its length, else 0).
  auto lstm_units = [&](int64_t t, int64_t b, int64_t j0, int64_t j1) {
    const T* gout = grad_output + t * B * Hout;
    const T* c_t = cells + t * B * H;
    const bool on = steps.active(t, b);
    const T *g = gates + t * B * W + b * W, *cp = on ? previous_c(t, b) : nullptr;
    T* dgb = dgx + t * B * GH + b * GH;
    const int64_t row = b * H;
    for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
      if (!on) {
        for (int64_t k = 0; k < 4; ++k) zero.store(dgb + k * H + j, n);
        if (!project) V::loadu(dh + row + j, n).store(carry + row + j, n);
        return;
      }
      const V i = V::loadu(g + j, n), f = V::loadu(g + H + j, n);
      const V gg = V::loadu(g + 2 * H + j, n), o = V::loadu(g + 3 * H + j, n);
      const V d = project ? V::loadu(dm + row + j, n)
                          : V::loadu(dh + row + j, n) + V::loadu(gout + row + j, n);
      const V tc = tanh<T>(V::loadu(c_t + row + j, n));
      const V dcell = V::loadu(dc + row + j, n) + d * o * (one - tc * tc);
      (dcell * gg * i * (one - i)).store(dgb + j, n);
      (dcell * V::loadu(cp + j, n) * f * (one - f)).store(dgb + H + j, n);
      (dcell * i * (one - gg * gg)).store(dgb + 2 * H + j, n);
      (d * tc * o * (one - o)).store(dgb + 3 * H + j, n);
      (dcell * f).store(dc + row + j, n);
      if (!project) zero.store(carry + row + j, n);
    });
  };
  if (mode == kLSTM && !project) {
    // The whole loop in one parallel region: each thread owns a share of the hidden units,
    // which are both its elementwise work and its columns of dh_{t-1} = dgates W_hh, so one
    // barrier per step (all of dgates_t must be written before any product reads it) suffices.
    const int64_t unit = rec.panels || B > 1 ? Packed<T>::width : Vec<T>::size();
    const int64_t pieces = Hout / unit;
    const int64_t threads = std::min(pieces, lstm_threads(B, Hout, H, pieces));
    if (threads > 1 && Hout % unit == 0) {
      auto run = [&](int64_t thread) {
        const int64_t c0 = pieces * thread / threads * unit;
        const int64_t c1 = pieces * (thread + 1) / threads * unit;
        const Packed<T> cols = rec.cols_from(c0 / unit);
        for (int64_t step = T_ - 1; step >= 0; --step) {
          const int64_t t = steps.reverse ? T_ - 1 - step : step;
          for (int64_t b = 0; b < B; ++b) lstm_units(t, b, c0, c1);
#ifdef _OPENMP
#pragma omp barrier
#endif
          const T* dg = dgx + t * B * GH;
          if (B == 1 && cols.panels) {
            // Each packed panel streams contiguously.
            for (int64_t p = 0; p < (c1 - c0) / unit; ++p) {
              vector_matrix<T>(GH, unit, dg, 1, cols.panel(p, 0), unit, true,
                               carry + c0 + p * unit);
            }
          } else if (B == 1) {
            vector_matrix<T>(GH, c1 - c0, dg, 1, cols.M, cols.ldm, true, carry + c0);
          } else {
            matmul<T>(B, GH, c1 - c0, dg, GH, 1, cols.M, cols.ldm, true, carry + c0, Hout,
                      cols.panels ? &cols : nullptr);
          }
          for (int64_t b = 0; b < B; ++b) {
            std::copy(carry + b * Hout + c0, carry + b * Hout + c1, dh + b * Hout + c0);
          }
        }
      };
#ifdef _OPENMP
      // Without OpenMP this split cannot run; the serial loop below serves instead.
      run_threads(threads, run);
      return;
#endif
    }
  }
  for (int64_t step = T_ - 1; step >= 0; --step) {
    const int64_t t = steps.reverse ? T_ - 1 - step : step;
    const T* gout = grad_output + t * B * Hout;
    const T* out_t = output + t * B * Hout;
    const T* g_t = gates + t * B * W;
    T* dg = dgx + t * B * GH;
    T* dr = dhh + t * B * GH;
    if (mode == kRNN) {
      dispatch_activation(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        for_rows(B, H, 2, [&](int64_t b, int64_t j0, int64_t j1) {
          const bool on = steps.active(t, b);
          const int64_t row = b * H;
          for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
            const V d = V::loadu(dh + row + j, n);
            if (!on) {
              zero.store(dg + row + j, n);
              d.store(carry + row + j, n);
              return;
            }
            V derivative;
            if constexpr (keeps_derivative(A)) {
              derivative = V::loadu(g_t + row + j, n);
            } else {
              derivative = derivative_from_output<A, T>(V::loadu(out_t + row + j, n));
            }
            ((d + V::loadu(gout + row + j, n)) * derivative).store(dg + row + j, n);
            zero.store(carry + row + j, n);
          });
        });
      });
      step_mm<T>(B, GH, Hout, dg, GH, rec, true, carry, Hout);
    } else if (mode == kGRU && reset_after) {
      for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T *g = g_t + b * W, *hp = on ? previous_h(t, b) : nullptr;
        T *dgb = dg + b * GH, *drb = dr + b * GH;
        const int64_t row = b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          if (!on) {
            for (int64_t k = 0; k < 3; ++k) {
              zero.store(dgb + k * H + j, n);
              zero.store(drb + k * H + j, n);
            }
            V::loadu(dh + row + j, n).store(carry + row + j, n);
            return;
          }
          const V r = V::loadu(g + j, n), z = V::loadu(g + H + j, n);
          const V cand = V::loadu(g + 2 * H + j, n), hn = V::loadu(g + 3 * H + j, n);
          const V d = V::loadu(dh + row + j, n) + V::loadu(gout + row + j, n);
          const V dn = d * (one - z) * (one - cand * cand);
          const V dz = d * (V::loadu(hp + j, n) - cand) * z * (one - z);
          const V dr_ = dn * hn * r * (one - r);
          dr_.store(dgb + j, n), dr_.store(drb + j, n);
          dz.store(dgb + H + j, n), dz.store(drb + H + j, n);
          dn.store(dgb + 2 * H + j, n);
          (dn * r).store(drb + 2 * H + j, n);
          (d * z).store(carry + row + j, n);
        });
      });
      step_mm<T>(B, GH, Hout, dr, GH, rec, true, carry, Hout);
    } else if (mode == kGRU) {
      for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T *g = g_t + b * W, *hp = on ? previous_h(t, b) : nullptr;
        T* dgb = dg + b * GH;
        const int64_t row = b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          if (!on) {
            for (int64_t k = 0; k < 3; ++k) zero.store(dgb + k * H + j, n);
            V::loadu(dh + row + j, n).store(carry + row + j, n);
            return;
          }
          const V z = V::loadu(g + H + j, n), cand = V::loadu(g + 2 * H + j, n);
          const V d = V::loadu(dh + row + j, n) + V::loadu(gout + row + j, n);
          (d * (one - z) * (one - cand * cand)).store(dgb + 2 * H + j, n);
          (d * (V::loadu(hp + j, n) - cand) * z * (one - z)).store(dgb + H + j, n);
          (d * z).store(carry + row + j, n);
        });
      });
      // d(r * h) = dn W_hn, into dm (B, H).
      step_mm<T>(B, H, H, dg + 2 * H, GH, rec.rows_from(2 * H), false, dm, H);
      for_rows(B, H, 4, [&](int64_t b, int64_t j0, int64_t j1) {
        if (!steps.active(t, b)) return;
        const T *g = g_t + b * W, *hp = previous_h(t, b);
        T* dgb = dg + b * GH;
        const int64_t row = b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          const V r = V::loadu(g + j, n), drh = V::loadu(dm + row + j, n);
          (drh * V::loadu(hp + j, n) * r * (one - r)).store(dgb + j, n);
          (V::loadu(carry + row + j, n) + drh * r).store(carry + row + j, n);
        });
      });
      step_mm<T>(B, 2 * H, Hout, dg, GH, rec, true, carry, Hout);
    } else {
      if (project) {
        T* dh_t = dhs + t * B * Hout;
        for (int64_t b = 0; b < B; ++b) {
          const bool on = steps.active(t, b);
          for (int64_t j = 0; j < Hout; ++j) {
            const int64_t k = b * Hout + j;
            dh_t[k] = on ? dh[k] + gout[k] : T(0);
            carry[k] = on ? T(0) : dh[k];
          }
        }
        step_mm<T>(B, Hout, H, dh_t, Hout, proj, false, dm, H);
      }
      for_rows(B, H, 24, [&](int64_t b, int64_t j0, int64_t j1) { lstm_units(t, b, j0, j1); });
      step_mm<T>(B, GH, Hout, dg, GH, rec, true, carry, Hout);
    }
    std::copy(carry, carry + B * Hout, dh);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_backward(
    const Tensor& grad_output_in, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& h0_in, const std::optional<Tensor>& c0_in, const Tensor& weight_hh_in,
    const std::optional<Tensor>& weight_hr_in, const std::optional<Tensor>& lengths_in,
    const Tensor& output_in, const Tensor& gates_in, const Tensor& cells_in,
    const Tensor& projected_in, int64_t mode, int64_t activation, bool reset_after,
    bool reverse, bool has_bias) {
  const Tensor grad_output = grad_output_in.contiguous();
  const Tensor h0 = h0_in.contiguous();
  const Tensor c0 = optional_or_empty(c0_in);
  const Tensor weight_hh = weight_hh_in.contiguous();
  const Tensor weight_hr = optional_or_empty(weight_hr_in);
  const Tensor lengths = optional_or_empty(lengths_in);
  const Tensor output = output_in.contiguous();
  const Tensor gates = gates_in.contiguous();
  const Tensor cells = cells_in.contiguous();
  const Tensor projected = projected_in.contiguous();
  const int64_t G = mode == kRNN ? 1 : (mode == kGRU ? 3 : 4);
  const int64_t GH = weight_hh.size(0);
  Shape s{output.size(0), output.size(1), GH / G, output.size(2), G};
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout;
  const auto opts = output.options();
  const bool lstm = mode == kLSTM, project = weight_hr.defined();
  const bool separate_dhh = mode == kGRU && reset_after;

  Tensor dh = grad_h_n.contiguous().clone();
  Tensor dc = lstm ? grad_c_n.contiguous().clone() : at::empty({0}, opts);
  Tensor dgx = call_buffer({T_, B, GH}, opts);
  Tensor dhh = separate_dhh ? call_buffer({T_, B, GH}, opts) : dgx;
  Tensor carry = at::empty({B, Hout}, opts);
  Tensor dhs = call_buffer({project ? T_ : 0, B, Hout}, opts);
  Tensor dm = at::empty({B, H}, opts);
  Tensor grad_w_hh = at::empty({GH, Hout}, opts);
  Tensor grad_w_hr = project ? at::empty({Hout, H}, opts) : at::empty({0}, opts);

  Steps steps{T_, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "rnnkit_cpu_recurrence_backward", [&] {
    using T = scalar_t;
    const bool blocked = B > 1;
    Tensor packed_rec, packed_proj;
    // The LSTM's one-row steps also read W_hh in packed panels (see backward_kernel).
    const Packed<T> rec = pack<T>(GH, Hout, weight_hh.data_ptr<T>(), Hout,
                                  blocked || (lstm && !project), packed_rec);
    const Packed<T> proj = project ? pack<T>(Hout, H, weight_hr.data_ptr<T>(), H, blocked,
                                             packed_proj)
                                   : Packed<T>{};
    backward_kernel<T>(s, steps, mode, activation, reset_after, grad_output.data_ptr<T>(),
                       dh.data_ptr<T>(), lstm ? dc.data_ptr<T>() : nullptr,
                       h0.data_ptr<T>(), lstm ? c0.data_ptr<T>() : nullptr, rec, proj, project,
                       output.data_ptr<T>(), gates.data_ptr<T>(),
                       lstm ? cells.data_ptr<T>() : nullptr, dgx.data_ptr<T>(),
                       dhh.data_ptr<T>(), carry.data_ptr<T>(),
                       project ? dhs.data_ptr<T>() : nullptr, dm.data_ptr<T>());

    // dW_hh = sum_t dgates_t^T h_{t-1}. Every step but each sequence's first takes h_{t-1}
    // from the neighbouring output, so that part is one GEMM over the shifted output (its
    // rows at a first step meet a zero output or a zero gradient); the first steps meet h0.
    const T* dg = dhh.data_ptr<T>();
    const T* out = output.data_ptr<T>();
    T* gw = grad_w_hh.data_ptr<T>();
    const int64_t rz = (mode == kGRU && !reset_after) ? 2 * H : GH;  // rows that see h_{t-1}
    const int64_t rows = (T_ - 1) * B;
    const T* dg_main = reverse ? dg : dg + B * GH;
    const T* out_main = reverse ? out + B * Hout : out;
    matmul<T>(rz, rows, Hout, dg_main, 1, GH, out_main, Hout, false, gw, Hout);
    Tensor first = at::empty({B, GH}, opts);
    T* fp = first.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t0 = reverse ? (steps.lengths ? steps.lengths[b] : T_) - 1 : 0;
      std::copy(dg + (t0 * B + b) * GH, dg + (t0 * B + b + 1) * GH, fp + b * GH);
    }
    matmul<T>(rz, B, Hout, fp, 1, GH, h0.data_ptr<T>(), Hout, rows > 0, gw, Hout);
    if (rz != GH) {
      // GRU with the reset before the matmul: W_hn meets r * h_{t-1}, saved in the gates.
      matmul<T>(H, T_ * B, Hout, dg + 2 * H, 1, GH, gates.data_ptr<T>() + 3 * H, 4 * H, false,
                gw + 2 * H * Hout, Hout);
    }
    if (project) {
      matmul<T>(Hout, T_ * B, H, dhs.data_ptr<T>(), 1, Hout, projected.data_ptr<T>(), H, false,
                grad_w_hr.data_ptr<T>(), H);
    }
  });
  Tensor grad_b_hh = has_bias ? at::sum(dhh.view({T_ * B, GH}), {0}) : at::empty({0}, opts);
  return {dgx, dh, dc, grad_w_hh, grad_b_hh, grad_w_hr};
}

// ---------------------------------------------------------------------------------------
// The layers' input projection, W_ih x + b_ih for all steps at once, on the same kernels.

Tensor linear_forward(const Tensor& input, const Tensor& weight_in,
                      const std::optional<Tensor>& bias_in) {
  const Tensor x = input.contiguous();
  const int64_t in_features = weight_in.size(1), out_features = weight_in.size(0);
  const int64_t rows = in_features == 0 ? 0 : x.numel() / in_features;
  const int64_t panel = x.scalar_type() == at::kFloat ? Packed<float>::width
                                                      : Packed<double>::width;
  // Whole panels of outputs: pack the weight as stored; else read a k-major copy.
  const bool direct = rows > 1 && in_features > 0 && out_features > 0 &&
                      out_features % panel == 0;
  const Tensor weight = weight_in.contiguous();
  const Tensor weight_t = direct ? Tensor() : weight_in.t().contiguous();  // (I, G)
  auto sizes = input.sizes().vec();
  sizes.back() = out_features;
  Tensor out = call_buffer(sizes, x.options());
  const bool has_bias = bias_in.has_value();
  const Tensor bias = has_bias ? bias_in->contiguous() : Tensor();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_cpu_linear", [&] {
    using T = scalar_t;
    T* o = out.data_ptr<T>();
    Tensor storage;
    const Packed<T> w =
        direct ? pack_transposed<T>(in_features, out_features, weight.data_ptr<T>(), storage)
               : pack<T>(in_features, out_features, weight_t.data_ptr<T>(), out_features,
                         rows > 1, storage);
    // The bias seeds the accumulators: the output is written once, never read back.
    matmul<T>(rows, in_features, out_features, x.data_ptr<T>(), in_features, 1, w.M, w.ldm,
              false, o, out_features, w.panels ? &w : nullptr,
              has_bias ? bias.data_ptr<T>() : nullptr);
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_in, const Tensor& input,
                                                   const Tensor& weight_in, bool input_grad,
                                                   bool weight_grad, bool has_bias) {
  const Tensor grad = grad_in.contiguous();
  const Tensor x = input.contiguous();
  const Tensor weight = weight_in.contiguous();
  const int64_t in_features = weight.size(1), out_features = weight.size(0);
  const int64_t rows = out_features == 0 ? 0 : grad.numel() / out_features;
  const auto opts = grad.options();
  Tensor grad_input = input_grad ? call_buffer(input.sizes(), opts) : at::empty({0}, opts);
  Tensor grad_weight =
      weight_grad ? at::empty({out_features, in_features}, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "rnnkit_cpu_linear_backward", [&] {
    using T = scalar_t;
    const T* g = grad.data_ptr<T>();
    if (input_grad) {  // dx = dy W
      Tensor storage;
      const Packed<T> w = pack<T>(out_features, in_features, weight.data_ptr<T>(), in_features,
                                  rows > 1, storage);
      matmul<T>(rows, out_features, in_features, g, out_features, 1, w.M, w.ldm, false,
                grad_input.data_ptr<T>(), in_features, w.panels ? &w : nullptr);
    }
    if (weight_grad) {  // dW = dy^T x, reading dy column-wise
      matmul<T>(out_features, rows, in_features, g, 1, out_features, x.data_ptr<T>(),
                in_features, false, grad_weight.data_ptr<T>(), in_features);
    }
  });
  Tensor grad_bias = has_bias ? at::sum(grad.view({rows, out_features}), {0})
                              : at::empty({0}, opts);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

// ---------------------------------------------------------------------------------------
// LSTM inference with the input projection inside the loop: W_ih x + b_ih is computed a
// chunk of steps at a time into one small reused buffer, just before those steps run, so the
// (T, B, 4H) gates_x never exists in full: no freshly mapped pages to fault in (a big buffer
// is mmapped anew on every call) and the chunk is still in cache when the steps read it.
// Nothing is saved for backward; the Python side calls this only when no gradient is needed.

// Steps per chunk (RNNKIT_LSTM_CHUNK overrides it). In the loop, each thread projects its own
// units over all the chunk's rows (steps x B); rows reuse each W_ih panel (I x 4 vectors) from
// cache, so a wider input wants more of them: I / 2 rows, within [64, 512], measured best at
// (B, H, T) = (16, 256, 200), (64, 512, 100), (32, 1024, 50). A separate product wants enough
// rows to split between threads (two row blocks of 120 each), in a buffer of about 2 MiB.
inline int64_t lstm_chunk_steps(int64_t T_, int64_t B, int64_t I, int64_t GH, int64_t element,
                                bool in_loop) {
  int64_t steps;
  if (in_loop) {
    const int64_t rows = std::min<int64_t>(512, std::max<int64_t>(64, I / 2));
    steps = std::max<int64_t>(1, (rows + B - 1) / B);
  } else {
    const int64_t rows = 240 * std::max<int64_t>(1, at::get_num_threads() / 2);
    const int64_t cap =
        std::max<int64_t>(1, (int64_t(2) << 20) / std::max<int64_t>(1, B * GH * element));
    steps = std::min(std::max<int64_t>(1, (rows + B - 1) / B), cap);
  }
  if (const char* env = std::getenv("RNNKIT_LSTM_CHUNK")) {
    steps = std::max<int64_t>(1, std::atoll(env));
  }
  return std::min(steps, T_);
}

// Rows [0, rows) of x (rows x I) times panels [p0, p1) of the gate-interleaved W_ih (packed
// as pack_gates packs W_hh) into gx (rows, H / U, 4, U), seeded with init (same layout).
template <typename T>
void lstm_project_panels(int64_t rows, int64_t I, const T* x, const T* ih, const T* init,
                         int64_t GH, T* gx, int64_t p0, int64_t p1) {
  constexpr int64_t U = lstm_unit<T>();
  constexpr int NV = panel_vectors<T>();
  for (int64_t p = p0; p < p1; ++p) {
    for (int64_t v0 = 0; v0 < 4; v0 += NV) {  // a panel_kernel call covers NV of the 4 gates
      const T* M = ih + p * I * 4 * U + v0 * U;
      const T* in = init + p * 4 * U + v0 * U;
      T* C = gx + p * 4 * U + v0 * U;
      for_row_blocks<T>(0, rows, [&](auto block, int64_t r) {
        panel_kernel<T, decltype(block)::value>(I, x + r * I, I, 1, M, 4 * U, false,
                                                C + r * GH, GH, in);
      });
    }
  }
}

// The fused LSTM loop (no projection) with the input projection inside the parallel region:
// each thread projects a chunk of steps for its own hidden units only (the only gates_x
// columns it reads), so the chunk needs no barrier of its own and stays in that core's cache.
template <typename T>
void lstm_inference_loop(const Shape& s, const Steps& steps, const T* x, int64_t I,
                         const T* ih, const T* init, const T* hh, const T* zero_bias,
                         int64_t chunk, T* gx, T* h, T* h_spare, T* c, T* output) {
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = 4 * H;
  const int64_t panels = H / lstm_unit<T>();
  const int64_t threads = lstm_threads(B, Hout, H, panels);
  double_buffered_steps(threads, 0, T_, h, h_spare, B * Hout,
                        [&](int64_t thread, int64_t step, T* from, T* to) {
    const int64_t p0 = panels * thread / threads, p1 = panels * (thread + 1) / threads;
    // The chunk of steps [step0, step1) this step belongs to: its times start at t0.
    const int64_t step0 = step - step % chunk, step1 = std::min(T_, step0 + chunk);
    const int64_t t0 = steps.reverse ? T_ - step1 : step0;
    if (step == step0) {
      lstm_project_panels<T>((step1 - step0) * B, I, x + t0 * B * I, ih, init, GH, gx, p0, p1);
    }
    const int64_t t = steps.reverse ? T_ - 1 - step : step;
    LstmStep<T> st{H, Hout, GH, gx + (t - t0) * B * GH, zero_bias, from, to,
                   output + t * B * Hout, nullptr, c, nullptr, nullptr, &steps, t};
    st.interleaved = true;
    lstm_panels<T>(st, B, hh, p0, p1);
  });
}

std::tuple<Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input, const Tensor& weight_ih_in, const std::optional<Tensor>& bias_ih_in,
    const Tensor& h0, const Tensor& c0, const Tensor& weight_hh_in,
    const std::optional<Tensor>& bias_hh_in, const std::optional<Tensor>& weight_hr_in,
    const std::optional<Tensor>& lengths_in, bool reverse) {
  TORCH_CHECK(input.dim() == 3, "rnnkit: input must be (T, B, I)");
  const Tensor x = input.contiguous();
  const Tensor weight_ih = weight_ih_in.contiguous();
  const Tensor weight_hh = weight_hh_in.contiguous();
  const Tensor weight_hr = optional_or_empty(weight_hr_in);
  const Tensor lengths = optional_or_empty(lengths_in);
  const auto opts = x.options();
  const Tensor bias_hh = bias_hh_in.has_value() ? bias_hh_in->contiguous()
                                                : at::zeros({weight_hh.size(0)}, opts);
  const bool has_bias_ih = bias_ih_in.has_value();
  const Tensor bias_ih = has_bias_ih ? bias_ih_in->contiguous() : Tensor();
  const int64_t GH = weight_ih.size(0), I = weight_ih.size(1);
  Shape s{x.size(0), x.size(1), GH / 4, h0.size(1), 4};
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout;
  Tensor h = h0.contiguous().clone();
  Tensor c = c0.contiguous().clone();
  Tensor output = call_buffer({T_, B, Hout}, opts);
  const bool project = weight_hr.defined();
  Tensor projected = at::empty({project ? 1 : 0, B, H}, opts);
  Tensor hh = at::empty({B, GH}, opts);
  Tensor proj_out = at::empty({project ? B : 0, Hout}, opts);
  Tensor gates = at::empty({1, B, 4 * H}, opts);
  Tensor cells = at::empty({1, B, H}, opts);
  Steps steps{T_, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  const int64_t unit = x.scalar_type() == at::kFloat ? Vec<float>::size() : Vec<double>::size();
  const bool fused = H > 0 && Hout > 0 && H % unit == 0;
  const Tensor w_t = fused ? Tensor() : weight_hh.t().contiguous();
  const Tensor w_hr_t = project ? weight_hr.t().contiguous() : weight_hr;
  const int64_t panel = x.scalar_type() == at::kFloat ? Packed<float>::width
                                                      : Packed<double>::width;
  const bool direct = I > 0 && GH > 0 && GH % panel == 0;
  const Tensor w_ih_t = direct ? Tensor() : weight_ih.t().contiguous();  // (I, 4H)
  // Fused step without projection: the projection runs inside the loop's parallel region.
  const bool in_loop = fused && !project && I > 0;
  const int64_t chunk = lstm_chunk_steps(T_, B, I, GH, x.element_size(), in_loop);
  Tensor buffer = at::empty({chunk, B, GH}, opts);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_cpu_lstm_layer_forward", [&] {
    using T = scalar_t;
    if (in_loop) {
      Tensor packed_ih, packed_hh;
      const T* ih = pack_gates<T>(4, H, I, weight_ih.data_ptr<T>(), packed_ih);
      const T* hh = pack_gates<T>(4, H, Hout, weight_hh.data_ptr<T>(), packed_hh);
      // b_ih + b_hh in the panels' layout seeds the projection; the step then adds zeros.
      constexpr int64_t U = lstm_unit<T>();
      Tensor init = at::empty({GH}, opts);
      T* in = init.data_ptr<T>();
      const T* bh = bias_hh.data_ptr<T>();
      const T* bi = has_bias_ih ? bias_ih.data_ptr<T>() : nullptr;
      for (int64_t p = 0; p < H / U; ++p) {
        for (int64_t g = 0; g < 4; ++g) {
          for (int64_t i = 0; i < U; ++i) {
            const int64_t j = g * H + p * U + i;
            in[(p * 4 + g) * U + i] = (bi ? bi[j] : T(0)) + bh[j];
          }
        }
      }
      Tensor zero_bias = at::zeros({GH}, opts);
      Tensor h_spare = at::empty_like(h);
      lstm_inference_loop<T>(s, steps, x.data_ptr<T>(), I, ih, in, hh,
                             zero_bias.data_ptr<T>(), chunk, buffer.data_ptr<T>(),
                             h.data_ptr<T>(), h_spare.data_ptr<T>(), c.data_ptr<T>(),
                             output.data_ptr<T>());
      return;
    }
    const bool blocked = B > 1;
    Tensor packed_ih, packed_rec, packed_proj, packed_lstm;
    const Packed<T> w_ih =
        direct ? pack_transposed<T>(I, GH, weight_ih.data_ptr<T>(), packed_ih)
               : pack<T>(I, GH, w_ih_t.data_ptr<T>(), GH, true, packed_ih);
    const Packed<T> rec =
        fused ? Packed<T>{} : pack<T>(Hout, GH, w_t.data_ptr<T>(), GH, blocked, packed_rec);
    const Packed<T> proj = project ? pack<T>(H, Hout, w_hr_t.data_ptr<T>(), Hout, blocked,
                                             packed_proj)
                                   : Packed<T>{};
    const T* lstm_panels =
        fused ? pack_gates<T>(4, H, Hout, weight_hh.data_ptr<T>(), packed_lstm) : nullptr;
    Tensor h_spare = fused && !project ? at::empty_like(h) : Tensor();
    const T* xs = x.data_ptr<T>();
    T* gx = buffer.data_ptr<T>();
    for (int64_t step0 = 0; step0 < T_; step0 += chunk) {
      const int64_t step1 = std::min(T_, step0 + chunk);
      // The chunk's times: [step0, step1) forward, their mirror image in reverse.
      const int64_t t0 = reverse ? T_ - step1 : step0;
      const int64_t rows = (step1 - step0) * B;
      matmul<T>(rows, I, GH, xs + t0 * B * I, I, 1, w_ih.M, w_ih.ldm, false, gx, GH,
                w_ih.panels ? &w_ih : nullptr, has_bias_ih ? bias_ih.data_ptr<T>() : nullptr);
      forward_kernel<T>(s, steps, kLSTM, 0, false, gx, h.data_ptr<T>(), c.data_ptr<T>(), rec,
                        Packed<T>{}, bias_hh.data_ptr<T>(), proj, project,
                        output.data_ptr<T>(), gates.data_ptr<T>(), 0, cells.data_ptr<T>(), 0,
                        project ? projected.data_ptr<T>() : nullptr, 0, hh.data_ptr<T>(),
                        project ? proj_out.data_ptr<T>() : nullptr, lstm_panels,
                        h_spare.defined() ? h_spare.data_ptr<T>() : nullptr, step0, step1, t0);
    }
  });
  return {output, h, c};
}

TORCH_LIBRARY_IMPL(rnnkit, CPU, m) {
  m.impl("cpu_recurrence_forward", &recurrence_forward);
  m.impl("cpu_recurrence_backward", &recurrence_backward);
  m.impl("cpu_linear", &linear_forward);
  m.impl("cpu_linear_backward", &linear_backward);
  m.impl("cpu_lstm_layer_forward", &lstm_layer_forward);
}
