r"""Conversion between Keras 3's ``SimpleRNN``/``GRU``/``LSTM`` and rnnkit layers.

Keras keeps ``kernel`` (D, G*H) and ``recurrent_kernel`` (H, G*H), the transposes of torch's
``weight_ih``/``weight_hh``. Gate orders: LSTM (i, f, c, o) is torch's; GRU is (z, r, h) where
torch has (r, z, n). Biases (rnnkit names on the right):

- ``SimpleRNN``, ``LSTM``: one ``bias`` = ``bias_ih_l0 + bias_hh_l0``.
- ``GRU(reset_after=True)``: ``bias`` (2, 3H) = (``bias_ih_l0``, ``bias_hh_l0``), reordered.
- ``GRU(reset_after=False)``: one input ``bias`` (3H). rnnkit's ``b_hn`` is added after
  ``W_hn (r * h)``, outside the reset product, so it folds into the input bias exactly.

Keras is imported on first use; if ``KERAS_BACKEND`` is unset then, it is set to ``"torch"``.
"""

from __future__ import annotations

import os
import warnings

import numpy as np

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
    "unit_forget_bias",
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


def from_keras(layer, *, backend: str | None = None) -> RecurrentLayer:
    """An rnnkit layer equal to a built Keras 3 ``SimpleRNN``, ``GRU`` or ``LSTM``.

    The result has ``batch_first=True`` and the Keras weights' dtype. For the same input and
    initial state its output equals Keras's with ``return_sequences=True``:
    ``out, h_n = from_keras(layer)(x, h0[None])`` gives ``layer(x, initial_state=[h0])``.
    A ``GRU`` keeps its ``reset_after``. Dropout only acts in training and is not carried over
    (a warning says so).

    Raises:
        TypeError: ``layer`` is not one of those Keras layers.
        ValueError: it is not built, runs ``go_backwards``, or uses an activation rnnkit does
            not have (GRU and LSTM need ``activation='tanh'`` and
            ``recurrent_activation='sigmoid'``).
    """
    keras = _import_keras()
    layers = keras.layers
    if isinstance(layer, layers.LSTM):
        cls = LSTM
    elif isinstance(layer, layers.GRU):
        cls = GRU
    elif isinstance(layer, layers.SimpleRNN):
        cls = RNN
    else:
        raise TypeError(
            f"from_keras takes a Keras SimpleRNN, GRU or LSTM layer, got {type(layer).__name__}"
        )
    kind = type(layer).__name__
    if not layer.built:
        raise ValueError(
            f"the Keras {kind} is not built and has no weights yet; call it once or "
            "layer.build((None, None, input_size)) first"
        )
    if layer.go_backwards:
        raise ValueError(
            f"a Keras {kind} with go_backwards=True returns its output reversed in time; "
            "rnnkit has no such option, so it cannot be converted"
        )
    cell = layer.cell
    if cls is RNN:
        nonlinearity = _activation_from_keras(keras, cell.activation, "activation")
    else:
        if cell.activation is not keras.activations.tanh:
            raise ValueError(f"rnnkit's {cls.__name__} needs activation='tanh' in the Keras {kind}")
        if cell.recurrent_activation is not keras.activations.sigmoid:
            raise ValueError(
                f"rnnkit's {cls.__name__} needs recurrent_activation='sigmoid' in the Keras {kind}"
            )
    if cell.dropout or cell.recurrent_dropout:
        warnings.warn(
            f"the Keras {kind}'s dropout={cell.dropout} and recurrent_dropout="
            f"{cell.recurrent_dropout} are not carried over (they only act in training)",
            stacklevel=2,
        )

    weights = layer.get_weights()
    kernel, recurrent = weights[0], weights[1]
    bias = weights[2] if cell.use_bias else None
    units = cell.units
    kwargs = dict(bias=cell.use_bias, batch_first=True, dtype=torch_dtype(kernel.dtype),
                  backend=backend)
    if cls is RNN:
        kwargs["nonlinearity"] = nonlinearity
    if cls is GRU:
        kwargs["reset_after"] = bool(cell.reset_after)
    module = cls(kernel.shape[0], units, **kwargs)

    order = _GRU_ORDER if cls is GRU else list(range(module.spec.num_gates))
    values = {
        "weight_ih_l0": reorder_gates(kernel.T, order),
        "weight_hh_l0": reorder_gates(recurrent.T, order),
    }
    if bias is not None:
        if cls is GRU and cell.reset_after:
            values["bias_ih_l0"] = reorder_gates(bias[0], order)
            values["bias_hh_l0"] = reorder_gates(bias[1], order)
        else:
            values["bias_ih_l0"] = reorder_gates(bias, order)
            values["bias_hh_l0"] = None
    load_weights(module, values)
    return module


def _build_without_initializers(keras, layer, input_shape: tuple) -> None:
    """Build ``layer`` with zeros for every weight, keeping its initializers in its config.

    The caller overwrites every weight, and Keras's default orthogonal recurrent initializer
    needs a QR factorisation that torch has no float16/bfloat16 kernel for (Keras's torch
    backend then fails with ``"geqrf_cpu" not implemented for 'Half'``).
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


def to_keras(module: RecurrentLayer, *, batch_size: int | None = None, **layer_options):
    """A built Keras 3 ``SimpleRNN``, ``GRU`` or ``LSTM`` equal to a one-layer, one-direction
    rnnkit layer (a torch.nn layer is accepted too).

    The Keras layer has ``return_sequences=True`` (its output is the whole sequence, as
    rnnkit's) and the module's dtype, float16 and bfloat16 included. Keras takes batch-major
    ``(N, L, D)`` input whatever ``batch_first`` says.

    Args:
        module: the layer to convert.
        batch_size: build the Keras layer for this static batch size. ``stateful=True`` needs
            one: Keras keeps a state per sequence of the batch between calls.
        **layer_options: more Keras constructor options, e.g. ``return_state=True``,
            ``stateful=True`` or ``name=...``. Options that change the math (``units``,
            ``activation``, ``reset_after``, ...) are refused.

    Raises:
        TypeError: ``module`` is not an RNN, GRU or LSTM layer.
        ValueError: Keras cannot express it exactly (stacked, bidirectional, ``proj_size``,
            ``learn_initial_state``, or an RNN nonlinearity Keras lacks), a reserved option,
            or ``stateful=True`` without ``batch_size``.
    """
    keras = _import_keras()
    module = as_rnnkit_layer(module, "keras")
    check_single_layer(module, "Keras")
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
    options = {
        "return_sequences": True,
        "use_bias": module.bias,
        "dtype": str(module.weight_ih_l0.dtype).removeprefix("torch."),
        **layer_options,
    }
    if isinstance(module, RNN):
        name = module.nonlinearity
        if not isinstance(name, str) or name not in _ACTIVATION_NAMES:
            raise ValueError(
                f"Keras has no activation for the nonlinearity {name!r}; use one of "
                f"{sorted(_ACTIVATION_NAMES)}"
            )
        layer = keras.layers.SimpleRNN(module.hidden_size, activation=_ACTIVATION_NAMES[name],
                                       **options)
        order = [0]
    elif isinstance(module, GRU):
        layer = keras.layers.GRU(module.hidden_size, reset_after=module.reset_after, **options)
        order = _GRU_ORDER
    else:
        layer = keras.layers.LSTM(module.hidden_size, **options)
        order = [0, 1, 2, 3]
    _build_without_initializers(keras, layer, (batch_size, None, module.input_size))

    weights = [
        reorder_gates(to_numpy(module.weight_ih_l0), order).T,
        reorder_gates(to_numpy(module.weight_hh_l0), order).T,
    ]
    if module.bias:
        bias_ih, bias_hh = to_numpy(module.bias_ih_l0), to_numpy(module.bias_hh_l0)
        if isinstance(module, GRU) and module.reset_after:
            weights.append(np.stack([reorder_gates(bias_ih, order),
                                     reorder_gates(bias_hh, order)]))
        else:
            weights.append(reorder_gates(bias_ih + bias_hh, order))
    layer.set_weights([np.ascontiguousarray(w) for w in weights])
    return layer
