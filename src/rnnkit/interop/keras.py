r"""Conversion between Keras 3's `SimpleRNN`/`GRU`/`LSTM` and rnnkit layers.

Keras keeps `kernel` (D, G*H) and `recurrent_kernel` (H, G*H), the transposes of torch's
`weight_ih`/`weight_hh`. Gate orders: LSTM (i, f, c, o) is torch's; GRU is (z, r, h) where
torch has (r, z, n). Biases (rnnkit names on the right):

- `SimpleRNN`, `LSTM`: one `bias` = `bias_ih_l0 + bias_hh_l0`.
- `GRU(reset_after=True)`: `bias` (2, 3H) = (`bias_ih_l0`, `bias_hh_l0`), reordered.
- `GRU(reset_after=False)`: one input `bias` (3H). rnnkit's `b_hn` is added after
  `W_hn (r * h)`, outside the reset product, so it folds into the input bias exactly.

Two directions: a `Bidirectional` (`merge_mode="concat"`) is an rnnkit layer with
`bidirectional=True`; its forward layer's weights are the `*_l0` parameters, its backward
layer's the `*_l0_reverse` ones. A layer with `go_backwards=True` is a `GoBackwards`
around the rnnkit layer.

Options: `activation` and `recurrent_activation` (any name of the activation table, Keras's
`hard_sigmoid` included), `recurrent_dropout`, `dropout` (rnnkit's `input_dropout`, one mask
per sequence on the layer's input) and LSTM's `unit_forget_bias` (`forget_bias=1.0`) convert
both ways. In evaluation the result is exact. In training Keras 3 draws one dropout mask per
gate (its `implementation=1`, which `recurrent_dropout` forces), rnnkit one mask for all gates:
the same distribution of each unit's drop, not the same draws (with all of Keras's per-gate
masks set equal, the two agree exactly).

Keras is imported on first use; if `KERAS_BACKEND` is unset then, it is set to `"torch"`.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnkit import _checks
from rnnkit.interop._common import (
    as_rnnkit_layer,
    check_single_layer,
    load_weights,
    reorder_gates,
    to_numpy,
    torch_dtype,
)
from rnnkit.layers import GRU, LSTM, RNN, RecurrentLayer
from rnnkit.ops.activations import TABLE

# Keras GRU gates (z, r, h) <-> torch (r, z, n): the permutation is its own inverse.
_GRU_ORDER = [1, 0, 2]

_ACTIVATION_NAMES = {row.name: row.keras for row in TABLE}
# Options that would change the math; to_keras sets them itself.
_RESERVED = {
    "units", "activation", "recurrent_activation", "use_bias", "reset_after", "go_backwards",
    "unit_forget_bias", "dropout", "recurrent_dropout", "zero_output_for_mask",
}


def _import_keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:
        raise ImportError(
            "Keras conversion needs Keras 3 (pip install 'rnnkit[keras]') and a working "
            "backend; rnnkit sets KERAS_BACKEND=torch when it is unset"
        ) from error
    return keras


def _activation_from_keras(keras, fn, what: str) -> str:
    for ours, theirs in _ACTIVATION_NAMES.items():
        if fn is keras.activations.get(theirs):
            return ours
    name = getattr(fn, "__name__", repr(fn))
    raise ValueError(
        f"{what} {name!r} has no rnnkit equivalent; known: "
        f"{sorted(_ACTIVATION_NAMES.values())}"
    )


class GoBackwards(nn.Module):
    r"""An rnnkit layer run as Keras runs one built with `go_backwards=True`.

    The layer reads each sequence from its last step to its first, and the output keeps that
    reversed order: `output[:, t]` (batch-first) is the output after reading steps
    `L-1, ..., L-1-t`, and the final state is the one after step 0. This is Keras's
    `layer(x)` for `go_backwards=True, return_sequences=True`, and the same as running
    `layer` on `x.flip(1)`.

    With `lengths=` (Keras's mask of right-padded sequences) it follows Keras, which reverses
    the whole padded sequence: a sequence of length `l` meets its `L - l` padding steps
    first, which keep the initial state and output zeros, and its own outputs are the last
    `l`, `output[:, L-l:]`. Its final state is the one after its step 0.

    Args:
        layer: a one-direction rnnkit RNN, GRU or LSTM. Its `batch_first` gives the layout;
            `from_keras` builds it batch-first, as Keras is.

    Raises:
        TypeError: `layer` is not an rnnkit RNN, GRU or LSTM.
        ValueError: `layer` is bidirectional.
    """

    def __init__(self, layer: RecurrentLayer) -> None:
        super().__init__()
        if not isinstance(layer, (RNN, GRU, LSTM)):
            raise TypeError(
                f"GoBackwards wraps an rnnkit RNN, GRU or LSTM layer, got {type(layer).__name__}"
            )
        if layer.bidirectional:
            raise ValueError(
                "GoBackwards wraps a one-direction layer; a bidirectional one already reads the "
                "sequence both ways (Keras's form of it is Bidirectional, not go_backwards)"
            )
        self.layer = layer

    def forward(self, input: Tensor, hx=None, *, lengths=None):
        """Run the layer from the last step to the first.

        Args:
            input: `(N, L, H_in)` with the layer's `batch_first`, `(L, N, H_in)`
                without, or unbatched `(L, H_in)`.
            hx: the initial state, as for the layer.
            lengths: optional valid steps per sequence (`0..L`); the steps past a length
                are right padding.

        Returns:
            `(output, h_n)`, or `(output, (h_n, c_n))` for LSTM, as the layer returns them,
                with `output` in the reversed time order described above.

        Raises:
            TypeError: `input` is a PackedSequence (its layout has no place for Keras's
                reversed order; pass the padded batch with `lengths=`).
            ValueError, TypeError: bad input, state or lengths, as the layer's `forward`.
        """
        layer = self.layer
        if isinstance(input, PackedSequence):
            raise TypeError(
                "GoBackwards takes a padded tensor, not a PackedSequence: Keras's reversed "
                "output order has no packed layout; pass the padded batch and lengths="
            )
        reference = next(layer.parameters())
        _checks.input_tensor(input, reference, layer.input_size, (2, 3), "input")
        batched = input.dim() == 3
        time = 1 if batched and layer.batch_first else 0
        if lengths is None:
            return layer(input.flip(time), hx)
        batch = input.shape[1 - time] if batched else 1
        lengths = _checks.lengths(lengths, batch, input.shape[time], input.device, minimum=0)
        # Each sequence reversed within its length, run forward over its own steps, and put
        # back after its padding, where Keras's reversal of the padded whole leaves it.
        output, state = layer(_reverse_within(input, lengths, time), hx, lengths=lengths)
        # Keras reads the padding first, before any output exists, so it outputs zeros there
        # even with zero_output_for_mask=False (the layer itself repeats its carried h).
        padding = torch.arange(input.shape[time], device=output.device) >= lengths[:, None]
        padding = padding if time == 1 or not batched else padding.T
        output = output.masked_fill(padding.reshape(output.shape[:-1]).unsqueeze(-1), 0)
        return _reverse_within(output, lengths, time).flip(time), state


def _reverse_within(tensor: Tensor, lengths: Tensor, time: int) -> Tensor:
    """`tensor` with each sequence's first `length` steps reversed, the rest in place."""
    steps = torch.arange(tensor.shape[time], device=tensor.device)[:, None]
    lengths = lengths.to(tensor.device)
    order = torch.where(steps < lengths, lengths - 1 - steps, steps)  # (L, N)
    if tensor.dim() == 2:
        order = order[:, 0]
    elif time == 1:
        order = order.t()
    return tensor.gather(time, order.unsqueeze(-1).expand_as(tensor))


def _rnnkit_class(keras, layer) -> type[RecurrentLayer] | None:
    for name, cls in (("LSTM", LSTM), ("GRU", GRU), ("SimpleRNN", RNN)):
        if isinstance(layer, getattr(keras.layers, name)):
            return cls
    return None


def _options(keras, layer, cls: type[RecurrentLayer], stacklevel: int) -> dict:
    """The rnnkit constructor options a built Keras layer of class `cls` stands for."""
    kind = type(layer).__name__
    if not layer.built:
        raise ValueError(
            f"the Keras {kind} is not built and has no weights yet; call it once or "
            "layer.build((None, None, input_size)) first"
        )
    cell = layer.cell
    # Keras's own default is False (a masked step repeats the last output); carry it so that
    # mask= gives Keras's outputs.
    options: dict = {"bias": bool(cell.use_bias),
                     "zero_output_for_mask": bool(layer.zero_output_for_mask)}
    if cls is RNN:
        options["nonlinearity"] = _activation_from_keras(keras, cell.activation, "activation")
    else:
        options["activation"] = _activation_from_keras(keras, cell.activation, "activation")
        options["recurrent_activation"] = _activation_from_keras(
            keras, cell.recurrent_activation, "recurrent_activation")
    if cls is GRU:
        options["reset_after"] = bool(cell.reset_after)
    if cls is LSTM and cell.use_bias and cell.unit_forget_bias:
        options["forget_bias"] = 1.0
    for theirs, ours in (("dropout", "input_dropout"), ("recurrent_dropout",
                                                         "recurrent_dropout")):
        value = float(getattr(cell, theirs))
        if value >= 1:
            raise ValueError(f"the Keras {kind}'s {theirs}={value} drops every unit; rnnkit's "
                             f"{ours} takes a probability in [0, 1)")
        if value:
            options[ours] = value
    return options


def _values(layer, module: RecurrentLayer, suffix: str) -> dict:
    """The rnnkit parameters `*{suffix}` (e.g. `_l0`) holding a Keras layer's weights."""
    cell = layer.cell
    weights = layer.get_weights()
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if cell.use_bias else None
    order = _GRU_ORDER if isinstance(module, GRU) else list(range(module.spec.num_gates))
    values = {
        "weight_ih" + suffix: reorder_gates(kernel.T, order),
        "weight_hh" + suffix: reorder_gates(recurrent.T, order),
    }
    if bias is not None:
        if isinstance(module, GRU) and cell.reset_after:
            values["bias_ih" + suffix] = reorder_gates(bias[0], order)
            values["bias_hh" + suffix] = reorder_gates(bias[1], order)
        else:
            values["bias_ih" + suffix] = reorder_gates(bias, order)
            values["bias_hh" + suffix] = None
    return values


def from_keras(layer, *, backend: str | None = None) -> RecurrentLayer | GoBackwards:
    """An rnnkit layer equal to a built Keras 3 `SimpleRNN`, `GRU` or `LSTM`, or to a
    `Bidirectional` around one.

    The result has `batch_first=True` and the Keras weights' dtype. For the same input and
    initial state its output equals Keras's with `return_sequences=True`:
    `out, h_n = from_keras(layer)(x, h0[None])` gives `layer(x, initial_state=[h0])`,
    and `lengths=` gives what Keras gives for the mask of right-padded sequences. A `GRU`
    keeps its `reset_after`; `activation`, `recurrent_activation`, `dropout` (as
    `input_dropout`), `recurrent_dropout` and `unit_forget_bias` (as `forget_bias=1.0`)
    carry over (see the module docstring for dropout in training).

    - `go_backwards=True` gives a `GoBackwards` around the rnnkit layer: it reads
      the sequence from its end and returns the output in that order, as Keras does.
    - `Bidirectional(..., merge_mode="concat")` gives a layer with `bidirectional=True`.
      Keras's `initial_state=[h_f, c_f, h_b, c_b]` is rnnkit's
      `hx=(stack([h_f, h_b]), stack([c_f, c_b]))`, and Keras's final states
      `h_f, c_f, h_b, c_b` are `h_n[0], c_n[0], h_n[1], c_n[1]`.

    Raises:
        TypeError: `layer` is not one of those Keras layers (a `Bidirectional` around
            another layer included).
        ValueError: it is not built, uses an activation rnnkit does not have, a dropout of
            1, or is a
            `Bidirectional` rnnkit cannot express: a `merge_mode` other than
            `"concat"`, a forward layer that goes backwards, or two directions that differ
            in class, size or options.
    """
    keras = _import_keras()
    if isinstance(layer, keras.layers.Bidirectional):
        return _from_bidirectional(keras, layer, backend)
    cls = _rnnkit_class(keras, layer)
    if cls is None:
        raise TypeError(
            "from_keras takes a Keras SimpleRNN, GRU or LSTM layer, or a Bidirectional around "
            f"one, got {type(layer).__name__}"
        )
    options = _options(keras, layer, cls, stacklevel=3)
    kernel = layer.get_weights()[0]
    module = cls(kernel.shape[0], layer.cell.units, batch_first=True,
                 dtype=torch_dtype(kernel.dtype), backend=backend, **options)
    load_weights(module, _values(layer, module, "_l0"))
    return GoBackwards(module) if layer.go_backwards else module


def _from_bidirectional(keras, wrapper, backend: str | None) -> RecurrentLayer:
    if wrapper.merge_mode != "concat":
        raise ValueError(
            f"a Keras Bidirectional with merge_mode={wrapper.merge_mode!r} cannot be converted: "
            "an rnnkit bidirectional layer returns the two directions concatenated "
            "(merge_mode='concat'); convert one with merge_mode='concat' and combine the halves "
            "output[..., :H] and output[..., H:] yourself"
        )
    forward, backward = wrapper.forward_layer, wrapper.backward_layer
    cls = _rnnkit_class(keras, forward)
    if cls is None or _rnnkit_class(keras, backward) is not cls:
        raise TypeError(
            "from_keras takes a Bidirectional around a Keras SimpleRNN, GRU or LSTM (the same "
            f"for both directions), got {type(forward).__name__} and {type(backward).__name__}"
        )
    if forward.go_backwards or not backward.go_backwards:
        raise ValueError(
            "a Keras Bidirectional whose forward layer has go_backwards=True (and backward "
            "layer go_backwards=False) cannot be converted: an rnnkit bidirectional layer runs "
            "its first direction forward in time and its second backward"
        )
    described = []
    for part in (forward, backward):
        options = _options(keras, part, cls, stacklevel=4)
        kernel = part.get_weights()[0]
        described.append({"input_size": kernel.shape[0], "units": part.cell.units,
                          "dtype": str(kernel.dtype), **options})
    if described[0] != described[1]:
        raise ValueError(
            f"an rnnkit bidirectional {cls.__name__} has one configuration for both directions, "
            f"but the Keras Bidirectional's differ: forward {described[0]}, backward "
            f"{described[1]}"
        )
    options = described[0]
    input_size, units, dtype = (options.pop(k) for k in ("input_size", "units", "dtype"))
    module = cls(input_size, units, bidirectional=True, batch_first=True,
                 dtype=torch_dtype(dtype), backend=backend, **options)
    load_weights(module, {**_values(forward, module, "_l0"),
                          **_values(backward, module, "_l0_reverse")})
    return module


def _build_without_initializers(keras, layer, input_shape: tuple) -> None:
    """Build `layer` with zeros for every weight, keeping its initializers in its config.

    The caller overwrites every weight, and Keras's default orthogonal recurrent initializer
    needs a QR factorisation that torch has no float16/bfloat16 kernel for (Keras's torch
    backend then fails with `"geqrf_cpu" not implemented for 'Half'`).
    """
    cell = layer.cell
    names = ("kernel_initializer", "recurrent_initializer", "bias_initializer")
    kept = {name: getattr(cell, name) for name in names}
    try:
        for name in names:
            setattr(cell, name, keras.initializers.Zeros())
        layer.build(input_shape)
    finally:
        for name, initializer in kept.items():
            setattr(cell, name, initializer)


def to_keras(
    module: RecurrentLayer | GoBackwards, *, batch_size: int | None = None, **layer_options
):
    """A built Keras 3 layer equal to a one-layer rnnkit layer (a torch.nn layer is accepted
    too): a `SimpleRNN`, `GRU` or `LSTM`, or a `Bidirectional` around one.

    The Keras layer has `return_sequences=True` (its output is the whole sequence, as
    rnnkit's) and the module's dtype, float16 and bfloat16 included. Keras takes batch-major
    `(N, L, D)` input whatever `batch_first` says.

    - A bidirectional layer gives `Bidirectional(layer, merge_mode="concat")`: the
      `*_l0` weights go to its `forward_layer`, the `*_l0_reverse` ones to its
      `backward_layer` (`go_backwards=True`).
    - A `GoBackwards` gives the layer with `go_backwards=True`.

    Args:
        module: the layer to convert.
        batch_size: build the Keras layer for this static batch size. `stateful=True` needs
            one: Keras keeps a state per sequence of the batch between calls.
        **layer_options: more Keras constructor options, e.g. `return_state=True`,
            `stateful=True` or `name=...`; for a bidirectional layer they go to the
            wrapped layer. Options that change the math (`units`, `activation`,
            `reset_after`, `go_backwards`, ...) are refused.

    Raises:
        TypeError: `module` is not an RNN, GRU or LSTM layer (or a GoBackwards around one).
        ValueError: Keras cannot express it exactly (stacked, `proj_size`,
            `learn_initial_state`, or an RNN nonlinearity Keras lacks), a reserved option,
            or `stateful=True` without `batch_size`.
    """
    keras = _import_keras()
    go_backwards = isinstance(module, GoBackwards)
    if go_backwards:
        module = module.layer
    module = as_rnnkit_layer(module, "keras")
    check_single_layer(module, "Keras", bidirectional=True)
    reserved = _RESERVED & set(layer_options)
    if reserved:
        raise ValueError(f"to_keras sets {sorted(reserved)} itself to keep the layer exact")
    if batch_size is not None:
        batch_size = _checks.positive_int("batch_size", batch_size)
    elif layer_options.get("stateful"):
        raise ValueError(
            "a Keras layer with stateful=True needs a static batch size (it keeps one state "
            "per sequence of the batch); pass to_keras(..., batch_size=N)"
        )
    dtype = str(module.weight_ih_l0.dtype).removeprefix("torch.")
    options = {
        "return_sequences": True,
        "use_bias": module.bias,
        "dtype": dtype,
        "go_backwards": go_backwards,
        "zero_output_for_mask": module.zero_output_for_mask,
        **layer_options,
    }
    spec = module.spec
    if spec.zoneout or spec.layer_norm:
        raise ValueError(
            f"Keras's {type(module).__name__} has no zoneout or layer norm; convert a layer "
            f"built with zoneout=0 and layer_norm=False (got zoneout={spec.zoneout}, "
            f"layer_norm={spec.layer_norm})"
        )
    options["dropout"] = module.input_dropout
    options["recurrent_dropout"] = module.recurrent_dropout
    activation = _keras_activation(spec.nonlinearity, "nonlinearity" if isinstance(
        module, RNN) else "activation")
    if isinstance(module, RNN):
        layer = keras.layers.SimpleRNN(module.hidden_size, activation=activation, **options)
    elif isinstance(module, GRU):
        layer = keras.layers.GRU(
            module.hidden_size, reset_after=module.reset_after, activation=activation,
            recurrent_activation=_keras_activation(spec.recurrent_activation,
                                                   "recurrent_activation"),
            **options)
    else:
        layer = keras.layers.LSTM(
            module.hidden_size, activation=activation,
            recurrent_activation=_keras_activation(spec.recurrent_activation,
                                                   "recurrent_activation"),
            unit_forget_bias=bool(module.forget_bias), **options)
    shape = (batch_size, None, module.input_size)
    if not module.bidirectional:
        _build_without_initializers(keras, layer, shape)
        layer.set_weights(_keras_weights(module, "_l0"))
        return layer
    # Bidirectional builds its two layers from the given one's config (the backward one with
    # go_backwards=True) and casts their outputs to its own dtype.
    wrapper = keras.layers.Bidirectional(layer, merge_mode="concat", dtype=dtype)
    for part, suffix in ((wrapper.forward_layer, "_l0"), (wrapper.backward_layer, "_l0_reverse")):
        _build_without_initializers(keras, part, shape)
        part.set_weights(_keras_weights(module, suffix))
    wrapper.build(shape)
    return wrapper


def _keras_activation(name, what: str) -> str:
    """Keras's name of a named activation.

    Raises:
        ValueError: a callable, or a name Keras lacks.
    """
    if not isinstance(name, str) or name not in _ACTIVATION_NAMES:
        raise ValueError(
            f"Keras has no activation for the {what} {name!r}; use one of "
            f"{sorted(_ACTIVATION_NAMES)}"
        )
    return _ACTIVATION_NAMES[name]


def _keras_weights(module: RecurrentLayer, suffix: str) -> list[np.ndarray]:
    """A Keras layer's weights (kernel, recurrent kernel[, bias]) from `*{suffix}`."""
    order = _GRU_ORDER if isinstance(module, GRU) else list(range(module.spec.num_gates))
    weights = [
        reorder_gates(to_numpy(getattr(module, "weight_ih" + suffix)), order).T,
        reorder_gates(to_numpy(getattr(module, "weight_hh" + suffix)), order).T,
    ]
    if module.bias:
        bias_ih = to_numpy(getattr(module, "bias_ih" + suffix))
        bias_hh = to_numpy(getattr(module, "bias_hh" + suffix))
        if isinstance(module, GRU) and module.reset_after:
            weights.append(np.stack([reorder_gates(bias_ih, order),
                                     reorder_gates(bias_hh, order)]))
        else:
            weights.append(reorder_gates(bias_ih + bias_hh, order))
    return [np.ascontiguousarray(w) for w in weights]
