// One step of a stacked unidirectional RNN, GRU or LSTM, for streaming inference: the whole
// stack in one call, from weights that rnnkit/ops/cpu/stream.py packs once and keeps until a
// parameter changes. Nothing is saved for backward; the Python side calls this only when no
// gradient is needed. At B = 1 every product is one pass over a k-major weight (vector_matrix,
// one thread: at streaming sizes the weights sit in L2 and a thread team costs more than it
// saves); a few rows run on gemm.h's register-blocked matmul.
//
// Per layer the packed weights are four tensors:
//   ih   (I, G*H)  W_ih^T, k-major
//   hh   (Hout, G*H)  W_hh^T, k-major
//   bias (G*H,) b_ih + b_hh for RNN and LSTM; (2*G*H,) [b_ih, b_hh] for GRU, whose candidate
//        needs them apart; empty without biases
//   hr   (H, P)  W_hr^T for an LSTM projection, else empty

#include "cells.h"
#include "gemm.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace rnnkit_cpu {
namespace {

enum StreamMode : int64_t { kStreamRnn = 0, kStreamGru = 1, kStreamLstm = 2 };

// y (B x N, row stride ldy) = x (B x K, row stride ldx) M (K x N, k-major, ldm) [+ y].
template <typename T>
void product(int64_t B, int64_t K, int64_t N, const T* x, int64_t ldx, const T* M, int64_t ldm,
             bool accumulate, T* y, int64_t ldy) {
  if (B == 1) {
    vector_matrix<T>(K, N, x, 1, M, ldm, accumulate, y);
  } else {
    matmul<T>(B, K, N, x, ldx, 1, M, ldm, accumulate, y, ldy);
  }
}

// Rows [0, B) of y (row stride ldy), N wide, start as `bias` (or zero, without one).
template <typename T>
void seed(int64_t B, int64_t N, const T* bias, T* y, int64_t ldy) {
  for (int64_t b = 0; b < B; ++b) {
    if (bias) {
      std::copy(bias, bias + N, y + b * ldy);
    } else {
      std::fill(y + b * ldy, y + b * ldy + N, T(0));
    }
  }
}

template <typename T>
struct Layer {
  const T* ih;
  const T* hh;
  const T* bias;  // nullptr: no biases
  const T* hr;    // nullptr: no projection
  int64_t I, H, Hout;
};

// gates (B x G*H) = x W_ih^T + h W_hh^T + bias: RNN and LSTM.
template <typename T>
void summed_gates(int64_t B, int64_t GH, const Layer<T>& w, const T* x, const T* h, T* gates) {
  seed<T>(B, GH, w.bias, gates, GH);
  product<T>(B, w.I, GH, x, w.I, w.ih, GH, true, gates, GH);
  product<T>(B, w.Hout, GH, h, w.Hout, w.hh, GH, true, gates, GH);
}

template <typename T>
void rnn_layer(int64_t activation, int64_t B, const Layer<T>& w, const T* x, const T* h,
               T* h_new, std::vector<T>& scratch) {
  const int64_t H = w.H;
  scratch.resize(B * H);
  T* gates = scratch.data();
  summed_gates<T>(B, H, w, x, h, gates);
  dispatch_activation(activation, [&](auto a) {
    constexpr int A = decltype(a)::value;
    for (int64_t b = 0; b < B; ++b) {
      for_vectors<T>(0, H, [&](int64_t j, int64_t count) {
        Vec<T> derivative;
        rnn_forward<A, T>(Vec<T>::loadu(gates + b * H + j, count), derivative)
            .store(h_new + b * H + j, count);
      });
    }
  });
}

template <typename T>
void lstm_layer(int64_t B, const Layer<T>& w, const T* x, const T* h, const T* c, T* h_new,
                T* c_new, std::vector<T>& scratch) {
  const int64_t H = w.H, GH = 4 * H;
  scratch.resize(B * (GH + H));
  T* gates = scratch.data();
  T* unprojected = gates + B * GH;  // o * tanh(c') before W_hr
  summed_gates<T>(B, GH, w, x, h, gates);
  T* y = w.hr ? unprojected : h_new;
  for (int64_t b = 0; b < B; ++b) {
    const T* g = gates + b * GH;
    for_vectors<T>(0, H, [&](int64_t j, int64_t count) {
      using V = Vec<T>;
      const LstmPoint<T> p =
          lstm_forward<T>(V::loadu(g + j, count), V::loadu(g + H + j, count),
                          V::loadu(g + 2 * H + j, count), V::loadu(g + 3 * H + j, count),
                          V::loadu(c + b * H + j, count));
      p.c.store(c_new + b * H + j, count);
      p.y.store(y + b * H + j, count);
    });
  }
  if (w.hr) product<T>(B, H, w.Hout, unprojected, H, w.hr, w.Hout, false, h_new, w.Hout);
}

template <typename T>
void gru_layer(bool reset_after, int64_t B, const Layer<T>& w, const T* x, const T* h,
               T* h_new, std::vector<T>& scratch) {
  using V = Vec<T>;
  const int64_t H = w.H, GH = 3 * H;
  scratch.resize(B * (2 * GH + H));
  T* gx = scratch.data();     // W_ih x + b_ih
  T* gh = gx + B * GH;        // W_hh h + b_hh (reset before: its r and z columns, then W_hn (r h))
  T* reset_h = gh + B * GH;   // r * h, reset before only
  const T* b_ih = w.bias;
  const T* b_hh = w.bias ? w.bias + GH : nullptr;
  seed<T>(B, GH, b_ih, gx, GH);
  product<T>(B, w.I, GH, x, w.I, w.ih, GH, true, gx, GH);
  if (reset_after) {
    seed<T>(B, GH, b_hh, gh, GH);
    product<T>(B, H, GH, h, H, w.hh, GH, true, gh, GH);
    for (int64_t b = 0; b < B; ++b) {
      const T *xr = gx + b * GH, *hr = gh + b * GH, *h_old = h + b * H;
      for_vectors<T>(0, H, [&](int64_t j, int64_t count) {
        const V r = sigmoid(V::loadu(xr + j, count) + V::loadu(hr + j, count));
        const V z = sigmoid(V::loadu(xr + H + j, count) + V::loadu(hr + H + j, count));
        const V n = gru_candidate_after<T>(V::loadu(xr + 2 * H + j, count), r,
                                           V::loadu(hr + 2 * H + j, count));
        gru_output<T>(z, n, V::loadu(h_old + j, count)).store(h_new + b * H + j, count);
      });
    }
    return;
  }
  // Reset before: r and z first, then the candidate's product with r * h.
  seed<T>(B, 2 * H, b_hh, gh, GH);
  product<T>(B, H, 2 * H, h, H, w.hh, GH, true, gh, GH);
  for (int64_t b = 0; b < B; ++b) {
    const T *xr = gx + b * GH, *h_old = h + b * H;
    T* hr = gh + b * GH;
    for_vectors<T>(0, H, [&](int64_t j, int64_t count) {
      const V r = sigmoid(V::loadu(xr + j, count) + V::loadu(hr + j, count));
      const V z = sigmoid(V::loadu(xr + H + j, count) + V::loadu(hr + H + j, count));
      z.store(hr + H + j, count);
      (r * V::loadu(h_old + j, count)).store(reset_h + b * H + j, count);
    });
  }
  seed<T>(B, H, b_hh ? b_hh + 2 * H : nullptr, gh + 2 * H, GH);
  product<T>(B, H, H, reset_h, H, w.hh + 2 * H, GH, true, gh + 2 * H, GH);
  for (int64_t b = 0; b < B; ++b) {
    const T *xr = gx + b * GH, *hr = gh + b * GH, *h_old = h + b * H;
    for_vectors<T>(0, H, [&](int64_t j, int64_t count) {
      const V n = gru_candidate_before<T>(V::loadu(xr + 2 * H + j, count) +
                                          V::loadu(hr + 2 * H + j, count));
      gru_output<T>(V::loadu(hr + H + j, count), n, V::loadu(h_old + j, count))
          .store(h_new + b * H + j, count);
    });
  }
}

const int64_t kNumGates[] = {1, 3, 4};

// The last layer's output and the new states, from the input x (..., I), B rows in all) and
// the states h0 (L * B * Hout elements) and, for LSTM, c0 (L * B * H), each of any shape (a
// cell's (B, H) or (H), a layer's (L, B, H) or (L, H)): the output is shaped like the input
// with Hout features, h_n and c_n like h0 and c0 (c_n is empty but for LSTM). weights holds
// four tensors per layer (see the top of this file). Taking and giving the callers' own shapes
// spares them a view per tensor and step.
std::tuple<Tensor, Tensor, Tensor> stream_step(const Tensor& input, const Tensor& h0,
                                               const std::optional<Tensor>& c0,
                                               at::TensorList weights, int64_t mode,
                                               int64_t activation, bool reset_after) {
  TORCH_CHECK(mode >= 0 && mode <= 2, "rnnkit stream_step: unknown mode ", mode);
  const bool lstm = mode == kStreamLstm;
  TORCH_CHECK(!lstm || c0.has_value(), "rnnkit stream_step: LSTM needs c0");
  const int64_t L = static_cast<int64_t>(weights.size()) / 4;
  TORCH_CHECK(L >= 1 && static_cast<int64_t>(weights.size()) == 4 * L && input.dim() >= 1,
              "rnnkit stream_step: 4 weights per layer and an input (..., I) expected");
  const int64_t G = kNumGates[mode];
  const int64_t H = weights[1].size(1) / G, Hout = weights[1].size(0);
  const int64_t I0 = input.size(-1);
  const int64_t B = I0 ? input.numel() / I0 : 0;
  TORCH_CHECK(h0.numel() == L * B * Hout && (!lstm || c0->numel() == L * B * H),
              "rnnkit stream_step: the states do not hold ", L, " layers of ", B, " rows");
  TORCH_CHECK(h0.scalar_type() == input.scalar_type() &&
                  (!lstm || c0->scalar_type() == input.scalar_type()),
              "rnnkit stream_step: the states must have the input's dtype");
  const Tensor x = input.contiguous(), h = h0.contiguous();
  const Tensor c = lstm ? c0->contiguous() : Tensor();
  Tensor h_n = at::empty(h0.sizes(), h0.options());
  Tensor c_n = lstm ? at::empty(c0->sizes(), c0->options()) : at::empty({0}, h0.options());
  std::vector<int64_t> output_size = input.sizes().vec();
  output_size.back() = Hout;
  Tensor output = at::empty(output_size, h0.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_stream_step", [&] {
    thread_local std::vector<scalar_t> scratch;
    const scalar_t* layer_x = x.data_ptr<scalar_t>();
    int64_t I = I0;
    for (int64_t l = 0; l < L; ++l) {
      const Tensor& ih = weights[4 * l];
      const Tensor& hh = weights[4 * l + 1];
      const Tensor& bias = weights[4 * l + 2];
      const Tensor& hr = weights[4 * l + 3];
      TORCH_CHECK(ih.is_contiguous() && hh.is_contiguous() && bias.is_contiguous() &&
                      hr.is_contiguous() && ih.scalar_type() == x.scalar_type() &&
                      hh.scalar_type() == x.scalar_type(),
                  "rnnkit stream_step: packed weights must be contiguous, in the input's dtype");
      TORCH_CHECK(ih.size(0) == I && ih.size(1) == G * H && hh.size(0) == Hout &&
                      hh.size(1) == G * H && (hr.numel() == 0 || (hr.size(0) == H &&
                                                                   hr.size(1) == Hout)),
                  "rnnkit stream_step: layer ", l, " weights have the wrong shapes");
      TORCH_CHECK(bias.numel() == 0 || bias.numel() == (mode == kStreamGru ? 2 : 1) * G * H,
                  "rnnkit stream_step: layer ", l, " bias has the wrong size");
      const Layer<scalar_t> w{ih.data_ptr<scalar_t>(),
                              hh.data_ptr<scalar_t>(),
                              bias.numel() ? bias.data_ptr<scalar_t>() : nullptr,
                              hr.numel() ? hr.data_ptr<scalar_t>() : nullptr,
                              I, H, Hout};
      const scalar_t* h_old = h.data_ptr<scalar_t>() + l * B * Hout;
      scalar_t* h_new = h_n.data_ptr<scalar_t>() + l * B * Hout;
      if (mode == kStreamRnn) {
        rnn_layer<scalar_t>(activation, B, w, layer_x, h_old, h_new, scratch);
      } else if (mode == kStreamGru) {
        gru_layer<scalar_t>(reset_after, B, w, layer_x, h_old, h_new, scratch);
      } else {
        lstm_layer<scalar_t>(B, w, layer_x, h_old, c.data_ptr<scalar_t>() + l * B * H, h_new,
                             c_n.data_ptr<scalar_t>() + l * B * H, scratch);
      }
      layer_x = h_new;
      I = Hout;
    }
    std::copy(layer_x, layer_x + B * Hout, output.data_ptr<scalar_t>());
  });
  return {output, h_n, c_n};
}

}  // namespace
}  // namespace rnnkit_cpu

TORCH_LIBRARY_FRAGMENT(rnnkit, m) {
  m.def(
      "stream_step(Tensor input, Tensor h0, Tensor? c0, Tensor[] weights, int mode, "
      "int activation, bool reset_after) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnkit, CPU, m) {
  m.impl("stream_step", &rnnkit_cpu::stream_step);
}
