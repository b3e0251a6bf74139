// The CPU kernels of the rnnkit ops declared in rnnkit/ops/cpu/_ops.py.
#include "recurrence.h"

#include <torch/library.h>

TORCH_LIBRARY_IMPL(rnnkit, CPU, m) {
  m.impl("cpu_recurrence_forward", &rnnkit_cpu::recurrence_forward);
  m.impl("cpu_recurrence_backward", &rnnkit_cpu::recurrence_backward);
  m.impl("cpu_linear", &rnnkit_cpu::linear_forward);
  m.impl("cpu_linear_backward", &rnnkit_cpu::linear_backward);
  m.impl("cpu_lstm_layer_forward", &rnnkit_cpu::lstm_layer_forward);
}
