"""ONNX export of rnnkit layers with dynamic batch and time axes.

Plain `torch.onnx.export(model, args, dynamo=True, dynamic_shapes=...)` exports models holding
rnnkit layers: while it traces, each layer-direction becomes ONNX's own `RNN`/`GRU`/`LSTM`
operator where ONNX has one, and a `Scan` over time otherwise (see
`rnnkit.ops.export.onnx_lowering`). [`export_onnx`][rnnkit.export.export_onnx] is that call.

A program made with `torch.export.export` instead holds one op per native layer-direction,
`rnnkit_export::recurrence` (see `rnnkit.ops.export.op`); pass
[`onnx_translation_table`][rnnkit.export.onnx_translation_table] as `custom_translation_table` to
`torch.onnx.export` of that program, and each op becomes the ONNX operator. `lengths` becomes the
operators' `sequence_lens`; gates are reordered from torch's layout (`i f g o`, `r z n`) to ONNX's
(`i o f c`, `z r h`) inside the graph.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnx
import torch
from onnxscript import opset18 as op

from rnnkit.ops.activations import TABLE
from rnnkit.ops.export import op as export_op

_NATIVE_RNN_ACTIVATIONS = {row.name: row.onnx for row in TABLE if row.onnx is not None}
_TORCH_TO_ONNX_GATES = {"lstm": [0, 3, 1, 2], "gru": [1, 0, 2], "rnn": [0]}


def onnx_translation_table() -> dict[Any, Callable]:
    """The `custom_translation_table` that lets `torch.onnx.export` handle rnnkit layers."""
    return {export_op.recurrence_op(): _recurrence_to_onnx}


def export_onnx(
    model: torch.nn.Module,
    args: tuple,
    f: str | None = None,
    *,
    kwargs: dict | None = None,
    dynamic_shapes: Any = None,
    **options: Any,
) -> torch.onnx.ONNXProgram:
    """`torch.onnx.export(model, args, f, dynamo=True, ...)`, rnnkit's translations included.

    Args:
        model: the module to export.
        args: example positional inputs, as for `torch.onnx.export`.
        f: where to save the model, or `None` to only return the program.
        kwargs: example keyword inputs.
        dynamic_shapes: as for `torch.onnx.export`; mark the batch and time dimensions of
            the input with `torch.export.Dim` to keep them dynamic.
        options: further keyword arguments for `torch.onnx.export`.

    Returns:
        The `ONNXProgram`.

    Raises:
        TypeError: a layer uses a callable nonlinearity, which ONNX cannot express.
    """
    table = {**onnx_translation_table(), **options.pop("custom_translation_table", {})}
    return torch.onnx.export(
        model, args, f, kwargs=kwargs, dynamic_shapes=dynamic_shapes, dynamo=True,
        custom_translation_table=table, **options,
    )


def _reorder_gates(tensor, mode: str, hidden_size: int):
    """Rows `[i f g o]`/`[r z n]` (torch) to `[i o f c]`/`[z r h]` (ONNX).

    A Gather with constant indices, which the exporter folds into the weights.
    """
    order = _TORCH_TO_ONNX_GATES[mode]
    if len(order) == 1:
        return tensor
    rows = [gate * hidden_size + k for gate in order for k in range(hidden_size)]
    return op.Gather(tensor, op.Constant(value_ints=rows), axis=0)


def _recurrence_to_onnx(
    input, weight_ih, bias_ih, weight_hh, bias_hh, weight_hr, h0, c0, lengths,
    mode: str, activation: int, reset_after: bool, reverse: bool,
):
    """Translate one `rnnkit_export::recurrence` call; returns `(Y, Y_h, Y_c)`.

    Raises:
        ValueError: ONNX has no operator for the layer-direction (an LSTM projection, an RNN
            activation ONNX does not name); `torch.onnx.export` of the module itself
            records those as a `Scan`.
    """
    nonlinearity = TABLE[activation].name
    if weight_hr is not None or (mode == "rnn" and nonlinearity not in _NATIVE_RNN_ACTIVATIONS):
        what = "an LSTM with proj_size" if weight_hr is not None else f"RNN {nonlinearity!r}"
        raise ValueError(
            f"ONNX has no operator for {what}; export the module with torch.onnx.export "
            "(or rnnkit.export.export_onnx) rather than a torch.export program, and it "
            "becomes an ONNX Scan"
        )
    return _native(input, weight_ih, bias_ih, weight_hh, bias_hh, h0, c0, lengths, mode,
                   nonlinearity, reset_after, reverse)


def _native(input, weight_ih, bias_ih, weight_hh, bias_hh, h0, c0, lengths, mode,
            nonlinearity, reset_after, reverse):
    """ONNX's own RNN/GRU/LSTM op for one direction."""
    hidden_size = weight_hh.shape[1]
    axis0 = op.Constant(value_ints=[0])
    w = op.Unsqueeze(_reorder_gates(weight_ih, mode, hidden_size), axis0)
    r = op.Unsqueeze(_reorder_gates(weight_hh, mode, hidden_size), axis0)
    b = None
    if bias_ih is not None:
        b = op.Unsqueeze(
            op.Concat(_reorder_gates(bias_ih, mode, hidden_size),
                      _reorder_gates(bias_hh, mode, hidden_size), axis=0),
            axis0,
        )
    seq_lens = None if lengths is None else op.Cast(lengths, to=onnx.TensorProto.INT32)
    attrs = {"hidden_size": int(hidden_size), "direction": "reverse" if reverse else "forward"}
    initial_h = op.Unsqueeze(h0, axis0)
    if mode == "lstm":
        y, y_h, y_c = op.LSTM(input, w, r, b, seq_lens, initial_h, op.Unsqueeze(c0, axis0),
                              **attrs)
    elif mode == "gru":
        y, y_h = op.GRU(input, w, r, b, seq_lens, initial_h,
                        linear_before_reset=int(reset_after), **attrs)
        y_c = y_h
    else:
        y, y_h = op.RNN(input, w, r, b, seq_lens, initial_h,
                        activations=[_NATIVE_RNN_ACTIVATIONS[nonlinearity]], **attrs)
        y_c = y_h
    # Y is (T, num_directions=1, B, H); the states are (1, B, H).
    axis1 = op.Constant(value_ints=[1])
    return op.Squeeze(y, axis1), op.Squeeze(y_h, axis0), op.Squeeze(y_c, axis0)
