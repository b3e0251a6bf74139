"""Layer-directions while exporting: ONNX-exportable operations, or one ``torch.library`` op.

``torch.export`` would trace a Python loop over time into ``T`` copies of the step, which fixes
the sequence length. While exporting, the plan (:func:`rnnkit.ops.dispatch.plan`) sends every
layer-direction to :data:`BACKEND` instead:

- under ``torch.onnx.export``, :mod:`.onnx_lowering` records ONNX's own ``RNN``/``GRU``/``LSTM``
  operator or a ``scan`` over time, so plain ``torch.onnx.export(..., dynamo=True)`` needs no
  extra argument;
- under ``torch.export``, a layer-direction that ONNX has as an operator is recorded as one
  opaque op, ``rnnkit_export::recurrence``, with symbolic shapes (``rnnkit.export``'s
  translation table turns it into that operator); anything else is the same ``scan``.

Run eagerly, the op computes ``W_ih x + b_ih`` and calls :func:`rnnkit.ops.reference.recurrence`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.ops import reference
from rnnkit.ops.activations import activation_name
from rnnkit.ops.backend import BackendBase
from rnnkit.ops.export import onnx_lowering
from rnnkit.ops.spec import Call, CellSpec, State


@torch.library.custom_op("rnnkit_export::recurrence", mutates_args=())
def recurrence_op(
    input: Tensor,
    weight_ih: Tensor,
    bias_ih: Tensor | None,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor | None,
    lengths: Tensor | None,
    mode: str,
    nonlinearity: str,
    reset_after: bool,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(output (T, B, H_out), h_n (B, H_out), c_n (B, H))``; ``c_n`` is a copy of ``h_n``
    for RNN and GRU, which have no cell state."""
    spec = CellSpec(mode, nonlinearity=nonlinearity, reset_after=reset_after)
    gates_x = F.linear(input, weight_ih, bias_ih)
    state = (h0,) if c0 is None else (h0, c0)
    output, final = reference.recurrence(
        spec, gates_x, state, weight_hh, bias_hh, weight_hr, lengths, reverse
    )
    cell = final[1] if len(final) == 2 else final[0].clone()
    return output, final[0], cell


@recurrence_op.register_fake
def _(input, weight_ih, bias_ih, weight_hh, bias_hh, weight_hr, h0, c0, lengths, mode,
      nonlinearity, reset_after, reverse):
    steps, batch = input.shape[0], input.shape[1]
    cell = h0 if c0 is None else c0
    return (
        input.new_empty(steps, batch, h0.shape[-1]),
        h0.new_empty(h0.shape),
        cell.new_empty(cell.shape),
    )


class ExportBackend(BackendBase):
    """Records a layer-direction as ``rnnkit_export::recurrence``; used only while exporting.

    The plan picks it itself (it is not registered): it serves calls with ``input`` and a
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
        if torch.onnx.is_in_onnx_export() or not onnx_lowering.native(call):
            # The op below stands for ONNX's own RNN/GRU/LSTM operators; everything else
            # (resets, the projection, other activations) is a scan over time.
            return onnx_lowering.lower(call)
        state = call.state
        output, hidden, cell = recurrence_op(
            call.input, call.weight_ih, call.bias_ih, call.weight_hh, call.bias_hh,
            call.weight_hr, state[0], state[1] if len(state) == 2 else None, call.lengths,
            spec.mode, spec.nonlinearity, spec.reset_after, call.reverse,
        )
        return output, ((hidden, cell) if spec.mode == "lstm" else (hidden,))


BACKEND = ExportBackend()
