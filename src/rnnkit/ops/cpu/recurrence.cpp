// rnnkit's compiled CPU recurrence: the whole time loop of one layer in one direction,
// forward and backward (BPTT), for RNN (named activations), GRU (both formulations) and
// LSTM (optionally projected), in float32 and float64.
//
// The math is exactly rnnkit.cells' step functions; rnnkit.ops.reference is the twin the
// tests hold this file equal to. Per step there is one GEMM against W_hh (two for GRU with
// reset_after=False, one more for the LSTM projection) into preallocated buffers, then one
// fused elementwise pass. Backward computes the per-step gate gradients and leaves the
// weight gradients to one big GEMM after the loop.
//
// Layout (row-major, as the Python side passes it): gates_x (T, B, G*H), h0 (B, Hout),
// c0 (B, H), weight_hh (G*H, Hout), bias_hh (G*H), weight_hr (Hout, H), lengths (B,) int64.
// A row b is "active" at time t when t < lengths[b]; inactive rows hold their state and
// write zero output, so a reverse pass starts at each sequence's own last step.
//
// The ops are declared (schema, fake and autograd) in rnnkit/ops/cpu/_ops.py; this file only
// adds their CPU kernels.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <optional>
#include <tuple>

using at::Tensor;

// BLAS from the MKL inside libtorch when it exports it; otherwise ATen's addmm (slower per
// call, same results). Weak, so a torch built without these symbols still loads this file.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*) __attribute__((weak));
}

namespace {

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
// GEMM on row-major matrices: C (M x N) = alpha * op(A) op(B) + beta * C.

template <typename T>
void blas_gemm(char ta, char tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b,
               int ldb, T beta, T* c, int ldc);

template <>
void blas_gemm<float>(char ta, char tb, int m, int n, int k, float alpha, const float* a,
                      int lda, const float* b, int ldb, float beta, float* c, int ldc) {
  sgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <>
void blas_gemm<double>(char ta, char tb, int m, int n, int k, double alpha, const double* a,
                       int lda, const double* b, int ldb, double beta, double* c, int ldc) {
  dgemm_(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
}

template <typename T>
bool have_blas() {
  if constexpr (std::is_same_v<T, float>) {
    return sgemm_ != nullptr;
  } else {
    return dgemm_ != nullptr;
  }
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, T alpha, const T* A,
          int64_t lda, const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  const bool fits = std::max({M, N, K, lda, ldb, ldc}) < INT_MAX;
  if (have_blas<T>() && fits && K > 0) {
    // Column-major BLAS sees each row-major matrix transposed: C^T = op(B)^T op(A)^T.
    blas_gemm<T>(trans_b ? 'T' : 'N', trans_a ? 'T' : 'N', N, M, K, alpha, B, ldb, A, lda,
                 beta, C, ldc);
    return;
  }
  auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    Tensor t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols},
                             {ld, 1}, options);
    return trans ? t.t() : t;
  };
  Tensor a = view(A, M, K, lda, trans_a);
  Tensor b = view(B, K, N, ldb, trans_b);
  Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, options);
  if (beta == T(0)) c.zero_();
  at::addmm_out(c, c, a, b, beta == T(0) ? T(1) : beta, alpha);
}

// ---------------------------------------------------------------------------------------
// Elementwise math. Each activation gives its value and its derivative at the same point,
// with torch's conventions at the kinks (relu'(0) = 0, hardtanh'(+-1) = 0).

template <typename T>
inline T sigmoid(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

template <int A, typename T>
inline T activate(T x, T& derivative) {
  if constexpr (A == kTanh) {
    T y = std::tanh(x);
    derivative = T(1) - y * y;
    return y;
  } else if constexpr (A == kRelu) {
    derivative = x > T(0) ? T(1) : T(0);
    return x > T(0) ? x : T(0);
  } else if constexpr (A == kIdentity) {
    derivative = T(1);
    return x;
  } else if constexpr (A == kSigmoid) {
    T y = sigmoid(x);
    derivative = y * (T(1) - y);
    return y;
  } else if constexpr (A == kSilu) {
    T s = sigmoid(x);
    derivative = s * (T(1) + x * (T(1) - s));
    return x * s;
  } else if constexpr (A == kGelu) {
    const T cdf = T(0.5) * (T(1) + std::erf(x * T(M_SQRT1_2)));
    const T pdf = std::exp(T(-0.5) * x * x) * T(0.5 * M_2_SQRTPI * M_SQRT1_2);
    derivative = cdf + x * pdf;
    return x * cdf;
  } else if constexpr (A == kSoftsign) {
    const T denominator = T(1) + std::abs(x);
    derivative = T(1) / (denominator * denominator);
    return x / denominator;
  } else {
    static_assert(A == kHardtanh);
    derivative = (x > T(-1) && x < T(1)) ? T(1) : T(0);
    return std::min(std::max(x, T(-1)), T(1));
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
  const int64_t grain = std::max<int64_t>(1, 8192 / cost_per_element);
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
// Forward

template <typename T>
void forward_kernel(const Shape& s, const Steps& steps, int64_t mode, int64_t activation,
                    bool reset_after, const T* gates_x, T* h, T* c, const T* w_hh,
                    const T* b_hh, const T* w_hr, T* output, T* gates, int64_t gates_stride,
                    T* cells, int64_t cells_stride, T* projected, int64_t projected_stride,
                    T* hh, T* proj_out) {
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = s.G * s.H;
  for (int64_t step = 0; step < T_; ++step) {
    const int64_t t = steps.reverse ? T_ - 1 - step : step;
    const T* gx = gates_x + t * B * GH;
    T* out = output + t * B * Hout;
    T* saved = gates + t * gates_stride;
    if (mode == kRNN) {
      gemm<T>(false, true, B, GH, Hout, T(1), h, Hout, w_hh, Hout, T(0), hh, GH);
      dispatch_activation(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
          const bool on = steps.active(t, b);
          for (int64_t j = j0; j < j1; ++j) {
            T pre = gx[b * GH + j] + hh[b * GH + j] + (b_hh ? b_hh[j] : T(0));
            T derivative;
            const T y = activate<A>(pre, derivative);
            saved[b * H + j] = derivative;
            if (on) h[b * H + j] = y;
            out[b * H + j] = on ? y : T(0);
          }
        });
      });
    } else if (mode == kGRU && reset_after) {
      gemm<T>(false, true, B, GH, Hout, T(1), h, Hout, w_hh, Hout, T(0), hh, GH);
      for_rows(B, H, 32, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T* x = gx + b * GH;
        const T* r_ = hh + b * GH;
        T* g = saved + b * 4 * H;
        for (int64_t j = j0; j < j1; ++j) {
          const T br = b_hh ? b_hh[j] : T(0), bz = b_hh ? b_hh[H + j] : T(0);
          const T bn = b_hh ? b_hh[2 * H + j] : T(0);
          const T r = sigmoid(x[j] + r_[j] + br);
          const T z = sigmoid(x[H + j] + r_[H + j] + bz);
          const T hn = r_[2 * H + j] + bn;
          const T n = std::tanh(x[2 * H + j] + r * hn);
          const T y = (T(1) - z) * n + z * h[b * H + j];
          g[j] = r, g[H + j] = z, g[2 * H + j] = n, g[3 * H + j] = hn;
          if (on) h[b * H + j] = y;
          out[b * H + j] = on ? y : T(0);
        }
      });
    } else if (mode == kGRU) {
      // reset before the matmul: the candidate needs W_hn (r * h), a second GEMM.
      gemm<T>(false, true, B, 2 * H, Hout, T(1), h, Hout, w_hh, Hout, T(0), hh, GH);
      for_rows(B, H, 16, [&](int64_t b, int64_t j0, int64_t j1) {
        const T* x = gx + b * GH;
        const T* r_ = hh + b * GH;
        T* g = saved + b * 4 * H;
        for (int64_t j = j0; j < j1; ++j) {
          const T br = b_hh ? b_hh[j] : T(0), bz = b_hh ? b_hh[H + j] : T(0);
          const T r = sigmoid(x[j] + r_[j] + br);
          g[j] = r;
          g[H + j] = sigmoid(x[H + j] + r_[H + j] + bz);
          g[3 * H + j] = r * h[b * H + j];
        }
      });
      gemm<T>(false, true, B, H, H, T(1), saved + 3 * H, 4 * H, w_hh + 2 * H * Hout, Hout,
              T(0), hh + 2 * H, GH);
      for_rows(B, H, 16, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T* x = gx + b * GH;
        const T* r_ = hh + b * GH;
        T* g = saved + b * 4 * H;
        for (int64_t j = j0; j < j1; ++j) {
          const T bn = b_hh ? b_hh[2 * H + j] : T(0);
          const T n = std::tanh(x[2 * H + j] + r_[2 * H + j] + bn);
          const T z = g[H + j];
          const T y = (T(1) - z) * n + z * h[b * H + j];
          g[2 * H + j] = n;
          if (on) h[b * H + j] = y;
          out[b * H + j] = on ? y : T(0);
        }
      });
    } else {
      gemm<T>(false, true, B, GH, Hout, T(1), h, Hout, w_hh, Hout, T(0), hh, GH);
      T* cell_out = cells + t * cells_stride;
      T* m = projected + t * projected_stride;
      const bool project = w_hr != nullptr;
      for_rows(B, H, 40, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T* x = gx + b * GH;
        const T* r_ = hh + b * GH;
        T* g = saved + b * 4 * H;
        for (int64_t j = j0; j < j1; ++j) {
          auto pre = [&](int64_t k) {
            return x[k * H + j] + r_[k * H + j] + (b_hh ? b_hh[k * H + j] : T(0));
          };
          const T i = sigmoid(pre(0)), f = sigmoid(pre(1)), gg = std::tanh(pre(2));
          const T o = sigmoid(pre(3));
          const T c_new = f * c[b * H + j] + i * gg;
          const T y = o * std::tanh(c_new);
          g[j] = i, g[H + j] = f, g[2 * H + j] = gg, g[3 * H + j] = o;
          if (on) c[b * H + j] = c_new;
          cell_out[b * H + j] = c[b * H + j];
          if (project) {
            m[b * H + j] = y;
          } else {
            if (on) h[b * H + j] = y;
            out[b * H + j] = on ? y : T(0);
          }
        }
      });
      if (project) {
        gemm<T>(false, true, B, Hout, H, T(1), m, H, w_hr, H, T(0), proj_out, Hout);
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
  const Tensor bias_hh = optional_or_empty(bias_hh_in);
  const Tensor weight_hr = optional_or_empty(weight_hr_in);
  const Tensor lengths = optional_or_empty(lengths_in);
  const int64_t G = mode == kRNN ? 1 : (mode == kGRU ? 3 : 4);
  Shape s{gates_x.size(0), gates_x.size(1), gates_x.size(2) / G, h0.size(1), G};
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout;
  const auto opts = gates_x.options();

  Tensor h = h0.contiguous().clone();
  Tensor c = mode == kLSTM ? c0->contiguous().clone() : at::empty({0}, opts);
  Tensor output = at::empty({T_, B, Hout}, opts);
  const int64_t saved_width = mode == kRNN ? H : 4 * H;
  // When no backward will follow, the per-step buffers are one step deep and reused.
  const int64_t depth = training ? T_ : 1;
  Tensor gates = at::empty({depth, B, saved_width}, opts);
  const bool lstm = mode == kLSTM, project = weight_hr.defined();
  Tensor cells = at::empty({lstm ? depth : 0, B, H}, opts);
  Tensor projected = at::empty({project ? depth : 0, B, H}, opts);
  Tensor hh = at::empty({B, G * H}, opts);
  Tensor proj_out = at::empty({project ? B : 0, Hout}, opts);
  const int64_t stride = training ? B : 0;  // rows per time step in the saved buffers

  Steps steps{T_, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES(gates_x.scalar_type(), "rnnkit_cpu_recurrence_forward", [&] {
    forward_kernel<scalar_t>(
        s, steps, mode, activation, reset_after, gates_x.data_ptr<scalar_t>(),
        h.data_ptr<scalar_t>(), lstm ? c.data_ptr<scalar_t>() : nullptr,
        weight_hh.data_ptr<scalar_t>(),
        bias_hh.defined() ? bias_hh.data_ptr<scalar_t>() : nullptr,
        project ? weight_hr.data_ptr<scalar_t>() : nullptr, output.data_ptr<scalar_t>(),
        gates.data_ptr<scalar_t>(), stride * saved_width,
        lstm ? cells.data_ptr<scalar_t>() : nullptr, stride * H,
        project ? projected.data_ptr<scalar_t>() : nullptr, stride * H,
        hh.data_ptr<scalar_t>(), project ? proj_out.data_ptr<scalar_t>() : nullptr);
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
void backward_kernel(const Shape& s, const Steps& steps, int64_t mode, bool reset_after,
                     const T* grad_output, T* dh, T* dc, const T* h0, const T* c0,
                     const T* w_hh, const T* w_hr, const T* output, const T* gates,
                     const T* cells, T* dgx, T* dhh, T* carry, T* dhs, T* dm) {
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = s.G * s.H;
  const int64_t W = mode == kRNN ? H : 4 * H;  // saved gate width
  auto previous_h = [&](int64_t t, int64_t b) {
    return steps.first(t, b) ? h0 + b * Hout : output + (steps.previous(t) * B + b) * Hout;
  };
  auto previous_c = [&](int64_t t, int64_t b) {
    return steps.first(t, b) ? c0 + b * H : cells + (steps.previous(t) * B + b) * H;
  };
  for (int64_t step = T_ - 1; step >= 0; --step) {
    const int64_t t = steps.reverse ? T_ - 1 - step : step;
    const T* gout = grad_output + t * B * Hout;
    const T* g_t = gates + t * B * W;
    T* dg = dgx + t * B * GH;
    T* dr = dhh + t * B * GH;
    if (mode == kRNN) {
      for_rows(B, H, 2, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t k = b * H + j;
          dg[k] = on ? (dh[k] + gout[k]) * g_t[k] : T(0);
          carry[k] = on ? T(0) : dh[k];
        }
      });
      gemm<T>(false, false, B, Hout, GH, T(1), dg, GH, w_hh, Hout, T(1), carry, Hout);
    } else if (mode == kGRU && reset_after) {
      for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T* g = g_t + b * W;
        const T* hp = previous_h(t, b);
        T* dgb = dg + b * GH;
        T* drb = dr + b * GH;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t k = b * H + j;
          if (!on) {
            dgb[j] = dgb[H + j] = dgb[2 * H + j] = T(0);
            drb[j] = drb[H + j] = drb[2 * H + j] = T(0);
            carry[k] = dh[k];
            continue;
          }
          const T r = g[j], z = g[H + j], n = g[2 * H + j], hn = g[3 * H + j];
          const T d = dh[k] + gout[k];
          const T dn = d * (T(1) - z) * (T(1) - n * n);
          const T dz = d * (hp[j] - n) * z * (T(1) - z);
          const T dr_ = dn * hn * r * (T(1) - r);
          dgb[j] = drb[j] = dr_;
          dgb[H + j] = drb[H + j] = dz;
          dgb[2 * H + j] = dn;
          drb[2 * H + j] = dn * r;
          carry[k] = d * z;
        }
      });
      gemm<T>(false, false, B, Hout, GH, T(1), dr, GH, w_hh, Hout, T(1), carry, Hout);
    } else if (mode == kGRU) {
      for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T* g = g_t + b * W;
        const T* hp = previous_h(t, b);
        T* dgb = dg + b * GH;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t k = b * H + j;
          if (!on) {
            dgb[j] = dgb[H + j] = dgb[2 * H + j] = T(0);
            carry[k] = dh[k];
            continue;
          }
          const T z = g[H + j], n = g[2 * H + j];
          const T d = dh[k] + gout[k];
          dgb[2 * H + j] = d * (T(1) - z) * (T(1) - n * n);
          dgb[H + j] = d * (hp[j] - n) * z * (T(1) - z);
          carry[k] = d * z;
        }
      });
      // d(r * h) = dn W_hn, into dm (B, H).
      gemm<T>(false, false, B, H, H, T(1), dg + 2 * H, GH, w_hh + 2 * H * Hout, Hout, T(0), dm,
              H);
      for_rows(B, H, 4, [&](int64_t b, int64_t j0, int64_t j1) {
        if (!steps.active(t, b)) return;
        const T* g = g_t + b * W;
        const T* hp = previous_h(t, b);
        T* dgb = dg + b * GH;
        for (int64_t j = j0; j < j1; ++j) {
          const int64_t k = b * H + j;
          const T r = g[j];
          dgb[j] = dm[k] * hp[j] * r * (T(1) - r);
          carry[k] += dm[k] * r;
        }
      });
      gemm<T>(false, false, B, Hout, 2 * H, T(1), dg, GH, w_hh, Hout, T(1), carry, Hout);
    } else {
      const bool project = w_hr != nullptr;
      if (project) {
        T* dh_t = dhs + t * B * Hout;
        for (int64_t b = 0; b < B; ++b) {
          const bool on = steps.active(t, b);
          for (int64_t j = 0; j < Hout; ++j) {
            const int64_t k = b * Hout + j;
            dh_t[k] = on ? dh[k] + gout[k] : T(0);
          }
        }
        gemm<T>(false, false, B, H, Hout, T(1), dh_t, Hout, w_hr, H, T(0), dm, H);
      }
      const T* c_t = cells + t * B * H;
      for_rows(B, H, 24, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T* g = g_t + b * W;
        const T* cp = on ? previous_c(t, b) : nullptr;
        T* dgb = dg + b * GH;
        for (int64_t j = j0; j < j1; ++j) {
          if (!on) {
            dgb[j] = dgb[H + j] = dgb[2 * H + j] = dgb[3 * H + j] = T(0);
            if (!project) carry[b * Hout + j] = dh[b * Hout + j];
            continue;
          }
          const int64_t k = b * H + j;
          const T i = g[j], f = g[H + j], gg = g[2 * H + j], o = g[3 * H + j];
          const T d = project ? dm[k] : dh[k] + gout[k];
          const T tc = std::tanh(c_t[k]);
          const T dcell = dc[k] + d * o * (T(1) - tc * tc);
          dgb[j] = dcell * gg * i * (T(1) - i);
          dgb[H + j] = dcell * cp[j] * f * (T(1) - f);
          dgb[2 * H + j] = dcell * i * (T(1) - gg * gg);
          dgb[3 * H + j] = d * tc * o * (T(1) - o);
          dc[k] = dcell * f;
          if (!project) carry[k] = T(0);
        }
      });
      if (project) {
        for (int64_t b = 0; b < B; ++b) {
          const bool on = steps.active(t, b);
          for (int64_t j = 0; j < Hout; ++j) carry[b * Hout + j] = on ? T(0) : dh[b * Hout + j];
        }
      }
      gemm<T>(false, false, B, Hout, GH, T(1), dg, GH, w_hh, Hout, T(1), carry, Hout);
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
  Tensor dgx = at::empty({T_, B, GH}, opts);
  Tensor dhh = separate_dhh ? at::empty({T_, B, GH}, opts) : dgx;
  Tensor carry = at::empty({B, Hout}, opts);
  Tensor dhs = at::empty({project ? T_ : 0, B, Hout}, opts);
  Tensor dm = at::empty({B, H}, opts);
  Tensor grad_w_hh = at::empty({GH, Hout}, opts);
  Tensor grad_w_hr = project ? at::empty({Hout, H}, opts) : at::empty({0}, opts);

  Steps steps{T_, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "rnnkit_cpu_recurrence_backward", [&] {
    using T = scalar_t;
    backward_kernel<T>(s, steps, mode, reset_after, grad_output.data_ptr<T>(),
                       dh.data_ptr<T>(), lstm ? dc.data_ptr<T>() : nullptr,
                       h0.data_ptr<T>(), lstm ? c0.data_ptr<T>() : nullptr,
                       weight_hh.data_ptr<T>(), project ? weight_hr.data_ptr<T>() : nullptr,
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
    gemm<T>(true, false, rz, Hout, rows, T(1), dg_main, GH, out_main, Hout, T(0), gw, Hout);
    Tensor first = at::empty({B, GH}, opts);
    T* fp = first.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      const int64_t t0 = reverse ? (steps.lengths ? steps.lengths[b] : T_) - 1 : 0;
      std::copy(dg + (t0 * B + b) * GH, dg + (t0 * B + b + 1) * GH, fp + b * GH);
    }
    gemm<T>(true, false, rz, Hout, B, T(1), fp, GH, h0.data_ptr<T>(), Hout,
            rows > 0 ? T(1) : T(0), gw, Hout);
    if (rz != GH) {
      // GRU with the reset before the matmul: W_hn meets r * h_{t-1}, saved in the gates.
      gemm<T>(true, false, H, Hout, T_ * B, T(1), dg + 2 * H, GH, gates.data_ptr<T>() + 3 * H,
              4 * H, T(0), gw + 2 * H * Hout, Hout);
    }
    if (project) {
      gemm<T>(true, false, Hout, H, T_ * B, T(1), dhs.data_ptr<T>(), Hout,
              projected.data_ptr<T>(), H, T(0), grad_w_hr.data_ptr<T>(), H);
    }
  });
  Tensor grad_b_hh = has_bias ? at::sum(dhh.view({T_ * B, GH}), {0}) : at::empty({0}, opts);
  return {dgx, dh, dc, grad_w_hh, grad_b_hh, grad_w_hr};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkit, CPU, m) {
  m.impl("cpu_recurrence_forward", &recurrence_forward);
  m.impl("cpu_recurrence_backward", &recurrence_backward);
}
