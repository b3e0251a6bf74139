// The backward time loop (cpu_recurrence_backward): per step, from the last, the gate
// gradients and dh_{t-1}; then dW_hh (and dW_hr) in one product each over all steps.
#include "cells.h"
#include "gemm.h"
#include "gemm_choice.h"
#include "recurrence.h"
#include "threads.h"
#include "vec_math.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace rnnkit_cpu {
namespace {

// The weights the backward steps read, packed once per call.
template <typename T>
struct BackwardWeights {
  Packed<T> rec;         // W_hh (G*H x Hout), for dh_{t-1} = dgates W_hh
  Packed<T> proj;        // W_hr (Hout x H), for the LSTM projection
  bool project = false;  // LSTM with a projection
};

// What the backward steps read (the forward's saved sequences) and write.
template <typename T>
struct BackwardBuffers {
  const T* grad_output = nullptr;  // (T, B, Hout)
  T* dh = nullptr;                 // the state's gradient (B, Hout), from grad_h_n on
  T* dc = nullptr;                 // the cell's (B, H), from grad_c_n on (LSTM)
  const T* h0 = nullptr;           // initial state (B, Hout), and c0 (B, H)
  const T* c0 = nullptr;
  const T* output = nullptr;       // the forward's saved sequences
  const T* gates = nullptr;
  const T* cells = nullptr;
  T* dgx = nullptr;                // (T, B, G*H): the gradient at the gate pre-activations
  T* dhh = nullptr;                // the part that meets W_hh (GRU, reset after), else dgx
  T* carry = nullptr;              // one step's dh_{t-1}, (B, Hout)
  T* dhs = nullptr;                // (T, B, Hout): dh at the projection's output (projected)
  T* dm = nullptr;                 // one step's scratch, (B, H)
  T* dh_in = nullptr;              // one step's gradient of the dropped state, (B, Hout)
  Regularization<T> reg;           // recurrent dropout and zoneout, as in the forward
  ResetStates<T> resets;           // where reset rows started from
  T* dreset_h = nullptr;           // (2, B, Hout) and (2, B, H): the reset rows' start
  T* dreset_c = nullptr;           // gradients, to reset_state (0) and to h0/c0 (1)
  LayerNorms<T> norms;             // the forward's layer norms and what they saved
  T* dprod = nullptr;              // (T, B, G*H): the gradient at the product W_hh h (norm_hh)
  T* dnormed_cell = nullptr;       // (T, B, H): the gradient at the normed cell (norm_cell)
  T* dcell = nullptr;              // one step's scratch, (B, H): the norm's dc (norm_cell)
};

template <typename T>
void backward_kernel(const Shape& s, const Steps& steps, const Cell& cell,
                     const BackwardWeights<T>& w, const BackwardBuffers<T>& io) {
  const int64_t mode = cell.mode, activation = cell.activation;
  const bool reset_after = cell.reset_after;
  const Packed<T>& rec = w.rec;
  const Packed<T>& proj = w.proj;
  const bool project = w.project;
  const T *grad_output = io.grad_output, *h0 = io.h0, *c0 = io.c0, *output = io.output;
  const T *gates = io.gates, *cells = io.cells;
  T *dh = io.dh, *dc = io.dc, *dgx = io.dgx, *dhh = io.dhh, *carry = io.carry, *dhs = io.dhs;
  T *dm = io.dm, *dreset_h = io.dreset_h, *dreset_c = io.dreset_c;
  const ResetStates<T>& resets = io.resets;
  using V = Vec<T>;
  const int64_t T_ = s.T, B = s.B, H = s.H, Hout = s.Hout, GH = s.G * s.H;
  const int64_t W = mode == kRNN ? (keeps_derivative(activation) ? H : 0) : 4 * H;
  const V zero(T(0));
  // The state active step t of row b started from: a reset row's reset_state or h0/c0, else
  // the initial state before its first active step, else that of its last active step.
  auto previous_h = [&](int64_t t, int64_t b) {
    if (const int code = steps.reset(t, b)) return resets.h[code] + b * Hout;
    const int64_t from = steps.start_time(t, b);
    return from < 0 ? h0 + b * Hout : output + (from * B + b) * Hout;
  };
  auto previous_c = [&](int64_t t, int64_t b) {
    if (const int code = steps.reset(t, b)) return resets.c[code] + b * H;
    const int64_t from = steps.start_time(t, b);
    return from < 0 ? c0 + b * H : cells + (from * B + b) * H;
  };
  // A skipped step passes the state's gradient on to t - 1, with its output's gradient when
  // it outputs the carried state (Steps::carry_output).
  auto skipped = [&](const T* gout, int64_t at, int64_t n) {
    const V d = V::loadu(dh + at, n);
    (steps.carry_output ? d + V::loadu(gout + at, n) : d).store(carry + at, n);
  };
  // At a reset row the gradient of step t's start state, columns [j0, j1) of dh (and of dc
  // for units [k0, k1)), goes to reset_state (plane 0 of dreset_*, code 1) or to h0/c0 (plane
  // 1, code 2), not to step t-1: it is added there and zeroed here.
  auto route_resets = [&](int64_t t, T* dh_start, int64_t j0, int64_t j1, int64_t k0,
                          int64_t k1, int64_t b0 = 0, int64_t b1 = -1) {
    if (steps.resets == nullptr) return;
    for (int64_t b = b0; b < (b1 < 0 ? B : b1); ++b) {
      const int code = steps.reset(t, b);
      if (code == 0) continue;
      T* from = dh_start + b * Hout;
      T* to = dreset_h + ((code - 1) * B + b) * Hout;
      for (int64_t j = j0; j < j1; ++j) to[j] += from[j], from[j] = T(0);
      if (mode != kLSTM) continue;
      T* from_c = dc + b * H;
      T* to_c = dreset_c + ((code - 1) * B + b) * H;
      for (int64_t k = k0; k < k1; ++k) to_c[k] += from_c[k], from_c[k] = T(0);
    }
  };
  const Regularization<T>& reg = io.reg;
  const bool zoned = reg.zoned();
  const V one(T(1));
  // The gradient reaching the state through the product with W_hh: `product` (the gradient
  // of what entered it, columns [j0, j1) of rows [b0, b1)) into carry, times the dropout
  // mask if any.
  auto add_dropped = [&](const T* product, int64_t j0, int64_t j1, int64_t b0 = 0,
                         int64_t b1 = -1) {
    for (int64_t b = b0; b < (b1 < 0 ? B : b1); ++b) {
      const int64_t row = b * Hout;
      for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
        const V d = V::loadu(product + row + j, n) * V::loadu(reg.dropout + row + j, n);
        (V::loadu(carry + row + j, n) + d).store(carry + row + j, n);
      });
    }
  };
  // carry += dX (B x K, leading dimension GH) W (the rows of W_hh in `weights`), through the
  // dropout mask if any; for rows [b0, b1) of dX and carry.
  auto product_into_carry = [&](int64_t K, const T* dx, const Packed<T>& weights,
                                int64_t b0 = 0, int64_t b1 = -1) {
    if (b1 < 0) b1 = B;
    if (reg.dropout == nullptr) {
      step_mm<T>(b1 - b0, K, Hout, dx + b0 * GH, GH, weights, true, carry + b0 * Hout, Hout);
      return;
    }
    step_mm<T>(b1 - b0, K, Hout, dx + b0 * GH, GH, weights, false, io.dh_in + b0 * Hout, Hout);
    add_dropped(io.dh_in, 0, Hout, b0, b1);
  };
  // The state's gradient d at an active step, split by zoneout: the part that reaches the new
  // state (returned) and the part kept for the start (added to `kept`, carry's row).
  auto zone_split = [&](int64_t t, int64_t b, int64_t j, int64_t n, const V& d, V& kept) {
    if (!zoned) return d;
    const V keep = reg.keep_h(t, B, b, Hout, j, n);
    kept = kept + keep * d;
    return (one - keep) * d;
  };
  // LSTM: the gate gradients of units [j0, j1) in row b at time t, into dgx, and the cell's
  // gradient carried to t - 1; without a projection also carry, the part of dh_{t-1} that
  // does not come from the product with W_hh (see `skipped` for a skipped row, else 0, or
  // zoneout's share).
  // LSTM with a projection, rows [b0, b1) of step t: dh at the projection's output (the
  // carried dh plus the output's gradient, through zoneout; zero on inactive rows) into dhs,
  // the part zoneout keeps into carry, and dm = dh_t W_hr, the gradient at the cell's output.
  auto projection_backward = [&](int64_t t, const T* gout, int64_t b0, int64_t b1) {
    T* dh_t = dhs + t * B * Hout;
    for (int64_t b = b0; b < b1; ++b) {
      const bool on = steps.active(t, b);
      const int64_t row = b * Hout;
      for_vectors<T>(0, Hout, [&](int64_t j, int64_t n) {
        if (!on) {
          zero.store(dh_t + row + j, n);
          skipped(gout, row + j, n);
          return;
        }
        V kept = zero;
        zone_split(t, b, j, n, V::loadu(dh + row + j, n) + V::loadu(gout + row + j, n), kept)
            .store(dh_t + row + j, n);
        kept.store(carry + row + j, n);
      });
    }
    step_mm<T>(b1 - b0, Hout, H, dh_t + b0 * Hout, Hout, proj, false, dm + b0 * H, H);
  };
  auto lstm_units = [&](const auto& acts, int64_t t, int64_t b, int64_t j0, int64_t j1) {
    const T* gout = grad_output + t * B * Hout;
    const T* c_t = cells + t * B * H;
    const bool on = steps.active(t, b);
    const T *g = gates + t * B * W + b * W, *cp = on ? previous_c(t, b) : nullptr;
    T* dgb = dgx + t * B * GH + b * GH;
    const int64_t row = b * H;
    for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
      if (!on) {
        for (int64_t k = 0; k < 4; ++k) zero.store(dgb + k * H + j, n);
        if (!project) skipped(gout, row + j, n);
        return;
      }
      const V i = V::loadu(g + j, n), f = V::loadu(g + H + j, n);
      const V gg = V::loadu(g + 2 * H + j, n), o = V::loadu(g + 3 * H + j, n);
      const V c_old = V::loadu(cp + j, n);
      V kept = zero;
      const V d = project ? V::loadu(dm + row + j, n)
                          : zone_split(t, b, j, n,
                                       V::loadu(dh + row + j, n) + V::loadu(gout + row + j, n),
                                       kept);
      V dc_new = V::loadu(dc + row + j, n), dc_kept = zero;
      V c_new = V::loadu(c_t + row + j, n);
      if (zoned) {  // the saved cell is the zoned state: the cell's own output is recomputed
        const V keep = reg.keep_c(t, B, b, H, j, n);
        dc_kept = keep * dc_new, dc_new = (one - keep) * dc_new;
        c_new = lstm_cell(i, f, gg, c_old);
      }
      const LstmGrad<T> grad = lstm_backward<T>(i, f, gg, o, c_new, c_old, d, dc_new, acts);
      grad.di.store(dgb + j, n), grad.df.store(dgb + H + j, n);
      grad.dg.store(dgb + 2 * H + j, n), grad.do_.store(dgb + 3 * H + j, n);
      (zoned ? grad.dc + dc_kept : grad.dc).store(dc + row + j, n);
      if (!project) kept.store(carry + row + j, n);
    });
  };
  // GRU, both formulations: the gradients at z and n of units [j0, j1) in row b at time t and
  // the part of dh_{t-1} through z h (and zoneout); reset after, also r's, and the rows that
  // meet W_hh into dhh.
  auto gru_units = [&](const auto& acts, int64_t t, int64_t b, int64_t j0, int64_t j1) {
    const T* gout = grad_output + t * B * Hout;
    const T* g_t = gates + t * B * W;
    T* dg = dgx + t * B * GH;
    T* dr = dhh + t * B * GH;
    const bool on = steps.active(t, b);
    const T *g = g_t + b * W, *hp = on ? previous_h(t, b) : nullptr;
    T *dgb = dg + b * GH, *drb = dr + b * GH;
    const int64_t row = b * H;
    for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
      if (!on) {
        for (int64_t k = 0; k < 3; ++k) {
          zero.store(dgb + k * H + j, n);
          if (reset_after) zero.store(drb + k * H + j, n);
        }
        skipped(gout, row + j, n);
        return;
      }
      const V z = V::loadu(g + H + j, n), cand = V::loadu(g + 2 * H + j, n);
      V kept = zero;
      const V d = zone_split(t, b, j, n,
                             V::loadu(dh + row + j, n) + V::loadu(gout + row + j, n), kept);
      const GruGrad<T> grad = gru_backward<T>(d, z, cand, V::loadu(hp + j, n), acts);
      grad.dz.store(dgb + H + j, n);
      grad.dn.store(dgb + 2 * H + j, n);
      (grad.dh + kept).store(carry + row + j, n);
      if (reset_after) {
        const V r = V::loadu(g + j, n), hn = V::loadu(g + 3 * H + j, n);
        const V dr_ = gru_reset_backward<T>(grad.dn * hn, r, acts);
        dr_.store(dgb + j, n), dr_.store(drb + j, n);
        grad.dz.store(drb + H + j, n);
        (grad.dn * r).store(drb + 2 * H + j, n);
      }
    });
  };
  const LayerNorms<T>& norms = io.norms;
  // LSTM with the cell's layer norm: lstm_units for the whole of row b, in two passes around
  // the norm's backward, which needs the row's every unit.
  auto lstm_row_normed = [&](const auto& acts, int64_t t, int64_t b) {
    const T* gout = grad_output + t * B * Hout;
    T* dgb = dgx + t * B * GH + b * GH;
    T* ds = io.dnormed_cell + (t * B + b) * H;
    const int64_t row = b * H;
    if (!steps.active(t, b)) {
      for_vectors<T>(0, H, [&](int64_t j, int64_t n) {
        for (int64_t k = 0; k < 4; ++k) zero.store(dgb + k * H + j, n);
        zero.store(ds + j, n);
        if (!project) skipped(gout, row + j, n);
      });
      if (norms.hh_gain) {
        T* dx = io.dprod + (t * B + b) * GH;
        std::fill(dx, dx + GH, T(0));
      }
      return;
    }
    const T *g = gates + t * B * W + b * W, *cp = previous_c(t, b);
    const T* normed = norms.normed_row(t, b) + (norms.hh_gain ? GH : 0);
    for_vectors<T>(0, H, [&](int64_t j, int64_t n) {
      V kept = zero;
      const V d = project ? V::loadu(dm + row + j, n)
                          : zone_split(t, b, j, n,
                                       V::loadu(dh + row + j, n) + V::loadu(gout + row + j, n),
                                       kept);
      const V shown = V::loadu(normed + j, n) * V::loadu(norms.cell_gain + j, n) +
                      V::loadu(norms.cell_bias + j, n);
      const LstmNormedOutGrad<T> grad =
          lstm_normed_output_backward<T>(V::loadu(g + 3 * H + j, n), shown, d, acts);
      grad.do_.store(dgb + 3 * H + j, n);
      grad.ds.store(ds + j, n);
      if (!project) kept.store(carry + row + j, n);
    });
    T* dcell = io.dcell + row;
    layer_norm_backward(ds, normed, H, norms.cell_gain, norms.rstd_row(t, b)[1], dcell);
    for_vectors<T>(0, H, [&](int64_t j, int64_t n) {
      const V i = V::loadu(g + j, n), f = V::loadu(g + H + j, n);
      const V gg = V::loadu(g + 2 * H + j, n), c_old = V::loadu(cp + j, n);
      V dc_new = V::loadu(dc + row + j, n), dc_kept = zero;
      if (zoned) {
        const V keep = reg.keep_c(t, B, b, H, j, n);
        dc_kept = keep * dc_new, dc_new = (one - keep) * dc_new;
      }
      const LstmGrad<T> grad =
          lstm_cell_backward<T>(i, f, gg, c_old, dc_new + V::loadu(dcell + j, n), acts);
      grad.di.store(dgb + j, n), grad.df.store(dgb + H + j, n);
      grad.dg.store(dgb + 2 * H + j, n);
      (zoned ? grad.dc + dc_kept : grad.dc).store(dc + row + j, n);
    });
    if (norms.hh_gain) {  // the row's gate gradients are whole: through the product's norm
      layer_norm_backward(dgb, norms.normed_row(t, b), GH, norms.hh_gain,
                          norms.rstd_row(t, b)[0], io.dprod + (t * B + b) * GH);
    }
  };
  // Layer norm (LSTM, GRU reset after): each row's steps need its whole gate vector, and rows
  // are independent, so the whole loop runs in one parallel region with each thread owning
  // rows [b0, b1) for every step: its rows' gate gradients, norms' backward and share of
  // dh_{t-1} = dprod W_hh. No barrier per step; each row is computed the same way whatever
  // the split. (dW_hh and the gains' gradients follow the loop, over all rows.)
  auto normed_rows = [&](const auto& acts, int64_t b0, int64_t b1) {
    for (int64_t step = T_ - 1; step >= 0; --step) {
      const int64_t t = steps.reverse ? T_ - 1 - step : step;
      const T* gout = grad_output + t * B * Hout;
      // The gradient at the gates' recurrent part: dhh (GRU) or the gates' (LSTM).
      T* dy = (mode == kGRU ? dhh : dgx) + t * B * GH;
      if (mode == kLSTM && project) projection_backward(t, gout, b0, b1);
      for (int64_t b = b0; b < b1; ++b) {
        if (mode == kGRU) {
          gru_units(acts, t, b, 0, H);
        } else if (norms.cell_gain) {
          lstm_row_normed(acts, t, b);
          continue;  // its product's norm done there
        } else {
          lstm_units(acts, t, b, 0, H);
        }
        if (norms.hh_gain) {
          layer_norm_backward(dy + b * GH, norms.normed_row(t, b), GH, norms.hh_gain,
                              norms.rstd_row(t, b)[0], io.dprod + (t * B + b) * GH);
        }
      }
      product_into_carry(GH, norms.hh_gain ? io.dprod + t * B * GH : dy, rec, b0, b1);
      route_resets(t, carry, 0, Hout, 0, H, b0, b1);
      std::copy(carry + b0 * Hout, carry + b1 * Hout, dh + b0 * Hout);
    }
  };
  auto body = [&](const auto& acts) {
  if (norms.any()) {
    const int64_t threads = norm_row_threads(B);
    run_threads(threads, [&](int64_t thread) {
      normed_rows(acts, B * thread / threads, B * (thread + 1) / threads);
    });
    return;
  }
  if (mode == kLSTM && !project) {
    // The whole loop in one parallel region: each thread owns a share of the hidden units,
    // which are both its elementwise work and its columns of dh_{t-1} = dgates W_hh, so one
    // barrier per step (all of dgates_t must be written before any product reads it) suffices.
    const int64_t unit = rec.panels || B > 1 ? Packed<T>::width : Vec<T>::size();
    const int64_t pieces = Hout / unit;
    const int64_t threads = std::min(pieces, lstm_threads(B, Hout, H, pieces));
    if (threads > 1 && Hout % unit == 0) {
      auto run = [&](int64_t thread) {
        const int64_t c0 = pieces * thread / threads * unit;
        const int64_t c1 = pieces * (thread + 1) / threads * unit;
        const Packed<T> cols = rec.cols_from(c0 / unit);
        // With dropout the product lands in dh_in, then enters carry through the mask.
        const bool dropped = reg.dropout != nullptr;
        T* to = dropped ? io.dh_in : carry;
        for (int64_t step = T_ - 1; step >= 0; --step) {
          const int64_t t = steps.reverse ? T_ - 1 - step : step;
          for (int64_t b = 0; b < B; ++b) lstm_units(acts, t, b, c0, c1);
          step_barrier();
          const T* dg = dgx + t * B * GH;
          if (B == 1 && cols.panels) {
            // Each packed panel streams contiguously.
            for (int64_t p = 0; p < (c1 - c0) / unit; ++p) {
              vector_matrix<T>(GH, unit, dg, 1, cols.panel(p, 0), unit, !dropped,
                               to + c0 + p * unit);
            }
          } else if (B == 1) {
            vector_matrix<T>(GH, c1 - c0, dg, 1, cols.M, cols.ldm, !dropped, to + c0);
          } else {
            matmul<T>(B, GH, c1 - c0, dg, GH, 1, cols.M, cols.ldm, !dropped, to + c0, Hout,
                      cols.panels ? &cols : nullptr);
          }
          if (dropped) add_dropped(io.dh_in, c0, c1);
          for (int64_t b = 0; b < B; ++b) {
            std::copy(carry + b * Hout + c0, carry + b * Hout + c1, dh + b * Hout + c0);
          }
          route_resets(t, dh, c0, c1, c0, c1);  // this thread's columns and units (H == Hout)
        }
      };
#ifdef _OPENMP
      // Without OpenMP this split cannot run; the serial loop below serves instead.
      run_threads(threads, run);
      return;
#endif
    }
  }
  for (int64_t step = T_ - 1; step >= 0; --step) {
    const int64_t t = steps.reverse ? T_ - 1 - step : step;
    const T* gout = grad_output + t * B * Hout;
    const T* out_t = output + t * B * Hout;
    const T* g_t = gates + t * B * W;
    T* dg = dgx + t * B * GH;
    T* dr = dhh + t * B * GH;
    if (mode == kRNN) {
      dispatch_activation(activation, [&](auto a) {
        constexpr int A = decltype(a)::value;
        for_rows(B, H, 2, [&](int64_t b, int64_t j0, int64_t j1) {
          const bool on = steps.active(t, b);
          const int64_t row = b * H;
          for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
            const V d = V::loadu(dh + row + j, n);
            if (!on) {
              zero.store(dg + row + j, n);
              skipped(gout, row + j, n);
              return;
            }
            V derivative;
            if constexpr (keeps_derivative(A)) {
              derivative = V::loadu(g_t + row + j, n);
            } else {
              derivative = derivative_from_output<A, T>(V::loadu(out_t + row + j, n));
            }
            rnn_backward(d + V::loadu(gout + row + j, n), derivative).store(dg + row + j, n);
            zero.store(carry + row + j, n);
          });
        });
      });
      product_into_carry(GH, dg, rec);
    } else if (mode == kGRU) {
      for_rows(B, H, 8, [&](int64_t b, int64_t j0, int64_t j1) {
        gru_units(acts, t, b, j0, j1);
      });
      if (reset_after) {
        product_into_carry(GH, dr, rec);
      } else {
        // d(r * h_in) = dn W_hn, into dm (B, H); h_in = h_{t-1} (times the dropout mask).
        step_mm<T>(B, H, H, dg + 2 * H, GH, rec.rows_from(2 * H), false, dm, H);
        for_rows(B, H, 4, [&](int64_t b, int64_t j0, int64_t j1) {
          if (!steps.active(t, b)) return;
          const T *g = g_t + b * W, *hp = previous_h(t, b);
          const T* drop = reg.dropout ? reg.dropout + b * Hout : nullptr;
          T* dgb = dg + b * GH;
          const int64_t row = b * H;
          for_vectors<T>(j0, j1, [&](int64_t j, int64_t n) {
            const V r = V::loadu(g + j, n), drh = V::loadu(dm + row + j, n);
            V h_in = V::loadu(hp + j, n), dh_in = drh * r;
            if (drop) h_in = h_in * V::loadu(drop + j, n), dh_in = dh_in * V::loadu(drop + j, n);
            gru_reset_backward<T>(drh * h_in, r, acts).store(dgb + j, n);
            (V::loadu(carry + row + j, n) + dh_in).store(carry + row + j, n);
          });
        });
        product_into_carry(2 * H, dg, rec);
      }
    } else {
      if (project) projection_backward(t, gout, 0, B);
      for_rows(B, H, 24, [&](int64_t b, int64_t j0, int64_t j1) {
        lstm_units(acts, t, b, j0, j1);
      });
      product_into_carry(GH, dg, rec);
    }
    route_resets(t, carry, 0, Hout, 0, H);
    std::copy(carry, carry + B * Hout, dh);
  }
  };
  if (mode == kRNN || cell.plain()) {
    body(PlainActs<T>{});
  } else {
    body(CodedActs<T>{cell.gate_activation, activation});
  }
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
           Tensor, Tensor>
recurrence_backward(
    const Tensor& grad_output_in, const Tensor& grad_h_n, const Tensor& grad_c_n,
    const Tensor& h0_in, const std::optional<Tensor>& c0_in, const Tensor& weight_hh_in,
    const std::optional<Tensor>& weight_hr_in, const std::optional<Tensor>& lengths_in,
    const std::optional<Tensor>& resets_in, const std::optional<Tensor>& reset_h_in,
    const std::optional<Tensor>& reset_c_in, const std::optional<Tensor>& mask_in,
    const std::optional<Tensor>& hidden_dropout, const std::optional<Tensor>& zoneout_h,
    const std::optional<Tensor>& zoneout_c, const std::optional<Tensor>& norm_hh_gain,
    const std::optional<Tensor>& norm_hh_bias, const std::optional<Tensor>& norm_cell_gain,
    const std::optional<Tensor>& norm_cell_bias, const Tensor& output_in,
    const Tensor& gates_in, const Tensor& cells_in, const Tensor& projected_in,
    const Tensor& normed_in, const Tensor& norm_rstd_in, int64_t mode, int64_t activation,
    bool reset_after, bool reverse, bool carry_output, int64_t gate_activation,
    double zoneout, bool has_bias) {
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
  Tensor dgx = call_buffer({T_, B, GH}, opts);
  Tensor dhh = separate_dhh ? call_buffer({T_, B, GH}, opts) : dgx;
  Tensor carry = at::empty({B, Hout}, opts);
  Tensor dhs = call_buffer({project ? T_ : 0, B, Hout}, opts);
  Tensor dm = at::empty({B, H}, opts);
  Tensor grad_w_hh = at::empty({GH, Hout}, opts);
  Tensor grad_w_hr = project ? at::empty({Hout, H}, opts) : at::empty({0}, opts);
  const Resets resets = checked_resets(resets_in, reset_h_in, reset_c_in, T_, B, H, Hout, lstm);
  // The start-state gradients of the reset rows, summed: plane 0 for reset_state (code 1),
  // plane 1 for h0/c0 (code 2).
  const bool resetting = resets.codes.defined();
  Tensor dreset_h = at::zeros({resetting ? 2 : 0, B, Hout}, opts);
  Tensor dreset_c = at::zeros({resetting && lstm ? 2 : 0, B, H}, opts);

  Steps steps{T_, reverse, lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
  steps.B = B;
  resets.attach(steps);
  const Masks masks = checked_masks(mask_in, carry_output, steps, B);
  masks.attach(steps);
  const Regularizers regs = checked_regularizers(hidden_dropout, zoneout_h, zoneout_c, zoneout,
                                                 s, output.scalar_type());
  const bool dropped = regs.dropout.defined();
  Tensor dh_in = at::empty({dropped ? B : 0, Hout}, opts);
  const Norms norms = checked_norms(norm_hh_gain, norm_hh_bias, norm_cell_gain, norm_cell_bias,
                                    s, mode, reset_after, output.scalar_type());
  const bool hh_normed = norms.hh_gain.defined(), cell_normed = norms.cell_gain.defined();
  const Tensor normed = normed_in.contiguous(), norm_rstd = norm_rstd_in.contiguous();
  TORCH_CHECK(!norms.any() || (normed.sizes() == at::IntArrayRef{T_, B, norms.width(s)} &&
                               norm_rstd.sizes() == at::IntArrayRef{T_, B, 2}),
              "rnnkit: layer norm's backward needs the forward's saved normed and norm_rstd");
  Tensor dprod = call_buffer({hh_normed ? T_ : 0, B, GH}, opts);
  Tensor dnormed_cell = call_buffer({cell_normed ? T_ : 0, B, H}, opts);
  Tensor dcell = at::empty({cell_normed ? B : 0, H}, opts);
  AT_DISPATCH_FLOATING_TYPES(output.scalar_type(), "rnnkit_cpu_recurrence_backward", [&] {
    using T = scalar_t;
    const bool blocked = B > 1;
    Tensor packed_rec, packed_proj;
    // The LSTM's one-row steps also read W_hh in packed panels (see backward_kernel).
    const Packed<T> rec = pack<T>(GH, Hout, weight_hh.data_ptr<T>(), Hout,
                                  blocked || (lstm && !project), packed_rec);
    const Packed<T> proj = project ? pack<T>(Hout, H, weight_hr.data_ptr<T>(), H, blocked,
                                             packed_proj)
                                   : Packed<T>{};
    BackwardWeights<T> w;
    w.rec = rec, w.proj = proj, w.project = project;
    BackwardBuffers<T> io;
    io.grad_output = grad_output.data_ptr<T>();
    io.dh = dh.data_ptr<T>(), io.dc = lstm ? dc.data_ptr<T>() : nullptr;
    io.h0 = h0.data_ptr<T>(), io.c0 = lstm ? c0.data_ptr<T>() : nullptr;
    io.output = output.data_ptr<T>(), io.gates = gates.data_ptr<T>();
    io.cells = lstm ? cells.data_ptr<T>() : nullptr;
    io.dgx = dgx.data_ptr<T>(), io.dhh = dhh.data_ptr<T>(), io.carry = carry.data_ptr<T>();
    io.dhs = project ? dhs.data_ptr<T>() : nullptr, io.dm = dm.data_ptr<T>();
    io.resets = resets.states<T>(h0, c0);
    io.dreset_h = dreset_h.data_ptr<T>(), io.dreset_c = dreset_c.data_ptr<T>();
    io.dh_in = dh_in.data_ptr<T>(), io.reg = regs.view<T>();
    io.norms = norms.view<T>(s);
    if (norms.any()) {
      io.norms.normed = normed.data_ptr<T>(), io.norms.normed_stride = B * norms.width(s);
      io.norms.rstd = norm_rstd.data_ptr<T>(), io.norms.rstd_stride = B * 2;
    }
    io.dprod = dprod.data_ptr<T>(), io.dnormed_cell = dnormed_cell.data_ptr<T>();
    io.dcell = dcell.data_ptr<T>();
    backward_kernel<T>(s, steps, Cell{mode, activation, reset_after, gate_activation}, w, io);

    // dW_hh = sum_t dgates_t^T h_{t-1}. Most steps start from the neighbouring step's output,
    // so that part is one GEMM over the shifted output (skipped rows meet a zero gradient);
    // the rest, where a row started from another state (the initial state, a reset's, or its
    // last active step's across a masked hole), add their gradient times (the state they
    // started from - the one assumed).
    // (With norm_hh, W_hh meets the gradient at the product rather than at the gates.)
    const T* dg = hh_normed ? dprod.data_ptr<T>() : dhh.data_ptr<T>();
    const T* out = output.data_ptr<T>();
    T* gw = grad_w_hh.data_ptr<T>();
    const int64_t rz = (mode == kGRU && !reset_after) ? 2 * H : GH;  // rows that see h_{t-1}
    const int64_t rows = (T_ - 1) * B;
    const ResetStates<T> starts = resets.states<T>(h0, c0);
    const T* h_first = h0.data_ptr<T>();
    auto start_of = [&](int64_t t, int64_t b) -> const T* {
      if (const int code = steps.reset(t, b)) return starts.h[code] + b * Hout;
      const int64_t from = steps.start_time(t, b);
      return from < 0 ? h_first + b * Hout : out + (from * B + b) * Hout;
    };
    if (dropped) {
      // What entered the product, start * mask, differs from every saved state: gathered
      // (zero on skipped rows, whose gradient is zero), then one product.
      Tensor inputs = call_buffer({T_, B, Hout}, opts);
      T* in = inputs.data_ptr<T>();
      const T* drop = regs.dropout.data_ptr<T>();
      at::parallel_for(0, T_ * B, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t t = r / B, b = r % B;
          T* row = in + r * Hout;
          if (!steps.active(t, b)) {
            std::fill(row, row + Hout, T(0));
            continue;
          }
          const T* start = start_of(t, b);
          for (int64_t j = 0; j < Hout; ++j) row[j] = start[j] * drop[b * Hout + j];
        }
      });
      product<T>(rz, T_ * B, Hout, dg, 1, GH, in, Hout, false, gw, Hout);
    }
    const T* dg_main = reverse ? dg : dg + B * GH;
    const T* out_main = reverse ? out + B * Hout : out;
    if (!dropped) product<T>(rz, rows, Hout, dg_main, 1, GH, out_main, Hout, false, gw, Hout);
    auto assumed_of = [&](int64_t t, int64_t b) -> const T* {
      const bool first_step = t == (reverse ? T_ - 1 : 0);
      return first_step ? nullptr : out + (steps.previous(t) * B + b) * Hout;
    };
    std::vector<int64_t> moved_rows;
    for (int64_t t = 0; t < T_ && !dropped; ++t) {
      for (int64_t b = 0; b < B; ++b) {
        if (steps.active(t, b) && start_of(t, b) != assumed_of(t, b)) {
          moved_rows.push_back(t * B + b);
        }
      }
    }
    const int64_t n = static_cast<int64_t>(moved_rows.size());
    Tensor picked = at::empty({n, GH}, opts), moved = at::empty({n, Hout}, opts);
    T *pg = picked.data_ptr<T>(), *pm = moved.data_ptr<T>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = moved_rows[i] / B, b = moved_rows[i] % B;
      const T *start = start_of(t, b), *assumed = assumed_of(t, b);
      std::copy(dg + moved_rows[i] * GH, dg + (moved_rows[i] + 1) * GH, pg + i * GH);
      for (int64_t j = 0; j < Hout; ++j) {
        pm[i * Hout + j] = assumed ? start[j] - assumed[j] : start[j];
      }
    }
    product<T>(rz, n, Hout, pg, 1, GH, pm, Hout, true, gw, Hout);
    if (rz != GH) {
      // GRU with the reset before the matmul: W_hn meets r * h_{t-1}, saved in the gates.
      product<T>(H, T_ * B, Hout, dg + 2 * H, 1, GH, gates.data_ptr<T>() + 3 * H, 4 * H, false,
                 gw + 2 * H * Hout, Hout);
    }
    if (project) {
      product<T>(Hout, T_ * B, H, dhs.data_ptr<T>(), 1, Hout, projected.data_ptr<T>(), H, false,
                 grad_w_hr.data_ptr<T>(), H);
    }
  });
  Tensor grad_b_hh = has_bias ? at::sum(dhh.view({T_ * B, GH}), {0}) : at::empty({0}, opts);
  Tensor grad_reset_h = at::empty({0}, opts), grad_reset_c = at::empty({0}, opts);
  if (resetting) {
    dh.add_(dreset_h[1]), grad_reset_h = dreset_h[0];
    if (lstm) dc.add_(dreset_c[1]), grad_reset_c = dreset_c[0];
  }
  // The norms' gains and biases: sums over every step and row of dy xhat and dy, dy the
  // gradient at the normed values (at the gates' recurrent part for norm_hh).
  Tensor grads[4] = {at::empty({0}, opts), at::empty({0}, opts), at::empty({0}, opts),
                     at::empty({0}, opts)};
  if (norms.any()) {
    const Tensor xhat = normed.view({T_ * B, norms.width(s)});
    if (hh_normed) {
      const Tensor dy = dhh.view({T_ * B, GH});
      grads[0] = at::sum(at::mul(dy, xhat.narrow(1, 0, GH)), {0});
      grads[1] = at::sum(dy, {0});
    }
    if (cell_normed) {
      const Tensor dy = dnormed_cell.view({T_ * B, H});
      grads[2] = at::sum(at::mul(dy, xhat.narrow(1, hh_normed ? GH : 0, H)), {0});
      grads[3] = at::sum(dy, {0});
    }
  }
  return {dgx, dh, dc, grad_w_hh, grad_b_hh, grad_w_hr, grad_reset_h, grad_reset_c,
          grads[0], grads[1], grads[2], grads[3]};
}

}  // namespace rnnkit_cpu
