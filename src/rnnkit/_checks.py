"""Argument and input checks that turn bad input into clear ValueError/TypeError messages."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _whole_number(name: str, value: object) -> int:
    # numpy's integers are Integral; bool (Python's or numpy's) is a flag, not a size.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def positive_int(name: str, value: object) -> int:
    """`value` as a Python int; any integer type (numpy's too) but bool.

    Raises:
        TypeError: not an integer. ValueError: zero or negative.
    """
    value = _whole_number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be greater than zero, got {value}")
    return value


def non_negative_int(name: str, value: object) -> int:
    """As `positive_int`, but zero is allowed."""
    value = _whole_number(name, value)
    if value < 0:
        raise ValueError(f"{name} must be zero or positive, got {value}")
    return value


def boolean(name: str, value: object) -> bool:
    """`value` as a Python bool; a bool (numpy's too) and nothing else.

    Raises:
        TypeError: anything else.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def torch_flag(name: str, value: object) -> bool:
    """A flag torch.nn also takes (`bias`, `batch_first`, `bidirectional`): a bool, or
    the integers 0 and 1 as code written for torch.nn passes them.

    Raises:
        TypeError: not a bool or an integer (a string, a float). ValueError: another integer.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        return boolean(name, value)
    if value not in (0, 1):
        raise ValueError(f"{name} must be a bool (or 0 or 1), got {int(value)}")
    return bool(value)


def dropout(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"dropout must be a number in [0, 1], got {value!r}")
    return float(value)


def probability(name: str, value: object) -> float:
    """A drop or keep probability in `[0, 1)` (recurrent/input dropout, zoneout).

    Raises:
        TypeError: not a real number (a bool, a string). ValueError: outside `[0, 1)`.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in [0, 1), got {type(value).__name__}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def real(name: str, value: object) -> float:
    """A finite real number (`forget_bias`).

    Raises:
        TypeError: not a real number. ValueError: not finite.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not np.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _matches_parameters(name: str, tensor: Tensor, reference: Tensor) -> None:
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(
            f"{name} must be a floating-point or complex tensor, got dtype {tensor.dtype}"
        )
    if tensor.device != reference.device:
        raise ValueError(
            f"{name} is on {tensor.device} but the parameters are on {reference.device}"
        )
    if tensor.dtype != reference.dtype and not torch.is_autocast_enabled(tensor.device.type):
        raise TypeError(
            f"{name} has dtype {tensor.dtype} but the parameters have dtype {reference.dtype}"
        )


def input_tensor(
    input: object, parameter: Tensor, input_size: int, ranks: tuple[int, int], what: str
) -> None:
    """Check type, rank, dtype, device and feature size of an input tensor."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{what} must be a Tensor or PackedSequence, got {type(input).__name__}")
    if input.dim() not in ranks:
        raise ValueError(
            f"{what} must be {ranks[0]}-D (unbatched) or {ranks[1]}-D (batched), "
            f"got {input.dim()}-D with shape {tuple(input.shape)}"
        )
    _matches_parameters(what, input, parameter)
    if input.shape[-1] != input_size:
        raise ValueError(
            f"{what} must have {input_size} features (input_size), got {input.shape[-1]} "
            f"in shape {tuple(input.shape)}"
        )


def state_tensor(name: str, state: object, expected: tuple[int, ...], parameter: Tensor) -> None:
    """Check an initial state against the exact shape it must have."""
    if not isinstance(state, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(state).__name__}")
    if tuple(state.shape) != tuple(expected):
        raise ValueError(
            f"{name} must have shape {tuple(expected)}, got {tuple(state.shape)}"
        )
    _matches_parameters(name, state, parameter)


def state_pair(hx: object) -> tuple[Tensor, Tensor]:
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"an LSTM state must be a pair (h, c), got {type(hx).__name__}")
    return hx[0], hx[1]


def _integers(values: Sequence, message: str) -> Tensor:
    """Integers (numpy's too, not bools) as an int64 tensor; else `TypeError(message)`."""
    if any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values):
        raise TypeError(message)
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def lengths(
    value: object, batch_size: int, seq_len: int, device: torch.device, minimum: int = 1
) -> Tensor:
    """Validate `lengths` and return it as an int64 tensor on `device`.

    Accepts a 1-D integer tensor on any device, or a list or tuple of ints, in any order.
    `minimum=0` admits sequences with no step in this call (used by streaming).
    Under torch.compile and torch.export the checks that read the values are skipped: they
    are data-dependent and would break the graph.
    """
    return _lengths(value, batch_size, seq_len, device, minimum)[0]


def lengths_with_empty(
    value: object, batch_size: int, seq_len: int, device: torch.device
) -> tuple[Tensor, Tensor | None]:
    """Validate a layer's `lengths` (`0` allowed) for the kernels, which need `>= 1`.

    Returns `(lengths clamped to at least 1, empty)` on `device`: `empty` is the
    `(N,)` boolean mask of the sequences of length 0, or `None` when there are none.
    Under torch.compile and torch.export the mask is always returned: deciding from the
    values would break the graph.
    """
    checked, values = _lengths(value, batch_size, seq_len, device, 0)
    if values is not None and int(values.min()) > 0:
        return checked, None
    return checked.clamp(min=1), checked == 0


def _lengths(
    value: object, batch_size: int, seq_len: int, device: torch.device, minimum: int
) -> tuple[Tensor, Tensor | None]:
    """`lengths` checked, on `device`, and its values on the CPU (`None` when traced)."""
    if isinstance(value, Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"lengths must hold integers, got a tensor of dtype {value.dtype}")
        if value.dim() != 1:
            raise ValueError(f"lengths must be 1-D, got shape {tuple(value.shape)}")
        if torch.compiler.is_compiling():
            if value.shape[0] != batch_size:
                raise ValueError(
                    f"lengths must have one entry per sequence: expected {batch_size}, "
                    f"got {value.shape[0]}"
                )
            return value.detach().to(device=device, dtype=torch.int64), None
        values = value.detach().to("cpu", torch.int64)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = _integers(value, f"lengths must hold integers, got {list(value)!r}")
    else:
        raise TypeError(
            f"lengths must be a 1-D integer tensor or a list of ints, got {type(value).__name__}"
        )
    if values.numel() == 0:
        raise ValueError("lengths must not be empty")
    if values.numel() != batch_size:
        raise ValueError(
            f"lengths must have one entry per sequence: expected {batch_size}, "
            f"got {values.numel()}"
        )
    if int(values.min()) < minimum:
        kind = "positive" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"lengths must be {kind}, got {values.tolist()}")
    if int(values.max()) > seq_len:
        raise ValueError(
            f"lengths must not exceed the sequence length {seq_len}, got {values.tolist()}"
        )
    return values.to(device), values


def per_step(
    what: str,
    value: object,
    shape: tuple[int, int],
    batched: bool,
    batch_first: bool,
    device: torch.device,
) -> Tensor:
    """Validate a per-step boolean tensor (`resets`, `mask`); return it `(T, B)` on
    `device`.

    `shape` is the input's time-first `(T, B)`; `value` must be `(T, B)`, `(B, T)`
    with `batch_first`, or `(T,)` for unbatched input.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must be a boolean tensor, got {type(value).__name__}")
    if value.dtype != torch.bool:
        raise TypeError(f"{what} must be a boolean tensor, got dtype {value.dtype}")
    steps, batch = shape
    if not batched:
        expected, layout = (steps,), "(L,) for unbatched input"
    elif batch_first:
        expected, layout = (batch, steps), "(N, L) with batch_first"
    else:
        expected, layout = (steps, batch), "(L, N)"
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{what} must have shape {expected}, {layout} like the input, "
            f"got {tuple(value.shape)}"
        )
    value = value.to(device)
    if not batched:
        return value[:, None]
    return value.t() if batch_first else value

def rows(value: object, batch: int | None, device: torch.device, what: str = "rows") -> Tensor:
    """A per-row boolean mask `(N,)` on `device`, from a mask or from row indices.

    `batch=None` (unbatched) takes only a 0-d boolean tensor and returns it.
    """
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        expected = () if batch is None else (batch,)
        if tuple(value.shape) != expected:
            raise ValueError(
                f"{what} must be a boolean mask of shape {expected} (one entry per row of the "
                f"carried batch), got shape {tuple(value.shape)}"
            )
        return value.to(device)
    if batch is None:
        raise TypeError(f"for unbatched input, {what} must be a 0-d boolean tensor")
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dim() != 1:
            raise TypeError(
                f"{what} must be a boolean mask or 1-D integer indices, got a tensor of dtype "
                f"{value.dtype} and shape {tuple(value.shape)}"
            )
        indices = value.detach().to("cpu", torch.int64)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        indices = _integers(
            value, f"{what} must be a boolean mask or integer indices, got {value!r}"
        )
    else:
        raise TypeError(
            f"{what} must be a boolean mask or integer indices, got {type(value).__name__}"
        )
    if indices.numel() and (int(indices.min()) < -batch or int(indices.max()) >= batch):
        raise ValueError(f"{what} indices must lie in [-{batch}, {batch}), got {indices.tolist()}")
    mask = torch.zeros(batch, dtype=torch.bool)
    mask[indices] = True
    return mask.to(device)
