r"""Cell math and the single-step cell modules.

The three recurrences, each written once, as in the docstrings below. ``gates_x`` is the input
projection :math:`W_{ih} x_t + b_{ih}` (computed for all steps at once by the layers), so each
function holds only the part that depends on the previous state. Every backend's reference path
calls these functions, and the tests hold every fused kernel equal to them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnkit import _checks
from rnnkit.activations import Activation, check_activation, nonlinearity_repr, resolve_activation


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


def rnn_step(
    gates_x: Tensor, hidden: Tensor, weight_hh: Tensor, bias_hh: Tensor | None, nonlinearity
) -> Tensor:
    r""":math:`h' = \sigma(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})`."""
    return resolve_activation(nonlinearity)(gates_x + F.linear(hidden, weight_hh, bias_hh))


def gru_step(
    gates_x: Tensor,
    hidden: Tensor,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    reset_after: bool = True,
) -> Tensor:
    r"""One GRU step.

    .. math::
        r = \sigma(W_{ir} x + b_{ir} + W_{hr} h + b_{hr}) \\
        z = \sigma(W_{iz} x + b_{iz} + W_{hz} h + b_{hz}) \\
        n = \tanh(W_{in} x + b_{in} + r \odot (W_{hn} h + b_{hn}))
            \quad\text{(reset\_after=True)} \\
        n = \tanh(W_{in} x + b_{in} + W_{hn} (r \odot h) + b_{hn})
            \quad\text{(reset\_after=False)} \\
        h' = (1 - z) \odot n + z \odot h
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

    .. math::
        i, f, g, o = \sigma, \sigma, \tanh, \sigma \,(W_{ih} x + b_{ih} + W_{hh} h + b_{hh}) \\
        c' = f \odot c + i \odot g \\
        h' = o \odot \tanh(c') \quad (\text{then } h' \leftarrow W_{hr} h' \text{ if projecting})
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
    state: tuple[Tensor, ...],
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """One step of ``spec``'s recurrence; ``state`` is ``(h,)`` or, for LSTM, ``(h, c)``."""
    if spec.mode == "rnn":
        return (rnn_step(gates_x, state[0], weight_hh, bias_hh, spec.nonlinearity),)
    if spec.mode == "gru":
        return (gru_step(gates_x, state[0], weight_hh, bias_hh, spec.reset_after),)
    return lstm_step(gates_x, state[0], state[1], weight_hh, bias_hh, weight_hr)


_Cell = TypeVar("_Cell", bound="_CellBase")


class _CellBase(nn.Module):
    """Shared parameters, checks and dispatch of the single-step cells."""

    def __init__(
        self,
        spec: CellSpec,
        input_size: int,
        hidden_size: int,
        bias: bool,
        device,
        dtype,
        learn_initial_state: bool,
        backend: str | None,
    ) -> None:
        super().__init__()
        _checks.positive_int("input_size", input_size)
        _checks.positive_int("hidden_size", hidden_size)
        _checks.boolean("bias", bias)
        _checks.boolean("learn_initial_state", learn_initial_state)
        self.backend = _checks.backend_name(backend)
        from rnnkit.ops import dispatch

        dispatch.registered()  # import the backends now: torch.compile cannot trace imports
        factory = {"device": device, "dtype": dtype}
        self.spec = spec
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.bias = bias
        self.learn_initial_state = learn_initial_state
        gate_size = spec.num_gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(gate_size, input_size, **factory))
        self.weight_hh = nn.Parameter(torch.empty(gate_size, hidden_size, **factory))
        if bias:
            self.bias_ih = nn.Parameter(torch.empty(gate_size, **factory))
            self.bias_hh = nn.Parameter(torch.empty(gate_size, **factory))
        else:
            self.register_parameter("bias_ih", None)
            self.register_parameter("bias_hh", None)
        if learn_initial_state:
            self.initial_h = nn.Parameter(torch.zeros(hidden_size, **factory))
            if spec.mode == "lstm":
                self.initial_c = nn.Parameter(torch.zeros(hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)).

        A learnable initial state starts at zero, so a fresh cell behaves like torch.nn's.
        """
        bound = 1.0 / self.hidden_size**0.5 if self.hidden_size > 0 else 0.0
        for name, param in self.named_parameters():
            if name.startswith("initial_"):
                nn.init.zeros_(param)
            else:
                nn.init.uniform_(param, -bound, bound)

    def _initial_state(self, input: Tensor, batched: bool) -> tuple[Tensor, ...]:
        shape = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        if self.learn_initial_state:
            names = ("initial_h", "initial_c")[: self.spec.num_states]
            return tuple(getattr(self, n).expand(shape) for n in names)
        zeros = torch.zeros(shape, dtype=input.dtype, device=input.device)
        return (zeros,) * self.spec.num_states

    def _run(self, input: Tensor, hx: tuple[Tensor, ...] | None) -> tuple[Tensor, ...]:
        from rnnkit.ops import dispatch

        # Read each weight once: a parametrized weight is computed on every access.
        weight_ih = self.weight_ih
        _checks.input_tensor(input, weight_ih, self.input_size, ranks=(1, 2), what="input")
        batched = input.dim() == 2
        if hx is None:
            state = self._initial_state(input, batched)
        else:
            expected = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            names = ("hx", "cx") if self.spec.num_states == 2 else ("hx",)
            for name, tensor in zip(names, hx):
                _checks.state_tensor(name, tensor, expected, weight_ih)
            state = tuple(hx)
        if not batched:
            input = input.unsqueeze(0)
            state = tuple(s.unsqueeze(0) for s in state)
        gates_x = F.linear(input, weight_ih, self.bias_ih).unsqueeze(0)
        _, state = dispatch.recurrence(
            self.spec, gates_x, state, self.weight_hh, self.bias_hh, None, None, False,
            backend=self.backend,
        )
        if not batched:
            state = tuple(s.squeeze(0) for s in state)
        return state

    @classmethod
    def from_weights(
        cls: type[_Cell],
        weight_ih: Tensor,
        weight_hh: Tensor,
        bias_ih: Tensor | None = None,
        bias_hh: Tensor | None = None,
        *,
        initial_state: Tensor | tuple[Tensor, Tensor] | None = None,
        requires_grad: bool = True,
        **options: Any,
    ) -> _Cell:
        r"""A cell whose parameters are the given tensors (Flux's ``RNNCell(σ, Wi, Wh, b, h0)``).

        Sizes are read from the shapes: ``weight_ih`` ``(G*H, H_in)``, ``weight_hh`` ``(G*H, H)``,
        biases ``(G*H,)`` (G = 1, 3, 4 for RNN, GRU, LSTM). With one bias given, the other is a
        frozen zero. ``initial_state`` (``(H,)`` or ``(1, H)``; for LSTM a pair) becomes the
        learnable ``initial_h`` / ``initial_c``. The tensors become the parameters without a copy;
        ``requires_grad`` says whether they train. ``options`` go to the constructor:
        ``nonlinearity`` (RNNCell), ``reset_after`` (GRUCell), ``backend``. See
        :func:`rnnkit._from_weights.build` for the full rules.

        Raises:
            ValueError, TypeError: wrong shapes, ranks, dtypes or devices, naming expected
            and got.
        """
        from rnnkit import _from_weights

        return _from_weights.build(
            cls, weight_ih, weight_hh, bias_ih, bias_hh, None, initial_state, requires_grad,
            options,
        )

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if not self.bias:
            text += ", bias=False"
        if self.learn_initial_state:
            text += ", learn_initial_state=True"
        return text


class RNNCell(_CellBase):
    r"""An Elman cell, :math:`h' = \sigma(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})`.

    Args:
        input_size: features of ``x``.
        hidden_size: features of ``h``.
        bias: add ``bias_ih`` and ``bias_hh``.
        nonlinearity: ``'tanh'``, ``'relu'``, another name of
            :data:`rnnkit.activations.ACTIVATIONS`, or any elementwise callable.
        learn_initial_state: add a trainable ``initial_h`` used when ``hx`` is not given.
        backend: ``"auto"``, ``"reference"`` or another registered backend; ``None`` reads
            ``RNNKIT_BACKEND`` and defaults to ``"auto"``.

    Shapes:
        ``input``: ``(N, H_in)`` or ``(H_in)``; ``hx``: ``(N, H)`` or ``(H)``; returns ``h'``
        of the same shape as ``hx``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        nonlinearity: Activation = "tanh",
        device=None,
        dtype=None,
        *,
        learn_initial_state: bool = False,
        backend: str | None = None,
    ) -> None:
        self.nonlinearity = check_activation(nonlinearity)
        super().__init__(
            CellSpec("rnn", nonlinearity=self.nonlinearity), input_size, hidden_size, bias,
            device, dtype, learn_initial_state, backend,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._run(input, None if hx is None else (hx,))[0]

    def extra_repr(self) -> str:
        return super().extra_repr() + nonlinearity_repr(self.nonlinearity)


class GRUCell(_CellBase):
    r"""A GRU cell; see :func:`gru_step` for the equations of both formulations.

    Args:
        input_size, hidden_size, bias, learn_initial_state, backend: as for :class:`RNNCell`.
        reset_after: ``True`` (torch, cuDNN, MLX, Keras default) applies the reset gate after
            the recurrent matmul; ``False`` (Cho et al. 2014, Flux's GRUv3) before it.

    Shapes:
        ``input``: ``(N, H_in)`` or ``(H_in)``; ``hx``: ``(N, H)`` or ``(H)``; returns ``h'``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        reset_after: bool = True,
        learn_initial_state: bool = False,
        backend: str | None = None,
    ) -> None:
        _checks.boolean("reset_after", reset_after)
        self.reset_after = reset_after
        super().__init__(
            CellSpec("gru", reset_after=reset_after), input_size, hidden_size, bias, device,
            dtype, learn_initial_state, backend,
        )

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        return self._run(input, None if hx is None else (hx,))[0]

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.reset_after else text + ", reset_after=False"


class LSTMCell(_CellBase):
    r"""An LSTM cell; see :func:`lstm_step` for the equations.

    Args:
        input_size, hidden_size, bias, backend: as for :class:`RNNCell`.
        learn_initial_state: add trainable ``initial_h`` and ``initial_c``.

    Shapes:
        ``input``: ``(N, H_in)`` or ``(H_in)``; ``hx``: a pair ``(h, c)`` of ``(N, H)`` or
        ``(H)``; returns ``(h', c')``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        learn_initial_state: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__(
            CellSpec("lstm"), input_size, hidden_size, bias, device, dtype,
            learn_initial_state, backend,
        )

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        if hx is not None:
            hx = _checks.state_pair(hx)
        hidden, cell = self._run(input, hx)
        return hidden, cell
