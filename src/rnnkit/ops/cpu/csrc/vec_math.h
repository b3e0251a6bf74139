// Elementwise math on ATen's vectors: sigmoid, tanh, the RNN activations with their
// derivatives, and the loop over a row in whole vectors.
//
// Every source file includes this header (directly or through another) before any ATen
// header: it picks the vector width that the rest of the build is written for.
#pragma once

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

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace rnnkit_cpu {

template <typename T>
using Vec = at::vec::Vectorized<T>;

#if defined(CPU_CAPABILITY_AVX512)
// Fails where an ATen vector header was included before this one (its default width then).
static_assert(Vec<float>::size() == 16, "include vec_math.h before any ATen header");
#endif

enum Activation : int64_t {
  kTanh = 0,
  kRelu = 1,
  kIdentity = 2,
  kSigmoid = 3,
  kSilu = 4,
  kGelu = 5,
  kSoftsign = 6,
  kHardtanh = 7,
  kSoftplus = 8,
  kHardSigmoid = 9,  // Keras 3's: relu6(x + 3) / 6 = clip(x / 6 + 1/2, 0, 1)
};

// hard_sigmoid's slope inside (-3, 3); the reference path's hardtanh(x + 3, 0, 6) / 6 has it
// exactly (F.hardsigmoid's own backward would use the float 1/6 in double).
template <typename T>
constexpr T kHardSigmoidSlope = T(1) / T(6);

// ---------------------------------------------------------------------------------------
// Elementwise math, on whole vectors. Each activation gives its value and its derivative at
// the same point, with torch's conventions at the kinks (relu'(0) = 0, hardtanh'(+-1) = 0).

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

// The gradient through y = sigmoid(x) (or tanh(x)), given y: upstream * y' in that order of
// rounding, upstream * y * (1 - y) (or upstream * (1 - y^2)).
template <typename T>
inline Vec<T> sigmoid_backward(const Vec<T>& upstream, const Vec<T>& y) {
  return upstream * y * (Vec<T>(T(1)) - y);
}

template <typename T>
inline Vec<T> tanh_backward(const Vec<T>& upstream, const Vec<T>& y) {
  return upstream * (Vec<T>(T(1)) - y * y);
}

// Activations whose derivative cannot be read off their output; only these save it.
constexpr bool keeps_derivative(int64_t activation) {
  return activation == kSilu || activation == kGelu || activation == kSoftplus;
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
  } else if constexpr (A == kHardtanh) {
    derivative = x.gt(Vec<T>(T(-1))) * x.lt(one);
    return at::vec::clamp(x, Vec<T>(T(-1)), one);
  } else if constexpr (A == kHardSigmoid) {
    // As the reference path's hardtanh(x + 3, 0, 6) / 6, so the values round alike.
    const Vec<T> y =
        at::vec::clamp(x + Vec<T>(T(3)), Vec<T>(T(0)), Vec<T>(T(6))) / Vec<T>(T(6));
    derivative = y.gt(Vec<T>(T(0))) * y.lt(one) * Vec<T>(kHardSigmoidSlope<T>);
    return y;
  } else {
    static_assert(A == kSoftplus);
    // log(1 + e^x), written without overflow; linear past torch's threshold of 20.
    const Vec<T> linear = x > Vec<T>(T(20));
    const Vec<T> smooth = at::vec::maximum(x, zero) + x.abs().neg().exp().log1p();
    derivative = Vec<T>::blendv(sigmoid(x), one, linear);
    return Vec<T>::blendv(smooth, x, linear);
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
  } else if constexpr (A == kHardSigmoid) {
    return y.gt(Vec<T>(T(0))) * y.lt(one) * Vec<T>(kHardSigmoidSlope<T>);
  } else {
    static_assert(A == kSilu || A == kGelu || A == kSoftplus,
                  "this activation saves its derivative");
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
    case kSoftplus: return body(std::integral_constant<int, kSoftplus>{});
    case kHardSigmoid: return body(std::integral_constant<int, kHardSigmoid>{});
    default: TORCH_CHECK(false, "rnnkit: unknown activation code ", activation);
  }
}

// Calls fn(j, count) over [j0, j1) in whole vectors, then one partial vector.
template <typename T, typename F>
inline void for_vectors(int64_t j0, int64_t j1, const F& fn) {
  constexpr int64_t width = Vec<T>::size();
  int64_t j = j0;
  for (; j + width <= j1; j += width) fn(j, width);
  if (j < j1) fn(j, j1 - j);
}

}  // namespace rnnkit_cpu
