r"""The cell math: one small function per recurrence, written like its equations.

`gates_x` is the input projection $W_{ih} x_t + b_{ih}$ (computed for all steps at once
by the caller), so each function holds only the part that depends on the previous state. The
reference backend runs these functions, and the tests hold every fused kernel equal to them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.ops.activations import resolve_activation
from rnnkit.ops.spec import CellSpec, State


def rnn_step(
    gates_x: Tensor, hidden: Tensor, weight_hh: Tensor, bias_hh: Tensor | None, nonlinearity
) -> Tensor:
    r"""$h' = \sigma(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})$."""
    return resolve_activation(nonlinearity)(gates_x + F.linear(hidden, weight_hh, bias_hh))


def gru_step(
    gates_x: Tensor,
    hidden: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    reset_after: bool = True,
) -> Tensor:
    r"""One GRU step.

    $$
    \begin{gathered}
    r = \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
    z = \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
    n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn}))
        \quad\text{(reset\_after=True)} \\
    n = \tanh(W_{in} x + b_{in} + W_{hn} (r \odot h) + b_{hn})
        \quad\text{(reset\_after=False)} \\
    h' = (1 - z) \odot n + z \odot h
    \end{gathered}
    $$
    """
    x_r, x_z, x_n = gates_x.chunk(3, dim=-1)
    hidden_size = hidden.shape[-1]
    if reset_after:
        h_r, h_z, h_n = F.linear(hidden, weight_hh, bias_hh).chunk(3, dim=-1)
        reset = torch.sigmoid(x_r + h_r)
        update = torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_n + reset * h_n)
    else:
        weight_rz, weight_n = weight_hh.split([2 * hidden_size, hidden_size])
        bias_rz, bias_n = (None, None) if bias_hh is None else bias_hh.split(
            [2 * hidden_size, hidden_size]
        )
        h_r, h_z = F.linear(hidden, weight_rz, bias_rz).chunk(2, dim=-1)
        reset = torch.sigmoid(x_r + h_r)
        update = torch.sigmoid(x_z + h_z)
        candidate = torch.tanh(x_n + F.linear(reset * hidden, weight_n, bias_n))
    return (1 - update) * candidate + update * hidden


def lstm_step(
    gates_x: Tensor,
    hidden: Tensor,
    cell: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One LSTM step, with optional projection.

    $$
    \begin{gathered}
    i, f, g, o = \sigma, \sigma, \tanh, \sigma \,(W_{ih} x + b_{ih} + W_{hh} h + b_{hh}) \\
    c' = f \odot c + i \odot g \\
    h' = o \odot \tanh(c') \quad (\text{then } h' \leftarrow W_{hr} h' \text{ if projecting})
    \end{gathered}
    $$
    """
    gates = gates_x + F.linear(hidden, weight_hh, bias_hh)
    in_gate, forget_gate, cell_gate, out_gate = gates.chunk(4, dim=-1)
    cell = torch.sigmoid(forget_gate) * cell + torch.sigmoid(in_gate) * torch.tanh(cell_gate)
    hidden = torch.sigmoid(out_gate) * torch.tanh(cell)
    if weight_hr is not None:
        hidden = F.linear(hidden, weight_hr)
    return hidden, cell


def step(
    spec: CellSpec,
    gates_x: Tensor,
    state: State,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None = None,
) -> State:
    """One step of `spec`'s recurrence; `state` is `(h,)` or, for LSTM, `(h, c)`."""
    if spec.mode == "rnn":
        return (rnn_step(gates_x, state[0], weight_hh, bias_hh, spec.nonlinearity),)
    if spec.mode == "gru":
        return (gru_step(gates_x, state[0], weight_hh, bias_hh, spec.reset_after),)
    return lstm_step(gates_x, state[0], state[1], weight_hh, bias_hh, weight_hr)
