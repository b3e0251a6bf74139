"""The contract between the modules and the backends: what a cell is, and what one call asks.

Layers, cells and [`Stateful`][rnnkit.Stateful] describe each layer-direction they run as one
[`Call`][rnnkit.ops.spec.Call]; [`rnnkit.ops.dispatch.run`][] plans it and hands it to one backend.
Nothing here imports the nn.Module files, so the modules and every backend can import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor

from rnnkit.ops.activations import Activation

State = tuple[Tensor, ...]  # (h,) or, for LSTM, (h, c)
# Call fields that hold integer or boolean tensors: never cast, never differentiated.
_INTEGER_FIELDS = ("lengths", "resets", "mask")


@dataclass(frozen=True)
class CellSpec:
    """What recurrence a layer runs: the cell kind and its options.

    Attributes:
        mode: `"rnn"`, `"gru"` or `"lstm"`.
        nonlinearity: the activation, a name from `rnnkit.activations.ACTIVATIONS` or a
            callable: RNN's nonlinearity, GRU's candidate activation, LSTM's cell-input and
            cell-output activation (Keras's `activation`). `"tanh"` for GRU and LSTM.
        recurrent_activation: the GRU/LSTM gate activation (Keras's `recurrent_activation`),
            `"sigmoid"` by default; unused by RNN.
        reset_after: the GRU formulation (GRU only); `True` is torch's and cuDNN's.
        zoneout: the zoneout probability `p`. A call with `zoneout_h` (training) keeps
            each unit's previous value where the mask is 1; a call without it (evaluation)
            uses the expectation `h = p h_prev + (1 - p) h_new` (and the same for `c`).
        layer_norm: LSTM/GRU with layer-normalized gate products: the call carries
            `norm_ih`, `norm_hh` and (LSTM) `norm_cell`.
    """

    mode: str
    nonlinearity: Activation = "tanh"
    reset_after: bool = True
    recurrent_activation: Activation = "sigmoid"
    zoneout: float = 0.0
    layer_norm: bool = False

    @property
    def plain(self) -> bool:
        """Whether the cell is torch.nn's own: default GRU/LSTM activations, no zoneout, no
        layer norm. Backends that have kernels only for torch.nn's cells check this."""
        if self.zoneout or self.layer_norm:
            return False
        if self.mode == "rnn":
            return True
        return self.nonlinearity == "tanh" and self.recurrent_activation == "sigmoid"

    @property
    def num_gates(self) -> int:
        return {"rnn": 1, "gru": 3, "lstm": 4}[self.mode]

    @property
    def num_states(self) -> int:
        return 2 if self.mode == "lstm" else 1


@dataclass(frozen=True)
class Call:
    """One layer-direction to run: everything a backend may look at and compute with.

    Either `gates_x` (the input projection `W_ih x + b_ih` of every step) or `input`
    with `weight_ih` and `bias_ih` is given; the plan projects `input` unless the chosen
    backend fuses the projection into its time loop.

    Attributes:
        spec: the cell kind and options.
        state: `(h0,)` or `(h0, c0)`; `h0` is `(B, H_out)`, `c0` is `(B, H)`.
        weight_hh: `(G*H, H_out)`; bias_hh: `(G*H,)` or `None`.
        weight_hr: LSTM projection `(H_out, H)` or `None`.
        gates_x: `(T, B, G*H)`, or `None` when `input` is given.
        input: `(T, B, H_in)`, or `None` when `gates_x` is given.
        weight_ih: `(G*H, H_in)` with `input`; bias_ih: `(G*H,)` or `None`.
        lengths: `(B,)` int64 on the input's device, or `None` for full length.
        reverse: run from each sequence's own last step back to step 0.
        resets: `(T, B)` int8 codes applied to the state *before* each step, or `None`:
            `0` carries the state on, `1` replaces it with `reset_state`, `2` with the
            call's initial `state` (a reverse direction's first segment starts from `hx`).
        reset_state: the state a code-1 reset starts from, shaped like `state`.
        mask: `(T, B)` bool, or `None`: a false step is skipped (the state carries over
            unchanged), as a step past a sequence's length is; holes are allowed.
        carry_masked_output: a skipped step outputs the carried `h` (Keras's
            `zero_output_for_mask=False`) instead of zeros.
        hidden_dropout: `(B, H_out)` recurrent-dropout multipliers (0, or `1/(1-p)`), or
            `None`: `h` is multiplied by it where it enters the recurrent product
            `W_hh h` (only there: the carried state and the output are not dropped), the
            same mask at every step of the call. For the GRU with `reset_after=False` the
            dropped `h` also enters `W_hn (r * h)`; the update mix `z * h` uses the
            undropped `h`.
        zoneout_h: `(T, B, H_out)` zoneout masks in training (1 keeps the unit's previous
            value, 0 takes the new one), or `None` (no zoneout, or its expectation in
            evaluation when `spec.zoneout > 0`); `zoneout_c`: the same for LSTM's `c`,
            `(T, B, H)`. Applied after the cell, before lengths, masks and resets:
            `h_t = m * h_prev + (1 - m) * h_new`, where `h_prev` is the state the step
            started from (after its reset). `zoneout_h[t]` belongs to time position `t`
            in either direction (a reverse call reads it from `T - 1` down). An LSTM call
            with `zoneout_h` but no `zoneout_c` uses the expectation for `c`.
        norm_ih: `(gain, bias)`, each `(G*H,)`: `gates_x = LN(W_ih x) * gain + bias +
            b_ih`, normalized over the whole gate vector with eps 1e-5. It is applied by the
            projection, so a call that carries `gates_x` has it applied already and this
            field is `None`; a backend that fuses the projection must refuse it.
        norm_hh: `(gain, bias)`, each `(G*H,)`: `gates_h = LN(W_hh h) * gain + bias +
            b_hh` at every step.
        norm_cell: `(gain, bias)`, each `(H,)` (LSTM): `h = o * act(LN(c_new) * gain +
            bias)`; `c_new` itself is carried unnormalized.
        backend: the backend the caller asked for (`None`: `RNNKIT_BACKEND`, else auto).
        time_axis: `False` for a cell's single step, which has no time axis of its own
            (exported as plain ops rather than as one recurrence).
    """

    spec: CellSpec
    state: State
    weight_hh: Tensor
    bias_hh: Tensor | None = None
    weight_hr: Tensor | None = None
    gates_x: Tensor | None = None
    input: Tensor | None = None
    weight_ih: Tensor | None = None
    bias_ih: Tensor | None = None
    lengths: Tensor | None = None
    reverse: bool = False
    resets: Tensor | None = None
    reset_state: State | None = None
    mask: Tensor | None = None
    carry_masked_output: bool = False
    hidden_dropout: Tensor | None = None
    zoneout_h: Tensor | None = None
    zoneout_c: Tensor | None = None
    norm_ih: tuple[Tensor, Tensor] | None = None
    norm_hh: tuple[Tensor, Tensor] | None = None
    norm_cell: tuple[Tensor, Tensor] | None = None
    backend: str | None = None
    time_axis: bool = True

    def __post_init__(self) -> None:
        if (self.gates_x is None) == (self.input is None):
            raise ValueError("a Call takes exactly one of gates_x and input")
        if self.input is not None and self.weight_ih is None:
            raise ValueError("a Call with input needs weight_ih")
        if (self.resets is None) != (self.reset_state is None):
            raise ValueError("a Call takes resets and reset_state together")
        if self.gates_x is not None and self.norm_ih is not None:
            raise ValueError("norm_ih belongs to the projection; a Call with gates_x has none")

    @property
    def regularized(self) -> bool:
        """Whether the call asks for anything beyond torch.nn's cells: recurrent dropout,
        zoneout, layer norm or other GRU/LSTM activations (see
        [`CellSpec.plain`][rnnkit.ops.spec.CellSpec.plain])."""
        return not self.spec.plain or self.hidden_dropout is not None

    @property
    def leading(self) -> Tensor:
        """The per-step tensor, `gates_x` or `input`: its device, dtype and shape lead."""
        return self.gates_x if self.gates_x is not None else self.input

    @property
    def steps(self) -> int:
        return self.leading.shape[0]

    @property
    def batch(self) -> int:
        return self.leading.shape[1]

    def tensors(self) -> list[Tensor]:
        """Every floating-point tensor of the call (inputs, weights, states), in field order."""
        found: list[Tensor] = []
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _INTEGER_FIELDS:
                continue
            if isinstance(value, Tensor):
                found.append(value)
            elif isinstance(value, tuple):
                found.extend(v for v in value if isinstance(v, Tensor))
        return found

    def needs_grad(self) -> bool:
        """Whether autograd will want gradients of this call."""
        return torch.is_grad_enabled() and any(t.requires_grad for t in self.tensors())

    def projected(self, gates_x: Tensor) -> Call:
        """This call with its input replaced by the input projection `gates_x`."""
        return replace(
            self, gates_x=gates_x, input=None, weight_ih=None, bias_ih=None, norm_ih=None
        )

    def cast(self, dtype) -> Call:
        """This call with every floating-point tensor cast to `dtype` (autocast)."""
        changes = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in _INTEGER_FIELDS:
                continue
            if isinstance(value, Tensor):
                changes[field.name] = value.to(dtype)
            elif isinstance(value, tuple) and value and isinstance(value[0], Tensor):
                changes[field.name] = tuple(v.to(dtype) for v in value)
        return replace(self, **changes)


def as_states(value: Tensor | tuple[Tensor, ...]) -> State:
    """A module's `hx` (`h`, or the LSTM pair `(h, c)`) as a state tuple."""
    return (value,) if isinstance(value, Tensor) else tuple(value)


def from_states(states: State) -> Tensor | tuple[Tensor, ...]:
    """The inverse of `as_states`: `h` alone, or the pair `(h, c)`."""
    return states[0] if len(states) == 1 else tuple(states)
