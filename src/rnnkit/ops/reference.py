"""The reference backend: the time loop in plain torch ops, differentiable to any order.

It serves every call on every device, and every other backend is held equal to it by the
conformance tests (`tests/test_conformance.py`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.ops.backend import BackendBase
from rnnkit.ops.cell_math import Norm, step, zoned
from rnnkit.ops.spec import Call, CellSpec, State


def step_mask(lengths: Tensor | None, seq_len: int) -> Tensor | None:
    """`(T, B, 1)` boolean mask, true where step `t` lies inside sequence `b`."""
    if lengths is None:
        return None
    steps = torch.arange(seq_len, device=lengths.device)
    return (steps[:, None] < lengths[None, :]).unsqueeze(-1)


def apply_resets(code: Tensor, state: State, reset_state: State, initial: State) -> State:
    """The state a step starts from, given its `(B,)` reset codes (see
    [`Call`][rnnkit.ops.spec.Call])."""
    code = code.view(-1, 1)
    return tuple(
        torch.where(code == 1, fresh, torch.where(code == 2, first, carried))
        for carried, fresh, first in zip(state, reset_state, initial)
    )


def recurrence(
    spec: CellSpec,
    gates_x: Tensor,
    state: State,
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    resets: Tensor | None = None,
    reset_state: State | None = None,
    mask: Tensor | None = None,
    carry_masked_output: bool = False,
    *,
    hidden_dropout: Tensor | None = None,
    zoneout_h: Tensor | None = None,
    zoneout_c: Tensor | None = None,
    norm_hh: Norm | None = None,
    norm_cell: Norm | None = None,
) -> tuple[Tensor, State]:
    """Run one layer in one direction over a whole sequence.

    Args:
        spec: the cell kind and options.
        gates_x: `(T, B, G*H)`, the input projection `W_ih x + b_ih` of every step.
        state: `(h0,)` or `(h0, c0)`; `h0` is `(B, H_out)`, `c0` is `(B, H)`.
        weight_hh: `(G*H, H_out)`; bias_hh: `(G*H,)` or `None`.
        weight_hr: LSTM projection `(H_out, H)` or `None`.
        lengths: `(B,)` int64 on `gates_x`'s device, or `None` for full length.
        reverse: run from each sequence's own last step back to step 0.
        resets: per-step reset codes `(T, B)` (see [`rnnkit.ops.spec.Call`][]), or `None`; a
            step past a sequence's length ignores its code, as it ignores everything else.
        reset_state: the state a code-1 reset starts from.
        mask: `(T, B)` bool or `None`; a false step is skipped like a step past a length.
        carry_masked_output: a skipped step outputs the carried `h` instead of zeros.
        hidden_dropout: recurrent-dropout multipliers, as the field of
            [`rnnkit.ops.spec.Call`][]. One step: its start state (after its reset),
            `h_in = h_start * hidden_dropout` into the recurrent product only, the cell,
            zoneout against the start state, then lengths and masks.
        zoneout_h: zoneout masks of `h`, as the field of [`rnnkit.ops.spec.Call`][].
        zoneout_c: zoneout masks of LSTM's `c`.
        norm_hh: `(gain, bias)` of the layer norm of `W_hh h`.
        norm_cell: `(gain, bias)` of the layer norm of LSTM's `c`.

    Returns:
        `output` of shape `(T, B, H_out)`, zero past each sequence's length, and the
        final state tuple, taken at each sequence's own last step.
    """
    seq_len = gates_x.shape[0]
    active_steps = step_mask(lengths, seq_len)
    if mask is not None:
        holes = mask.unsqueeze(-1)
        active_steps = holes if active_steps is None else active_steps & holes
    initial = state
    outputs: list[Tensor] = [gates_x] * seq_len
    for t in range(seq_len - 1, -1, -1) if reverse else range(seq_len):
        start = state if resets is None else apply_resets(resets[t], state, reset_state, initial)
        new_state = step(
            spec, gates_x[t], start, weight_hh, bias_hh, weight_hr,
            hidden_dropout=hidden_dropout, norm_hh=norm_hh, norm_cell=norm_cell,
        )
        if spec.zoneout:  # the masks of time step t, in either direction
            masks = None if zoneout_h is None else (
                zoneout_h[t], None if zoneout_c is None else zoneout_c[t])
            new_state = zoned(spec, start, new_state, masks)
        if active_steps is None:
            state = new_state
            outputs[t] = new_state[0]
        else:
            active = active_steps[t]
            state = tuple(torch.where(active, new, old) for new, old in zip(new_state, state))
            skipped = state[0] if carry_masked_output else torch.zeros_like(new_state[0])
            outputs[t] = torch.where(active, new_state[0], skipped)
    return torch.stack(outputs), state


class ReferenceBackend(BackendBase):
    """Plain torch ops on any device; the fallback of every plan."""

    name = "reference"
    device_types: tuple[str, ...] = ()  # every device: the plan falls back to it, never picks

    def unsupported_reason(self, call: Call) -> str | None:
        return None

    def run(self, call: Call) -> tuple[Tensor, State]:
        return recurrence(
            call.spec, call.gates_x, call.state, call.weight_hh, call.bias_hh, call.weight_hr,
            call.lengths, call.reverse, call.resets, call.reset_state, call.mask,
            call.carry_masked_output, hidden_dropout=call.hidden_dropout,
            zoneout_h=call.zoneout_h, zoneout_c=call.zoneout_c, norm_hh=call.norm_hh,
            norm_cell=call.norm_cell,
        )


BACKEND = ReferenceBackend()
