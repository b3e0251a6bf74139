"""ONNX Script functions: recurrences that ONNX's own RNN/GRU/LSTM ops cannot express.

Each is a ``Scan`` over time. ``gates_x`` is ``(T, B, G*H)``, the input projection of every
step; ``mask`` is ``(T, B, 1)`` bool, false past a sequence's end, where the step keeps its
state and outputs zero. The weights are used transposed (``recurrent_t = W_hh^T``). Inputs
may be any float type; the ``FLOAT`` return annotations only tell the exporter how many
outputs there are.

ONNX Script compiles these from their source, and a Scan body cannot call another function,
so each RNN nonlinearity has its own copy of the body. (This module does not use
``from __future__ import annotations``: ONNX Script reads the annotations as types.)
"""

from onnxscript import FLOAT, graph, script
from onnxscript import opset18 as op


@script()
def lstm_projection_scan(
    gates_x, recurrent_t, bias_hh, projection_t, h0,
    c0, mask,
) -> tuple[FLOAT, FLOAT, FLOAT]:
    """LSTM with projection, ``h' = W_hr (o * tanh(c'))``; returns ``(Y, h_n, c_n)``."""

    @graph()
    def step(h, c, gates_t, mask_t):
        gates = op.Add(gates_t, op.Add(op.MatMul(h, recurrent_t), bias_hh))
        in_gate, forget_gate, cell_gate, out_gate = op.Split(gates, axis=-1, num_outputs=4)
        cell = op.Add(op.Mul(op.Sigmoid(forget_gate), c),
                      op.Mul(op.Sigmoid(in_gate), op.Tanh(cell_gate)))
        hidden = op.MatMul(op.Mul(op.Sigmoid(out_gate), op.Tanh(cell)), projection_t)
        h_out = op.Where(mask_t, hidden, h)
        c_out = op.Where(mask_t, cell, c)
        y_t = op.Mul(hidden, op.CastLike(mask_t, hidden))
        return h_out, c_out, y_t

    h_n, c_n, y = op.Scan(h0, c0, gates_x, mask, body=step, num_scan_inputs=2)
    return y, h_n, c_n


@script()
def rnn_identity_scan(gates_x, recurrent_t, bias_hh, h0, mask) -> tuple[FLOAT, FLOAT]:
    """Elman RNN, ``h' = pre``; returns ``(Y, h_n)``."""

    @graph()
    def step(h, gates_t, mask_t):
        hidden = op.Add(gates_t, op.Add(op.MatMul(h, recurrent_t), bias_hh))
        return op.Where(mask_t, hidden, h), op.Mul(hidden, op.CastLike(mask_t, hidden))

    h_n, y = op.Scan(h0, gates_x, mask, body=step, num_scan_inputs=2)
    return y, h_n


@script()
def rnn_softsign_scan(gates_x, recurrent_t, bias_hh, h0, mask) -> tuple[FLOAT, FLOAT]:
    """Elman RNN, ``h' = pre / (1 + |pre|)``; returns ``(Y, h_n)``."""

    @graph()
    def step(h, gates_t, mask_t):
        hidden = op.Softsign(op.Add(gates_t, op.Add(op.MatMul(h, recurrent_t), bias_hh)))
        return op.Where(mask_t, hidden, h), op.Mul(hidden, op.CastLike(mask_t, hidden))

    h_n, y = op.Scan(h0, gates_x, mask, body=step, num_scan_inputs=2)
    return y, h_n


@script()
def rnn_silu_scan(gates_x, recurrent_t, bias_hh, h0, mask) -> tuple[FLOAT, FLOAT]:
    """Elman RNN, ``h' = pre * sigmoid(pre)``; returns ``(Y, h_n)``."""

    @graph()
    def step(h, gates_t, mask_t):
        pre = op.Add(gates_t, op.Add(op.MatMul(h, recurrent_t), bias_hh))
        hidden = op.Mul(pre, op.Sigmoid(pre))
        return op.Where(mask_t, hidden, h), op.Mul(hidden, op.CastLike(mask_t, hidden))

    h_n, y = op.Scan(h0, gates_x, mask, body=step, num_scan_inputs=2)
    return y, h_n


@script()
def rnn_hardtanh_scan(gates_x, recurrent_t, bias_hh, h0, mask) -> tuple[FLOAT, FLOAT]:
    """Elman RNN, ``h' = clip(pre, -1, 1)``; returns ``(Y, h_n)``."""

    @graph()
    def step(h, gates_t, mask_t):
        pre = op.Add(gates_t, op.Add(op.MatMul(h, recurrent_t), bias_hh))
        hidden = op.Clip(pre, op.CastLike(-1.0, pre), op.CastLike(1.0, pre))
        return op.Where(mask_t, hidden, h), op.Mul(hidden, op.CastLike(mask_t, hidden))

    h_n, y = op.Scan(h0, gates_x, mask, body=step, num_scan_inputs=2)
    return y, h_n


@script()
def rnn_gelu_scan(gates_x, recurrent_t, bias_hh, h0, mask) -> tuple[FLOAT, FLOAT]:
    """Elman RNN with torch's exact GELU, ``h' = pre/2 * (1 + erf(pre / sqrt 2))``."""

    @graph()
    def step(h, gates_t, mask_t):
        pre = op.Add(gates_t, op.Add(op.MatMul(h, recurrent_t), bias_hh))
        erf = op.Erf(op.Mul(pre, op.CastLike(0.7071067811865476, pre)))
        hidden = op.Mul(op.Mul(pre, op.CastLike(0.5, pre)), op.Add(erf, op.CastLike(1.0, pre)))
        return op.Where(mask_t, hidden, h), op.Mul(hidden, op.CastLike(mask_t, hidden))

    h_n, y = op.Scan(h0, gates_x, mask, body=step, num_scan_inputs=2)
    return y, h_n


RNN_SCANS = {
    "identity": rnn_identity_scan,
    "softsign": rnn_softsign_scan,
    "silu": rnn_silu_scan,
    "hardtanh": rnn_hardtanh_scan,
    "gelu": rnn_gelu_scan,
}
