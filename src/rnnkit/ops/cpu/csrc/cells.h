// Each cell's pointwise math, forward and backward, written once: the fused steps
// (fused_steps.h), the general forward loop and LSTM inference (forward.cpp,
// lstm_inference.cpp) and the backward loop (backward.cpp) all call these. They work on one
// vector of hidden units; where the values come from (registers of a fused product, or a
// product buffer) and where they go is the caller's business. The expressions keep their
// order of operations: every path rounds alike.
#pragma once

#include "vec_math.h"

#include <cmath>
#include <cstdint>

namespace rnnkit_cpu {

// The activations of a GRU/LSTM cell: its gates' (recurrent_activation) and its candidate's
// and cell output's (nonlinearity), each with its backward from the activation's output:
// backward(upstream, y) = upstream * act'(x) where y = act(x).
// torch.nn's cells, sigmoid and tanh, as templates (the fast path).
template <typename T>
struct PlainActs {
  Vec<T> gate(const Vec<T>& x) const { return sigmoid(x); }
  Vec<T> gate_backward(const Vec<T>& up, const Vec<T>& y) const {
    return sigmoid_backward(up, y);
  }
  Vec<T> act(const Vec<T>& x) const { return tanh<T>(x); }
  Vec<T> act_backward(const Vec<T>& up, const Vec<T>& y) const { return tanh_backward(up, y); }
};

// Any activations whose derivative can be read off their output (vec_math.h), chosen per call
// by their codes.
template <typename T>
struct CodedActs {
  int64_t gate_code = kSigmoid, act_code = kTanh;

  static Vec<T> apply(int64_t code, const Vec<T>& x) {
    Vec<T> y;
    dispatch_activation(code, [&](auto a) {
      Vec<T> unused;
      y = activate<decltype(a)::value, T>(x, unused);
    });
    return y;
  }
  static Vec<T> backward(int64_t code, const Vec<T>& up, const Vec<T>& y) {
    Vec<T> d;
    dispatch_activation(code, [&](auto a) {
      constexpr int A = decltype(a)::value;
      if constexpr (keeps_derivative(A)) {
        TORCH_CHECK(false, "rnnkit: a GRU/LSTM activation must have its derivative from its output");
      } else {
        d = up * derivative_from_output<A, T>(y);
      }
    });
    return d;
  }
  Vec<T> gate(const Vec<T>& x) const { return apply(gate_code, x); }
  Vec<T> gate_backward(const Vec<T>& up, const Vec<T>& y) const {
    return backward(gate_code, up, y);
  }
  Vec<T> act(const Vec<T>& x) const { return apply(act_code, x); }
  Vec<T> act_backward(const Vec<T>& up, const Vec<T>& y) const {
    return backward(act_code, up, y);
  }
};

// Zoneout: the state kept from the step's start where the mask (or, in evaluation, the
// probability) `keep` is, the new one elsewhere.
template <typename T>
inline Vec<T> zoneout(const Vec<T>& keep, const Vec<T>& start, const Vec<T>& fresh) {
  return keep * start + (Vec<T>(T(1)) - keep) * fresh;
}

// The pre-activation of gate k at column j of a general step: gates_x + the step's product
// with W_hh + b_hh, each a row of G*H (gate k at k * H), `count` lanes.
template <typename T>
inline Vec<T> preactivation(const T* x, const T* rec, const T* bias, int64_t at,
                            int64_t count) {
  return Vec<T>::loadu(x + at, count) + Vec<T>::loadu(rec + at, count) +
         Vec<T>::loadu(bias + at, count);
}

// ---------------------------------------------------------------------------------------
// RNN: h = act(x W_ih^T + b_ih + h W_hh^T + b_hh). The activations and their derivatives are
// vec_math.h's; backward the gradient at the pre-activation is (dh + dout) act'.

template <int A, typename T>
inline Vec<T> rnn_forward(const Vec<T>& pre, Vec<T>& derivative) {
  return activate<A, T>(pre, derivative);
}

template <typename T>
inline Vec<T> rnn_backward(const Vec<T>& d, const Vec<T>& derivative) {
  return d * derivative;
}

// ---------------------------------------------------------------------------------------
// GRU, both formulations: r = sigmoid(.), z = sigmoid(.), h' = (1 - z) n + z h, with the
// candidate n = tanh(x_n + r * (W_hn h + b_hn)) when the reset comes after the product
// (torch's), tanh(x_n + W_hn (r * h) + b_hn) when before.

// The new state from the update gate, the candidate and the previous state.
template <typename T>
inline Vec<T> gru_output(const Vec<T>& z, const Vec<T>& n, const Vec<T>& h_old) {
  return (Vec<T>(T(1)) - z) * n + z * h_old;
}

// Reset after: the candidate from x_n and hn = W_hn h + b_hn.
template <typename T, typename Acts = PlainActs<T>>
inline Vec<T> gru_candidate_after(const Vec<T>& x_n, const Vec<T>& r, const Vec<T>& hn,
                                  const Acts& acts = Acts{}) {
  return acts.act(x_n + r * hn);
}

// Reset before: the candidate from its whole pre-activation, x_n + W_hn (r * h) + b_hn.
template <typename T, typename Acts = PlainActs<T>>
inline Vec<T> gru_candidate_before(const Vec<T>& pre_n, const Acts& acts = Acts{}) {
  return acts.act(pre_n);
}

// Backward, both formulations: from d = dh' (with the output's gradient), the saved z and n
// and the previous state, the gradients at n's and z's pre-activations and the part of dh
// that flows straight through z h.
template <typename T>
struct GruGrad {
  Vec<T> dn, dz, dh;
};

template <typename T, typename Acts = PlainActs<T>>
inline GruGrad<T> gru_backward(const Vec<T>& d, const Vec<T>& z, const Vec<T>& n,
                               const Vec<T>& h_old, const Acts& acts = Acts{}) {
  const Vec<T> one(T(1));
  return {acts.act_backward(d * (one - z), n), acts.gate_backward(d * (h_old - n), z), d * z};
}

// The gradient at r's pre-activation, from the gradient at r's product partner: dn * hn
// (reset after), or d(r * h) * h (reset before), given as upstream.
template <typename T, typename Acts = PlainActs<T>>
inline Vec<T> gru_reset_backward(const Vec<T>& upstream, const Vec<T>& r,
                                 const Acts& acts = Acts{}) {
  return acts.gate_backward(upstream, r);
}

// ---------------------------------------------------------------------------------------
// LSTM: i, f, o = sigmoid(.), g = tanh(.), c' = f c + i g, y = o tanh(c').

template <typename T>
struct LstmPoint {
  Vec<T> i, f, g, o;  // the activated gates
  Vec<T> c;           // the new cell state
  Vec<T> y;           // the output, o * tanh(c)

  // The gates, as saved for backward: i, f, g, o at gates, + H, + 2H, + 3H.
  void store_gates(T* gates, int64_t H, int64_t count = Vec<T>::size()) const {
    i.store(gates, count), f.store(gates + H, count), g.store(gates + 2 * H, count);
    o.store(gates + 3 * H, count);
  }
};

// The new cell from the activated gates and the previous cell (backward recomputes it when
// zoneout kept a different state).
template <typename T>
inline Vec<T> lstm_cell(const Vec<T>& i, const Vec<T>& f, const Vec<T>& g, const Vec<T>& c_old) {
  return f * c_old + i * g;
}

template <typename T, typename Acts = PlainActs<T>>
inline LstmPoint<T> lstm_forward(const Vec<T>& pre_i, const Vec<T>& pre_f, const Vec<T>& pre_g,
                                 const Vec<T>& pre_o, const Vec<T>& c_old,
                                 const Acts& acts = Acts{}) {
  LstmPoint<T> p;
  p.i = acts.gate(pre_i), p.f = acts.gate(pre_f), p.g = acts.act(pre_g);
  p.o = acts.gate(pre_o);
  p.c = lstm_cell(p.i, p.f, p.g, c_old);
  p.y = p.o * acts.act(p.c);
  return p;
}

// Backward: from the saved gates and cell c_t, the previous cell, d = dy and dc = the cell
// gradient carried from t + 1: the gradients at the four pre-activations and the cell
// gradient carried on to t - 1.
template <typename T>
struct LstmGrad {
  Vec<T> di, df, dg, do_, dc;
};

template <typename T, typename Acts = PlainActs<T>>
inline LstmGrad<T> lstm_backward(const Vec<T>& i, const Vec<T>& f, const Vec<T>& g,
                                 const Vec<T>& o, const Vec<T>& c_t, const Vec<T>& c_old,
                                 const Vec<T>& d, const Vec<T>& dc, const Acts& acts = Acts{}) {
  const Vec<T> tc = acts.act(c_t);
  const Vec<T> dcell = dc + acts.act_backward(d * o, tc);
  return {acts.gate_backward(dcell * g, i), acts.gate_backward(dcell * c_old, f),
          acts.act_backward(dcell * i, g), acts.gate_backward(d * tc, o), dcell * f};
}


// With the cell's layer norm (y = o act(LN(c') gain_c + bias_c)), backward splits in two: the
// output gate's gradient and the gradient at the normalized cell s from the output's, then,
// from the whole gradient at c' (carried, plus the norm's backward of ds), the other gates'.
template <typename T>
struct LstmNormedOutGrad {
  Vec<T> do_, ds;
};

template <typename T, typename Acts = PlainActs<T>>
inline LstmNormedOutGrad<T> lstm_normed_output_backward(const Vec<T>& o, const Vec<T>& s,
                                                        const Vec<T>& d,
                                                        const Acts& acts = Acts{}) {
  const Vec<T> ts = acts.act(s);
  return {acts.gate_backward(d * ts, o), acts.act_backward(d * o, ts)};
}

// The input, forget and candidate gates' gradients (di, df, dg of LstmGrad) and the cell
// gradient carried on, from dcell, the whole gradient at the new cell.
template <typename T, typename Acts = PlainActs<T>>
inline LstmGrad<T> lstm_cell_backward(const Vec<T>& i, const Vec<T>& f, const Vec<T>& g,
                                      const Vec<T>& c_old, const Vec<T>& dcell,
                                      const Acts& acts = Acts{}) {
  return {acts.gate_backward(dcell * g, i), acts.gate_backward(dcell * c_old, f),
          acts.act_backward(dcell * i, g), Vec<T>(T(0)), dcell * f};
}

// ---------------------------------------------------------------------------------------
// Layer norm over one row of n values (Call.norm_hh over the G*H gates, norm_cell over LSTM's
// H cells), as torch.nn.LayerNorm with eps 1e-5: xhat = (x - mean) rstd with the biased
// variance, y = xhat gain + bias. Row-wise: one thread owns a row.

constexpr double kLayerNormEps = 1e-5;

template <typename T>
inline T lane_sum(const Vec<T>& v) {
  T lanes[Vec<T>::size()];
  v.store(lanes);
  T sum = T(0);
  for (int64_t k = 0; k < Vec<T>::size(); ++k) sum += lanes[k];
  return sum;
}

// Writes xhat to `normed` (nullptr: not kept) and y to `y` (which may be x); returns rstd.
template <typename T>
inline T layer_norm_forward(const T* x, int64_t n, const T* gain, const T* bias, T* normed,
                            T* y) {
  using V = Vec<T>;
  V sum(T(0)), squares(T(0));
  for_vectors<T>(0, n, [&](int64_t j, int64_t m) { sum = sum + V::loadu(x + j, m); });
  const V mean(lane_sum(sum) / T(n));
  for_vectors<T>(0, n, [&](int64_t j, int64_t m) {
    const V centred = V::set(V(T(0)), V::loadu(x + j, m) - mean, m);  // partial lanes: 0
    squares = squares + centred * centred;
  });
  const T rstd = T(1) / std::sqrt(lane_sum(squares) / T(n) + T(kLayerNormEps));
  for_vectors<T>(0, n, [&](int64_t j, int64_t m) {
    const V xhat = (V::loadu(x + j, m) - mean) * V(rstd);
    if (normed) xhat.store(normed + j, m);
    (xhat * V::loadu(gain + j, m) + V::loadu(bias + j, m)).store(y + j, m);
  });
  return rstd;
}

// dx from dy, the gradient at y: with dxhat = dy gain,
// dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)). The gain's and bias's gradients
// (sums of dy xhat and dy over every step and row) are left to the caller.
template <typename T>
inline void layer_norm_backward(const T* dy, const T* xhat, int64_t n, const T* gain, T rstd,
                                T* dx) {
  using V = Vec<T>;
  V sum(T(0)), dot(T(0));
  for_vectors<T>(0, n, [&](int64_t j, int64_t m) {  // partial lanes load zeros
    const V dxhat = V::loadu(dy + j, m) * V::loadu(gain + j, m);
    sum = sum + dxhat, dot = dot + dxhat * V::loadu(xhat + j, m);
  });
  const V mean(lane_sum(sum) / T(n)), mean_dot(lane_sum(dot) / T(n));
  for_vectors<T>(0, n, [&](int64_t j, int64_t m) {
    const V dxhat = V::loadu(dy + j, m) * V::loadu(gain + j, m);
    (V(rstd) * (dxhat - mean - V::loadu(xhat + j, m) * mean_dot)).store(dx + j, m);
  });
}

}  // namespace rnnkit_cpu
