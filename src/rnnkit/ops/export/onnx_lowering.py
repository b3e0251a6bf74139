"""A layer-direction as plain-exportable ONNX, used while `torch.onnx.export` traces.

No translation table is needed: where ONNX has the recurrence as an operator (`RNN` with
an activation it names, `GRU`, `LSTM` without projection) the layer-direction is recorded
as that operator with `torch.onnx.ops.symbolic_multi_out`; anything else (other
activations, the LSTM projection, state resets, layer norm, zoneout's evaluation rule, other
GRU/LSTM gate activations) becomes torch's `scan` over time, whose body is the reference step
(`rnnkit.ops.cell_math.step`), and which the exporter turns into ONNX `Scan`. Batch and
time stay dynamic either way. Exports are of evaluation: dropout is the identity, zoneout its
expectation, and a call carrying training masks is refused (see
`rnnkit.ops.export.op.ExportBackend.run`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._higher_order_ops.scan import scan

from rnnkit.ops.activations import ROWS
from rnnkit.ops.cell_math import layer_norm, step, zoned
from rnnkit.ops.reference import apply_resets
from rnnkit.ops.spec import Call, State

# Gate rows: torch's [i f g o] / [r z n] to ONNX's [i o f c] / [z r h].
_ONNX_GATE_ORDER = {"lstm": (0, 3, 1, 2), "gru": (1, 0, 2), "rnn": (0,)}
OPSET = 14  # ONNX RNN/GRU/LSTM as of opset 14 (layout attribute)


def native(call: Call) -> bool:
    """Whether ONNX has this layer-direction as one operator."""
    spec = call.spec
    if call.resets is not None or call.mask is not None or call.regularized:
        return False
    if spec.mode == "rnn":
        return isinstance(spec.nonlinearity, str) and ROWS[spec.nonlinearity].onnx is not None
    return call.weight_hr is None


def lower(call: Call) -> tuple[Tensor, State]:
    """`(output (T, B, H_out), final state)` recorded as ONNX-exportable operations."""
    return _operator(call) if native(call) else _scan(call)


def _reorder(tensor: Tensor, mode: str) -> Tensor:
    gates = _ONNX_GATE_ORDER[mode]
    if len(gates) == 1:
        return tensor
    chunks = tensor.chunk(len(gates))
    return torch.cat([chunks[g] for g in gates])


def _operator(call: Call) -> tuple[Tensor, State]:
    spec, x = call.spec, call.input
    hidden = call.weight_hh.shape[1]
    steps, batch = x.shape[0], x.shape[1]
    weights = [_reorder(call.weight_ih, spec.mode)[None], _reorder(call.weight_hh, spec.mode)[None]]
    if call.bias_ih is not None:
        bias = torch.cat([_reorder(call.bias_ih, spec.mode), _reorder(call.bias_hh, spec.mode)])
        weights.append(bias[None])
    else:
        weights.append(None)
    lengths = None if call.lengths is None else call.lengths.to(torch.int32)
    inputs = [x, *weights, lengths, call.state[0][None]]
    attrs: dict = {"hidden_size": hidden, "direction": "reverse" if call.reverse else "forward"}
    if spec.mode == "lstm":
        name, inputs = "LSTM", [*inputs, call.state[1][None]]
    elif spec.mode == "gru":
        name, attrs["linear_before_reset"] = "GRU", int(spec.reset_after)
    else:
        name, attrs["activations"] = "RNN", [ROWS[spec.nonlinearity].onnx]
    count = 3 if spec.mode == "lstm" else 2
    shapes = [[steps, 1, batch, hidden]] + [[1, batch, hidden]] * (count - 1)
    results = torch.onnx.ops.symbolic_multi_out(
        name, inputs, attrs, dtypes=[x.dtype] * count, shapes=shapes, version=OPSET
    )
    return results[0].squeeze(1), tuple(r.squeeze(0) for r in results[1:])


def _scan(call: Call) -> tuple[Tensor, State]:
    """A scan over time whose body is the reference step, masked by lengths."""
    spec = call.spec
    if not isinstance(spec.nonlinearity, str) or not isinstance(spec.recurrent_activation, str):
        raise TypeError("a callable nonlinearity has no ONNX form")
    if call.norm_ih is None:
        gates_x = F.linear(call.input, call.weight_ih, call.bias_ih)
    else:
        gates_x = layer_norm(F.linear(call.input, call.weight_ih), call.norm_ih)
        if call.bias_ih is not None:
            gates_x = gates_x + call.bias_ih
    steps, batch = gates_x.shape[0], gates_x.shape[1]
    time = torch.arange(steps, device=gates_x.device)[:, None]
    lengths = call.lengths
    active = (time < lengths[None, :]) if lengths is not None else time < steps
    active = active.expand(steps, batch)
    if call.mask is not None:
        active = active & call.mask
    active = active[..., None]
    codes = call.resets if call.resets is not None else gates_x.new_zeros(
        (steps, batch), dtype=torch.int8)
    if call.reverse:  # steps past a length come first, inactive, as in the reference loop
        gates_x, codes, active = gates_x.flip(0), codes.flip(0), active.flip(0)
    # Copies: scan refuses tensors that alias each other (the initial and the reset state are
    # often one and the same tensor).
    initial = tuple(s.clone() for s in call.state)
    reset_state = initial if call.reset_state is None else tuple(
        s.clone() for s in call.reset_state)
    weight_hh, bias_hh, weight_hr = call.weight_hh, call.bias_hh, call.weight_hr
    norms = {"norm_hh": call.norm_hh, "norm_cell": call.norm_cell}

    def body(state, inputs):
        gates, code, mask = inputs
        start = apply_resets(code, state, reset_state, initial)
        new = step(spec, gates, start, weight_hh, bias_hh, weight_hr, **norms)
        new = zoned(spec, start, new, None)  # evaluation: zoneout's expectation
        kept = tuple(torch.where(mask, n, o) for n, o in zip(new, state))
        skipped = kept[0].clone() if call.carry_masked_output else torch.zeros_like(new[0])
        return kept, torch.where(mask, new[0], skipped)

    # The carry starts as a copy: scan refuses a carry that aliases a tensor the body reads.
    final, output = scan(body, tuple(s.clone() for s in initial), (gates_x, codes, active))
    if call.reverse:
        output = output.flip(0)
    return output, tuple(final)
