// One step of a stacked unidirectional RNN, GRU or LSTM, for streaming inference: the whole
// stack in one call, from weights that rnnkit/ops/cpu/stream.py packs once (stream_pack) and
// keeps until a parameter changes. Nothing is saved for backward; the Python side calls this
// only when no gradient is needed. At B = 1 every product is one pass over a panel of the
// weight (vector_matrix); a few rows run on gemm.h's register-blocked matmul. Threads split
// the hidden units in whole panels, each computing its columns of every gate (stream_threads).
//
// Per layer the packed weights are four tensors:
//   ih   (I, G*H)  W_ih^T in panels (below)
//   hh   (Hout, G*H)  W_hh^T in panels
//   bias (G*H,) b_ih + b_hh for RNN and LSTM; (2*G*H,) [b_ih, b_hh] for GRU, whose candidate
//        needs them apart; empty without biases
//   hr   (H, Hout)  W_hr^T in panels (one gate of Hout columns) for an LSTM projection, else
//        empty
//
// Panels: a weight of K rows and G gates of N columns each keeps every gate's columns in
// panels of panel_width (the last one narrower), each panel its K rows of its width one after
// the other. A step's product then reads each panel front to back, where the plain k-major
// layout jumps a whole row (G*N elements) per k: measured 1.5x faster with the weights in L2
// and 2x when another process has pushed them out to L3 (B=1, K=320, 4 gates of 256).

#include "cells.h"
#include "gemm.h"
#include "threads.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
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

// The hidden units [u0, u1) one thread computes: its columns of every gate, so the pointwise
// math needs nothing from the other threads.
struct Units {
  int64_t u0, u1;
  int64_t count() const { return u1 - u0; }
};

// Columns per panel of a packed weight: vector_matrix's block of eight vectors.
template <typename T>
constexpr int64_t panel_width() {
  return 8 * Vec<T>::size();
}

// Packs w (G*N rows of K, as torch stores a weight) into out (K x G*N in panels, see the top of
// this file).
template <typename T>
void pack_panels(int64_t K, int64_t G, int64_t N, const T* w, T* out) {
  constexpr int64_t P = panel_width<T>();
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t n0 = 0; n0 < N; n0 += P) {
      const int64_t width = std::min(P, N - n0);
      T* panel = out + (g * N + n0) * K;
      const T* rows = w + (g * N + n0) * K;
      for (int64_t k = 0; k < K; ++k) {
        for (int64_t j = 0; j < width; ++j) panel[k * width + j] = rows[j * K + k];
      }
    }
  }
}

// y (B x [u0, u1), row stride ldy) = x (B x K, row stride K) times the columns [u0, u1) of one
// gate's panels `gate` (K x N) [+ y]; u0 starts a panel.
template <typename T>
void panel_product(int64_t B, int64_t K, int64_t N, Units u, const T* x, const T* gate,
                   bool accumulate, T* y, int64_t ldy) {
  constexpr int64_t P = panel_width<T>();
  for (int64_t n0 = u.u0; n0 < u.u1; n0 += P) {
    const int64_t width = std::min(P, N - n0);
    product<T>(B, K, width, x, K, gate + n0 * K, width, accumulate, y + n0, ldy);
  }
}

// Waits for the other threads of run_threads (threads.h); nothing with one thread.
inline void barrier(int64_t threads) {
#ifdef _OPENMP
  if (threads > 1) {
#pragma omp barrier
  }
#else
  (void)threads;
#endif
}

// Calls fn(g, n0, width) for each panel of gates [first, last) within the units u: gate g's
// columns [n0, n0 + width). `backwards` walks them in the reverse order: a step's weights
// (about 1 MiB at H=256) just overflow a core's L2, and a walk in one direction only would
// evict each panel before its next use; every other step walks back, starting from the
// panels the last one left in L2. Each column's sums run in the same order either way.
template <typename T, typename F>
void for_panels(int64_t first, int64_t last, int64_t N, Units u, bool backwards, const F& fn) {
  constexpr int64_t P = panel_width<T>();
  const int64_t per_gate = (u.count() + P - 1) / P;
  const int64_t count = (last - first) * per_gate;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t at = backwards ? count - 1 - i : i;
    const int64_t n0 = u.u0 + at % per_gate * P;
    fn(first + at / per_gate, n0, std::min(P, N - n0));
  }
}

// Columns [n0, n0 + width) of gate g of y (B rows GH apart) = bias + x W^T, from the
// weight's panels M (K rows): one panel's product.
template <typename T>
void gate_panel(int64_t B, int64_t K, int64_t H, int64_t GH, int64_t g, int64_t n0,
                int64_t width, const T* x, const T* M, const T* bias, T* y) {
  const int64_t at = g * H + n0;
  seed<T>(B, width, bias ? bias + at : nullptr, y + at, GH);
  product<T>(B, K, width, x, K, M + g * H * K + n0 * K, width, true, y + at, GH);
}

// gates (B x G*H) = x W_ih^T + h W_hh^T + bias at the units u: RNN and LSTM.
template <typename T>
void summed_gates(int64_t B, int64_t G, const Layer<T>& w, Units u, bool backwards, const T* x,
                  const T* h, T* gates) {
  const int64_t H = w.H, GH = G * H;
  for_panels<T>(0, G, H, u, backwards, [&](int64_t g, int64_t n0, int64_t width) {
    gate_panel<T>(B, w.I, H, GH, g, n0, width, x, w.ih, w.bias, gates);
    product<T>(B, w.Hout, width, h, w.Hout, w.hh + g * H * w.Hout + n0 * w.Hout, width, true,
               gates + g * H + n0, GH);
  });
}

template <typename T>
void rnn_layer(int64_t activation, int64_t B, const Layer<T>& w, Units u, bool backwards,
               const T* x, const T* h, T* h_new, T* gates) {
  const int64_t H = w.H;
  summed_gates<T>(B, 1, w, u, backwards, x, h, gates);
  dispatch_activation(activation, [&](auto a) {
    constexpr int A = decltype(a)::value;
    for (int64_t b = 0; b < B; ++b) {
      for_vectors<T>(u.u0, u.u1, [&](int64_t j, int64_t count) {
        Vec<T> derivative;
        rnn_forward<A, T>(Vec<T>::loadu(gates + b * H + j, count), derivative)
            .store(h_new + b * H + j, count);
      });
    }
  });
}

// `projection`: this thread's columns of W_hr's product, run after a barrier.
template <typename T>
void lstm_layer(int64_t threads, int64_t B, const Layer<T>& w, Units u, Units projection,
                bool backwards, const T* x, const T* h, const T* c, T* h_new, T* c_new,
                T* gates, T* unprojected) {
  const int64_t H = w.H, GH = 4 * H;
  summed_gates<T>(B, 4, w, u, backwards, x, h, gates);
  T* y = w.hr ? unprojected : h_new;
  for (int64_t b = 0; b < B; ++b) {
    const T* g = gates + b * GH;
    for_vectors<T>(u.u0, u.u1, [&](int64_t j, int64_t count) {
      using V = Vec<T>;
      const LstmPoint<T> p =
          lstm_forward<T>(V::loadu(g + j, count), V::loadu(g + H + j, count),
                          V::loadu(g + 2 * H + j, count), V::loadu(g + 3 * H + j, count),
                          V::loadu(c + b * H + j, count));
      p.c.store(c_new + b * H + j, count);
      p.y.store(y + b * H + j, count);
    });
  }
  if (w.hr) {
    barrier(threads);  // the projection reads every unit
    if (projection.count() > 0) {
      panel_product<T>(B, H, w.Hout, projection, unprojected, w.hr, false, h_new, w.Hout);
    }
  }
}

// gx: W_ih x + b_ih; gh: W_hh h + b_hh (reset before: its r and z columns, then W_hn (r h));
// reset_h: r * h (reset before only). Each (B x 3H) but reset_h (B x H).
template <typename T>
void gru_layer(int64_t threads, bool reset_after, int64_t B, const Layer<T>& w, Units u,
               bool backwards, const T* x, const T* h, T* h_new, T* gx, T* gh, T* reset_h) {
  using V = Vec<T>;
  const int64_t H = w.H, GH = 3 * H;
  const T* b_ih = w.bias;
  const T* b_hh = w.bias ? w.bias + GH : nullptr;
  // Reset after: every gate of W_hh h; reset before: r and z only, the candidate's product
  // waits for r * h.
  const int64_t hh_gates = reset_after ? 3 : 2;
  for_panels<T>(0, 3, H, u, backwards, [&](int64_t g, int64_t n0, int64_t width) {
    gate_panel<T>(B, w.I, H, GH, g, n0, width, x, w.ih, b_ih, gx);
    if (g < hh_gates) gate_panel<T>(B, H, H, GH, g, n0, width, h, w.hh, b_hh, gh);
  });
  if (reset_after) {
    for (int64_t b = 0; b < B; ++b) {
      const T *xr = gx + b * GH, *hr = gh + b * GH, *h_old = h + b * H;
      for_vectors<T>(u.u0, u.u1, [&](int64_t j, int64_t count) {
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
  for (int64_t b = 0; b < B; ++b) {
    const T *xr = gx + b * GH, *h_old = h + b * H;
    T* hr = gh + b * GH;
    for_vectors<T>(u.u0, u.u1, [&](int64_t j, int64_t count) {
      const V r = sigmoid(V::loadu(xr + j, count) + V::loadu(hr + j, count));
      const V z = sigmoid(V::loadu(xr + H + j, count) + V::loadu(hr + H + j, count));
      z.store(hr + H + j, count);
      (r * V::loadu(h_old + j, count)).store(reset_h + b * H + j, count);
    });
  }
  barrier(threads);  // W_hn (r * h) reads every unit of r * h
  for_panels<T>(2, 3, H, u, backwards, [&](int64_t g, int64_t n0, int64_t width) {
    gate_panel<T>(B, H, H, GH, g, n0, width, reset_h, w.hh, b_hh, gh);
  });
  for (int64_t b = 0; b < B; ++b) {
    const T *xr = gx + b * GH, *hr = gh + b * GH, *h_old = h + b * H;
    for_vectors<T>(u.u0, u.u1, [&](int64_t j, int64_t count) {
      const V n = gru_candidate_before<T>(V::loadu(xr + 2 * H + j, count) +
                                          V::loadu(hr + 2 * H + j, count));
      gru_output<T>(V::loadu(hr + H + j, count), n, V::loadu(h_old + j, count))
          .store(h_new + b * H + j, count);
    });
  }
}

// Thread `thread` of `threads`: its share of `size` columns, in whole panels.
template <typename T>
Units share(int64_t size, int64_t thread, int64_t threads) {
  constexpr int64_t width = panel_width<T>();
  const int64_t vectors = (size + width - 1) / width;
  return {std::min(size, vectors * thread / threads * width),
          std::min(size, vectors * (thread + 1) / threads * width)};
}

// Threads for one step: each takes a slice of every weight (its units' columns), and the
// threads meet at a barrier per layer. Each call opens its own parallel region, and a thread
// that another process has taken off its core stalls the barrier, so only a step of 2M
// multiply-adds or more (B=1: a GRU with I = H = 1024) is split; the streaming sizes (B=1,
// H=256) run on one thread. Splitting might pay earlier on an idle machine, where each core
// then keeps its share of the weights in its own L2: RNNKIT_STREAM_THREADS=n forces n threads
// to measure that.
inline int64_t stream_threads(int64_t B, int64_t multiply_adds, int64_t H) {
#ifdef _OPENMP
  static const int64_t forced = [] {
    const char* env = std::getenv("RNNKIT_STREAM_THREADS");
    return env ? std::max<int64_t>(1, std::atoll(env)) : int64_t(0);
  }();
  if (at::in_parallel_region()) return 1;
  const int64_t panels = (H + panel_width<float>() - 1) / panel_width<float>();
  if (forced) return std::min(forced, panels);
  if (B * multiply_adds < (int64_t(1) << 21)) return 1;
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), panels));
#else
  (void)B, (void)multiply_adds, (void)H;
  return 1;
#endif
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
  // Check every layer's weights, and count the step's multiply-adds.
  int64_t multiply_adds = 0;
  for (int64_t l = 0, I = I0; l < L; ++l, I = Hout) {
    const Tensor& ih = weights[4 * l];
    const Tensor& hh = weights[4 * l + 1];
    const Tensor& bias = weights[4 * l + 2];
    const Tensor& hr = weights[4 * l + 3];
    for (const Tensor* t : {&ih, &hh, &bias, &hr}) {
      TORCH_CHECK(t->is_contiguous() && t->scalar_type() == input.scalar_type(),
                  "rnnkit stream_step: packed weights must be contiguous, in the input's dtype");
    }
    TORCH_CHECK(ih.dim() == 2 && hh.dim() == 2 && ih.size(0) == I && ih.size(1) == G * H &&
                    hh.size(0) == Hout && hh.size(1) == G * H &&
                    (hr.numel() == 0 ? Hout == H
                                     : (lstm && hr.dim() == 2 && hr.size(0) == H &&
                                        hr.size(1) == Hout)),
                "rnnkit stream_step: layer ", l, " weights have the wrong shapes");
    TORCH_CHECK(bias.numel() == 0 || bias.numel() == (mode == kStreamGru ? 2 : 1) * G * H,
                "rnnkit stream_step: layer ", l, " bias has the wrong size");
    multiply_adds += (I + Hout) * G * H + hr.numel();
  }
  const int64_t threads = stream_threads(B, multiply_adds, H);
  // Every other call on this thread walks the panels backwards (see for_panels).
  static thread_local bool walk_back = false;
  walk_back = !walk_back;
  const bool backwards = walk_back;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "rnnkit_stream_step", [&] {
    using T = scalar_t;
    // Scratch for every thread's columns: gates (GRU: gx and gh), then r * h or W_hr's input.
    thread_local std::vector<T> scratch;
    const int64_t GH = G * H;
    scratch.resize(B * (2 * GH + H));
    T* gates = scratch.data();
    T* second = gates + B * GH;
    T* third = second + B * GH;
    const T* input_data = x.data_ptr<T>();
    const T* h_data = h.data_ptr<T>();
    const T* c_data = lstm ? c.data_ptr<T>() : nullptr;
    T* h_out = h_n.data_ptr<T>();
    T* c_out = lstm ? c_n.data_ptr<T>() : nullptr;
    run_threads(threads, [&](int64_t thread) {
      const Units units = share<T>(H, thread, threads);
      const Units projection = share<T>(Hout, thread, threads);
      const T* layer_x = input_data;
      int64_t I = I0;
      for (int64_t l = 0; l < L; ++l) {
        const Tensor& hr = weights[4 * l + 3];
        const Tensor& bias = weights[4 * l + 2];
        const Layer<T> w{weights[4 * l].data_ptr<T>(), weights[4 * l + 1].data_ptr<T>(),
                         bias.numel() ? bias.data_ptr<T>() : nullptr,
                         hr.numel() ? hr.data_ptr<T>() : nullptr, I, H, Hout};
        const T* h_old = h_data + l * B * Hout;
        T* h_new = h_out + l * B * Hout;
        if (mode == kStreamRnn) {
          rnn_layer<T>(activation, B, w, units, backwards, layer_x, h_old, h_new, gates);
        } else if (mode == kStreamGru) {
          gru_layer<T>(threads, reset_after, B, w, units, backwards, layer_x, h_old, h_new, gates,
                       second, third);
        } else {
          lstm_layer<T>(threads, B, w, units, projection, backwards, layer_x, h_old,
                        c_data + l * B * H, h_new, c_out + l * B * H, gates, third);
        }
        barrier(threads);  // the next layer reads every unit
        layer_x = h_new;
        I = Hout;
      }
    });
    const T* last = h_out + (L - 1) * B * Hout;
    std::copy(last, last + B * Hout, output.data_ptr<T>());
  });
  return {output, h_n, c_n};
}

// `weight` (gates * N rows of K: W_ih, W_hh or W_hr as torch stores them) packed for
// stream_step: a (K, gates * N) tensor whose storage holds the panels (see the top of this
// file), so its shape reads as the plain W^T's.
Tensor stream_pack(const Tensor& weight, int64_t gates) {
  TORCH_CHECK(weight.dim() == 2 && gates >= 1 && weight.size(0) % gates == 0,
              "rnnkit stream_pack: a weight of gates * N rows expected");
  const Tensor w = weight.contiguous();
  const int64_t K = w.size(1), N = w.size(0) / gates;
  Tensor packed = at::empty({K, gates * N}, w.options());
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "rnnkit_stream_pack", [&] {
    pack_panels<scalar_t>(K, gates, N, w.data_ptr<scalar_t>(), packed.data_ptr<scalar_t>());
  });
  return packed;
}

}  // namespace
}  // namespace rnnkit_cpu

TORCH_LIBRARY_FRAGMENT(rnnkit, m) {
  m.def(
      "stream_step(Tensor input, Tensor h0, Tensor? c0, Tensor[] weights, int mode, "
      "int activation, bool reset_after) -> (Tensor, Tensor, Tensor)");
  m.def("stream_pack(Tensor weight, int gates) -> Tensor");
}

TORCH_LIBRARY_IMPL(rnnkit, CPU, m) {
  m.impl("stream_step", &rnnkit_cpu::stream_step);
  m.impl("stream_pack", &rnnkit_cpu::stream_pack);
}
