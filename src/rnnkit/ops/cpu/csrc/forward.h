// The forward time loop, shared by cpu_recurrence_forward (forward.cpp) and the chunked LSTM
// inference (lstm_inference.cpp): its arguments, grouped, and its declaration.
#pragma once

#include "gemm.h"
#include "recurrence.h"
#include "vec_math.h"

#include <cstdint>

namespace rnnkit_cpu {

// The weights the steps read, packed once per call.
template <typename T>
struct ForwardWeights {
  Packed<T> rec;                   // W_hh^T (Hout x G*H), for the general steps
  Packed<T> rec_n;                 // its W_hn columns (GRU with the reset before)
  const T* bias = nullptr;         // b_hh (zeros without one)
  Packed<T> proj;                  // W_hr^T (H x Hout), for the LSTM projection
  bool project = false;            // LSTM with a projection
  const T* fused_packed = nullptr; // W_hh gate-interleaved (pack_gates): the fused steps run
};

// The buffers the steps read and write. The saved per-step buffers (gates, cells, projected)
// advance by their stride per time step; a stride of zero reuses one step's rows, and for
// gates marks inference: the fused steps then keep nothing per step.
template <typename T>
struct ForwardBuffers {
  const T* gates_x = nullptr;  // (T, B, G*H), holding the times from gx_t0 on
  int64_t gx_t0 = 0;           // (the chunked inference path computes it a few steps at a time)
  T* h = nullptr;              // state (B, Hout), updated in place
  T* c = nullptr;              // cell state (B, H), LSTM only
  T* output = nullptr;         // (T, B, Hout)
  T* gates = nullptr;          // saved gates, 4H per row (RNN: the derivative, H, if kept)
  int64_t gates_stride = 0;
  T* cells = nullptr;          // saved cell states, H per row (LSTM)
  int64_t cells_stride = 0;
  T* projected = nullptr;      // saved o * tanh(c), H per row (projected LSTM)
  int64_t projected_stride = 0;
  T* hh = nullptr;             // one step's product with W_hh, (B, G*H)
  T* proj_out = nullptr;       // one step's product with W_hr, (B, Hout)
  T* h_spare = nullptr;        // the fused loop's second state buffer, (B, Hout)
  ResetStates<T> resets;       // where reset rows start from (with Steps::resets)
  Regularization<T> reg;       // recurrent dropout and zoneout
  T* h_in = nullptr;           // one step's dropped state, (B, Hout), with reg.dropout
  LayerNorms<T> norms;         // layer norm (general steps only), and what it saves per step
  T* cell_fresh = nullptr;     // one step's new cells before their norm, (B, H), with norm_cell
};

// Steps [step0, step1) of the loop (all by default). forward.cpp, for float and double.
template <typename T>
void forward_kernel(const Shape& s, const Steps& steps, const Cell& cell,
                    const ForwardWeights<T>& w, const ForwardBuffers<T>& io,
                    int64_t step0 = 0, int64_t step1 = -1);

}  // namespace rnnkit_cpu
