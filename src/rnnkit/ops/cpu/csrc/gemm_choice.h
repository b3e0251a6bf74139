// Which matrix product a whole-sequence call runs on: rnnkit's register-blocked kernel
// (gemm.h) or torch's library product (at::mm: MKL or oneDNN). The one place this is decided.
//
// Only the products made once per call go through here (the input projection, its gradients,
// the weight gradients); the per-step products stay on rnnkit's kernels, inside the fused
// loops, where a library call per step would cost more than it saves.
#pragma once

#include "gemm.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace rnnkit_cpu {

// RNNKIT_GEMM=library or RNNKIT_GEMM=rnnkit forces one path for every product (tests hold
// both equal to torch; benchmarks/gemm_choice.py compares them); unset, empty or "auto": the
// table below. Read per call, not cached, so a test can switch it within one process; called
// outside parallel regions only, where the error can reach Python (as a ValueError).
inline int forced_gemm() {
  const char* value = std::getenv("RNNKIT_GEMM");
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return 0;
  if (std::strcmp(value, "library") == 0) return 1;
  if (std::strcmp(value, "rnnkit") == 0) return -1;
  TORCH_CHECK_VALUE(false, "RNNKIT_GEMM must be 'library', 'rnnkit' or 'auto', not '", value,
                    "'");
}

// C (M x N) = A (M x K) B (K x N), A read down its columns when `a_transposed` (the weight
// gradients, dW = dY^T X, K = B*T): does torch's library product beat rnnkit's kernel here?
// Measured with `python benchmarks/gemm_choice.py --threads 1` (float32, interleaved, median of
// 7; AMD EPYC, load 8-11, so indicative), at the products of the `rnnkit bench` grid, rnnkit
// time / library time:
//   AVX-512: projection 0.64-1.06, its input gradient 0.70-1.04, weight gradients 0.91-1.01:
//            rnnkit's kernel, everywhere.
//   AVX2 (the avx2 kernels against MKL and oneDNN held to AVX2, see the script): projection
//            0.67-1.30 and input gradient 0.72-1.43, about even; weight gradients 0.97-1.99,
//            6 of 7 above 1: the library for those.
// The shape is unused so far: no grid shape turned the choice within an ISA.
inline bool use_library_gemm([[maybe_unused]] int64_t M, [[maybe_unused]] int64_t N,
                             [[maybe_unused]] int64_t K, [[maybe_unused]] bool a_transposed) {
  if (const int forced = forced_gemm()) return forced > 0;
#if defined(CPU_CAPABILITY_AVX512)
  return false;
#elif defined(CPU_CAPABILITY_AVX2)
  return a_transposed;
#else
  return false;  // not measured: rnnkit's kernel, as before
#endif
}

// matmul's contract (gemm.h: C (R x N) = A (R x K, element (r, k) at A[r * ars + k * aks])
// M (K x N, k-major, leading dimension ldm) [+ C]) on the product use_library_gemm picks.
// Outside a parallel region only: inside one, rnnkit's kernel (the library would nest).
template <typename T>
void product(int64_t R, int64_t K, int64_t N, const T* A, int64_t ars, int64_t aks,
             const T* M, int64_t ldm, bool accumulate, T* C, int64_t ldc) {
  if (R == 0 || N == 0 || K == 0 || at::in_parallel_region() ||
      !use_library_gemm(R, N, K, ars == 1 && aks != 1)) {
    matmul<T>(R, K, N, A, ars, aks, M, ldm, accumulate, C, ldc);
    return;
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // Views of the caller's memory, never written but through `c`.
  const Tensor a = at::from_blob(const_cast<T*>(A), {R, K}, {ars, aks}, opts);
  const Tensor m = at::from_blob(const_cast<T*>(M), {K, N}, {ldm, 1}, opts);
  Tensor c = at::from_blob(C, {R, N}, {ldc, 1}, opts);
  if (accumulate) {
    c.addmm_(a, m);
  } else {
    at::mm_out(c, a, m);
  }
}

}  // namespace rnnkit_cpu
