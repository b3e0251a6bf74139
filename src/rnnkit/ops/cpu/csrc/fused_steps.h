// The LSTM and GRU steps fused into their W_hh product, as register blocks: the cell math
// runs on the accumulators of the product, so a step is one pass with no product buffer.
#pragma once

#include "cells.h"
#include "gemm.h"
#include "recurrence.h"
#include "threads.h"
#include "vec_math.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace rnnkit_cpu {

// The LSTM step fused into its product. W_hh is packed once per call gate-interleaved: panel
// p holds, for each k, the four gates' columns of hidden units [p*U, (p+1)*U) (U = one
// vector), so a register block of R batch rows x 4 vectors ends holding all four
// pre-activations of U units, seeded with gates_x + b_hh. The cell math runs on the
// registers and writes h, c, the output and the saved gates directly: one pass, one parallel
// region per step, no (B, 4H) product buffer. Threads take panels (hidden units), so every
// thread reads the whole previous h: it is double-buffered.

template <typename T>
struct LstmStep {
  int64_t H, Hout, GH;
  const T* gx;     // this step's gates_x, (B, 4H)
  const T* bias;   // (4H)
  const T* h_in;   // previous state, (B, Hout)
  T* h_out;        // next state (B, H); nullptr with a projection (h is set after it)
  T* out;          // this step's output rows (B, H); unused with a projection
  T* m;            // with a projection: o * tanh(c), (B, H); else nullptr
  T* c;            // cell state (B, H), updated in place (each unit has one owner)
  T* cells;        // saved cell (B, H) or nullptr
  T* gates;        // saved activations (B, 4H) or nullptr
  const Steps* steps;
  int64_t t;
  // gx laid out per panel, (B, H / U, 4, U), as the in-loop projection writes it; else (B, 4H).
  bool interleaved = false;
  // The states reset rows start from (steps->reset); nullptr: none, or already in h_in and c.
  const ResetStates<T>* resets = nullptr;
  // The regularized step (lstm_panels<T, true>): dropout and zoneout, and the activations.
  const Regularization<T>* reg = nullptr;
  CodedActs<T> acts;
};

// The row a block's row b starts its step from: h_in's, or with a reset the state it names.
template <typename T>
inline const T* start_row(const T* h_in, int64_t width, const ResetStates<T>* resets,
                          const Steps& steps, int64_t t, int64_t b, int& code) {
  code = resets ? steps.reset(t, b) : 0;
  return (code ? resets->h[code] : h_in) + b * width;
}

// acc[r][g] += sum_k h[r][k] panel[k][g] for R state rows (each Hout long, wherever it lives)
// and the G gates of U units in a gate-interleaved panel (Hout, G, U): one register block of
// the fused step. With kDropped, each h[r][k] enters times drop[r][k] (recurrent dropout).
template <typename T, int R, int G, bool kDropped = false>
inline void gate_products(int64_t Hout, const T* const (&h)[R], const T* panel,
                          Vec<T> (&acc)[R][G], const T* const (&drop)[R]) {
  using V = Vec<T>;
  constexpr int64_t U = Vec<T>::size();
  // Few rows have few accumulator chains: split k S ways to hide the FMA latency, up to about
  // 24 chains with 32 AVX512 registers (12 with AVX2's 16), beside G weights and a broadcast.
  constexpr int chains = Vec<T>::size() * sizeof(T) >= 64 ? 24 : 12;
  constexpr int S = std::max(1, std::min(4, chains / (R * G)));
  V part[S][R][G];
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) {
      part[0][r][g] = acc[r][g];
      for (int q = 1; q < S; ++q) part[q][r][g] = V(T(0));
    }
  }
  int64_t k = 0;
  if constexpr (S > 1) {
    for (; k + S <= Hout; k += S) {
      for (int q = 0; q < S; ++q) {
        const T* w = panel + (k + q) * G * U;
        V m[G];
        for (int g = 0; g < G; ++g) m[g] = V::loadu(w + g * U);
        for (int r = 0; r < R; ++r) {
          const V a(kDropped ? h[r][k + q] * drop[r][k + q] : h[r][k + q]);
          for (int g = 0; g < G; ++g) part[q][r][g] = at::vec::fmadd(a, m[g], part[q][r][g]);
        }
      }
    }
  }
  for (; k < Hout; ++k) {
    const T* w = panel + k * G * U;
    V m[G];
    for (int g = 0; g < G; ++g) m[g] = V::loadu(w + g * U);
    for (int r = 0; r < R; ++r) {
      const V a(kDropped ? h[r][k] * drop[r][k] : h[r][k]);
      for (int g = 0; g < G; ++g) part[0][r][g] = at::vec::fmadd(a, m[g], part[0][r][g]);
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int g = 0; g < G; ++g) {
      for (int q = 1; q < S; ++q) part[0][r][g] = part[0][r][g] + part[q][r][g];
      acc[r][g] = part[0][r][g];
    }
  }
}

// Rows b0 .. b0+R of units u0 .. u0+U; panel is (Hout, 4, U). kReg: the regularized step
// (s.reg's dropout and zoneout, s.acts' activations), else torch.nn's cell.
template <typename T, int R, bool kReg = false>
inline void lstm_block(const LstmStep<T>& s, const T* panel, int64_t b0, int64_t u0) {
  using V = Vec<T>;
  constexpr int64_t U = lstm_unit<T>();
  const int64_t H = s.H, Hout = s.Hout;
  V acc[R][4];
  const T* h_start[R];
  const T* drop[R];
  int code[R];
  for (int r = 0; r < R; ++r) {
    h_start[r] = start_row(s.h_in, Hout, s.resets, *s.steps, s.t, b0 + r, code[r]);
    drop[r] = kReg && s.reg->dropout ? s.reg->dropout + (b0 + r) * Hout : h_start[r];
    for (int g = 0; g < 4; ++g) {
      const int64_t gx_at = s.interleaved ? 4 * u0 + g * U : g * H + u0;
      acc[r][g] = V::loadu(s.gx + (b0 + r) * s.GH + gx_at) + V::loadu(s.bias + g * H + u0);
    }
  }
  if constexpr (kReg) {
    if (s.reg->dropout) {
      gate_products<T, R, 4, true>(Hout, h_start, panel, acc, drop);
    } else {
      gate_products<T, R, 4>(Hout, h_start, panel, acc, drop);
    }
  } else {
    gate_products<T, R, 4>(Hout, h_start, panel, acc, drop);
  }
  const V zero(T(0));
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r;
    const bool on = s.steps->active(s.t, b);
    const int64_t at = b * H + u0;
    const V c_old = V::loadu((code[r] ? s.resets->c[code[r]] : s.c) + at);
    LstmPoint<T> p;
    if constexpr (kReg) {
      p = lstm_forward<T>(acc[r][0], acc[r][1], acc[r][2], acc[r][3], c_old, s.acts);
    } else {
      p = lstm_forward<T>(acc[r][0], acc[r][1], acc[r][2], acc[r][3], c_old);
    }
    if (s.gates) p.store_gates(s.gates + b * 4 * H + u0, H);
    V y = p.y, c_new = p.c;
    const V h_old = s.m ? zero : V::loadu(h_start[r] + u0);  // a skipped row has no reset
    if (kReg && s.reg->zoned()) {
      c_new = zoneout<T>(s.reg->keep_c(s.t, s.steps->B, b, H, u0, U), c_old, c_new);
      if (!s.m) y = zoneout<T>(s.reg->keep_h(s.t, s.steps->B, b, Hout, u0, U), h_old, y);
    }
    const V c_kept = on ? c_new : c_old;
    c_kept.store(s.c + at);
    if (s.cells) c_kept.store(s.cells + at);
    if (s.m) {
      p.y.store(s.m + at);
    } else {
      (on ? y : h_old).store(s.h_out + at);
      (on ? y : s.steps->carry_output ? h_old : zero).store(s.out + at);
    }
  }
}

// The GRU step (reset after the product, torch's formulation) fused the same way: panel p
// holds, for each k, the r, z and n weights of hidden units [p*U, (p+1)*U), so a register
// block ends with r and z's pre-activations (seeded with gates_x + b_hh) and W_hn h + b_hn;
// the candidate and the new state are computed on the registers and written once.
template <typename T>
struct GruStep {
  int64_t H;
  const T* gx;     // this step's gates_x, (B, 3H)
  const T* bias;   // b_hh, (3H)
  const T* h_in;   // previous state, (B, H)
  T* h_out;        // next state, (B, H)
  T* out;          // this step's output rows, (B, H)
  T* gates;        // saved r, z, n, W_hn h + b_hn, (B, 4H), or nullptr
  const Steps* steps;
  int64_t t;
  const ResetStates<T>* resets = nullptr;  // as LstmStep's
  const Regularization<T>* reg = nullptr;  // as LstmStep's
  CodedActs<T> acts;
};

// Rows b0 .. b0+R of units u0 .. u0+U; panel is (H, 3, U). kReg as lstm_block's.
template <typename T, int R, bool kReg = false>
inline void gru_block(const GruStep<T>& s, const T* panel, int64_t b0, int64_t u0) {
  using V = Vec<T>;
  constexpr int64_t U = lstm_unit<T>();
  const int64_t H = s.H;
  V acc[R][3];
  const T* h_start[R];
  const T* drop[R];
  for (int r = 0; r < R; ++r) {
    int code;
    h_start[r] = start_row(s.h_in, H, s.resets, *s.steps, s.t, b0 + r, code);
    drop[r] = kReg && s.reg->dropout ? s.reg->dropout + (b0 + r) * H : h_start[r];
    const T* gx = s.gx + (b0 + r) * 3 * H + u0;
    acc[r][0] = V::loadu(gx) + V::loadu(s.bias + u0);
    acc[r][1] = V::loadu(gx + H) + V::loadu(s.bias + H + u0);
    acc[r][2] = V::loadu(s.bias + 2 * H + u0);
  }
  if constexpr (kReg) {
    if (s.reg->dropout) {
      gate_products<T, R, 3, true>(H, h_start, panel, acc, drop);
    } else {
      gate_products<T, R, 3>(H, h_start, panel, acc, drop);
    }
  } else {
    gate_products<T, R, 3>(H, h_start, panel, acc, drop);
  }
  const V zero(T(0));
  for (int r = 0; r < R; ++r) {
    const int64_t b = b0 + r, at = b * H + u0;
    const V x_n = V::loadu(s.gx + b * 3 * H + 2 * H + u0);
    V reset, update, cand;
    if constexpr (kReg) {
      reset = s.acts.gate(acc[r][0]), update = s.acts.gate(acc[r][1]);
      cand = gru_candidate_after<T>(x_n, reset, acc[r][2], s.acts);
    } else {
      reset = sigmoid(acc[r][0]), update = sigmoid(acc[r][1]);
      cand = gru_candidate_after<T>(x_n, reset, acc[r][2]);
    }
    const V h_old = V::loadu(h_start[r] + u0);
    V y = gru_output<T>(update, cand, h_old);
    if (kReg && s.reg->zoned()) {
      y = zoneout<T>(s.reg->keep_h(s.t, s.steps->B, b, H, u0, U), h_old, y);
    }
    if (s.gates) {
      T* g = s.gates + b * 4 * H + u0;
      reset.store(g), update.store(g + H), cand.store(g + 2 * H), acc[r][2].store(g + 3 * H);
    }
    const bool on = s.steps->active(s.t, b);
    (on ? y : h_old).store(s.h_out + at);
    (on ? y : s.steps->carry_output ? h_old : zero).store(s.out + at);
  }
}

// Panels [p0, p1) of one fused step, all B rows, for a block kernel of either cell.
template <typename T, typename Block>
void fused_panels(int64_t B, const T* packed, int64_t panel_size, int64_t p0, int64_t p1,
                  const Block& block) {
  constexpr int64_t U = Vec<T>::size();
  for (int64_t p = p0; p < p1; ++p) {
    const T* panel = packed + p * panel_size;
    for_row_blocks<T>(0, B, [&](auto rows, int64_t b) { block(rows, panel, b, p * U); });
  }
}

// Panels [p0, p1) of one fused LSTM step, all B rows; packed is (H / U panels, Hout, 4, U).
template <typename T, bool kReg = false>
void lstm_panels(const LstmStep<T>& s, int64_t B, const T* packed, int64_t p0, int64_t p1) {
  fused_panels<T>(B, packed, s.Hout * 4 * Vec<T>::size(), p0, p1,
                  [&](auto rows, const T* panel, int64_t b, int64_t u0) {
                    lstm_block<T, decltype(rows)::value, kReg>(s, panel, b, u0);
                  });
}

template <typename T, bool kReg = false>
void gru_panels(const GruStep<T>& s, int64_t B, const T* packed, int64_t p0, int64_t p1) {
  fused_panels<T>(B, packed, s.H * 3 * Vec<T>::size(), p0, p1,
                  [&](auto rows, const T* panel, int64_t b, int64_t u0) {
                    gru_block<T, decltype(rows)::value, kReg>(s, panel, b, u0);
                  });
}

// One fused LSTM step over all B rows.
template <typename T, bool kReg = false>
void lstm_step(const LstmStep<T>& s, int64_t B, const T* packed) {
  const int64_t panels = s.H / lstm_unit<T>();
  const int64_t threads = lstm_threads(B, s.Hout, s.H, panels);
  at::parallel_for(0, panels, (panels + threads - 1) / threads, [&](int64_t p0, int64_t p1) {
    lstm_panels<T, kReg>(s, B, packed, p0, p1);
  });
}

}  // namespace rnnkit_cpu
