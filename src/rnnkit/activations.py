"""Named nonlinearities for RNN and RNNCell.

A nonlinearity is either one of the names below or any callable that maps a tensor to a
tensor of the same shape elementwise, as in MLX's ``nn.RNN``. Named activations can be
served by the compiled kernels; callables always run on the reference path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Activation = str | Callable[[Tensor], Tensor]

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": lambda x: x,
    "sigmoid": torch.sigmoid,
    "silu": F.silu,
    "gelu": F.gelu,
    "softsign": F.softsign,
    "hardtanh": F.hardtanh,
}


def check_activation(nonlinearity: object) -> Activation:
    """Return ``nonlinearity`` if it names a known activation or is callable.

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
    """The ``extra_repr`` piece of an RNN layer or cell: empty for the default tanh."""
    if nonlinearity == "tanh":
        return ""
    return f", nonlinearity={activation_name(nonlinearity)!r}"
