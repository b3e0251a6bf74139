// rnnkit_export::recurrence: one layer-direction of a program made with torch.export, defined
// here with its schema so that a program compiled ahead of time (AOTInductor) runs from C++
// with only this library loaded, no Python. It is inference: the forward kernels, nothing
// saved for a backward. rnnkit/ops/export/op.py adds the fake (shape) rule and the other
// devices' path; its docstring has the meaning of every argument.
#include "recurrence.h"

#include <ATen/ATen.h>
#include <torch/library.h>

namespace rnnkit_cpu {
namespace {

int64_t mode_code(c10::string_view mode) {
  if (mode == "rnn") return kRNN;
  if (mode == "gru") return kGRU;
  TORCH_CHECK(mode == "lstm", "rnnkit_export::recurrence: mode must be rnn, gru or lstm, got ",
              std::string(mode));
  return kLSTM;
}

std::tuple<Tensor, Tensor, Tensor> export_recurrence(
    const Tensor& input, const Tensor& weight_ih, const std::optional<Tensor>& bias_ih,
    const Tensor& weight_hh, const std::optional<Tensor>& bias_hh,
    const std::optional<Tensor>& weight_hr, const Tensor& h0, const std::optional<Tensor>& c0,
    const std::optional<Tensor>& lengths, c10::string_view mode, int64_t activation,
    bool reset_after, bool reverse) {
  const int64_t code = mode_code(mode);
  if (code == kLSTM) {
    TORCH_CHECK(c0.has_value(), "rnnkit_export::recurrence: an LSTM needs c0");
    return lstm_layer_forward(input, weight_ih, bias_ih, h0, *c0, weight_hh, bias_hh,
                              weight_hr, lengths, reverse);
  }
  const Tensor gates_x = at::linear(input, weight_ih, bias_ih);
  auto [output, h, c, gates, cells, projected, normed, norm_rstd] = recurrence_forward(
      gates_x, h0, std::nullopt, weight_hh, bias_hh, std::nullopt, lengths, std::nullopt,
      std::nullopt, std::nullopt, /*mask=*/std::nullopt, /*hidden_dropout=*/std::nullopt,
      /*zoneout_h=*/std::nullopt, /*zoneout_c=*/std::nullopt, /*norm_hh_gain=*/std::nullopt,
      /*norm_hh_bias=*/std::nullopt, /*norm_cell_gain=*/std::nullopt,
      /*norm_cell_bias=*/std::nullopt, code, activation, reset_after,
      reverse, /*carry_output=*/false, /*gate_activation=*/kSigmoid, /*zoneout=*/0.0,
      /*training=*/false);
  return {output, h, h.clone()};
}

}  // namespace
}  // namespace rnnkit_cpu

TORCH_LIBRARY_FRAGMENT(rnnkit_export, m) {
  m.def(
      "recurrence(Tensor input, Tensor weight_ih, Tensor? bias_ih, Tensor weight_hh, "
      "Tensor? bias_hh, Tensor? weight_hr, Tensor h0, Tensor? c0, Tensor? lengths, str mode, "
      "int activation, bool reset_after, bool reverse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rnnkit_export, CPU, m) {
  m.impl("recurrence", &rnnkit_cpu::export_recurrence);
}
