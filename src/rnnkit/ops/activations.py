"""The one table of named nonlinearities, and the checks around it.

A nonlinearity is either a name from `TABLE` or any callable that maps a tensor to a
tensor of the same shape elementwise, as in MLX's `nn.RNN`. Every per-backend code (the
index of a row), ONNX name and Keras/MLX mapping derives from `TABLE`; adding an
activation is one row here plus its formula in each kernel language (the compiled CPU
kernels' `vec_math.h`, the Triton kernels' `_activate`), and the conformance tests check
that every backend serves every row or names why not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = str | Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


def _hard_sigmoid(x: Tensor) -> Tensor:
    """Keras 3's `hard_sigmoid`, `relu6(x + 3) / 6`, bitwise `F.hardsigmoid`'s formula but
    differentiable twice (`F.hardsigmoid` has no double backward)."""
    return F.hardtanh(x + 3.0, 0.0, 6.0) / 6.0


@dataclass(frozen=True)
class ActivationRow:
    """One named nonlinearity and its names elsewhere.

    Attributes:
        name: rnnkit's name (`nonlinearity="..."`).
        function: the torch formula, used by the reference path.
        keras: the name `keras.activations.get` knows it by.
        mlx: the `mlx.nn` function of the same formula (`None`: none, use a plain callable).
        mlx_class: the `mlx.nn` module class of the same formula, or `None`.
        onnx: the `activations` attribute of ONNX's own `RNN` op, or `None` when export
            runs a `Scan` over time (`rnnkit.ops.export.onnx_lowering`).
        saves_derivative: the compiled CPU forward saves the derivative, since it cannot be
            read off the output (non-monotonic or not invertible cheaply).
    """

    name: str
    function: Callable[[Tensor], Tensor]
    keras: str
    mlx: str | None
    mlx_class: str | None
    onnx: str | None
    saves_derivative: bool = False


# The order is the per-backend code of each activation; append new rows at the end.
TABLE: tuple[ActivationRow, ...] = (
    ActivationRow("tanh", torch.tanh, "tanh", "tanh", "Tanh", "Tanh"),
    ActivationRow("relu", torch.relu, "relu", "relu", "ReLU", "Relu"),
    ActivationRow("identity", _identity, "linear", None, "Identity", None),
    ActivationRow("sigmoid", torch.sigmoid, "sigmoid", "sigmoid", "Sigmoid", "Sigmoid"),
    ActivationRow("silu", F.silu, "silu", "silu", "SiLU", None, saves_derivative=True),
    ActivationRow("gelu", F.gelu, "gelu", "gelu", None, None, saves_derivative=True),
    ActivationRow("softsign", F.softsign, "softsign", "softsign", "Softsign", None),
    ActivationRow("hardtanh", F.hardtanh, "hard_tanh", "hard_tanh", "HardTanh", None),
    ActivationRow("softplus", F.softplus, "softplus", "softplus", "Softplus", "Softplus",
                  saves_derivative=True),
    # Keras 3's hard_sigmoid, relu6(x + 3) / 6 (Keras 2's was clip(0.2 x + 0.5, 0, 1)).
    ActivationRow("hard_sigmoid", _hard_sigmoid, "hard_sigmoid", None, None, None),
)

ROWS: dict[str, ActivationRow] = {row.name: row for row in TABLE}
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {row.name: row.function for row in TABLE}
"""The named nonlinearities, name to function (`"tanh"`, `"relu"`, `"silu"`, ...), one per
row of `TABLE`, in its order."""
CODES: dict[str, int] = {row.name: code for code, row in enumerate(TABLE)}


def code(nonlinearity: Activation) -> int:
    """The per-backend code of a named activation (its row in `TABLE`)."""
    return CODES[nonlinearity]


def check_activation(nonlinearity: object) -> Activation:
    """Return `nonlinearity` if it names a known activation or is callable.

    Raises:
        ValueError: an unknown name.
        TypeError: neither a string nor a callable.
    """
    if isinstance(nonlinearity, str):
        if nonlinearity not in ACTIVATIONS:
            raise ValueError(
                f"nonlinearity must be one of {sorted(ACTIVATIONS)} or a callable, "
                f"got {nonlinearity!r}"
            )
        return nonlinearity
    if callable(nonlinearity):
        return nonlinearity
    raise TypeError(
        "nonlinearity must be a name or a callable elementwise function, "
        f"got {type(nonlinearity).__name__}"
    )


def resolve_activation(nonlinearity: Activation) -> Callable[[Tensor], Tensor]:
    """The function behind a name, or the callable itself."""
    return ACTIVATIONS[nonlinearity] if isinstance(nonlinearity, str) else nonlinearity


def activation_name(nonlinearity: Activation) -> str:
    """A readable name for reprs and error messages."""
    if isinstance(nonlinearity, str):
        return nonlinearity
    return getattr(nonlinearity, "__name__", type(nonlinearity).__name__)


def nonlinearity_repr(nonlinearity: Activation) -> str:
    """The `extra_repr` piece of an RNN layer or cell: empty for the default tanh."""
    if nonlinearity == "tanh":
        return ""
    return f", nonlinearity={activation_name(nonlinearity)!r}"
