// LSTM inference with the input projection inside the loop: W_ih x + b_ih is computed a
// chunk of steps at a time into one small reused buffer, just before those steps run, so the
// (T, B, 4H) gates_x never exists in full: no freshly mapped pages to fault in (a big buffer
// is mmapped anew on every call) and the chunk is still in cache when the steps read it.
// Nothing is saved for backward; the Python side calls this only when no gradient is needed.

#include "forward.h"
#include "fused_steps.h"
#include "gemm.h"
#include "recurrence.h"
#include "threads.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <tuple>

namespace rnnkit_cpu {
namespace {

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

}  // namespace

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
    ForwardWeights<T> w;
    w.rec = rec, w.bias = bias_hh.data_ptr<T>(), w.proj = proj, w.project = project;
    w.fused_packed = lstm_panels;
    // Nothing is kept per step: the saved buffers are one step deep (stride 0).
    ForwardBuffers<T> io;
    io.h = h.data_ptr<T>(), io.c = c.data_ptr<T>(), io.output = output.data_ptr<T>();
    io.gates = gates.data_ptr<T>(), io.cells = cells.data_ptr<T>();
    io.projected = project ? projected.data_ptr<T>() : nullptr;
    io.hh = hh.data_ptr<T>(), io.proj_out = project ? proj_out.data_ptr<T>() : nullptr;
    io.h_spare = h_spare.defined() ? h_spare.data_ptr<T>() : nullptr;
    const T* xs = x.data_ptr<T>();
    T* gx = buffer.data_ptr<T>();
    for (int64_t step0 = 0; step0 < T_; step0 += chunk) {
      const int64_t step1 = std::min(T_, step0 + chunk);
      // The chunk's times: [step0, step1) forward, their mirror image in reverse.
      const int64_t t0 = reverse ? T_ - step1 : step0;
      const int64_t rows = (step1 - step0) * B;
      matmul<T>(rows, I, GH, xs + t0 * B * I, I, 1, w_ih.M, w_ih.ldm, false, gx, GH,
                w_ih.panels ? &w_ih : nullptr, has_bias_ih ? bias_ih.data_ptr<T>() : nullptr);
      io.gates_x = gx, io.gx_t0 = t0;
      forward_kernel<T>(s, steps, Cell{kLSTM, 0, false}, w, io, step0, step1);
    }
  });
  return {output, h, c};
}

}  // namespace rnnkit_cpu
