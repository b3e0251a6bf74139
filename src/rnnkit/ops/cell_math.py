r"""The cell math: one small function per recurrence, written like its equations.

`gates_x` is the input projection $W_{ih} x_t + b_{ih}$ (computed for all steps at once by the
caller; with layer norm $\mathrm{LN}(W_{ih} x_t) \gamma + \beta + b_{ih}$), so each function
holds only the part that depends on the previous state. The reference backend runs these
functions, and the tests hold every fused kernel equal to them.

Beyond torch.nn's cells, every step takes (keyword-only, all optional):

- `activation` / `recurrent_activation`: Keras's names for the candidate/cell activation and
  the gate activation (a name of the activation table or a callable);
- `hidden_dropout`: recurrent-dropout multipliers, applied to `h` only where it enters a
  recurrent product ($W_{hh} h$, and GRU's $W_{hn} (r \odot h)$ when `reset_after=False`);
  the carried state and GRU's update mix use the undropped `h`;
- `norm_hh`: `(gain, bias)` of the recurrent product's layer norm (see [`recurrent_gates`]
  [rnnkit.ops.cell_math.recurrent_gates]); `norm_cell` (LSTM): `(gain, bias)` of the cell
  state's layer norm before the output activation.

Zoneout ([`zoneout`][rnnkit.ops.cell_math.zoneout]) is applied by the time loop after the step,
against the state the step started from.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rnnkit.ops.activations import Activation, resolve_activation
from rnnkit.ops.spec import CellSpec, State

Norm = tuple[Tensor, Tensor]  # (gain, bias) of one layer norm
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, as haste's LayerNormLSTM/GRU


def layer_norm(x: Tensor, norm: Norm) -> Tensor:
    r"""$\mathrm{LN}(x) \gamma + \beta$ over the last dimension, $\epsilon = 10^{-5}$."""
    gain, bias = norm
    return F.layer_norm(x, gain.shape, gain, bias, LAYER_NORM_EPS)


def recurrent_gates(
    hidden: Tensor, weight_hh: Tensor, bias_hh: Tensor | None, norm_hh: Norm | None = None
) -> Tensor:
    r"""$W_{hh} h + b_{hh}$, or with layer norm $\mathrm{LN}(W_{hh} h) \gamma_h + \beta_h +
    b_{hh}$ (normalized over the whole gate vector, as Ba et al. 2016 and haste)."""
    if norm_hh is None:
        return F.linear(hidden, weight_hh, bias_hh)
    gates = layer_norm(F.linear(hidden, weight_hh), norm_hh)
    return gates if bias_hh is None else gates + bias_hh


def _dropped(hidden: Tensor, hidden_dropout: Tensor | None) -> Tensor:
    return hidden if hidden_dropout is None else hidden * hidden_dropout


def rnn_step(
    gates_x: Tensor,
    hidden: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    nonlinearity: Activation,
    *,
    hidden_dropout: Tensor | None = None,
) -> Tensor:
    r"""$h' = \sigma(W_{ih} x + b_{ih} + W_{hh} (h \odot d) + b_{hh})$, $d$ the recurrent
    dropout multipliers (1 without dropout)."""
    recurrent = recurrent_gates(_dropped(hidden, hidden_dropout), weight_hh, bias_hh)
    return resolve_activation(nonlinearity)(gates_x + recurrent)


def gru_step(
    gates_x: Tensor,
    hidden: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    reset_after: bool = True,
    *,
    activation: Activation = "tanh",
    recurrent_activation: Activation = "sigmoid",
    hidden_dropout: Tensor | None = None,
    norm_hh: Norm | None = None,
) -> Tensor:
    r"""One GRU step ($\sigma$ the recurrent activation, $\phi$ the activation, $\tilde h =
    h \odot d$ with the recurrent dropout multipliers $d$).

    $$
    \begin{aligned}
    [a_r, a_z, a_n] &= W_{hh} \tilde h + b_{hh}
        \quad\text{(layer norm: } \mathrm{LN}(W_{hh} \tilde h)\gamma_h + \beta_h + b_{hh}) \\
    r &= \sigma(x_r + a_r), \quad z = \sigma(x_z + a_z) \\
    n &= \phi(x_n + r \odot a_n) \quad\text{(reset\_after=True)} \\
    n &= \phi(x_n + W_{hn} (r \odot \tilde h) + b_{hn}) \quad\text{(reset\_after=False)} \\
    h' &= (1 - z) \odot n + z \odot h
    \end{aligned}
    $$

    With layer norm this is haste's `LayerNormGRU` (reset-after only).

    Raises:
        ValueError: `norm_hh` with `reset_after=False`.
    """
    gate = resolve_activation(recurrent_activation)
    act = resolve_activation(activation)
    x_r, x_z, x_n = gates_x.chunk(3, dim=-1)
    hidden_in = _dropped(hidden, hidden_dropout)
    if reset_after:
        h_r, h_z, h_n = recurrent_gates(hidden_in, weight_hh, bias_hh, norm_hh).chunk(3, dim=-1)
        reset = gate(x_r + h_r)
        update = gate(x_z + h_z)
        candidate = act(x_n + reset * h_n)
    else:
        if norm_hh is not None:
            raise ValueError("layer norm is defined for the GRU with reset_after=True only")
        hidden_size = hidden.shape[-1]
        weight_rz, weight_n = weight_hh.split([2 * hidden_size, hidden_size])
        bias_rz, bias_n = (None, None) if bias_hh is None else bias_hh.split(
            [2 * hidden_size, hidden_size]
        )
        h_r, h_z = F.linear(hidden_in, weight_rz, bias_rz).chunk(2, dim=-1)
        reset = gate(x_r + h_r)
        update = gate(x_z + h_z)
        candidate = act(x_n + F.linear(reset * hidden_in, weight_n, bias_n))
    return (1 - update) * candidate + update * hidden


def lstm_step(
    gates_x: Tensor,
    hidden: Tensor,
    cell: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None = None,
    *,
    activation: Activation = "tanh",
    recurrent_activation: Activation = "sigmoid",
    hidden_dropout: Tensor | None = None,
    norm_hh: Norm | None = None,
    norm_cell: Norm | None = None,
) -> tuple[Tensor, Tensor]:
    r"""One LSTM step, with optional projection ($\sigma$ the recurrent activation, $\phi$ the
    activation, $d$ the recurrent dropout multipliers).

    $$
    \begin{aligned}
    [a_i, a_f, a_g, a_o] &= x + W_{hh} (h \odot d) + b_{hh}
        \quad\text{(layer norm: } x + \mathrm{LN}(W_{hh} (h \odot d))\gamma_h + \beta_h
        + b_{hh}) \\
    c' &= \sigma(a_f) \odot c + \sigma(a_i) \odot \phi(a_g) \\
    h' &= \sigma(a_o) \odot \phi(c') \quad\text{(layer norm: }
        \sigma(a_o) \odot \phi(\mathrm{LN}(c')\gamma_c + \beta_c)) \\
    h' &\leftarrow W_{hr} h' \quad\text{(projection)}
    \end{aligned}
    $$

    `c'` is carried unnormalized (haste's `LayerNormLSTM`).
    """
    gate = resolve_activation(recurrent_activation)
    act = resolve_activation(activation)
    recurrent = recurrent_gates(_dropped(hidden, hidden_dropout), weight_hh, bias_hh, norm_hh)
    in_gate, forget_gate, cell_gate, out_gate = (gates_x + recurrent).chunk(4, dim=-1)
    cell = gate(forget_gate) * cell + gate(in_gate) * act(cell_gate)
    shown = cell if norm_cell is None else layer_norm(cell, norm_cell)
    hidden = gate(out_gate) * act(shown)
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
    *,
    hidden_dropout: Tensor | None = None,
    norm_hh: Norm | None = None,
    norm_cell: Norm | None = None,
) -> State:
    """One step of `spec`'s recurrence (zoneout aside); `state` is `(h,)` or `(h, c)`."""
    if spec.mode == "rnn":
        return (
            rnn_step(gates_x, state[0], weight_hh, bias_hh, spec.nonlinearity,
                     hidden_dropout=hidden_dropout),
        )
    options = {
        "activation": spec.nonlinearity,
        "recurrent_activation": spec.recurrent_activation,
        "hidden_dropout": hidden_dropout,
        "norm_hh": norm_hh,
    }
    if spec.mode == "gru":
        return (gru_step(gates_x, state[0], weight_hh, bias_hh, spec.reset_after, **options),)
    return lstm_step(gates_x, state[0], state[1], weight_hh, bias_hh, weight_hr,
                     norm_cell=norm_cell, **options)


def zoneout(previous: Tensor, new: Tensor, keep: Tensor | float) -> Tensor:
    r"""$m \odot h_{prev} + (1 - m) \odot h_{new}$: `keep` is the training mask $m$ (1 keeps
    the previous value) or, in evaluation, the probability $p$ itself (the expectation)."""
    return keep * previous + (1 - keep) * new


def zoned(
    spec: CellSpec, start: State, new: State, masks: tuple[Tensor | None, ...] | None
) -> State:
    """`new` after zoneout against `start`, the state the step started from.

    `masks` holds this step's `(B, H_out)` [and `(B, H)`] training masks; `None` (for all or
    for one state) is evaluation, the expectation with $p$ = `spec.zoneout`. No zoneout when
    `spec.zoneout == 0`.
    """
    if not spec.zoneout:
        return new
    keeps = masks if masks is not None else (None,) * len(new)
    return tuple(
        zoneout(old, fresh, spec.zoneout if keep is None else keep)
        for old, fresh, keep in zip(start, new, keeps)
    )
