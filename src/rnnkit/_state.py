"""The one way a module's initial state is built: learnable or zeros, broadcast to a batch."""

from __future__ import annotations

import torch
from torch import nn

from rnnkit.ops.spec import State


def initial_state(
    module: nn.Module, lead: tuple[int, ...], batch_size: int | None, sizes: tuple[int, ...]
) -> State:
    """`(h,)` or `(h, c)` of shape `(*lead, N, size)` (no `N` for `batch_size=None`).

    With `module.learn_initial_state` these are `module.initial_h` / `initial_c`
    (shaped `(*lead, size)`) expanded over the batch, so gradients reach them; else zeros
    in the dtype and device of the module's first parameter.
    """
    batch_dims = () if batch_size is None else (batch_size,)
    names = ("initial_h", "initial_c")[: len(sizes)]
    if module.learn_initial_state:
        states = []
        for name, size in zip(names, sizes):
            learned = getattr(module, name)
            view = learned.reshape(*lead, *(1 for _ in batch_dims), size)
            states.append(view.expand(*lead, *batch_dims, size))
        return tuple(states)
    reference = next(module.parameters())
    return tuple(
        torch.zeros((*lead, *batch_dims, size), dtype=reference.dtype, device=reference.device)
        for size in sizes
    )
