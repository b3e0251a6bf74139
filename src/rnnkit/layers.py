r"""Multi-layer, optionally bidirectional RNN, GRU and LSTM layers with torch.nn's interface.

This module handles everything around the recurrence: parameters, stacking, directions,
`batch_first`, unbatched input, dropout between layers, `lengths` and PackedSequence.
The recurrence itself runs in `rnnkit.ops.dispatch.recurrence`.
"""

from __future__ import annotations

import warnings
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import _checks, _from_weights, _packed, _regularize
from rnnkit._state import initial_state
from rnnkit.ops import dispatch
from rnnkit.ops.activations import Activation, check_activation, nonlinearity_repr
from rnnkit.ops.cpu import stream
from rnnkit.ops.spec import Call, CellSpec, State, from_states


def _reset_codes(
    resets: Tensor | None, lengths: Tensor | None, bidirectional: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The per-step reset codes (see [`rnnkit.ops.spec.Call`][]) of each direction.

    `resets` is `(T, B)` bool, time-first. Forward, a reset point `p` restarts the state
    before step `p` from the initial state (code 1). In reverse, each segment `[p, q)` runs
    from `q - 1` down to `p`: the state restarts before step `q - 1`, from `hx` (code
    2) for the first segment `[0, p_1)` and from the initial state (code 1) for the others,
    and the pass starts from the initial state at a sequence's last step when it has any reset.
    """
    if resets is None:
        return None, None
    steps = resets.shape[0]
    time = torch.arange(steps, device=resets.device)[:, None]
    if lengths is not None:
        resets = resets & (time < lengths[None, :])
    forward = resets.to(torch.int8)
    if not bidirectional:
        return forward, None
    # Shifts and selects rather than slices, so export keeps the time axis symbolic.
    first = resets & (resets.cumsum(0) == 1)  # each sequence's first reset point
    following = torch.where(first, 2, forward).to(torch.int8).roll(-1, 0)
    reverse = torch.where(time < steps - 1, following, torch.zeros_like(following))
    last = (lengths - 1)[None, :] if lengths is not None else steps - 1
    start = resets.any(0).to(torch.int8)[None, :]
    reverse = torch.where(time == last, torch.maximum(reverse, start), reverse)
    return forward, reverse


_Layer = TypeVar("_Layer", bound="RecurrentLayer")


class RecurrentLayer(nn.Module):
    """The shared body of [`RNN`][rnnkit.RNN], [`GRU`][rnnkit.GRU] and [`LSTM`][rnnkit.LSTM].

    Arguments are checked as torch.nn.RNNBase checks them, with two allowances: sizes may be
    any integer type (numpy's too), and flags (`bias`, `batch_first`, `bidirectional`)
    may be the integers 0 and 1. Sizes of zero are refused, as torch.nn refuses them.
    Parameters and inputs may be complex (`complex64`/`complex128`); complex calls run on
    the reference path, and `'relu'` is undefined for them (NotImplementedError, as in
    torch.nn).

    RNNBase's attributes and helpers are here for code written against torch.nn:
    `_flat_weights_names`, `_flat_weights`, `all_weights`, `mode`,
    `flatten_parameters`, `check_input`, `get_expected_hidden_size`,
    `check_hidden_size`, `check_forward_args`, `permute_hidden` (and LSTM's
    `get_expected_cell_size`). They raise torch.nn's error types; `forward` does its own,
    fuller checks.
    """

    def __init__(
        self,
        spec: CellSpec,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        learn_initial_state: bool = False,
        backend: str | None = None,
        zero_output_for_mask: bool = True,
        recurrent_dropout: float = 0.0,
        input_dropout: float = 0.0,
        forget_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.recurrent_dropout = _checks.probability("recurrent_dropout", recurrent_dropout)
        self.input_dropout = _checks.probability("input_dropout", input_dropout)
        self.forget_bias = _checks.real("forget_bias", forget_bias)
        input_size = _checks.positive_int("input_size", input_size)
        hidden_size = _checks.positive_int("hidden_size", hidden_size)
        num_layers = _checks.positive_int("num_layers", num_layers)
        bias = _checks.torch_flag("bias", bias)
        batch_first = _checks.torch_flag("batch_first", batch_first)
        bidirectional = _checks.torch_flag("bidirectional", bidirectional)
        learn_initial_state = _checks.boolean("learn_initial_state", learn_initial_state)
        self.dropout = _checks.dropout(dropout)
        proj_size = _checks.non_negative_int("proj_size", proj_size)
        if proj_size and spec.mode != "lstm":
            raise ValueError(f"proj_size is only supported by LSTM, got proj_size={proj_size}")
        if self.forget_bias and not bias:
            raise ValueError(f"forget_bias={forget_bias} needs bias=True")
        if proj_size >= hidden_size:
            raise ValueError(
                f"proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}"
            )
        if self.dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout applies between layers, so it has no effect with num_layers=1 "
                f"(got dropout={dropout})",
                stacklevel=3,
            )
        self.spec = spec
        self.backend = dispatch.check_name(backend)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bias = bias
        self.batch_first = batch_first
        self.bidirectional = bidirectional
        self.proj_size = proj_size
        self.learn_initial_state = learn_initial_state
        self.zero_output_for_mask = _checks.boolean("zero_output_for_mask", zero_output_for_mask)

        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        gate_size = spec.num_gates * hidden_size
        out_size = proj_size or hidden_size
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else out_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                shapes = {
                    "weight_ih": (gate_size, layer_input),
                    "weight_hh": (gate_size, out_size),
                }
                if bias:
                    shapes.update(bias_ih=(gate_size,), bias_hh=(gate_size,))
                if proj_size:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                names = []
                for base, shape in shapes.items():
                    setattr(self, base + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    names.append(base + suffix)
                self._all_weights.append(names)
        self._flat_weights_names = [name for names in self._all_weights for name in names]
        # Layer-norm gains and biases (not torch.nn weights, so not in _flat_weights_names).
        for layer in range(num_layers):
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                for base, size in _regularize.norm_shapes(spec, hidden_size).items():
                    setattr(self, base + suffix, nn.Parameter(torch.empty(size, **factory)))
        if learn_initial_state:
            self.initial_h = nn.Parameter(
                torch.zeros(num_layers * directions, out_size, **factory)
            )
            if spec.mode == "lstm":
                self.initial_c = nn.Parameter(
                    torch.zeros(num_layers * directions, hidden_size, **factory)
                )
        self.reset_parameters()

    # torch.nn compatibility ---------------------------------------------------------------

    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[Tensor | None]:
        """The weights named by `_flat_weights_names` (torch.nn's order), read at access.

        A weight under `torch.nn.utils.parametrize`, `weight_norm` or `prune` is its
        current computed value, as torch.nn's list holds after a forward pass.
        """
        return [getattr(self, name, None) for name in self._flat_weights_names]

    @property
    def mode(self) -> str:
        """torch.nn's name of the recurrence: `"RNN_TANH"`, `"RNN_RELU"`, `"GRU"` or
        `"LSTM"`.

        An RNN with another named nonlinearity is `"RNN_"` and the name in capitals
        (`"RNN_SILU"`), with a callable `"RNN_CALLABLE"`: code that picks torch.nn's kernel
        by `mode` then finds none, rather than running tanh. A GRU is `"GRU"` in both
        formulations; `reset_after` tells them apart.
        """
        spec = self.spec
        if spec.mode != "rnn":
            return spec.mode.upper()
        if isinstance(spec.nonlinearity, str):
            return "RNN_" + spec.nonlinearity.upper()
        return "RNN_CALLABLE"

    def flatten_parameters(self) -> None:
        """Does nothing; kept so code written for torch.nn runs unchanged."""

    def check_input(self, input: Tensor, batch_sizes: Tensor | None) -> None:
        """torch.nn's check of a batched (3-D) input, or of a PackedSequence's 2-D data.

        Raises:
            ValueError: its dtype is not the weights' (outside autocast).
            RuntimeError: the wrong number of dimensions or features (torch.nn's types).
        """
        weight = getattr(self, self._flat_weights_names[0])
        if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(
                f"input has dtype {input.dtype} but the weights have dtype {weight.dtype}; "
                "convert one with .to()"
            )
        expected = 2 if batch_sizes is not None else 3
        if input.dim() != expected:
            raise RuntimeError(f"input must have {expected} dimensions, got {input.dim()}")
        if input.size(-1) != self.input_size:
            raise RuntimeError(
                f"input must have {self.input_size} features (input_size), got {input.size(-1)}"
            )

    def get_expected_hidden_size(
        self, input: Tensor, batch_sizes: Tensor | None
    ) -> tuple[int, int, int]:
        """`(D*num_layers, N, H_out)`, the shape `h_0` must have for `input`."""
        if batch_sizes is not None:
            batch = int(batch_sizes[0])
        else:
            batch = input.size(0) if self.batch_first else input.size(1)
        return (self.num_layers * self.num_directions, batch, self.proj_size or self.hidden_size)

    def check_hidden_size(
        self,
        hx: Tensor,
        expected_hidden_size: tuple[int, int, int],
        msg: str = "Expected hidden size {}, got {}",
    ) -> None:
        """Raises RuntimeError(`msg` with the expected and the actual size) if they differ."""
        if hx.size() != expected_hidden_size:
            raise RuntimeError(msg.format(expected_hidden_size, list(hx.size())))

    def check_forward_args(
        self, input: Tensor, hidden: Tensor, batch_sizes: Tensor | None
    ) -> None:
        """`check_input`, then `check_hidden_size` of `hidden`."""
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden, self.get_expected_hidden_size(input, batch_sizes))

    def permute_hidden(self, hx: Tensor, permutation: Tensor | None) -> Tensor:
        """`hx` with its batch (dimension 1) reordered by `permutation`, if given."""
        if permutation is None:
            return hx
        return hx.index_select(1, permutation)

    def reset_parameters(self) -> None:
        """torch.nn's initialisation, in torch.nn's order: U(-1/sqrt(H), 1/sqrt(H)).

        A learnable initial state starts at zero, layer-norm gains at 1 and their biases at
        0; LSTM's `forget_bias` is then added to the forget-gate rows of every `bias_ih`.
        """
        bound = 1.0 / self.hidden_size**0.5
        for name, param in self.named_parameters():
            if name.startswith("initial_"):
                nn.init.zeros_(param)
            else:
                _regularize.init_parameter(name, param, bound)
        if getattr(self, "forget_bias", 0.0):
            for names in self._all_weights:
                bias_ih = next((getattr(self, n) for n in names if n.startswith("bias_ih")),
                               None)
                _regularize.add_forget_bias(bias_ih, self.hidden_size, self.forget_bias)

    @classmethod
    def from_weights(
        cls: type[_Layer],
        weight_ih: Tensor,
        weight_hh: Tensor,
        bias_ih: Tensor | None = None,
        bias_hh: Tensor | None = None,
        *,
        weight_hr: Tensor | None = None,
        initial_state: Tensor | tuple[Tensor, Tensor] | None = None,
        requires_grad: bool = True,
        **options: Any,
    ) -> _Layer:
        r"""A single-layer, unidirectional layer whose `*_l0` parameters are the given tensors.

        Sizes are read from the shapes: `weight_ih` `(G*H, H_in)`, `weight_hh`
        `(G*H, H_out)`, biases `(G*H,)` (G = 1, 3, 4 for RNN, GRU, LSTM), `weight_hr`
        `(P, H)` (LSTM projection). With one bias given, the other is a frozen zero.
        `initial_state` (`(H_out,)` or `(1, H_out)`; for LSTM a pair) becomes the
        learnable `initial_h` / `initial_c`. The tensors become the parameters without a
        copy; `requires_grad` says whether they train. `options` go to the constructor:
        `batch_first`, `backend`, `nonlinearity` (RNN), `reset_after` (GRU). See
        `rnnkit._from_weights.build` for the full rules.

        Raises:
            ValueError, TypeError: wrong shapes, ranks, dtypes or devices, naming expected
                and got; `num_layers`, `bidirectional` or `dropout` among `options`.
        """
        return _from_weights.build(
            cls, weight_ih, weight_hh, bias_ih, bias_hh, weight_hr, initial_state,
            requires_grad, options,
        )

    # forward ------------------------------------------------------------------------------

    def initial_state(self, batch_size: int | None) -> State:
        """The state a call starts from when `hx` is not given, as a tuple.

        `h` is `(D*num_layers, N, H_out)` (no `N` when `batch_size` is `None`), and
        for LSTM `c` is `(D*num_layers, N, H_cell)`: the learnable `initial_h` /
        `initial_c` broadcast over the batch, or zeros.
        """
        out_size = self.proj_size or self.hidden_size
        sizes = (out_size, self.hidden_size)[: self.spec.num_states]
        count = self.num_layers * self.num_directions
        return initial_state(self, (count,), batch_size, sizes)

    def _initial_states(
        self, hx: object, batch_size: int, batched: bool, reference: Tensor
    ) -> list[State]:
        """One state tuple per layer and direction, each `(B, H_out)` [and `(B, H)`]."""
        count = self.num_layers * self.num_directions
        out_size = self.proj_size or self.hidden_size
        sizes = [out_size, self.hidden_size][: self.spec.num_states]
        if hx is None:
            stacked = self.initial_state(batch_size)
        else:
            if self.spec.mode == "lstm":
                given = _checks.state_pair(hx)
                names = ["h_0", "c_0"]
            else:
                given, names = (hx,), ["h_0"]
            stacked = []
            for name, tensor, size in zip(names, given, sizes):
                expected = (count, batch_size, size) if batched else (count, size)
                if isinstance(tensor, Tensor) and tensor.dim() != len(expected):
                    kind = "batched 3-D" if batched else "unbatched 2-D"
                    raise ValueError(
                        f"for {kind} input, {name} must be {len(expected)}-D "
                        f"{expected}, got {tensor.dim()}-D {tuple(tensor.shape)}"
                    )
                _checks.state_tensor(name, tensor, expected, reference)
                stacked.append(tensor if batched else tensor.unsqueeze(1))
        return [tuple(s[i] for s in stacked) for i in range(count)]

    def sequence_masks(self, batch_size: int) -> dict[str, Tensor]:
        """Draw the per-sequence dropout masks of one training call on `batch_size` sequences.

        Keys `input_l{k}` (`input_dropout`, `(N, H_in)` of layer `k`'s input) and
        `hidden_l{k}` / `hidden_l{k}_reverse` (`recurrent_dropout`, `(N, H_out)`), each
        pre-scaled multipliers (0 or `1/(1-p)`), drawn in that order, layer by layer, on the
        CPU from torch's default generator (so `torch.manual_seed` reproduces them on every
        device and backend). Empty when both probabilities are 0. Pass the result as
        `forward(..., dropout_masks=)` to reuse the masks over several calls, as
        `rnnkit.Stateful` does across the chunks of a sequence.
        """
        reference = next(self.parameters())
        out_size = self.proj_size or self.hidden_size
        masks: dict[str, Tensor] = {}
        for layer in range(self.num_layers):
            features = self.input_size if layer == 0 else out_size * self.num_directions
            if self.input_dropout:
                masks[f"input_l{layer}"] = _regularize.dropout_mask(
                    (batch_size, features), self.input_dropout, reference)
            if self.recurrent_dropout:
                for direction in range(self.num_directions):
                    key = f"hidden_l{layer}" + ("_reverse" if direction else "")
                    masks[key] = _regularize.dropout_mask(
                        (batch_size, out_size), self.recurrent_dropout, reference)
        return masks

    def forward(self, input, hx=None, *, lengths=None, resets=None, mask=None,
                dropout_masks=None):
        """Run the layer over a batch of sequences.

        Shapes: `L` steps, `N` sequences, `H_in` = `input_size`, `D` = 2 if `bidirectional`
        else 1, `H_out` = `proj_size` if it is set (LSTM) else `hidden_size`, `H_cell` =
        `hidden_size`.

        Args:
            input: `(L, N, H_in)`, `(N, L, H_in)` with `batch_first`, unbatched
                `(L, H_in)`, or a PackedSequence.
            hx: initial state `(D*num_layers, N, H_out)` (unbatched: no `N`); for LSTM a
                pair `(h_0, c_0)` with `c_0` of size `H_cell`. Defaults to zeros, or to
                the learnable initial state.
            lengths: optional per-sequence lengths (1-D integer tensor on any device, or a
                list), in any order, each in `0..L`. Output past a sequence's length is zero
                and the final state is taken at its own last step; a sequence of length 0 has
                an all-zero output and its initial state as final state.
            resets: optional boolean `(L, N)` tensor (`(N, L)` with `batch_first`,
                `(L,)` unbatched), on any device: `resets[t, b]` true starts sequence
                `b` afresh at step `t` (an episode start). The result equals cutting each
                sequence at its reset points and running every segment on its own from the
                layer's initial state (zeros or the learnable one); `hx` applies to the
                first segment only, so `resets[0]` true ignores it for that sequence. Every
                layer and both directions reset; steps past `lengths` are ignored.
            mask: optional boolean tensor shaped like `resets`, holes allowed (Keras's
                `mask`): a false step is skipped, so the state carries over it unchanged, and
                its output is zero (with `zero_output_for_mask=False`, the carried `h`, as
                Keras repeats the last output). Combines with `lengths`; not with
                `resets` or a PackedSequence.
            dropout_masks: in training, the masks to use instead of fresh ones: a dict from
                `sequence_masks` (unbatched input: `N` = 1);
                it may also hold zoneout masks `zoneout_h_l{k}` `(L, N, H_out)` and (LSTM)
                `zoneout_c_l{k}` `(L, N, H)` (1 keeps the previous value), with `_reverse`
                for the reverse direction. Ignored in evaluation.

        Returns:
            `(output, h_n)`, or `(output, (h_n, c_n))` for LSTM. `output` has the
                layout of `input` with `D*H_out` features; a PackedSequence in gives one out.

        Raises:
            ValueError, TypeError: for input, state, lengths, resets or mask of the wrong kind
                or shape, and for mask with resets or a PackedSequence.
        """
        if lengths is None and resets is None and mask is None and dropout_masks is None:
            # One step without gradients runs compiled from packed weights (ops/cpu/stream.py).
            fast = stream.layer_step(self, input, hx)
            if fast is not None:
                return fast[0], from_states(fast[1])
        # Checks need only a dtype and device. Reading weight_ih_l0 here would compute it twice
        # when it is parametrized; forward computes each weight once, in _run_direction.
        reference = next(self.parameters())
        packed = input if isinstance(input, PackedSequence) else None
        if packed is not None:
            if lengths is not None:
                raise ValueError("lengths must not be given with a PackedSequence input")
            for name, given in (("resets", resets), ("mask", mask)):
                if given is not None:
                    raise ValueError(
                        f"{name} must not be given with a PackedSequence input; pass the "
                        "padded batch with lengths= instead"
                    )
            _checks.input_tensor(packed.data, reference, self.input_size, (2, 2), "input")
            # Runs in chunks over the sorted batch, in the block layout `(R, H_in)`.
            layout = _packed.PackedLayout(packed)
            x, seq_len, batch_size = layout.blocks(packed.data), layout.steps, layout.batch
            batched = True
        else:
            _checks.input_tensor(input, reference, self.input_size, (2, 3), "input")
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(1)
            else:
                x = input.transpose(0, 1) if self.batch_first else input
            seq_len, batch_size = x.shape[0], x.shape[1]
        if seq_len == 0:
            raise ValueError(f"input must have at least one time step, got shape {tuple(x.shape)}")
        empty = None
        if lengths is not None:
            # The kernels need at least one step: a sequence of length 0 runs one step that
            # is undone below (its state stays the initial state, its output zero).
            lengths, empty = _checks.lengths_with_empty(lengths, batch_size, seq_len, x.device)
        if resets is not None and mask is not None:
            raise ValueError(
                "resets and mask cannot be combined yet (a reset on a masked step has no "
                "defined meaning); give one of them"
            )
        if resets is not None:
            resets = _checks.per_step(
                "resets", resets, x.shape[:2], batched, self.batch_first, x.device
            )
        if mask is not None:
            mask = _checks.per_step("mask", mask, x.shape[:2], batched, self.batch_first,
                                    x.device)
        states = self._initial_states(hx, batch_size, batched, reference)
        masks = self._masks(dropout_masks, batch_size, seq_len)
        if packed is not None:  # states and masks are given in the caller's order
            states = [tuple(_packed.sorted_batch(s, packed) for s in st) for st in states]
            masks = {key: _packed.sorted_batch(mask, packed) for key, mask in masks.items()}
        directions = _reset_codes(resets, lengths, self.bidirectional)
        initial = self.initial_state(batch_size) if resets is not None else None

        finals: list[State] = []
        layer_input = x
        for layer in range(self.num_layers):
            input_mask = masks.get(f"input_l{layer}")
            if input_mask is not None:  # variational input dropout: one mask for all steps
                if packed is not None:
                    input_mask = layout.per_row(input_mask)
                layer_input = layer_input * input_mask
            outputs = []
            for direction in range(self.num_directions):
                index = layer * self.num_directions + direction
                reset_state = None if initial is None else tuple(s[index] for s in initial)
                if packed is None:
                    output, final = self._run_direction(
                        layer_input, states[index], layer, direction, lengths,
                        directions[direction], reset_state, mask, masks,
                    )
                else:
                    output, final = self._run_packed_direction(
                        layout, layer_input, states[index], layer, direction, masks)
                outputs.append(output)
                finals.append(final)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        output = layer_input

        final_states = tuple(
            torch.stack([f[i] for f in finals]) for i in range(self.spec.num_states)
        )
        if empty is not None:
            rows = empty.view(1, -1, 1)
            if self.zero_output_for_mask:
                skipped = torch.zeros_like(output)
            else:  # every step of an empty sequence repeats the last layer's initial h
                last = range((self.num_layers - 1) * self.num_directions, len(states))
                skipped = torch.cat([states[i][0] for i in last], -1).to(output.dtype)
            output = torch.where(rows, skipped, output)
            final_states = tuple(
                torch.where(rows, torch.stack([s[i] for s in states]).to(final.dtype), final)
                for i, final in enumerate(final_states)
            )
        if packed is not None:
            output = PackedSequence(layout.packed_data(output), packed.batch_sizes,
                                    packed.sorted_indices, packed.unsorted_indices)
            final_states = tuple(_packed.caller_order(s, packed) for s in final_states)
        elif not batched:
            output = output.squeeze(1)
            final_states = tuple(s.squeeze(1) for s in final_states)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, from_states(final_states)

    def _run_direction(
        self,
        layer_input: Tensor,
        state: State,
        layer: int,
        direction: int,
        lengths: Tensor | None,
        resets: Tensor | None,
        reset_state: State | None,
        mask: Tensor | None,
        masks: dict[str, Tensor],
    ) -> tuple[Tensor, State]:
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        # Read each weight once: a parametrized weight is computed on every access.
        weight = {
            name: getattr(self, name + suffix, None)
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
        }
        norm_ih, norm_hh, norm_cell = _regularize.norms(self, suffix, self.spec)
        return dispatch.run(
            Call(
                spec=self.spec,
                state=state,
                weight_hh=weight["weight_hh"],
                bias_hh=weight["bias_hh"],
                weight_hr=weight["weight_hr"],
                input=layer_input,
                weight_ih=weight["weight_ih"],
                bias_ih=weight["bias_ih"],
                lengths=lengths,
                reverse=bool(direction),
                resets=resets,
                reset_state=reset_state,
                mask=mask,
                carry_masked_output=not self.zero_output_for_mask,
                hidden_dropout=masks.get("hidden" + suffix),
                zoneout_h=masks.get("zoneout_h" + suffix),
                zoneout_c=masks.get("zoneout_c" + suffix),
                norm_ih=norm_ih,
                norm_hh=norm_hh,
                norm_cell=norm_cell,
                backend=self.backend,
            )
        )

    def _run_packed_direction(
        self,
        layout: _packed.PackedLayout,
        layer_input: Tensor,
        state: State,
        layer: int,
        direction: int,
        masks: dict[str, Tensor],
    ) -> tuple[Tensor, State]:
        """`_run_direction` over a PackedSequence's block layout, chunk by chunk."""

        def run(chunk: Tensor, start: State, lengths: Tensor | None, steps: slice,
                width: int) -> tuple[Tensor, State]:
            # Per-sequence masks keep the chunk's rows; zoneout's, its steps too.
            chunk_masks = {key: mask[steps, :width] if key.startswith("zoneout") else
                           mask[:width] for key, mask in masks.items()}
            return self._run_direction(chunk, start, layer, direction, lengths, None, None,
                                       None, chunk_masks)

        return _packed.run_chunked(layout, run, layer_input, state, bool(direction))

    def _masks(
        self, given: dict[str, Tensor] | None, batch_size: int, seq_len: int
    ) -> dict[str, Tensor]:
        """This call's dropout and zoneout masks: none in evaluation; else `given`, with
        whatever it lacks drawn fresh (zoneout: one mask per step, layer-direction and state,
        drawn after the per-sequence masks).

        Raises:
            TypeError, ValueError: `given` is not a dict of tensors of the expected shapes.
        """
        if not self.training:
            return {}
        if given is not None and not isinstance(given, dict):
            raise TypeError("dropout_masks must be a dict from sequence_masks(), got "
                            f"{type(given).__name__}")
        expected = self._mask_shapes(batch_size, seq_len)
        given = dict(given or {})
        for key, tensor in given.items():
            if key not in expected:
                raise ValueError(f"dropout_masks has no use for {key!r} in this layer; "
                                 f"expected keys among {sorted(expected)}")
            if not isinstance(tensor, Tensor) or tuple(tensor.shape) != expected[key]:
                got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor)
                raise ValueError(f"dropout_masks[{key!r}] must be a tensor of shape "
                                 f"{expected[key]}, got {got}")
        masks = given
        if any(k not in given for k in expected if not k.startswith("zoneout")):
            masks = {**self.sequence_masks(batch_size), **given}
        reference = next(self.parameters())
        for key, shape in expected.items():
            if key.startswith("zoneout") and key not in masks:
                masks[key] = _regularize.zoneout_mask(shape, self.spec.zoneout, reference)
        return _regularize.refuse_export(masks)

    def _mask_shapes(self, batch_size: int, seq_len: int) -> dict[str, tuple[int, ...]]:
        """Every mask a training call uses, by key, with its shape."""
        out_size = self.proj_size or self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in range(self.num_layers):
            features = self.input_size if layer == 0 else out_size * self.num_directions
            if self.input_dropout:
                shapes[f"input_l{layer}"] = (batch_size, features)
            for direction in range(self.num_directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                if self.recurrent_dropout:
                    shapes["hidden" + suffix] = (batch_size, out_size)
                if self.spec.zoneout:
                    shapes["zoneout_h" + suffix] = (seq_len, batch_size, out_size)
                    if self.spec.mode == "lstm":
                        shapes["zoneout_c" + suffix] = (seq_len, batch_size, self.hidden_size)
        return shapes

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "proj_size": 0,
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
            "learn_initial_state": False,
            "zero_output_for_mask": True,
            "recurrent_dropout": 0.0,
            "input_dropout": 0.0,
            "forget_bias": 0.0,
        }
        for name, default in defaults.items():
            if getattr(self, name) != default:
                text += f", {name}={getattr(self, name)}"
        return text


class RNN(RecurrentLayer):
    r"""An Elman RNN, $h_t = \sigma(W_{ih} x_t + b_{ih} + W_{hh} h_{t-1} + b_{hh})$.

    Arguments, parameters (`weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`,
    `bias_hh_l{k}`, with `_reverse` for the second direction) and shapes are torch.nn.RNN's;
    `nonlinearity` may be any activation, and the keyword-only arguments are rnnkit's own.
    Call it as described under [`forward`][rnnkit.RNN.forward].

    Args:
        input_size: the number of features `H_in` of each input step.
        hidden_size: the number of features `H` of the hidden state.
        num_layers: how many layers are stacked; layer `k > 0` reads the output of layer
            `k - 1`.
        nonlinearity: `'tanh'`, `'relu'`, another name of
            [`ACTIVATIONS`][rnnkit.activations.ACTIVATIONS], or any elementwise callable (as
            MLX allows).
        bias: if `False`, the layers have no `bias_ih_l{k}` and `bias_hh_l{k}`.
        batch_first: if `True`, `input` and `output` are `(N, L, H)` instead of `(L, N, H)`;
            the states keep `(D*num_layers, N, H)`.
        dropout: the probability of dropout on the output of every layer but the last, in
            training mode.
        bidirectional: if `True`, each layer also runs in reverse (`D = 2`) and its output
            concatenates both directions.
        device: where the parameters are created.
        dtype: the parameters' floating-point (or complex) dtype.
        proj_size: must be 0; only [`LSTM`][rnnkit.LSTM] has a projection (accepted for
            code that passes torch's arguments by name).
        learn_initial_state: add a trainable `initial_h` of shape `(D*num_layers, H)`, used
            when `hx` is not given.
        backend: `None` reads `RNNKIT_BACKEND` (unset: `"auto"`); `"auto"` takes the first
            registered backend that serves the call, `"reference"` the plain PyTorch path,
            `"cpu"` or `"triton"` that fused kernel (falling back to the reference path with a
            warning when it cannot serve a call).
        zero_output_for_mask: with `mask=` in [`forward`][rnnkit.RNN.forward], `True` makes
            the output of a skipped step zero; `False` repeats the carried `h` there, as
            Keras does.
        recurrent_dropout: as for [`GRU`][rnnkit.GRU] (see the regularization guide).
        input_dropout: as for [`GRU`][rnnkit.GRU].
        zoneout: as for [`GRU`][rnnkit.GRU]. `layer_norm=True` is refused (ValueError).
    """

    cell_kind = "rnn"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: Activation = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        proj_size: int = 0,
        learn_initial_state: bool = False,
        backend: str | None = None,
        zero_output_for_mask: bool = True,
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
            hidden_size, num_layers, bias, batch_first, dropout, bidirectional, proj_size,
            device, dtype, learn_initial_state=learn_initial_state, backend=backend,
            zero_output_for_mask=zero_output_for_mask, recurrent_dropout=recurrent_dropout,
            input_dropout=input_dropout,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr() + nonlinearity_repr(self.nonlinearity)
        return text + (f", zoneout={self.spec.zoneout}" if self.spec.zoneout else "")


class GRU(RecurrentLayer):
    r"""A multi-layer GRU with torch.nn.GRU's arguments, parameters and shapes.

    See [`rnnkit.cells.gru_step`][] for the equations. The keyword-only arguments are
    rnnkit's own. Call it as described under [`forward`][rnnkit.GRU.forward].

    Args:
        input_size: the number of features `H_in` of each input step.
        hidden_size: the number of features `H` of the hidden state.
        num_layers: how many layers are stacked; layer `k > 0` reads the output of layer
            `k - 1`.
        bias: if `False`, the layers have no `bias_ih_l{k}` and `bias_hh_l{k}`.
        batch_first: if `True`, `input` and `output` are `(N, L, H)` instead of `(L, N, H)`;
            the states keep `(D*num_layers, N, H)`.
        dropout: the probability of dropout on the output of every layer but the last, in
            training mode.
        bidirectional: if `True`, each layer also runs in reverse (`D = 2`) and its output
            concatenates both directions.
        device: where the parameters are created.
        dtype: the parameters' floating-point (or complex) dtype.
        proj_size: must be 0; only [`LSTM`][rnnkit.LSTM] has a projection.
        reset_after: `True` (torch, cuDNN, MLX, Keras) applies the reset gate after the
            recurrent matmul; `False` (Cho et al. 2014, Keras `reset_after=False`, Flux's
            GRUv3) before it.
        learn_initial_state: add a trainable `initial_h` of shape `(D*num_layers, H)`, used
            when `hx` is not given.
        backend: `None` reads `RNNKIT_BACKEND` (unset: `"auto"`); `"auto"` takes the first
            registered backend that serves the call, `"reference"` the plain PyTorch path,
            `"cpu"` or `"triton"` that fused kernel (falling back to the reference path with a
            warning when it cannot serve a call).
        zero_output_for_mask: with `mask=` in [`forward`][rnnkit.GRU.forward], `True` makes
            the output of a skipped step zero; `False` repeats the carried `h` there, as
            Keras does.
        activation: the candidate activation $\phi$ (Keras's `activation`): a name of the
            activation table or, on the reference path, a callable. Default `'tanh'`.
        recurrent_activation: the gate activation $\sigma$ of $r$ and $z$ (Keras's
            `recurrent_activation`, e.g. `'hard_sigmoid'`). Default `'sigmoid'`.
        recurrent_dropout: $p$ of variational recurrent dropout (Gal & Ghahramani 2016):
            in training, `h` is multiplied by one mask per sequence and layer-direction,
            fixed over the steps, where it enters the recurrent product (scaled by
            $1/(1-p)$); the carried state and the output are not dropped.
        input_dropout: $p$ of variational input dropout: in training, each layer's input
            is multiplied by one mask per sequence, fixed over the steps (`dropout` keeps
            torch's meaning, fresh dropout between layers).
        zoneout: $p$ of zoneout (Krueger et al. 2016): in training each unit of `h` keeps
            its previous value with probability $p$ at each step, $h_t = m \odot h_{t-1} +
            (1 - m) \odot \tilde h_t$ with a fresh mask $m$ per step; in evaluation
            $h_t = p\, h_{t-1} + (1 - p)\, \tilde h_t$ (haste's rule).
        layer_norm: layer-normalize the gate products (Ba et al. 2016; haste's
            `LayerNormGRU`): $\mathrm{LN}(W_{ih} x)\gamma_x + \beta_x + b_{ih}$ and
            $\mathrm{LN}(W_{hh} h)\gamma_h + \beta_h + b_{hh}$, each over the whole $3H$
            gate vector with $\epsilon = 10^{-5}$, with parameters
            `layer_norm_ih_weight_l{k}`, `layer_norm_ih_bias_l{k}`,
            `layer_norm_hh_weight_l{k}`, `layer_norm_hh_bias_l{k}` (gains start at 1,
            biases at 0; `_reverse` for the reverse direction). Reset-after only
            (ValueError with `reset_after=False`).

    Raises:
        ValueError, TypeError: a probability outside $[0, 1)$, an unknown activation name,
            `layer_norm` with `reset_after=False`.
    """

    cell_kind = "gru"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
        *,
        proj_size: int = 0,
        reset_after: bool = True,
        learn_initial_state: bool = False,
        backend: str | None = None,
        zero_output_for_mask: bool = True,
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
            spec, input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, proj_size, device, dtype,
            learn_initial_state=learn_initial_state, backend=backend,
            zero_output_for_mask=zero_output_for_mask, recurrent_dropout=recurrent_dropout,
            input_dropout=input_dropout,
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        text = text if self.reset_after else text + ", reset_after=False"
        return text + _regularize.spec_repr(self.spec)


class LSTM(RecurrentLayer):
    r"""A multi-layer LSTM with torch.nn.LSTM's arguments, parameters and shapes.

    See [`rnnkit.cells.lstm_step`][] for the equations. `proj_size > 0` adds
    `weight_hr_l{k}` and makes `h` of size `proj_size`.

    Call it as described under [`forward`][rnnkit.LSTM.forward]; `hx` and the final state
    are pairs `(h, c)`.

    Args:
        input_size: the number of features `H_in` of each input step.
        hidden_size: the number of features `H` of the cell state `c` (`H_cell`), and of `h`
            unless `proj_size > 0`.
        num_layers: how many layers are stacked; layer `k > 0` reads the output of layer
            `k - 1`.
        bias: if `False`, the layers have no `bias_ih_l{k}` and `bias_hh_l{k}`.
        batch_first: if `True`, `input` and `output` are `(N, L, H)` instead of `(L, N, H)`;
            the states keep `(D*num_layers, N, H)`.
        dropout: the probability of dropout on the output of every layer but the last, in
            training mode.
        bidirectional: if `True`, each layer also runs in reverse (`D = 2`) and its output
            concatenates both directions.
        device: where the parameters are created.
        dtype: the parameters' floating-point (or complex) dtype.
        proj_size: if `> 0`, `h` is projected to this size (`H_out = proj_size`) by
            `weight_hr_l{k}` of shape `(proj_size, hidden_size)`; must be below
            `hidden_size`.
        learn_initial_state: add trainable `initial_h` `(D*num_layers, H_out)` and
            `initial_c` `(D*num_layers, H_cell)`, used when `hx` is not given.
        backend: `None` reads `RNNKIT_BACKEND` (unset: `"auto"`); `"auto"` takes the first
            registered backend that serves the call, `"reference"` the plain PyTorch path,
            `"cpu"` or `"triton"` that fused kernel (falling back to the reference path with a
            warning when it cannot serve a call).
        zero_output_for_mask: with `mask=` in [`forward`][rnnkit.LSTM.forward], `True` makes
            the output of a skipped step zero; `False` repeats the carried `h` there, as
            Keras does.
        activation: $\phi$, the cell-input and cell-output activation (Keras's
            `activation`), default `'tanh'`. A name of the activation table, or a
            callable on the reference path.
        recurrent_activation: $\sigma$ of the $i, f, o$ gates, default `'sigmoid'`.
        recurrent_dropout: as for [`GRU`][rnnkit.GRU].
        input_dropout: as for [`GRU`][rnnkit.GRU].
        zoneout: as for [`GRU`][rnnkit.GRU], applied to both `h` and `c` with independent
            masks (Krueger et al. 2016).
        layer_norm: haste's `LayerNormLSTM` (Ba et al. 2016): with $a = \mathrm{LN}(W_{ih}
            x)\gamma_x + \beta_x + \mathrm{LN}(W_{hh} h)\gamma_h + \beta_h + b_{ih} +
            b_{hh}$ split into $i, f, g, o$, $c' = \sigma(f) \odot c + \sigma(i) \odot
            \phi(g)$ and $h' = \sigma(o) \odot \phi(\mathrm{LN}(c')\gamma_c +
            \beta_c)$; `c'` is carried unnormalized. Each norm has $\epsilon = 10^{-5}$;
            parameters as for [`GRU`][rnnkit.GRU] plus `layer_norm_cell_weight_l{k}` and
            `layer_norm_cell_bias_l{k}` of size `H`.
        forget_bias: added to the forget-gate rows of every `bias_ih_l{k}` at
            initialisation (Keras's `unit_forget_bias=True` is `forget_bias=1.0`). It is part
            of the initial values only: loading a state_dict (torch.nn's included) replaces
            it with the loaded biases.

    Raises:
        ValueError, TypeError: a probability outside $[0, 1)$, an unknown activation name,
            `forget_bias` with `bias=False`.
    """

    cell_kind = "lstm"

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        *,
        learn_initial_state: bool = False,
        backend: str | None = None,
        zero_output_for_mask: bool = True,
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
            spec, input_size, hidden_size, num_layers, bias, batch_first,
            dropout, bidirectional, proj_size, device, dtype,
            learn_initial_state=learn_initial_state, backend=backend,
            zero_output_for_mask=zero_output_for_mask, recurrent_dropout=recurrent_dropout,
            input_dropout=input_dropout, forget_bias=forget_bias,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + _regularize.spec_repr(self.spec)

    def get_expected_cell_size(
        self, input: Tensor, batch_sizes: Tensor | None
    ) -> tuple[int, int, int]:
        """`(D*num_layers, N, H_cell)`, the shape `c_0` must have for `input`."""
        layers, batch, _ = self.get_expected_hidden_size(input, batch_sizes)
        return (layers, batch, self.hidden_size)

    def check_forward_args(  # type: ignore[override]
        self, input: Tensor, hidden: tuple[Tensor, Tensor], batch_sizes: Tensor | None
    ) -> None:
        """`check_input`, then the sizes of `h_0` and `c_0` (RuntimeError)."""
        self.check_input(input, batch_sizes)
        self.check_hidden_size(
            hidden[0], self.get_expected_hidden_size(input, batch_sizes),
            "Expected hidden[0] size {}, got {}",
        )
        self.check_hidden_size(
            hidden[1], self.get_expected_cell_size(input, batch_sizes),
            "Expected hidden[1] size {}, got {}",
        )

    def permute_hidden(  # type: ignore[override]
        self, hx: tuple[Tensor, Tensor], permutation: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Both states with their batch (dimension 1) reordered by `permutation`."""
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)
