// rnnkit's compiled CPU recurrence: the whole time loop of one layer in one direction,
// forward and backward (BPTT), for RNN (named activations), GRU (both formulations) and
// LSTM (optionally projected), in float32 and float64; and the layers' input projection.
//
// The math is exactly rnnkit.cells' step functions; rnnkit.ops.reference is the twin the
// tests hold these files equal to. Per step there is one product with W_hh (two for GRU with
// reset_after=False, one more for the LSTM projection) into preallocated buffers, then one
// fused elementwise pass. Backward computes the per-step gate gradients and leaves dW_hh to
// one big product after the loop. All products run on the register-blocked kernels of
// gemm.h, not on BLAS.
//
// Layout (row-major, as the Python side passes it): gates_x (T, B, G*H), h0 (B, Hout),
// c0 (B, H), weight_hh (G*H, Hout), bias_hh (G*H), weight_hr (Hout, H), lengths (B,) int64.
// A row b is "active" at time t when t < lengths[b]; inactive rows hold their state and
// write zero output, so a reverse pass starts at each sequence's own last step. With resets
// (T, B) int8 and reset_h (B, Hout), reset_c (B, H), an active row whose code at t is 1 or 2
// starts step t from reset_state or from h0/c0 instead of the carried state: forward selects
// that row's start per step; backward sends the gradient reaching it to reset_state or h0/c0
// rather than to step t-1. The saved sequences keep the carried states. With a mask (T, B)
// bool, a row is active only where it is also true: a hole is skipped as a step past a length
// is, and the step after it starts from the state of the row's last active step (backward
// finds it through Steps::start_time). With carry_output, a skipped step outputs the carried
// h instead of zero (Keras's zero_output_for_mask=False), and backward passes that output's
// gradient on to the state it carries.
//
// The ops are declared (schema, fake and autograd) in rnnkit/ops/cpu/_ops.py; these files only
// add their CPU kernels (register.cpp). The files, one job each:
//   vec_math.h        vector width, sigmoid/tanh, the RNN activations and their derivatives
//   threads.h         per-call buffers, the OpenMP frame of the fused loops, row splits
//   buffers.cpp       the per-call buffers: freed large ones kept for the next call
//   gemm.h, gemm.cpp  the register-blocked products and the weight packers
//   cells.h           each cell's pointwise math, forward and backward, written once
//   fused_steps.h     the LSTM and GRU steps fused into their W_hh product
//   forward.h/.cpp    the forward time loop (cpu_recurrence_forward)
//   backward.cpp      the backward time loop (cpu_recurrence_backward)
//   linear.cpp        the input projection (cpu_linear, cpu_linear_backward)
//   lstm_inference.cpp  LSTM inference with the projection inside the loop
//   register.cpp      the TORCH_LIBRARY_IMPL block
#pragma once

#include "vec_math.h"

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace rnnkit_cpu {

using at::Tensor;

enum Mode : int64_t { kRNN = 0, kGRU = 1, kLSTM = 2 };

struct Shape {
  int64_t T, B, H, Hout, G;
};

// Which cell the loop runs.
struct Cell {
  int64_t mode;         // Mode
  int64_t activation;   // Activation: RNN's; GRU's candidate and LSTM's cell input and output
  bool reset_after;     // GRU formulation: reset after the product (torch's), else before
  int64_t gate_activation = kSigmoid;  // GRU/LSTM gates' (recurrent_activation)

  // torch.nn's GRU/LSTM activations, which the cells run as templates (PlainActs).
  bool plain() const { return activation == kTanh && gate_activation == kSigmoid; }
};

// Recurrent dropout and zoneout (Call.hidden_dropout, zoneout_h, zoneout_c, spec.zoneout).
// Per step: h_in = start * dropout enters the product with W_hh (only it); after the cell,
// a unit keeps its start value where the zoneout mask is 1 (or, without masks, in the
// proportion `zoneout`): new = keep * start + (1 - keep) * fresh.
template <typename T>
struct Regularization {
  const T* dropout = nullptr;  // (B, Hout) multipliers, or nullptr
  const T* zone_h = nullptr;   // (T, B, Hout) masks, or nullptr
  const T* zone_c = nullptr;   // (T, B, H) masks (LSTM), or nullptr
  T zoneout = T(0);            // the probability, used where there are no masks

  bool zoned() const { return zone_h != nullptr || zoneout != T(0); }
  // The keep factor of units [j, j + n) of row b at time t, for h (width Hout) or c (width H).
  Vec<T> keep_h(int64_t t, int64_t B, int64_t b, int64_t width, int64_t j, int64_t n) const {
    return zone_h ? Vec<T>::loadu(zone_h + (t * B + b) * width + j, n) : Vec<T>(zoneout);
  }
  Vec<T> keep_c(int64_t t, int64_t B, int64_t b, int64_t width, int64_t j, int64_t n) const {
    return zone_c ? Vec<T>::loadu(zone_c + (t * B + b) * width + j, n) : Vec<T>(zoneout);
  }
};

// Layer norm of the recurrent product and of LSTM's cell (Call.norm_hh, norm_cell): per row,
// gates_h = LN(W_hh h_in) gain + bias + b_hh over the whole G*H gate vector, and (LSTM)
// y = o act(LN(c') gain_c + bias_c) with c' carried unnormalized; eps 1e-5 as torch's. The
// forward saves per step and row the normalized values, (G*H [+ H]) each ("normed": product,
// then cell), and their 1/std, (2) each ("rstd": product, cell); backward reads them.
template <typename T>
struct LayerNorms {
  const T* hh_gain = nullptr;    // (G*H), nullptr: the product is not normalized
  const T* hh_bias = nullptr;
  const T* cell_gain = nullptr;  // (H), nullptr: the cell is not normalized
  const T* cell_bias = nullptr;
  T* normed = nullptr;           // (B, width) per step, advancing by normed_stride
  int64_t width = 0, normed_stride = 0;
  T* rstd = nullptr;             // (B, 2) per step, advancing by rstd_stride
  int64_t rstd_stride = 0;

  bool any() const { return hh_gain != nullptr || cell_gain != nullptr; }
  T* normed_row(int64_t t, int64_t b) const { return normed + t * normed_stride + b * width; }
  T* rstd_row(int64_t t, int64_t b) const { return rstd + t * rstd_stride + b * 2; }
};

// Which rows run at each step, and where a step's previous state lives: the initial state
// at a sequence's first step, else the output (or saved cell) of the neighbouring time step;
// with per-step resets, which rows start a step from another state instead (Call.resets);
// with a mask, which steps are skipped as steps past a length are (Call.mask).
struct Steps {
  int64_t T;
  bool reverse;
  const int64_t* lengths;          // nullptr: every sequence is T long
  const int8_t* resets = nullptr;  // (T, B) reset codes, or nullptr: no resets
  int64_t B = 0;                   // rows per step of `resets` and `mask`
  const bool* mask = nullptr;      // (T, B), false where a step is skipped; nullptr: none
  // With a mask, (T, B): the time of row b's last active step before t (in the direction of
  // the loop), or -1 when there is none and the step starts from the initial state.
  const int64_t* start_times = nullptr;
  bool carry_output = false;       // a skipped step outputs the carried h instead of zero

  bool active(int64_t t, int64_t b) const {
    return (lengths == nullptr || t < lengths[b]) && (mask == nullptr || mask[t * B + b]);
  }
  bool first(int64_t t, int64_t b) const {
    if (!reverse) return t == 0;
    return t == (lengths == nullptr ? T : lengths[b]) - 1;
  }
  int64_t previous(int64_t t) const { return reverse ? t + 1 : t - 1; }
  // The time whose output (and saved cell) holds the state an active step t of row b carries
  // on from, or -1 for the initial state.
  int64_t start_time(int64_t t, int64_t b) const {
    if (start_times != nullptr) return start_times[t * B + b];
    return first(t, b) ? -1 : previous(t);
  }
  // The state row b starts step t from: 0, the carried state; 1, reset_state; 2, the call's
  // initial state. A skipped step (past the row's length, or masked) ignores its code, as it
  // ignores the rest.
  int reset(int64_t t, int64_t b) const {
    if (resets == nullptr || !active(t, b)) return 0;
    const int code = resets[t * B + b];
    return code == 1 || code == 2 ? code : 0;
  }
};

// The states a reset row starts from, indexed by its code: [1] reset_state, [2] the call's
// initial state (h0, c0 as given: the loops overwrite their own copies). h rows are Hout
// long, c rows H.
template <typename T>
struct ResetStates {
  const T* h[3] = {nullptr, nullptr, nullptr};
  const T* c[3] = {nullptr, nullptr, nullptr};
};

inline Tensor optional_or_empty(const std::optional<Tensor>& t) {
  return t.has_value() ? t->contiguous() : Tensor();
}

// A call's resets as the kernels read them: the codes (T, B) int8 and reset_state, contiguous;
// all undefined without resets.
struct Resets {
  Tensor codes, h, c;

  void attach(Steps& steps) const {
    if (!codes.defined()) return;
    steps.resets = codes.data_ptr<int8_t>();
    steps.B = codes.size(1);
  }
  // Code 1 starts from reset_state, code 2 from the call's initial state h0 (and c0).
  template <typename T>
  ResetStates<T> states(const Tensor& h0, const Tensor& c0) const {
    ResetStates<T> states;
    if (!codes.defined()) return states;
    states.h[1] = h.data_ptr<T>(), states.h[2] = h0.data_ptr<T>();
    if (c.defined()) states.c[1] = c.data_ptr<T>(), states.c[2] = c0.data_ptr<T>();
    return states;
  }
};

// A call's mask as the kernels read it: (T, B) bool, and the start times of its rows (see
// Steps::start_times); both undefined without a mask.
struct Masks {
  Tensor mask, start_times;
  bool carry_output = false;

  void attach(Steps& steps) const {
    steps.carry_output = carry_output;
    if (!mask.defined()) return;
    steps.mask = mask.data_ptr<bool>();
    steps.B = mask.size(1);
    steps.start_times = start_times.data_ptr<int64_t>();
  }
};

Masks checked_masks(const std::optional<Tensor>& mask, bool carry_output, const Steps& steps,
                    int64_t B);

// A call's recurrent dropout and zoneout as the kernels read them: contiguous, each
// undefined when not given.
struct Regularizers {
  Tensor dropout, zone_h, zone_c;
  double zoneout = 0;

  template <typename T>
  Regularization<T> view() const {
    Regularization<T> reg;
    reg.dropout = dropout.defined() ? dropout.data_ptr<T>() : nullptr;
    reg.zone_h = zone_h.defined() ? zone_h.data_ptr<T>() : nullptr;
    reg.zone_c = zone_c.defined() ? zone_c.data_ptr<T>() : nullptr;
    reg.zoneout = static_cast<T>(zoneout);
    return reg;
  }
};

inline Regularizers checked_regularizers(const std::optional<Tensor>& dropout,
                                         const std::optional<Tensor>& zone_h,
                                         const std::optional<Tensor>& zone_c, double zoneout,
                                         const Shape& s, at::ScalarType dtype) {
  auto checked = [&](const std::optional<Tensor>& t, at::IntArrayRef shape, const char* what) {
    if (!t.has_value()) return Tensor();
    TORCH_CHECK(t->sizes() == shape && t->scalar_type() == dtype, "rnnkit: ", what,
                " must have shape ", shape, " and the inputs' dtype");
    return t->contiguous();
  };
  Regularizers regs;
  regs.dropout = checked(dropout, {s.B, s.Hout}, "hidden_dropout");
  regs.zone_h = checked(zone_h, {s.T, s.B, s.Hout}, "zoneout_h");
  regs.zone_c = checked(zone_c, {s.T, s.B, s.H}, "zoneout_c");
  regs.zoneout = zoneout;
  return regs;
}

// A call's layer-norm gains and biases as the kernels read them: contiguous, undefined when
// not given. Only LSTM and the reset-after GRU have them.
struct Norms {
  Tensor hh_gain, hh_bias, cell_gain, cell_bias;

  bool any() const { return hh_gain.defined() || cell_gain.defined(); }
  // The width of a saved row of normalized values: the product's G*H, then the cell's H.
  int64_t width(const Shape& s) const {
    return (hh_gain.defined() ? s.G * s.H : 0) + (cell_gain.defined() ? s.H : 0);
  }
  template <typename T>
  LayerNorms<T> view(const Shape& s) const {
    auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    LayerNorms<T> norms;
    norms.hh_gain = ptr(hh_gain), norms.hh_bias = ptr(hh_bias);
    norms.cell_gain = ptr(cell_gain), norms.cell_bias = ptr(cell_bias);
    norms.width = width(s);
    return norms;
  }
};

inline Norms checked_norms(const std::optional<Tensor>& hh_gain,
                           const std::optional<Tensor>& hh_bias,
                           const std::optional<Tensor>& cell_gain,
                           const std::optional<Tensor>& cell_bias, const Shape& s,
                           int64_t mode, bool reset_after, at::ScalarType dtype) {
  auto checked = [&](const std::optional<Tensor>& t, int64_t size, const char* what) {
    if (!t.has_value()) return Tensor();
    TORCH_CHECK(t->dim() == 1 && t->size(0) == size && t->scalar_type() == dtype, "rnnkit: ",
                what, " must have shape (", size, ") and the inputs' dtype");
    return t->contiguous();
  };
  Norms norms{checked(hh_gain, s.G * s.H, "norm_hh's gain"),
              checked(hh_bias, s.G * s.H, "norm_hh's bias"),
              checked(cell_gain, s.H, "norm_cell's gain"),
              checked(cell_bias, s.H, "norm_cell's bias")};
  TORCH_CHECK(norms.hh_gain.defined() == norms.hh_bias.defined() &&
                  norms.cell_gain.defined() == norms.cell_bias.defined(),
              "rnnkit: a layer norm takes its gain and bias together");
  TORCH_CHECK(!norms.hh_gain.defined() || mode == kLSTM || (mode == kGRU && reset_after),
              "rnnkit: norm_hh is defined for LSTM and the reset-after GRU only");
  TORCH_CHECK(!norms.cell_gain.defined() || mode == kLSTM,
              "rnnkit: norm_cell is defined for LSTM only");
  return norms;
}

inline Resets checked_resets(const std::optional<Tensor>& codes,
                             const std::optional<Tensor>& reset_h,
                             const std::optional<Tensor>& reset_c, int64_t T, int64_t B,
                             int64_t H, int64_t Hout, bool lstm) {
  if (!codes.has_value()) return {};
  TORCH_CHECK(codes->scalar_type() == at::kChar && codes->dim() == 2 && codes->size(0) == T &&
                  codes->size(1) == B,
              "rnnkit: resets must be (T, B) int8");
  TORCH_CHECK(reset_h.has_value() && reset_h->dim() == 2 && reset_h->size(0) == B &&
                  reset_h->size(1) == Hout,
              "rnnkit: resets need reset_h (B, Hout)");
  TORCH_CHECK(!lstm || (reset_c.has_value() && reset_c->dim() == 2 && reset_c->size(0) == B &&
                        reset_c->size(1) == H),
              "rnnkit: LSTM resets need reset_c (B, H)");
  return {codes->contiguous(), reset_h->contiguous(), lstm ? reset_c->contiguous() : Tensor()};
}

// The ops' CPU kernels, registered in register.cpp; argument order and results as the
// schemas in _ops.py.

// forward.cpp
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
    double zoneout, bool training);

// backward.cpp
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
    const std::optional<Tensor>& norm_cell_bias, const Tensor& output_in, const Tensor& gates_in, const Tensor& cells_in,
    const Tensor& projected_in, const Tensor& normed_in, const Tensor& norm_rstd_in,
    int64_t mode, int64_t activation,
    bool reset_after, bool reverse, bool carry_output, int64_t gate_activation,
    double zoneout, bool has_bias);

// linear.cpp
Tensor linear_forward(const Tensor& input, const Tensor& weight_in,
                      const std::optional<Tensor>& bias_in);
std::tuple<Tensor, Tensor, Tensor> linear_backward(const Tensor& grad_in, const Tensor& input,
                                                   const Tensor& weight_in, bool input_grad,
                                                   bool weight_grad, bool has_bias);

// lstm_inference.cpp
std::tuple<Tensor, Tensor, Tensor> lstm_layer_forward(
    const Tensor& input, const Tensor& weight_ih_in, const std::optional<Tensor>& bias_ih_in,
    const Tensor& h0, const Tensor& c0, const Tensor& weight_hh_in,
    const std::optional<Tensor>& bias_hh_in, const std::optional<Tensor>& weight_hr_in,
    const std::optional<Tensor>& lengths_in, bool reverse);

}  // namespace rnnkit_cpu
