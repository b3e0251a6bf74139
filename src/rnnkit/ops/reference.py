"""The reference backend: the time loop in plain torch ops, differentiable to any order.

Every other backend is held equal to this one by the tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.cells import CellSpec, step


def step_mask(lengths: Tensor | None, seq_len: int) -> Tensor | None:
    """``(T, B, 1)`` boolean mask, true where step ``t`` lies inside sequence ``b``."""
    if lengths is None:
        return None
    steps = torch.arange(seq_len, device=lengths.device)
    return (steps[:, None] < lengths[None, :]).unsqueeze(-1)


def recurrence(
    spec: CellSpec,
    gates_x: Tensor,
    state: tuple[Tensor, ...],
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run one layer in one direction over a whole sequence.

    Args:
        spec: the cell kind and options.
        gates_x: ``(T, B, G*H)``, the input projection ``W_ih x + b_ih`` of every step.
        state: ``(h0,)`` or ``(h0, c0)``; ``h0`` is ``(B, H_out)``, ``c0`` is ``(B, H)``.
        weight_hh: ``(G*H, H_out)``; bias_hh: ``(G*H,)`` or ``None``.
        weight_hr: LSTM projection ``(H_out, H)`` or ``None``.
        lengths: ``(B,)`` int64 on ``gates_x``'s device, or ``None`` for full length.
        reverse: run from each sequence's own last step back to step 0.

    Returns:
        ``output`` of shape ``(T, B, H_out)``, zero past each sequence's length, and the
        final state tuple, taken at each sequence's own last step.
    """
    seq_len = gates_x.shape[0]
    mask = step_mask(lengths, seq_len)
    outputs: list[Tensor] = [gates_x] * seq_len
    for t in range(seq_len - 1, -1, -1) if reverse else range(seq_len):
        new_state = step(spec, gates_x[t], state, weight_hh, bias_hh, weight_hr)
        if mask is None:
            state = new_state
            outputs[t] = new_state[0]
        else:
            active = mask[t]
            state = tuple(torch.where(active, new, old) for new, old in zip(new_state, state))
            outputs[t] = torch.where(active, new_state[0], torch.zeros_like(new_state[0]))
    return torch.stack(outputs), state
