"""The contract between the modules and the backends: what a cell is, and what one call asks.

Layers, cells and :class:`~rnnkit.Stateful` describe each layer-direction they run as one
:class:`Call`; :func:`rnnkit.ops.dispatch.run` plans it and hands it to one backend. Nothing
here imports the nn.Module files, so the modules and every backend can import this module.
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
        mode: ``"rnn"``, ``"gru"`` or ``"lstm"``.
        nonlinearity: the RNN activation, a name from :data:`rnnkit.activations.ACTIVATIONS`
            or a callable (RNN only).
        reset_after: the GRU formulation (GRU only); ``True`` is torch's and cuDNN's.
    """

    mode: str
    nonlinearity: Activation = "tanh"
    reset_after: bool = True

    @property
    def num_gates(self) -> int:
        return {"rnn": 1, "gru": 3, "lstm": 4}[self.mode]

    @property
    def num_states(self) -> int:
        return 2 if self.mode == "lstm" else 1


@dataclass(frozen=True)
class Call:
    """One layer-direction to run: everything a backend may look at and compute with.

    Either ``gates_x`` (the input projection ``W_ih x + b_ih`` of every step) or ``input``
    with ``weight_ih`` and ``bias_ih`` is given; the plan projects ``input`` unless the chosen
    backend fuses the projection into its time loop.

    Attributes:
        spec: the cell kind and options.
        state: ``(h0,)`` or ``(h0, c0)``; ``h0`` is ``(B, H_out)``, ``c0`` is ``(B, H)``.
        weight_hh: ``(G*H, H_out)``; bias_hh: ``(G*H,)`` or ``None``.
        weight_hr: LSTM projection ``(H_out, H)`` or ``None``.
        gates_x: ``(T, B, G*H)``, or ``None`` when ``input`` is given.
        input: ``(T, B, H_in)``, or ``None`` when ``gates_x`` is given.
        weight_ih: ``(G*H, H_in)`` with ``input``; bias_ih: ``(G*H,)`` or ``None``.
        lengths: ``(B,)`` int64 on the input's device, or ``None`` for full length.
        reverse: run from each sequence's own last step back to step 0.
        resets: ``(T, B)`` int8 codes applied to the state *before* each step, or ``None``:
            ``0`` carries the state on, ``1`` replaces it with ``reset_state``, ``2`` with the
            call's initial ``state`` (a reverse direction's first segment starts from ``hx``).
        reset_state: the state a code-1 reset starts from, shaped like ``state``.
        mask: ``(T, B)`` bool, or ``None``: a false step is skipped (the state carries over
            unchanged), as a step past a sequence's length is; holes are allowed.
        carry_masked_output: a skipped step outputs the carried ``h`` (Keras's
            ``zero_output_for_mask=False``) instead of zeros.
        backend: the backend the caller asked for (``None``: ``RNNKIT_BACKEND``, else auto).
        time_axis: ``False`` for a cell's single step, which has no time axis of its own
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
    backend: str | None = None
    time_axis: bool = True

    def __post_init__(self) -> None:
        if (self.gates_x is None) == (self.input is None):
            raise ValueError("a Call takes exactly one of gates_x and input")
        if self.input is not None and self.weight_ih is None:
            raise ValueError("a Call with input needs weight_ih")
        if (self.resets is None) != (self.reset_state is None):
            raise ValueError("a Call takes resets and reset_state together")

    @property
    def leading(self) -> Tensor:
        """The per-step tensor, ``gates_x`` or ``input``: its device, dtype and shape lead."""
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
        """This call with its input replaced by the input projection ``gates_x``."""
        return replace(self, gates_x=gates_x, input=None, weight_ih=None, bias_ih=None)

    def cast(self, dtype) -> Call:
        """This call with every floating-point tensor cast to ``dtype`` (autocast)."""
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
    """A module's ``hx`` (``h``, or the LSTM pair ``(h, c)``) as a state tuple."""
    return (value,) if isinstance(value, Tensor) else tuple(value)


def from_states(states: State) -> Tensor | tuple[Tensor, ...]:
    """The inverse of :func:`as_states`: ``h`` alone, or the pair ``(h, c)``."""
    return states[0] if len(states) == 1 else tuple(states)
