// The forward time loop (cpu_recurrence_forward): per step, the product with W_hh and one
// elementwise pass, or the fused step of fused_steps.h.
#include "forward.h"

#include "cells.h"
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
#include <optional>
#include <tuple>

namespace rnnkit_cpu {
namespace {

// One vector of a row's new state in a general step: an active row writes it to h and the
// output; a skipped row (past its length, or masked) keeps its h and outputs zero, or its h
// with Steps::carry_output.
template <typename T>
inline void store_state(const Steps& steps, bool on, const Vec<T>& y, T* h, T* out,
                        int64_t count) {
  if (on) {
    y.store(h, count), y.store(out, count);
  } else {
    (steps.carry_output ? Vec<T>::loadu(h, count) : Vec<T>(T(0))).store(out, count);
  }
}

}  // namespace

Masks checked_masks(const std::optional<Tensor>& mask, bool carry_output, const Steps& steps,
                    int64_t B) {
  Masks masks;
  masks.carry_output = carry_output;
  if (!mask.has_value()) return masks;
  TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 2 &&
                  mask->size(0) == steps.T && mask->size(1) == B,
              "rnnkit: mask must be (T, B) bool");
  masks.mask = mask->contiguous();
  masks.start_times = at::empty({steps.T, B}, masks.mask.options().dtype(at::kLong));
  Steps masked = steps;
  masked.mask = masks.mask.data_ptr<bool>(), masked.B = B;
  int64_t* start = masks.start_times.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t last = -1;
    for (int64_t step = 0; step < steps.T; ++step) {
      const int64_t t = steps.reverse ? steps.T - 1 - step : step;
      start[t * B + b] = last;
      if (masked.active(t, b)) last = t;
    }
  }
  return masks;
}

template <typename T>
void forward_kernel(const Shape& s, const Steps& steps, const Cell& cell,
                    const ForwardWeights<T>& w, const ForwardBuffers<T>& io, int64_t step0,
                    int64_t step1) {
  const int64_t mode = cell.mode, activation = cell.activation;
  const bool reset_after = cell.reset_after;
  const Packed<T>& rec = w.rec;
  const Packed<T>& rec_n = w.rec_n;
  const Packed<T>& proj = w.proj;
  const T* bias = w.bias;
  const bool project = w.project;
  const T* fused_packed = w.fused_packed;
  const T* gates_x = io.gates_x;
  const int64_t gx_t0 = io.gx_t0;
  T *h = io.h, *c = io.c, *output = io.output, *gates = io.gates, *cells = io.cells;
  T *projected = io.projected, *hh = io.hh, *proj_out = io.proj_out, *h_spare = io.h_spare;
  const int64_t gates_stride = io.gates_stride, cells_stride = io.cells_stride;
  const int64_t projected_stride = io.projected_stride;
  if (step1 < 0) step1 = s.T;
  using V = Vec<T>;
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = s.G * s.H;
  const ResetStates<T>* resets = steps.resets ? &io.resets : nullptr;
  // W_hh packed gate-interleaved: the fused LSTM step, or the fused GRU step (reset after).
  const T* lstm_packed = mode == kLSTM ? fused_packed : nullptr;
  const Regularization<T>& reg = io.reg;
  const bool zoned = reg.zoned();
  // The fused steps' regularized instance: dropout, zoneout or other activations.
  const bool regularized = reg.dropout != nullptr || zoned || !cell.plain();
  const CodedActs<T> coded{cell.gate_activation, activation};
  const LayerNorms<T>& norms = io.norms;
  TORCH_CHECK(!norms.any() || (fused_packed == nullptr && (mode == kLSTM || reset_after)),
              "rnnkit: layer norm runs on the row-split steps only (LSTM, GRU reset after)");
  // Rows [b0, b1) of step t start from h (and c): a reset row's start is copied there first.
  // Returns what enters the product with W_hh: h, or with recurrent dropout h * mask.
  auto start_rows = [&](int64_t t, int64_t b0, int64_t b1) -> const T* {
    for (int64_t b = b0; b < b1; ++b) {
      const int code = resets ? steps.reset(t, b) : 0;
      if (code != 0) {
        std::copy(resets->h[code] + b * Hout, resets->h[code] + (b + 1) * Hout, h + b * Hout);
        if (c) std::copy(resets->c[code] + b * H, resets->c[code] + (b + 1) * H, c + b * H);
      }
      if (reg.dropout) {
        for (int64_t i = b * Hout; i < (b + 1) * Hout; ++i) io.h_in[i] = h[i] * reg.dropout[i];
      }
    }
    return reg.dropout ? io.h_in : h;
  };
  // Zoneout of units [j, j + n) of row b at step t: the new state `fresh` against the start.
  auto zone_h = [&](int64_t t, int64_t b, int64_t j, int64_t n, const V& start, const V& fresh) {
    return zoned ? zoneout<T>(reg.keep_h(t, B, b, Hout, j, n), start, fresh) : fresh;
  };
  // The reset-after GRU's units [j0, j1) of row b at step t, from the row's input part x and
  // recurrent part rec (W_hh h, normalized or not): saves r, z, the candidate and
  // W_hn h + b_hn per step, and writes the new state and output.
  auto gru_after_units = [&](const auto& acts, int64_t t, int64_t b, int64_t j0, int64_t j1,
                             const T* x, const T* rec, T* saved, T* out) {
    const bool on = steps.active(t, b);
    T *g = saved + b * 4 * H, *hb = h + b * H, *ob = out + b * H;
    for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
      auto pre = [&](int64_t k) { return preactivation(x, rec, bias, k * H + j, n); };
      const V r = acts.gate(pre(0)), z = acts.gate(pre(1));
      const V hn = V::loadu(rec + 2 * H + j, n) + V::loadu(bias + 2 * H + j, n);
      const V cand = gru_candidate_after<T>(V::loadu(x + 2 * H + j, n), r, hn, acts);
      const V h_old = V::loadu(hb + j, n);
      const V y = zone_h(t, b, j, n, h_old, gru_output<T>(z, cand, h_old));
      r.store(g + j, n), z.store(g + H + j, n), cand.store(g + 2 * H + j, n);
      hn.store(g + 3 * H + j, n);
      store_state(steps, on, y, hb + j, ob + j, n);
    });
  };
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
        LstmStep<T> st{H, Hout, GH, gx, bias, from, to, output + t * B * Hout, nullptr, c,
                       save ? cells + t * cells_stride : nullptr, saved, &steps, t};
        st.resets = resets;  // every thread reads whole rows of `from`: selected per row
        st.reg = &reg, st.acts = coded;
        if (regularized) {
          lstm_panels<T, true>(st, B, fused_packed, p0, p1);
        } else {
          lstm_panels<T>(st, B, fused_packed, p0, p1);
        }
      } else {
        GruStep<T> st{H, gx, bias, from, to, output + t * B * Hout, saved, &steps, t, resets};
        st.reg = &reg, st.acts = coded;
        if (regularized) {
          gru_panels<T, true>(st, B, fused_packed, p0, p1);
        } else {
          gru_panels<T>(st, B, fused_packed, p0, p1);
        }
      }
    });
    return;
  }
  if (norms.any()) {
    // Layer norm: a reduction over each row's whole gate vector, and rows are independent.
    // So the whole loop runs in one parallel region, each thread owning a block of rows for
    // every step (its rows' product, norms, gates and outputs): no barrier and no fork per
    // step. Each row is computed the same way whatever the split.
    auto normed_rows = [&](const auto& acts, int64_t b0, int64_t b1) {
      for (int64_t step = step0; step < step1; ++step) {
        const int64_t t = steps.reverse ? T_ - 1 - step : step;
        const T* gx = gates_x + (t - gx_t0) * B * GH;
        T* out = output + t * B * Hout;
        T* saved = gates + t * gates_stride;
        T* cell_out = cells + t * cells_stride;
        T* m = project ? projected + t * projected_stride : nullptr;
        const T* h_in = start_rows(t, b0, b1);
        step_mm<T>(b1 - b0, Hout, GH, h_in + b0 * Hout, Hout, rec, false, hh + b0 * GH, GH);
        for (int64_t b = b0; b < b1; ++b) {
          const bool on = steps.active(t, b);
          const T* x = gx + b * GH;
          T* r_b = hh + b * GH;
          if (norms.hh_gain) {
            norms.rstd_row(t, b)[0] = layer_norm_forward(r_b, GH, norms.hh_gain, norms.hh_bias,
                                                         norms.normed_row(t, b), r_b);
          }
          if (mode == kGRU) {
            gru_after_units(acts, t, b, 0, H, x, r_b, saved, out);
            continue;
          }
          T* g = saved + b * 4 * H;
          auto pre = [&](int64_t k, int64_t j, int64_t n) {
            return preactivation(x, r_b, bias, k * H + j, n);
          };
          // LSTM: the new cells (into `fresh` when the cell's norm follows), then the output.
          T *cb = c + b * H, *co = cell_out + b * H;
          T* fresh = norms.cell_gain ? io.cell_fresh + b * H : nullptr;
          for_vectors<T>(0, H, [&](int64_t j, int64_t n) {
            const V c_old = V::loadu(cb + j, n);
            const LstmPoint<T> p = lstm_forward<T>(pre(0, j, n), pre(1, j, n), pre(2, j, n),
                                                   pre(3, j, n), c_old, acts);
            p.store_gates(g + j, H, n);
            if (fresh) p.c.store(fresh + j, n);
            const V c_new = zoned ? zoneout<T>(reg.keep_c(t, B, b, H, j, n), c_old, p.c) : p.c;
            const V c_kept = on ? c_new : c_old;
            c_kept.store(cb + j, n);
            c_kept.store(co + j, n);
            if (!fresh) {
              if (project) {
                p.y.store(m + b * H + j, n);
              } else {
                const V h_old = V::loadu(h + b * H + j, n);
                store_state(steps, on, zone_h(t, b, j, n, h_old, p.y), h + b * H + j,
                            out + b * H + j, n);
              }
            }
          });
          if (!fresh) continue;
          T* normed = norms.normed_row(t, b) + (norms.hh_gain ? GH : 0);
          norms.rstd_row(t, b)[1] =
              layer_norm_forward(fresh, H, norms.cell_gain, norms.cell_bias, normed, fresh);
          for_vectors<T>(0, H, [&](int64_t j, int64_t n) {
            const V y = V::loadu(g + 3 * H + j, n) * acts.act(V::loadu(fresh + j, n));
            if (project) {
              y.store(m + b * H + j, n);
            } else {
              const V h_old = V::loadu(h + b * H + j, n);
              store_state(steps, on, zone_h(t, b, j, n, h_old, y), h + b * H + j,
                          out + b * H + j, n);
            }
          });
        }
        if (project) {  // h = W_hr (o * tanh(c)) for the block's rows still running
          step_mm<T>(b1 - b0, H, Hout, m + b0 * H, H, proj, false, proj_out + b0 * Hout, Hout);
          for (int64_t b = b0; b < b1; ++b) {
            const bool on = steps.active(t, b);
            T *hb = h + b * Hout, *ob = out + b * Hout;
            const T* fresh = proj_out + b * Hout;
            for_vectors<T>(0, Hout, [&](int64_t j, int64_t n) {
              const V h_old = V::loadu(hb + j, n);
              store_state(steps, on, zone_h(t, b, j, n, h_old, V::loadu(fresh + j, n)), hb + j,
                          ob + j, n);
            });
          }
        }
      }
    };
    const int64_t threads = norm_row_threads(B);
    run_threads(threads, [&](int64_t thread) {
      const int64_t b0 = B * thread / threads, b1 = B * (thread + 1) / threads;
      if (cell.plain()) {
        normed_rows(PlainActs<T>{}, b0, b1);
      } else {
        normed_rows(coded, b0, b1);
      }
    });
    return;
  }
  // The general steps, for the cell's activations (acts: PlainActs or CodedActs).
  auto general_steps = [&](const auto& acts) {
  for (int64_t step = step0; step < step1; ++step) {
    const int64_t t = steps.reverse ? T_ - 1 - step : step;
    const T* gx = gates_x + (t - gx_t0) * B * GH;
    T* out = output + t * B * Hout;
    T* saved = gates + t * gates_stride;
    const T* h_in = start_rows(t, 0, B);
    if (mode == kRNN) {
      step_mm<T>(B, Hout, GH, h_in, Hout, rec, false, hh, GH);
      dispatch_activation(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
          const bool on = steps.active(t, b);
          const T *x = gx + b * GH, *r = hh + b * GH;
          T *hb = h + b * H, *ob = out + b * H, *db = saved + b * H;
          for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
            V derivative;
            const V y = rnn_forward<A, T>(preactivation(x, r, bias, j, n), derivative);
            if constexpr (keeps_derivative(A)) derivative.store(db + j, n);
            store_state(steps, on, y, hb + j, ob + j, n);
          });
        });
      });
    } else if (mode == kGRU && reset_after) {
      step_mm<T>(B, Hout, GH, h_in, Hout, rec, false, hh, GH);
      for_rows(B, H, 32, [&](int64_t b, int64_t j0, int64_t j1) {
        gru_after_units(acts, t, b, j0, j1, gx + b * GH, hh + b * GH, saved, out);
      });
    } else if (mode == kGRU) {
      // The reset comes before the matmul: the candidate needs W_hn (r * h), a second GEMM.
      step_mm<T>(B, Hout, 2 * H, h_in, Hout, rec, false, hh, GH);
      for_rows(B, H, 16, [&](int64_t b, int64_t j0, int64_t j1) {
        const T *x = gx + b * GH, *rec = hh + b * GH, *hb = h_in + b * H;
        T* g = saved + b * 4 * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          auto pre = [&](int64_t k) { return preactivation(x, rec, bias, k * H + j, n); };
          const V r = acts.gate(pre(0));
          r.store(g + j, n);
          acts.gate(pre(1)).store(g + H + j, n);
          (r * V::loadu(hb + j, n)).store(g + 3 * H + j, n);
        });
      });
      step_mm<T>(B, H, H, saved + 3 * H, 4 * H, rec_n, false, hh + 2 * H, GH);
      for_rows(B, H, 16, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T *x = gx + b * GH, *rec = hh + b * GH;
        T *g = saved + b * 4 * H, *hb = h + b * H, *ob = out + b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          const V cand =
              gru_candidate_before<T>(preactivation(x, rec, bias, 2 * H + j, n), acts);
          const V z = V::loadu(g + H + j, n);
          const V h_old = V::loadu(hb + j, n);
          const V y = zone_h(t, b, j, n, h_old, gru_output<T>(z, cand, h_old));
          cand.store(g + 2 * H + j, n);
          store_state(steps, on, y, hb + j, ob + j, n);
        });
      });
    } else if (lstm_packed) {
      // Projected (the loop above serves the rest): the fused cell step writes o * tanh(c)
      // into m, and h = W_hr m follows below.
      const bool save = gates_stride != 0;  // zero: inference, nothing is kept per step
      LstmStep<T> st{H, Hout, GH, gx, bias, h, nullptr, out, projected + t * projected_stride,
                     c, save ? cells + t * cells_stride : nullptr, save ? saved : nullptr,
                     &steps, t};
      st.reg = &reg, st.acts = coded;
      if (regularized) {
        lstm_step<T, true>(st, B, lstm_packed);
      } else {
        lstm_step<T>(st, B, lstm_packed);
      }
    } else {
      step_mm<T>(B, Hout, GH, h_in, Hout, rec, false, hh, GH);
      T* cell_out = cells + t * cells_stride;
      T* m = projected + t * projected_stride;
      for_rows(B, H, 40, [&](int64_t b, int64_t j0, int64_t j1) {
        const bool on = steps.active(t, b);
        const T *x = gx + b * GH, *rec = hh + b * GH;
        T *g = saved + b * 4 * H, *cb = c + b * H, *co = cell_out + b * H;
        for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
          auto pre = [&](int64_t k) { return preactivation(x, rec, bias, k * H + j, n); };
          const V c_old = V::loadu(cb + j, n);
          const LstmPoint<T> p = lstm_forward<T>(pre(0), pre(1), pre(2), pre(3), c_old, acts);
          p.store_gates(g + j, H, n);
          const V c_new =
              zoned ? zoneout<T>(reg.keep_c(t, B, b, H, j, n), c_old, p.c) : p.c;
          const V c_kept = on ? c_new : c_old;
          c_kept.store(cb + j, n);
          c_kept.store(co + j, n);
          if (project) {
            p.y.store(m + b * H + j, n);
          } else {
            const V h_old = V::loadu(h + b * H + j, n);
            store_state(steps, on, zone_h(t, b, j, n, h_old, p.y), h + b * H + j,
                        out + b * H + j, n);
          }
        });
      });
    }
    if (mode == kLSTM && project) {  // h = W_hr (o * tanh(c)), for the rows still running
      step_mm<T>(B, H, Hout, projected + t * projected_stride, H, proj, false, proj_out, Hout);
      for (int64_t b = 0; b < B; ++b) {
        const bool on = steps.active(t, b);
        T *hb = h + b * Hout, *ob = out + b * Hout;
        const T* fresh = proj_out + b * Hout;
        for_vectors<T>(0, Hout, [&](int64_t j, int64_t n) {
          const V h_old = V::loadu(hb + j, n);
          store_state(steps, on, zone_h(t, b, j, n, h_old, V::loadu(fresh + j, n)), hb + j,
                      ob + j, n);
        });
      }
    }
  }
  };
  if (mode == kRNN || cell.plain()) {
    general_steps(PlainActs<T>{});
  } else {
    general_steps(CodedActs<T>{cell.gate_activation, activation});
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_forward(
    const Tensor& gates_x_in, const Tensor& h0, const std::optional<Tensor>& c0,
    const Tensor& weight_hh_in, const std::optional<Tensor>& bias_hh_in,
    const std::optional<Tensor>& weight_hr_in, const std::optional<Tensor>& lengths_in,
    const std::optional<Tensor>& resets_in, const std::optional<Tensor>& reset_h_in,
    const std::optional<Tensor>& reset_c_in, const std::optional<Tensor>& mask_in,
    const std::optional<Tensor>& hidden_dropout, const std::optional<Tensor>& zoneout_h,
    const std::optional<Tensor>& zoneout_c, const std::optional<Tensor>& norm_hh_gain,
    const std::optional<Tensor>& norm_hh_bias, const std::optional<Tensor>& norm_cell_gain,
    const std::optional<Tensor>& norm_cell_bias, int64_t mode, int64_t activation,
    bool reset_after, bool reverse, bool carry_output, int64_t gate_activation,
    double zoneout, bool training) {
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

  const Tensor h_first = h0.contiguous();
  const Tensor c_first = mode == kLSTM ? c0->contiguous() : Tensor();
  Tensor h = h_first.clone();
  Tensor c = mode == kLSTM ? c_first.clone() : at::empty({0}, opts);
  const Resets resets =
      checked_resets(resets_in, reset_h_in, reset_c_in, T_, B, H, Hout, mode == kLSTM);
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
  steps.B = B;
  resets.attach(steps);
  const Masks masks = checked_masks(mask_in, carry_output, steps, B);
  masks.attach(steps);
  const Regularizers regs = checked_regularizers(hidden_dropout, zoneout_h, zoneout_c, zoneout,
                                                 s, gates_x.scalar_type());
  const Cell cell{mode, activation, reset_after, gate_activation};
  Tensor h_in = at::empty({regs.dropout.defined() ? B : 0, Hout}, opts);
  const Norms norms = checked_norms(norm_hh_gain, norm_hh_bias, norm_cell_gain, norm_cell_bias,
                                    s, mode, reset_after, gates_x.scalar_type());
  // Per step and row: the normalized values (see LayerNorms) and their rstd (zeros: a call
  // with one norm leaves the other's column unwritten). Empty without layer norm.
  Tensor normed = norms.any() ? call_buffer({depth, B, norms.width(s)}, opts)
                              : at::empty({0}, opts);
  Tensor norm_rstd = at::zeros({norms.any() ? depth : 0, B, 2}, opts);
  if (!norms.any()) norm_rstd = at::empty({0}, opts);
  Tensor cell_fresh = at::empty({norms.cell_gain.defined() ? B : 0, H}, opts);
  // LSTM, and GRU with the reset after the product, with whole vectors of hidden units run
  // the fused step (else the general path), which packs W_hh gate-interleaved; the other step
  // kernels read W_hh^T, W_hr^T (k-major copies).
  const int64_t unit = gates_x.scalar_type() == at::kFloat ? Vec<float>::size()
                                                           : Vec<double>::size();
  // Layer norm is a reduction over each row's whole gate vector: only the general steps have it.
  const bool fused = (lstm || (mode == kGRU && reset_after)) && H > 0 && Hout > 0 &&
                     H % unit == 0 && !norms.any();
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
    ForwardWeights<T> w;
    w.rec = rec, w.rec_n = rec_n, w.bias = bias_hh.data_ptr<T>(), w.proj = proj;
    w.project = project, w.fused_packed = gate_panels;
    ForwardBuffers<T> io;
    io.gates_x = gates_x.data_ptr<T>();
    io.h = h.data_ptr<T>();
    io.c = lstm ? c.data_ptr<T>() : nullptr;
    io.output = output.data_ptr<T>();
    io.gates = gates.data_ptr<T>(), io.gates_stride = stride * saved_width;
    io.cells = lstm ? cells.data_ptr<T>() : nullptr, io.cells_stride = stride * H;
    io.projected = project ? projected.data_ptr<T>() : nullptr, io.projected_stride = stride * H;
    io.hh = hh.data_ptr<T>();
    io.proj_out = project ? proj_out.data_ptr<T>() : nullptr;
    io.h_spare = h_spare.defined() ? h_spare.data_ptr<T>() : nullptr;
    io.resets = resets.states<T>(h_first, c_first);
    io.reg = regs.view<T>();
    io.h_in = h_in.data_ptr<T>();
    io.norms = norms.view<T>(s);
    if (norms.any()) {
      io.norms.normed = normed.data_ptr<T>(), io.norms.normed_stride = stride * norms.width(s);
      io.norms.rstd = norm_rstd.data_ptr<T>(), io.norms.rstd_stride = stride * 2;
    }
    io.cell_fresh = cell_fresh.data_ptr<T>();
    forward_kernel<T>(s, steps, cell, w, io);
  });
  if (!training) {
    gates = at::empty({0}, opts);
    cells = at::empty({0}, opts);
    projected = at::empty({0}, opts);
    normed = at::empty({0}, opts);
    norm_rstd = at::empty({0}, opts);
  }
  return {output, h, c, gates, cells, projected, normed, norm_rstd};
}

template void forward_kernel<float>(const Shape&, const Steps&, const Cell&,
                                   const ForwardWeights<float>&, const ForwardBuffers<float>&,
                                   int64_t, int64_t);
template void forward_kernel<double>(const Shape&, const Steps&, const Cell&,
                                    const ForwardWeights<double>&, const ForwardBuffers<double>&,
                                    int64_t, int64_t);

}  // namespace rnnkit_cpu
