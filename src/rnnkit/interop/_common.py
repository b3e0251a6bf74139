"""Checks and array helpers shared by the MLX and Keras converters."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from rnnkit.interop.torch import from_torch
from rnnkit.layers import GRU, LSTM, RNN, RecurrentLayer


def as_rnnkit_layer(module: object, target: str) -> RecurrentLayer:
    """`module` as an rnnkit layer (a torch.nn RNN/GRU/LSTM is converted first)."""
    if isinstance(module, nn.RNNBase):
        module = from_torch(module)
    if not isinstance(module, (RNN, GRU, LSTM)):
        raise TypeError(
            f"to_{target} takes an rnnkit (or torch.nn) RNN, GRU or LSTM layer, "
            f"got {type(module).__name__}"
        )
    return module


def check_single_layer(
    module: RecurrentLayer, library: str, *, bidirectional: bool = False
) -> None:
    """Refuse what a one-layer layer of `library` cannot express exactly.

    `bidirectional=True`: `library` has a two-direction form of its layers.
    """
    kind = type(module).__name__
    if module.num_layers != 1:
        raise ValueError(
            f"{library} has no stacked layers, so a {kind} with num_layers="
            f"{module.num_layers} cannot be converted; convert one layer at a time"
        )
    if module.bidirectional and not bidirectional:
        raise ValueError(f"{library} has no bidirectional {kind}, so it cannot be converted")
    if module.proj_size:
        raise ValueError(
            f"{library} has no LSTM projection, so proj_size={module.proj_size} "
            "cannot be converted"
        )
    if module.learn_initial_state:
        raise ValueError(
            f"{library} layers start from a zero state and have no learnable initial state; "
            "pass module.initial_h (and initial_c) as the initial state yourself and convert "
            "a layer built with learn_initial_state=False"
        )


def to_numpy(tensor: Tensor) -> np.ndarray:
    """A detached CPU copy; bfloat16, which numpy lacks, goes through float32."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.numpy().copy()


def reorder_gates(array, order: list[int], axis: int = 0):
    """Permute the `len(order)` equal gate blocks of `array` along `axis`."""
    blocks = np.split(np.asarray(array), len(order), axis=axis)
    return np.concatenate([blocks[i] for i in order], axis=axis)


def torch_dtype(dtype: object) -> torch.dtype:
    """The torch dtype of a numpy dtype (or a name such as `"float32"`)."""
    name = str(np.dtype(dtype)) if not isinstance(dtype, str) else dtype
    try:
        return getattr(torch, name)
    except AttributeError:
        raise TypeError(f"cannot convert weights of dtype {name} to torch") from None


@torch.no_grad()
def load_weights(module: RecurrentLayer, weights: dict[str, np.ndarray | None]) -> None:
    """Copy `{parameter name: array}` into `module`; `None` means zeros."""
    for name, value in weights.items():
        param = getattr(module, name)
        if value is None:
            param.zero_()
            continue
        value = np.asarray(value)
        if value.dtype.name == "bfloat16":  # ml_dtypes' (Keras's); torch cannot read it
            value = value.astype(np.float32)
        value = torch.as_tensor(value)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"{name}: expected shape {tuple(param.shape)}, got {tuple(value.shape)}"
            )
        param.copy_(value)
