"""Layer-directions while exporting: ONNX-exportable operations, or one `torch.library` op.

`torch.export` would trace a Python loop over time into `T` copies of the step, which fixes
the sequence length. While exporting, the plan ([`rnnkit.ops.dispatch.plan`][]) sends every
layer-direction to `BACKEND` instead:

- under `torch.onnx.export`, `onnx_lowering` records ONNX's own `RNN`/`GRU`/`LSTM`
  operator or a `scan` over time, so plain `torch.onnx.export(..., dynamo=True)` needs no
  extra argument;
- under `torch.export`, a layer-direction is recorded as one opaque op,
  `rnnkit_export::recurrence`, with symbolic shapes. The compiled CPU library defines it
  with a C++ kernel, so AOTInductor can compile the program and its C++ runtime runs it with
  that library loaded (docs/deploy.md); `rnnkit.export`'s translation table turns it into
  ONNX's operator. Resets, masks and regularization, which its arguments do not carry, are
  the same `scan`.

Run eagerly, the op runs the compiled CPU kernels, or elsewhere computes `W_ih x + b_ih` and
calls [`rnnkit.ops.reference.recurrence`][].
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.ops import reference
from rnnkit.ops.activations import CODES, TABLE, activation_name
from rnnkit.ops.backend import BackendBase
from rnnkit.ops.cpu import _build
from rnnkit.ops.export import onnx_lowering
from rnnkit.ops.spec import Call, CellSpec, State

# The schema is the C++ library's (csrc/export_op.cpp), which defines the op when it loads;
# without the library, Python defines the same one.
SCHEMA = (
    "recurrence(Tensor input, Tensor weight_ih, Tensor? bias_ih, Tensor weight_hh, "
    "Tensor? bias_hh, Tensor? weight_hr, Tensor h0, Tensor? c0, Tensor? lengths, str mode, "
    "int activation, bool reset_after, bool reverse) -> (Tensor, Tensor, Tensor)"
)
_lock = threading.Lock()
_libraries: list[torch.library.Library] = []


def recurrence_op() -> torch._ops.OpOverload:
    """`rnnkit_export::recurrence`: one layer-direction, `(output (T, B, H_out), h_n (B, H_out),
    c_n (B, H))`; `c_n` is a copy of `h_n` for RNN and GRU, which have no cell state.
    `activation` is the row of the activation table (`rnnkit.ops.activations.CODES`).

    On first use it loads the compiled CPU kernels, whose library defines the op with a C++
    CPU kernel (so an AOTInductor program runs it without Python); the reference path serves
    other devices, and CPU too when the library is unavailable.
    """
    with _lock:
        if not _libraries:
            _declare()
    return torch.ops.rnnkit_export.recurrence.default


def _declare() -> None:
    library = torch.library.Library("rnnkit_export", "FRAGMENT")
    if _build.status() is not None or not hasattr(torch.ops.rnnkit_export, "recurrence"):
        library.define(SCHEMA)
    library.impl("recurrence", _reference_recurrence, "CompositeExplicitAutograd")
    torch.library.register_fake("rnnkit_export::recurrence", _fake, lib=library)
    _libraries.append(library)


def _reference_recurrence(input, weight_ih, bias_ih, weight_hh, bias_hh, weight_hr, h0, c0,
                          lengths, mode, activation, reset_after, reverse):
    spec = CellSpec(mode, nonlinearity=TABLE[activation].name, reset_after=reset_after)
    gates_x = F.linear(input, weight_ih, bias_ih)
    state = (h0,) if c0 is None else (h0, c0)
    output, final = reference.recurrence(
        spec, gates_x, state, weight_hh, bias_hh, weight_hr, lengths, reverse
    )
    cell = final[1] if len(final) == 2 else final[0].clone()
    return output, final[0], cell


def _fake(input, weight_ih, bias_ih, weight_hh, bias_hh, weight_hr, h0, c0, lengths, mode,
          activation, reset_after, reverse):
    steps, batch = input.shape[0], input.shape[1]
    cell = h0 if c0 is None else c0
    return (
        input.new_empty(steps, batch, h0.shape[-1]),
        h0.new_empty(h0.shape),
        cell.new_empty(cell.shape),
    )


class ExportBackend(BackendBase):
    """Records a layer-direction as `rnnkit_export::recurrence`; used only while exporting.

    The plan picks it itself (it is not registered): it serves calls with `input` and a
    time axis, the projection included.
    """

    name = "export"
    device_types: tuple[str, ...] = ()

    def unsupported_reason(self, call: Call) -> str | None:
        return None

    def fuses_projection(self, call: Call) -> bool:
        return True

    def run(self, call: Call) -> tuple[Tensor, State]:
        """Record the op; the nonlinearity must be a name (a callable has no ONNX form).

        Raises:
            TypeError: the nonlinearity or gate activation is a callable.
            ValueError: the call carries training masks (recurrent dropout, zoneout).
        """
        spec = call.spec
        for function in (spec.nonlinearity, spec.recurrent_activation):
            if not isinstance(function, str):
                raise TypeError(
                    "cannot export an RNN whose nonlinearity is a callable "
                    f"({activation_name(function)}); use one of the named activations in "
                    "rnnkit.ACTIVATIONS"
                )
        if call.hidden_dropout is not None or call.zoneout_h is not None:
            raise ValueError(
                "cannot export a layer in training mode with recurrent dropout, input dropout "
                "or zoneout: their masks are drawn per call; export the model in eval() "
                "(dropout is then the identity and zoneout its expectation)"
            )
        if torch.onnx.is_in_onnx_export() or not recorded(call):
            # torch.onnx.export gets ONNX's own operators or a scan; so does what the op's
            # arguments cannot say (resets, masks, regularization).
            return onnx_lowering.lower(call)
        state = call.state
        output, hidden, cell = recurrence_op()(
            call.input, call.weight_ih, call.bias_ih, call.weight_hh, call.bias_hh,
            call.weight_hr, state[0], state[1] if len(state) == 2 else None, call.lengths,
            spec.mode, CODES[spec.nonlinearity], spec.reset_after, call.reverse,
        )
        return output, ((hidden, cell) if spec.mode == "lstm" else (hidden,))


def recorded(call: Call) -> bool:
    """Whether `torch.export` records `call` as one `rnnkit_export::recurrence` op."""
    return (
        call.resets is None and call.mask is None and not call.regularized
        and isinstance(call.spec.nonlinearity, str)
    )


BACKEND = ExportBackend()
