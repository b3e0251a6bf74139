// The register-blocked products that every step runs on, and the packed weight layouts they
// read. The kernels stay in this header, not in gemm.cpp: they run at every time step, and
// each caller's file must be able to inline them and specialise them for its constant
// arguments. gemm.cpp holds only the packers, which run once per call.
//
// All products run on these kernels (matmul, vector_matrix), not on BLAS: they skip the
// per-call overhead that dominates small steps, and use the full vector width where the
// bundled MKL does not (AMD CPUs).
#pragma once

#include "threads.h"
#include "vec_math.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rnnkit_cpu {

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

// The packers (gemm.cpp, for float and double). Each fills `storage` with the packed copy
// that the returned view points into.

// M (K x N, k-major) into Packed panels; unpacked (a view of M) unless `wanted`.
template <typename T>
Packed<T> pack(int64_t K, int64_t N, const T* M, int64_t ldm, bool wanted, Tensor& storage);

// A weight as stored, N x K row-major, straight into the panels of its transpose (K x N,
// k-major) that matmul reads; N must be whole panels.
template <typename T>
Packed<T> pack_transposed(int64_t K, int64_t N, const T* w, Tensor& storage);

// Hidden units per gate-interleaved panel of the fused steps: one vector.
template <typename T>
constexpr int64_t lstm_unit() {
  return Vec<T>::size();
}

// W_hh (G*H x Hout, as stored) into the gate-interleaved panels the fused steps read,
// transposing it on the way: panel p, row k, gate g, lane i holds W_hh[g * H + p * U + i, k].
template <typename T>
const T* pack_gates(int64_t G, int64_t H, int64_t Hout, const T* w, Tensor& storage);

// C (R x N) = A (R x K, strided as in panel_kernel) M (K x N, k-major) [+ C], on ATen's
// vector registers: no BLAS call overhead per step, and full-width FMAs also where the
// bundled BLAS runs a narrower code path. Column panels are shared between threads when the
// product is large enough; K is cut into chunks whose panel stays in cache across row blocks.
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

}  // namespace rnnkit_cpu
