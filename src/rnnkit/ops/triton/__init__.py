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

Serves: named RNN activations, both GRU formulations, LSTM with or without projection,
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
        if spec.mode == "rnn":
            if not isinstance(spec.nonlinearity, str):
                return "the nonlinearity is a callable; triton kernels serve the named activations"
            served = _autograd.kernels().ACTIVATION_CODES
            if spec.nonlinearity not in served:
                return (f"activation {spec.nonlinearity!r} has no triton kernel "
                        f"(served: {sorted(served)})")
        if call.regularized:
            return ("recurrent dropout, zoneout, layer norm and other gate activations are not "
                    "in the triton kernels yet")
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
            call.carry_masked_output,
        )


BACKEND = TritonBackend()
