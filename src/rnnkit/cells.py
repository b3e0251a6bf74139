r"""The single-step cell modules: RNNCell, GRUCell and LSTMCell.

Their math lives in `rnnkit.ops.cell_math` (re-exported here: [`rnn_step`][rnnkit.cells.rnn_step],
[`gru_step`][rnnkit.cells.gru_step], [`lstm_step`][rnnkit.cells.lstm_step], `step`), where every
backend's reference path and the tests use it. A cell's step runs as a one-step
[`Call`][rnnkit.ops.spec.Call] through the same plan as the layers.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from rnnkit import _checks, _from_weights, _regularize
from rnnkit._state import initial_state
from rnnkit.ops import dispatch
from rnnkit.ops.activations import Activation, check_activation, nonlinearity_repr
from rnnkit.ops.cell_math import gru_step, lstm_step, rnn_step, step
from rnnkit.ops.cpu import stream
from rnnkit.ops.spec import Call, CellSpec, State

__all__ = [
    "CellSpec", "GRUCell", "LSTMCell", "RNNCell", "gru_step", "lstm_step", "rnn_step", "step",
]


_Cell = TypeVar("_Cell", bound="_CellBase")


class _CellBase(nn.Module):
    """Shared parameters, checks and dispatch of the single-step cells.

    As torch.nn's cells, `input_size` and `hidden_size` may be zero (a step then gives
    `(N, 0)` states, or uses only the biases and `hx`), sizes may be any integer type
    (numpy's too), `bias` may be 0 or 1, and parameters and inputs may be complex.
    """

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
        recurrent_dropout: float = 0.0,
        input_dropout: float = 0.0,
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.recurrent_dropout = _checks.probability("recurrent_dropout", recurrent_dropout)
        self.input_dropout = _checks.probability("input_dropout", input_dropout)
        self.forget_bias = _checks.real("forget_bias", forget_bias)
        # Zero sizes are allowed, as torch.nn's cells allow them.
        input_size = _checks.non_negative_int("input_size", input_size)
        hidden_size = _checks.non_negative_int("hidden_size", hidden_size)
        bias = _checks.torch_flag("bias", bias)
        if self.forget_bias and not bias:
            raise ValueError(f"forget_bias={forget_bias} needs bias=True")
        learn_initial_state = _checks.boolean("learn_initial_state", learn_initial_state)
        self.backend = dispatch.check_name(backend)
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
        for name, size in _regularize.norm_shapes(spec, hidden_size).items():
            setattr(self, name, nn.Parameter(torch.empty(size, **factory)))
        if learn_initial_state:
            self.initial_h = nn.Parameter(torch.zeros(hidden_size, **factory))
            if spec.mode == "lstm":
                self.initial_c = nn.Parameter(torch.zeros(hidden_size, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's initialisation: every weight and bias ~ U(-1/sqrt(H), 1/sqrt(H)).

        A learnable initial state starts at zero, so a fresh cell behaves like torch.nn's;
        layer-norm gains start at 1 and their biases at 0; LSTM's `forget_bias` is then
        added to the forget-gate rows of `bias_ih`.
        """
        bound = 1.0 / self.hidden_size**0.5 if self.hidden_size > 0 else 0.0
        for name, param in self.named_parameters():
            if name.startswith("initial_"):
                nn.init.zeros_(param)
            else:
                _regularize.init_parameter(name, param, bound)
        if getattr(self, "forget_bias", 0.0):
            _regularize.add_forget_bias(self.bias_ih, self.hidden_size, self.forget_bias)

    def sequence_masks(self, batch_size: int) -> dict[str, Tensor]:
        """Draw per-sequence dropout masks: `input` `(N, H_in)` (`input_dropout`) and
        `hidden` `(N, H)` (`recurrent_dropout`), pre-scaled multipliers drawn on the CPU from
        torch's default generator. Pass them as `dropout_masks=` at every step of a sequence
        for variational dropout (`rnnkit.Stateful` does); without them each step
        draws its own."""
        # Not self.weight_ih: a parametrized weight would be computed once more.
        reference = next(self.parameters())
        masks: dict[str, Tensor] = {}
        if self.input_dropout:
            masks["input"] = _regularize.dropout_mask(
                (batch_size, self.input_size), self.input_dropout, reference)
        if self.recurrent_dropout:
            masks["hidden"] = _regularize.dropout_mask(
                (batch_size, self.hidden_size), self.recurrent_dropout, reference)
        return masks

    def initial_state(self, batch_size: int | None) -> State:
        """The state a step starts from when `hx` is not given, as a tuple: `(N, H)`
        (`(H,)` for `batch_size=None`), the learnable `initial_h`/`initial_c` or zeros."""
        sizes = (self.hidden_size,) * self.spec.num_states
        return initial_state(self, (), batch_size, sizes)

    def _run(self, input: Tensor, hx: State | None, dropout_masks=None) -> State:
        if dropout_masks is None:
            fast = stream.cell_step(self, input, hx)  # a step without gradients, compiled
            if fast is not None:
                return fast[1]
        # Read each weight once: a parametrized weight is computed on every access.
        weight_ih = self.weight_ih
        _checks.input_tensor(input, weight_ih, self.input_size, ranks=(1, 2), what="input")
        batched = input.dim() == 2
        if hx is None:
            state = self.initial_state(input.shape[0] if batched else None)
        else:
            expected = (input.shape[0], self.hidden_size) if batched else (self.hidden_size,)
            names = ("hx", "cx") if self.spec.num_states == 2 else ("hx",)
            for name, tensor in zip(names, hx):
                _checks.state_tensor(name, tensor, expected, weight_ih)
            state = tuple(hx)
        if not batched:
            input = input.unsqueeze(0)
            state = tuple(s.unsqueeze(0) for s in state)
        masks = self._masks(dropout_masks, input.shape[0])
        if "input" in masks:
            input = input * masks["input"]
        norm_ih, norm_hh, norm_cell = _regularize.norms(self, "", self.spec)
        _, state = dispatch.run(
            Call(
                spec=self.spec,
                state=state,
                weight_hh=self.weight_hh,
                bias_hh=self.bias_hh,
                input=input.unsqueeze(0),
                weight_ih=weight_ih,
                bias_ih=self.bias_ih,
                hidden_dropout=masks.get("hidden"),
                zoneout_h=masks.get("zoneout_h"),
                zoneout_c=masks.get("zoneout_c"),
                norm_ih=norm_ih,
                norm_hh=norm_hh,
                norm_cell=norm_cell,
                backend=self.backend,
                time_axis=False,
            )
        )
        if not batched:
            state = tuple(s.squeeze(0) for s in state)
        return state

    def _masks(self, given, batch_size: int) -> dict[str, Tensor]:
        """This step's masks in training: `given` (from `sequence_masks`) or fresh ones,
        and fresh zoneout masks."""
        if not self.training:
            return {}
        if given is not None and not isinstance(given, dict):
            raise TypeError("dropout_masks must be a dict from sequence_masks(), got "
                            f"{type(given).__name__}")
        expected = {}
        if self.input_dropout:
            expected["input"] = (batch_size, self.input_size)
        if self.recurrent_dropout:
            expected["hidden"] = (batch_size, self.hidden_size)
        for key, tensor in (given or {}).items():
            if key not in expected or not isinstance(tensor, Tensor) or (
                    tuple(tensor.shape) != expected[key]):
                raise ValueError(f"dropout_masks[{key!r}]: this cell expects keys and shapes "
                                 f"{expected}")
        masks = dict(given) if given is not None else self.sequence_masks(batch_size)
        if self.spec.zoneout:
            for name in ("zoneout_h", "zoneout_c")[: self.spec.num_states]:
                masks[name] = _regularize.zoneout_mask(
                    (1, batch_size, self.hidden_size), self.spec.zoneout,
                    next(self.parameters()))
        return _regularize.refuse_export(masks)

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
        r"""A cell whose parameters are the given tensors (Flux's `RNNCell(σ, Wi, Wh, b, h0)`).

        Sizes are read from the shapes: `weight_ih` `(G*H, H_in)`, `weight_hh` `(G*H, H)`,
        biases `(G*H,)` (G = 1, 3, 4 for RNN, GRU, LSTM). With one bias given, the other is a
        frozen zero. `initial_state` (`(H,)` or `(1, H)`; for LSTM a pair) becomes the
        learnable `initial_h` / `initial_c`. The tensors become the parameters without a copy;
        `requires_grad` says whether they train. `options` go to the constructor:
        `nonlinearity` (RNNCell), `reset_after` (GRUCell), `backend`. See
        `rnnkit._from_weights.build` for the full rules.

        Raises:
            ValueError, TypeError: wrong shapes, ranks, dtypes or devices, naming expected
                and got.
        """
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
        for name in ("recurrent_dropout", "input_dropout", "forget_bias"):
            if getattr(self, name):
                text += f", {name}={getattr(self, name)}"
        return text


class RNNCell(_CellBase):
    r"""An Elman cell, $h' = \sigma(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})$.

    Arguments and parameters are torch.nn.RNNCell's; `nonlinearity` may be any activation,
    and the keyword-only arguments are rnnkit's own. Call it as described under
    [`forward`][rnnkit.RNNCell.forward].

    Args:
        input_size: the number of features `H_in` of `x`.
        hidden_size: the number of features `H` of `h`.
        bias: if `False`, the cell has no `bias_ih` and `bias_hh`.
        nonlinearity: `'tanh'`, `'relu'`, another name of
            [`ACTIVATIONS`][rnnkit.activations.ACTIVATIONS], or any elementwise callable.
        device: where the parameters are created.
        dtype: the parameters' floating-point (or complex) dtype.
        learn_initial_state: add a trainable `initial_h` of shape `(H,)`, used when `hx` is
            not given.
        backend: `None` reads `RNNKIT_BACKEND` (unset: `"auto"`); `"auto"`, `"reference"` or
            another registered backend, as for [`RNN`][rnnkit.RNN].
        recurrent_dropout: as for [`GRUCell`][rnnkit.GRUCell].
        input_dropout: as for [`GRUCell`][rnnkit.GRUCell].
        zoneout: as for [`GRUCell`][rnnkit.GRUCell]; `layer_norm=True` is refused (ValueError).
    """

    cell_kind = "rnn"

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
        recurrent_dropout: float = 0.0,
        input_dropout: float = 0.0,
        zoneout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        self.nonlinearity = check_activation(nonlinearity)
        _regularize.refuse_layer_norm(layer_norm)
        zoneout = _checks.probability("zoneout", zoneout)
        super().__init__(
            CellSpec("rnn", nonlinearity=self.nonlinearity, zoneout=zoneout), input_size,
            hidden_size, bias, device, dtype, learn_initial_state, backend,
            recurrent_dropout, input_dropout,
        )

    def forward(
        self, input: Tensor, hx: Tensor | None = None, *, dropout_masks=None
    ) -> Tensor:
        r"""One step: $h' = \sigma(W_{ih} x + b_{ih} + W_{hh} h + b_{hh})$.

        Args:
            input: `x`, `(N, H_in)`, or `(H_in,)` unbatched.
            hx: `h`, `(N, H)`, or `(H,)` unbatched. Defaults to zeros, or to the learnable
                initial state.
            dropout_masks: in training, the masks of `sequence_masks` to use instead of fresh
                ones (variational dropout across the steps of a sequence).

        Returns:
            `h'`, shaped like `hx`: `(N, H)`, or `(H,)` unbatched.

        Raises:
            ValueError, TypeError: `input` or a state of the wrong rank, size, dtype or
                device, naming what was expected and what came.
        """
        return self._run(input, None if hx is None else (hx,), dropout_masks)[0]

    def extra_repr(self) -> str:
        text = super().extra_repr() + nonlinearity_repr(self.nonlinearity)
        return text + (f", zoneout={self.spec.zoneout}" if self.spec.zoneout else "")


class GRUCell(_CellBase):
    r"""A GRU cell; see [`gru_step`][rnnkit.cells.gru_step] for the equations of both formulations.

    Arguments and parameters are torch.nn.GRUCell's; the keyword-only arguments are
    rnnkit's own. Call it as described under [`forward`][rnnkit.GRUCell.forward].

    Args:
        input_size: the number of features `H_in` of `x`.
        hidden_size: the number of features `H` of `h`.
        bias: if `False`, the cell has no `bias_ih` and `bias_hh`.
        device: where the parameters are created.
        dtype: the parameters' floating-point (or complex) dtype.
        reset_after: `True` (torch, cuDNN, MLX, Keras default) applies the reset gate after
            the recurrent matmul; `False` (Cho et al. 2014, Flux's GRUv3) before it.
        learn_initial_state: add a trainable `initial_h` of shape `(H,)`, used when `hx` is
            not given.
        backend: `None` reads `RNNKIT_BACKEND` (unset: `"auto"`); `"auto"`, `"reference"` or
            another registered backend, as for [`RNN`][rnnkit.RNN].
        activation: as for [`GRU`][rnnkit.GRU].
        recurrent_activation: as for [`GRU`][rnnkit.GRU].
        zoneout: as for [`GRU`][rnnkit.GRU].
        layer_norm: as for [`GRU`][rnnkit.GRU], with parameters `layer_norm_ih_weight`,
            `layer_norm_ih_bias`, `layer_norm_hh_weight`, `layer_norm_hh_bias`.
        recurrent_dropout: dropout of `h` where it enters the recurrent product, scaled by
            $1/(1-p)$, in training. A step cannot know where a sequence starts: pass the
            masks of `sequence_masks` as `dropout_masks=` at every step for variational
            dropout (as `rnnkit.Stateful` does); without them each step draws its own.
        input_dropout: the same for `x`.
    """

    cell_kind = "gru"

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
        activation: Activation = "tanh",
        recurrent_activation: Activation = "sigmoid",
        recurrent_dropout: float = 0.0,
        input_dropout: float = 0.0,
        zoneout: float = 0.0,
        layer_norm: bool = False,
    ) -> None:
        reset_after = _checks.boolean("reset_after", reset_after)
        self.reset_after = reset_after
        spec = _regularize.spec(
            "gru", activation=activation, recurrent_activation=recurrent_activation,
            reset_after=reset_after, zoneout=zoneout, layer_norm=layer_norm,
        )
        self.activation = spec.nonlinearity
        self.recurrent_activation = spec.recurrent_activation
        super().__init__(
            spec, input_size, hidden_size, bias, device, dtype, learn_initial_state, backend,
            recurrent_dropout, input_dropout,
        )

    def forward(
        self, input: Tensor, hx: Tensor | None = None, *, dropout_masks=None
    ) -> Tensor:
        """One step (equations under [`gru_step`][rnnkit.cells.gru_step]).

        Args:
            input: `x`, `(N, H_in)`, or `(H_in,)` unbatched.
            hx: `h`, `(N, H)`, or `(H,)` unbatched. Defaults to zeros, or to the learnable
                initial state.
            dropout_masks: in training, the masks of `sequence_masks` to use instead of fresh
                ones (variational dropout across the steps of a sequence).

        Returns:
            `h'`, shaped like `hx`: `(N, H)`, or `(H,)` unbatched.

        Raises:
            ValueError, TypeError: `input` or a state of the wrong rank, size, dtype or
                device, naming what was expected and what came.
        """
        return self._run(input, None if hx is None else (hx,), dropout_masks)[0]

    def extra_repr(self) -> str:
        text = super().extra_repr()
        text = text if self.reset_after else text + ", reset_after=False"
        return text + _regularize.spec_repr(self.spec)


class LSTMCell(_CellBase):
    r"""An LSTM cell; see [`lstm_step`][rnnkit.cells.lstm_step] for the equations.

    Arguments and parameters are torch.nn.LSTMCell's; the keyword-only arguments are
    rnnkit's own. Call it as described under [`forward`][rnnkit.LSTMCell.forward].

    Args:
        input_size: the number of features `H_in` of `x`.
        hidden_size: the number of features `H` of `h` and `c`.
        bias: if `False`, the cell has no `bias_ih` and `bias_hh`.
        device: where the parameters are created.
        dtype: the parameters' floating-point (or complex) dtype.
        learn_initial_state: add trainable `initial_h` and `initial_c`, each of shape
            `(H,)`, used when `hx` is not given.
        backend: `None` reads `RNNKIT_BACKEND` (unset: `"auto"`); `"auto"`, `"reference"` or
            another registered backend, as for [`RNN`][rnnkit.RNN].
        activation: as for [`LSTM`][rnnkit.LSTM].
        recurrent_activation: as for [`LSTM`][rnnkit.LSTM].
        zoneout: as for [`LSTM`][rnnkit.LSTM].
        layer_norm: as for [`LSTM`][rnnkit.LSTM], with parameters as
            [`GRUCell`][rnnkit.GRUCell]'s plus `layer_norm_cell_weight`, `layer_norm_cell_bias`.
        forget_bias: as for [`LSTM`][rnnkit.LSTM].
        recurrent_dropout: as for [`GRUCell`][rnnkit.GRUCell].
        input_dropout: as for [`GRUCell`][rnnkit.GRUCell].
    """

    cell_kind = "lstm"

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
        activation: Activation = "tanh",
        recurrent_activation: Activation = "sigmoid",
        recurrent_dropout: float = 0.0,
        input_dropout: float = 0.0,
        zoneout: float = 0.0,
        layer_norm: bool = False,
        forget_bias: float = 0.0,
    ) -> None:
        spec = _regularize.spec(
            "lstm", activation=activation, recurrent_activation=recurrent_activation,
            zoneout=zoneout, layer_norm=layer_norm,
        )
        self.activation = spec.nonlinearity
        self.recurrent_activation = spec.recurrent_activation
        super().__init__(
            spec, input_size, hidden_size, bias, device, dtype, learn_initial_state, backend,
            recurrent_dropout, input_dropout, forget_bias,
        )

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, *, dropout_masks=None
    ) -> tuple[Tensor, Tensor]:
        """One step (equations under [`lstm_step`][rnnkit.cells.lstm_step]).

        Args:
            input: `x`, `(N, H_in)`, or `(H_in,)` unbatched.
            hx: the pair `(h, c)`, each `(N, H)`, or `(H,)` unbatched. Defaults to zeros, or
                to the learnable initial state.
            dropout_masks: in training, the masks of `sequence_masks` to use instead of fresh
                ones (variational dropout across the steps of a sequence).

        Returns:
            The pair `(h', c')`, each shaped like `h`.

        Raises:
            ValueError, TypeError: `input` or a state of the wrong rank, size, dtype or
                device, naming what was expected and what came.
        """
        if hx is not None:
            hx = _checks.state_pair(hx)
        hidden, cell = self._run(input, hx, dropout_masks)
        return hidden, cell

    def extra_repr(self) -> str:
        return super().extra_repr() + _regularize.spec_repr(self.spec)
