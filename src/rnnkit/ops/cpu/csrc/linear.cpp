// The layers' input projection, W_ih x + b_ih for all steps at once (cpu_linear), and its
// gradients (cpu_linear_backward): on rnnkit's kernels or torch's library product, as
// gemm_choice.h decides.
#include "gemm.h"
#include "gemm_choice.h"
#include "recurrence.h"
#include "threads.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace rnnkit_cpu {

Tensor linear_forward(const Tensor& input, const Tensor& weight_in,
                      const std::optional<Tensor>& bias_in) {
  const int64_t in_features = weight_in.size(1), out_features = weight_in.size(0);
  auto sizes = input.sizes().vec();
  sizes.back() = out_features;
  if (in_features == 0) {  // no products to form: every row is the bias (or zero)
    Tensor out = at::zeros(sizes, input.options());
    if (bias_in.has_value()) out.add_(*bias_in);
    return out;
  }
  const Tensor x = input.contiguous();
  const int64_t rows = x.numel() / in_features;
  if (rows > 0 && out_features > 0 && !at::in_parallel_region() &&
      use_library_gemm(rows, out_features, in_features, false)) {
    Tensor out = call_buffer(sizes, x.options());
    Tensor out_rows = out.view({rows, out_features});
    const Tensor x_rows = x.view({rows, in_features});
    if (bias_in.has_value()) {
      at::addmm_out(out_rows, *bias_in, x_rows, weight_in.t());
    } else {
      at::mm_out(out_rows, x_rows, weight_in.t());
    }
    return out;
  }
  const int64_t panel = x.scalar_type() == at::kFloat ? Packed<float>::width
                                                      : Packed<double>::width;
  // Whole panels of outputs: pack the weight as stored; else read a k-major copy.
  const bool direct = rows > 1 && in_features > 0 && out_features > 0 &&
                      out_features % panel == 0;
  const Tensor weight = weight_in.contiguous();
  const Tensor weight_t = direct ? Tensor() : weight_in.t().contiguous();  // (I, G)
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
    if (input_grad && use_library_gemm(rows, in_features, out_features, false)) {  // dx = dy W
      product<T>(rows, out_features, in_features, g, out_features, 1, weight.data_ptr<T>(),
                 in_features, false, grad_input.data_ptr<T>(), in_features);
    } else if (input_grad) {
      Tensor storage;
      const Packed<T> w = pack<T>(out_features, in_features, weight.data_ptr<T>(), in_features,
                                  rows > 1, storage);
      matmul<T>(rows, out_features, in_features, g, out_features, 1, w.M, w.ldm, false,
                grad_input.data_ptr<T>(), in_features, w.panels ? &w : nullptr);
    }
    if (weight_grad) {  // dW = dy^T x, reading dy column-wise
      product<T>(out_features, rows, in_features, g, 1, out_features, x.data_ptr<T>(),
                 in_features, false, grad_weight.data_ptr<T>(), in_features);
    }
  });
  Tensor grad_bias = has_bias ? at::sum(grad.view({rows, out_features}), {0})
                              : at::empty({0}, opts);
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace rnnkit_cpu
