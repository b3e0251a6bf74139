"""The `"cpu"` backend: compiled C++ time loops, forward and backward, for CPU tensors.

Importing this package declares the `rnnkit::cpu_*` custom ops (`_ops`). Their C++ kernels
(`csrc/`) are compiled at install, once per instruction set, and the first use loads the one
this CPU runs best (`_build`); a source checkout with edited kernels compiles them on demand
(`_jit`). Without kernels the backend reports itself unavailable (one warning, with the
reason) and calls fall back to the reference path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.ops.backend import BackendBase
from rnnkit.ops.cpu import _build, _ops
from rnnkit.ops.spec import Call, State

DTYPES = (torch.float32, torch.float64)


class CpuBackend(BackendBase):
    """Serves named-activation RNN, GRU and LSTM recurrences on float32/float64 CPU tensors,
    with lengths, resets, masks, recurrent dropout, zoneout (GRU, LSTM), layer norm (LSTM and
    the reset-after GRU, on the kernels' general steps) and other GRU/LSTM activations."""

    name = "cpu"
    device_types = ("cpu",)

    def unavailable_reason(self) -> str | None:
        if torch.compiler.is_compiling():
            # No build while tracing; the op's fake rule builds before the graph first runs.
            return _build.cached_status()
        return _build.status()

    def unsupported_reason(self, call: Call) -> str | None:
        spec = call.spec
        if spec.mode == "rnn" and not isinstance(spec.nonlinearity, str):
            return "a callable nonlinearity runs only on the reference path"
        if spec.mode == "rnn" and not _ops.served_activation(spec.nonlinearity):
            return f"no compiled kernel for the nonlinearity {spec.nonlinearity!r}"
        if spec.mode != "rnn":
            for role, name in (("nonlinearity", spec.nonlinearity),
                               ("recurrent_activation", spec.recurrent_activation)):
                if not isinstance(name, str):
                    return f"a callable {role} runs only on the reference path"
                if not _ops.served_activation(name, _ops.CELL_ACTIVATIONS):
                    return (f"no compiled {spec.mode.upper()} kernel for the {role} {name!r} "
                            f"(these are: {', '.join(_ops.CELL_ACTIVATIONS)})")
        if call.norm_hh is not None and spec.mode == "gru" and not spec.reset_after:
            # The reference path raises its ValueError for this call.
            return "layer norm is defined for the GRU with reset_after=True only"
        if spec.mode == "rnn" and (spec.zoneout or call.zoneout_h is not None):
            return "zoneout on an RNN is not in the compiled kernels (GRU and LSTM have it)"
        if call.resets is not None and not _ops.SERVES_RESETS:
            return "state resets are not compiled into these kernels yet"
        dtype = call.leading.dtype
        if dtype not in DTYPES:
            return f"dtype {dtype} is not supported (float32, float64 are)"
        for tensor in call.tensors():
            if tensor.dtype != dtype:
                return f"mixed dtypes ({dtype} and {tensor.dtype})"
            if tensor.device.type != "cpu":
                return f"a tensor is on {tensor.device}, not the CPU"
        return None

    def auto_declines(self, call: Call) -> str | None:
        """`"auto"` runs a single time step of fewer than 32 rows on the reference path.

        One step has no time loop to fuse, while the compiled path packs the weights for that
        single use and adds a custom op's autograd overhead. Measured here, one step with
        gradients: RNN B=16, H=512 took 1.21 ms compiled against 0.47 ms on the reference
        path, GRU 2.03 against 1.56 ms; from 32 rows on the compiled products win (GRU B=64,
        H=256: 0.78 against 1.05 ms). `backend="cpu"` still runs every step compiled, and
        LSTM inference keeps its fused layer path (faster at any size).
        """
        if call.steps == 1 and call.batch < 32 and not self.fuses_projection(call):
            return "a single step of fewer than 32 rows runs faster on the reference path"
        return None

    def fuses_projection(self, call: Call) -> bool:
        """LSTM inference computes `W_ih x + b_ih` a few steps at a time inside its loop.

        Only for LSTM calls with a time axis that need no gradient and carry no resets, mask,
        carried output or regularization (dropout, zoneout, layer norm, other activations);
        anything else runs as `project` then the recurrence.
        """
        return (
            call.spec.mode == "lstm"
            and call.input is not None
            and call.time_axis
            and call.resets is None
            and call.mask is None
            and not call.carry_masked_output
            and not call.regularized
            and call.norm_ih is None
            and not call.needs_grad()
        )

    def project(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return _ops.linear(input, weight, bias)

    def run(self, call: Call) -> tuple[Tensor, State]:
        if call.input is not None:
            return _ops.lstm_layer(
                call.input, call.weight_ih, call.bias_ih, call.state, call.weight_hh,
                call.bias_hh, call.weight_hr, call.lengths, call.reverse,
            )
        return _ops.recurrence(
            call.spec, call.gates_x, call.state, call.weight_hh, call.bias_hh, call.weight_hr,
            call.lengths, call.reverse, call.resets, call.reset_state, call.mask,
            call.carry_masked_output, call.hidden_dropout, call.zoneout_h, call.zoneout_c,
            # As the reference cells: an RNN has no norms, a GRU no cell norm.
            call.norm_hh if call.spec.mode != "rnn" else None,
            call.norm_cell if call.spec.mode == "lstm" else None,
        )


BACKEND = CpuBackend()

__all__ = ["BACKEND", "CpuBackend"]


def library_path() -> str | None:
    """The compiled library this process uses (loading it if needed), or `None` when the
    kernels are unavailable. It defines the `rnnkit::cpu_*` kernels and `rnnkit_export::
    recurrence`; a C++ program running an AOTInductor package loads it (docs/deploy.md)."""
    if _build.status() is not None:
        return None
    return _build.loaded().path


def loaded_how() -> str | None:
    """`"prebuilt"` (installed with the package), `"jit"` (built on demand) or `None`."""
    kernels = _build.loaded()
    return None if kernels is None else kernels.how
