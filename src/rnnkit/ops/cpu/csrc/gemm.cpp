// The packers: each weight's copy in the layout a kernel streams, made once per call (see
// gemm.h for the layouts). Not per step, so they live here, built once for float and double.
#include "gemm.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>

namespace rnnkit_cpu {
namespace {

// A call buffer of `elements` T for a packed copy, kept alive by `storage`.
template <typename T>
T* packed_storage(int64_t elements, Tensor& storage) {
  storage = call_buffer({elements}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  return storage.data_ptr<T>();
}

// fn(p) for each of `count` panels, the panels split between threads.
template <typename F>
void for_panels(int64_t count, const F& fn) {
  at::parallel_for(0, count, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) fn(p);
  });
}

}  // namespace

template <typename T>
Packed<T> pack(int64_t K, int64_t N, const T* M, int64_t ldm, bool wanted, Tensor& storage) {
  constexpr int64_t width = Packed<T>::width;
  const int64_t count = N / width;
  if (!wanted || count == 0) return {M, ldm, nullptr, K};
  T* out = packed_storage<T>(count * K * width, storage);
  for_panels(count, [&](int64_t p) {
    for (int64_t k = 0; k < K; ++k) {
      std::copy(M + k * ldm + p * width, M + k * ldm + (p + 1) * width, out + (p * K + k) * width);
    }
  });
  return {M, ldm, out, K};
}

template <typename T>
const T* pack_gates(int64_t G, int64_t H, int64_t Hout, const T* w, Tensor& storage) {
  constexpr int64_t U = lstm_unit<T>();
  const int64_t panels = H / U;
  T* out = packed_storage<T>(panels * Hout * G * U, storage);
  for_panels(panels, [&](int64_t p) {
    T* panel = out + p * Hout * G * U;
    // Contiguous writes (i innermost) from U row streams, which stay in L1 meanwhile.
    for (int64_t g = 0; g < G; ++g) {
      const T* rows = w + (g * H + p * U) * Hout;
      for (int64_t k = 0; k < Hout; ++k) {
        T* dst = panel + (k * G + g) * U;
        for (int64_t i = 0; i < U; ++i) dst[i] = rows[i * Hout + k];
      }
    }
  });
  return out;
}

template <typename T>
Packed<T> pack_transposed(int64_t K, int64_t N, const T* w, Tensor& storage) {
  constexpr int64_t width = Packed<T>::width;
  const int64_t panels = N / width;
  T* out = packed_storage<T>(panels * K * width, storage);
  for_panels(panels, [&](int64_t p) {
    T* panel = out + p * K * width;
    const T* rows = w + p * width * K;
    for (int64_t k = 0; k < K; ++k) {
      for (int64_t c = 0; c < width; ++c) panel[k * width + c] = rows[c * K + k];
    }
  });
  return {nullptr, width, out, K};
}

#define RNNKIT_INSTANTIATE(T)                                                              \
  template Packed<T> pack<T>(int64_t, int64_t, const T*, int64_t, bool, Tensor&);          \
  template Packed<T> pack_transposed<T>(int64_t, int64_t, const T*, Tensor&);              \
  template const T* pack_gates<T>(int64_t, int64_t, int64_t, const T*, Tensor&);
RNNKIT_INSTANTIATE(float)
RNNKIT_INSTANTIATE(double)
#undef RNNKIT_INSTANTIATE

}  // namespace rnnkit_cpu
