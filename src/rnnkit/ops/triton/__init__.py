"""The `"triton"` backend: fused Triton kernels for the RNN, GRU and LSTM time loop.

Design
------
One layer-direction is a loop over `T` steps. A step is split into *phases*: the parts that
need no other program's result of the same step. The forward of RNN, GRU (`reset_after`) and
LSTM is one phase (recurrent matmul, gates and state update fused per tile); GRU with
`reset_after=False` needs `r` for every hidden unit before `W_hn (r*h)`, and LSTM with a
projection needs all of `o*tanh(c)` before `W_hr`, so they take two. Backward takes two or
three (cell gradients, then `dh_prev = dgates @ W_hh`). Each phase is one `@triton.jit`
function that loops over `(batch block, hidden block)` tiles with
`for tile in range(pid, tiles, nprog)`; accumulation is fp32 in a fixed order.

The same phase code runs under two schedules (`RNNKIT_TRITON_SCHEDULE`):

- `persistent` (default on CUDA): one launch for the whole sequence, at most one program per
  SM, a grid-wide barrier (a monotonic atomic counter, order-independent) between phases. The
  recurrent weights are re-read every step from L2, where they stay resident.
- `step` (default under `TRITON_INTERPRET=1`): one launch per step and phase, one tile per
  program; the launch boundary is the barrier. The interpreter runs programs one after another,
  so it cannot run a spinning barrier; `persistent` under the interpreter runs one program
  that owns every tile, with no barrier.

Backward saves the pre-activations and the state sequence from forward, computes per-step
gate gradients in the kernels into `(T, B, G*H)` buffers, then forms `dW_hh`, `db_hh` and
`dW_hr` as single matmuls over all steps, so there are no atomics. Double backward
(`create_graph=True`) recomputes through the reference path.

State resets (`Call.resets`) are a per-row select wherever a step reads its previous state:
the carried state, `reset_state` (code 1) or the initial state (code 2); the saved state
sequence keeps the carried states, and backward repeats the select. At a reset row, the
gradient of the step's start state goes to `reset_state` or `h0`/`c0` instead of the
carried state, summed over steps in `(2, B, ...)` buffers that each tile's one owner updates.

Matmuls accumulate in fp32. fp32 inputs use IEEE matmuls, or TF32 on CUDA when
`torch.backends.cudnn.allow_tf32` is set (torch's default, under which cuDNN's RNNs use TF32
too).

Recurrent dropout (constexpr `HAS_DROPOUT`) multiplies the start state by
`Call.hidden_dropout` where it enters `W_hh` (and GRU's `W_hn (r * h)`); backward
multiplies `dgates @ W_hh` by it, and `dW_hh` is formed against the dropped states.
Zoneout (`ZONE_H`, `ZONE_C`) mixes each new state with the step's start state after the
cell, by the training masks `Call.zoneout_h`/`zoneout_c` read at step `t` or by the
evaluation expectation `spec.zoneout`; backward splits the state's gradient between the
start state (the kept part) and the cell. GRU's and LSTM's activations (constexpr `ACT`,
`GATE`) are any row of the table with a Triton formula.

Layer norm needs statistics over a whole row, which no tile holds alone, so each norm adds a
phase. `NORM_HH`: one phase stores the raw `W_hh h_in` of every gate, the next
normalizes it (each tile reads its rows' `G*H` values for the mean and variance) before the
cell math. `NORM_CELL` (LSTM): the cell phase stores the new `c`, the next forms
`h = o * act(LN(c) * gain + bias)`. Backward mirrors them: one phase stores the gradient of
`LN(c)`'s output (and of `o`) before the cell phase reduces it over the row, and one
phase takes the gate gradients through `LN(W_hh h_in)` before `dh_prev`. The gains' and
biases' gradients are sums over all steps, formed after the kernels from the saved raw
values.

Serves: named activations (RNN's nonlinearity, GRU's and LSTM's activation and recurrent
activation), recurrent dropout, zoneout, layer norm (`norm_hh` for LSTM and the reset-after
GRU, `norm_cell` for LSTM), both GRU formulations, LSTM with or without projection,
`lengths`, `reverse`, masks with holes (`Call.mask`: a skipped step outputs zeros or,
with `carry_masked_output`, the carried `h`, whose gradient then flows into the carried
state) and per-step state `resets` (selected per row inside the time loop); fp32, fp16, bf16
(bf16 not under the interpreter). CUDA tensors, or CPU tensors when `TRITON_INTERPRET=1`.
Everything else falls back to the reference path
with a reason, through [`rnnkit.ops.dispatch`][].
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.ops.backend import BackendBase
from rnnkit.ops.spec import Call, State

try:
    import triton  # noqa: F401
except ImportError as error:  # triton is an optional dependency
    _IMPORT_ERROR: str | None = f"triton is not installed ({error}); pip install 'rnnkit[triton]'"
    _autograd = None
else:
    _IMPORT_ERROR = None
    from rnnkit.ops.triton import _autograd

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonBackend(BackendBase):
    """Fused Triton kernels; see the module docstring for the design."""

    name = "triton"
    device_types = ("cuda",)

    def unavailable_reason(self) -> str | None:
        if _IMPORT_ERROR is not None:
            return _IMPORT_ERROR
        if not torch.cuda.is_available() and not _autograd.interpreting():
            return "no CUDA device, and TRITON_INTERPRET=1 is not set for the CPU interpreter"
        return None

    def unsupported_reason(self, call: Call) -> str | None:
        spec = call.spec
        served = _autograd.kernels().ACTIVATION_CODES
        activations = {"nonlinearity": spec.nonlinearity}
        if spec.mode != "rnn":
            activations["recurrent_activation"] = spec.recurrent_activation
        for role, activation in activations.items():
            if not isinstance(activation, str):
                return (f"the {role} is a callable; triton kernels serve the named "
                        "activations")
            if activation not in served:
                return (f"activation {activation!r} has no triton kernel "
                        f"(served: {sorted(served)})")
        if call.norm_hh is not None and (spec.mode == "rnn" or not spec.reset_after):
            return ("layer norm of the recurrent product (norm_hh) is served for LSTM and the "
                    "GRU with reset_after=True only")
        if call.norm_cell is not None and spec.mode != "lstm":
            return "layer norm of the cell state (norm_cell) is served for LSTM only"
        tensors = call.tensors()
        dtype = call.leading.dtype
        if dtype not in DTYPES:
            return f"dtype {dtype} is not served (float32, float16, bfloat16 are)"
        mixed = sorted({str(tensor.dtype) for tensor in tensors})
        if len(mixed) > 1:
            return f"tensors have mixed dtypes {mixed}"
        device_type = call.leading.device.type
        if device_type == "cpu":
            if not _autograd.interpreting():
                return "CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter)"
            if dtype == torch.bfloat16:
                return "bfloat16 matmuls are not exact under the Triton interpreter"
        elif device_type != "cuda":
            return f"{device_type} tensors are not served (cuda, or cpu under the interpreter)"
        if any(tensor.device != call.leading.device for tensor in tensors):
            return "tensors are on different devices"
        return None

    def run(self, call: Call) -> tuple[Tensor, State]:
        """[`rnnkit.ops.reference.recurrence`][]'s semantics."""
        return _autograd.recurrence(
            call.spec, call.gates_x, call.state, call.weight_hh, call.bias_hh, call.weight_hr,
            call.lengths, call.reverse, call.resets, call.reset_state, call.mask,
            call.carry_masked_output, hidden_dropout=call.hidden_dropout,
            zoneout_h=call.zoneout_h, zoneout_c=call.zoneout_c, norm_hh=call.norm_hh,
            norm_cell=call.norm_cell,
        )


BACKEND = TritonBackend()
