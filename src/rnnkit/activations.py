"""Named nonlinearities for RNN and RNNCell (public names; the table is
`rnnkit.ops.activations.TABLE`).

A nonlinearity is either one of the names in `ACTIVATIONS` or any callable that maps a
tensor to a tensor of the same shape elementwise, as in MLX's `nn.RNN`. Named activations
can be served by the compiled kernels; callables always run on the reference path.
"""

from rnnkit.ops.activations import (
    ACTIVATIONS,
    TABLE,
    Activation,
    activation_name,
    check_activation,
    nonlinearity_repr,
    resolve_activation,
)

__all__ = [
    "ACTIVATIONS", "TABLE", "Activation", "activation_name", "check_activation",
    "nonlinearity_repr", "resolve_activation",
]
