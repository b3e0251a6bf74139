"""PackedSequence input as a padded batch in sorted order, run in chunks of time, and back.

A PackedSequence's `data` is time-first and sorted: step `t` holds rows `[0, batch_sizes[t])`
of the sequences in descending order of length. The layers run it as a padded `(T, B, H)`
batch in that same sorted order, so no permutation of the batch is needed; only the state is
permuted (`hx` by `sorted_indices`, `h_n` back by `unsorted_indices`), as torch.nn does.
Each conversion is one index copy or select over rows, whose backward is one select or
index-add: cheap beside the recurrence.

The kernels compute every row of every step, so a padded batch of short and long sequences
wastes the work of the finished rows (3x the packed rows on real sentence lengths). Each
direction therefore runs as a few calls over chunks of time, chunk `[t0, t1)` over the rows
`[0, batch_sizes[t0])` still running at its start, each carrying the state of the last
(forward) or next (reverse) one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from rnnkit.ops.spec import State


class PackedLayout:
    """Where each row of a PackedSequence's `data` sits in the padded sorted batch.

    Attributes:
        steps: `T`, the longest sequence's length.
        batch: `B`, the number of sequences.
        lengths: `(B,)` int64, the sequences' lengths in sorted (descending) order.
        positions: `(N,)` int64, row `i` of `data` is row `positions[i]` of the padded
            batch flattened to `(T * B, H)`.
        chunks: `(t0, t1, width, lengths)` in time order: the steps `[t0, t1)` run the rows
            `[0, width)`, with `lengths` `(width,)` counted from `t0` (`None`: all run to
            `t1`).
    """

    def __init__(self, packed: PackedSequence) -> None:
        batch_sizes = packed.batch_sizes  # on the CPU, as torch keeps it
        device = packed.data.device
        self.steps, self.batch = len(batch_sizes), int(batch_sizes[0])
        # Sequence b (sorted) is running at step t while b < batch_sizes[t].
        slots = torch.arange(self.batch)
        self.lengths = (slots[:, None] < batch_sizes[None, :]).sum(1).to(device)
        step_of_row = torch.repeat_interleave(torch.arange(self.steps), batch_sizes)
        first_row = torch.cumsum(batch_sizes, 0) - batch_sizes
        slot_of_row = torch.arange(len(step_of_row)) - first_row[step_of_row]
        self.positions = (step_of_row * self.batch + slot_of_row).to(device)
        self.chunks = []
        for t0, t1 in _chunk_bounds(batch_sizes.tolist()):
            width = int(batch_sizes[t0])
            full = int(batch_sizes[t1 - 1]) == width
            lengths = None if full else (self.lengths[:width] - t0).clamp(max=t1 - t0)
            self.chunks.append((t0, t1, width, lengths))

    def padded(self, data: Tensor) -> Tensor:
        """`data` `(N, H)` as the padded sorted batch `(T, B, H)`, zero past each length."""
        flat = data.new_zeros(self.steps * self.batch, data.shape[-1])
        return flat.index_copy(0, self.positions, data).view(self.steps, self.batch, -1)

    def packed_data(self, padded: Tensor) -> Tensor:
        """The rows of a padded sorted batch `(T, B, H)` that a PackedSequence keeps."""
        return padded.reshape(self.steps * self.batch, -1).index_select(0, self.positions)


def sorted_batch(state: Tensor, packed: PackedSequence) -> Tensor:
    """A state `(.., B, H)` in the caller's order, reordered as the packed batch is sorted."""
    order = packed.sorted_indices
    return state if order is None else state.index_select(-2, order)


def caller_order(state: Tensor, packed: PackedSequence) -> Tensor:
    """A state `(.., B, H)` in sorted order, back in the caller's order of sequences."""
    order = packed.unsorted_indices
    return state if order is None else state.index_select(-2, order)


# A call's fixed cost, in rows of one step: a chunk is cut where the padded rows it would
# carry on cost more than starting another call.
CALL_COST_ROWS = 16


def _chunk_bounds(batch_sizes: list[int]) -> list[tuple[int, int]]:
    """Cut the steps into chunks `[t0, t1)`, a new one wherever the rows finished since the
    chunk began would add up to more than `CALL_COST_ROWS` over the chunk's further steps."""
    bounds, start, waste = [], 0, 0
    for t, size in enumerate(batch_sizes):
        waste += batch_sizes[start] - size
        if waste > CALL_COST_ROWS:
            bounds.append((start, t))
            start, waste = t, 0
    bounds.append((start, len(batch_sizes)))
    return bounds


def run_chunked(
    layout: PackedLayout,
    run: Callable[[Tensor, State, Tensor | None, slice, int], tuple[Tensor, State]],
    layer_input: Tensor,
    state: State,
    reverse: bool,
) -> tuple[Tensor, State]:
    """One direction over the padded sorted batch, chunk by chunk.

    `run(input, state, lengths, steps, width)` runs one chunk: input `(t1 - t0, width, F)`,
    the state's first `width` rows, `steps` the slice `t0:t1`. Returns the output `(T, B,
    H_out)` (zero past each length) and the final state, as one call with the lengths would.
    """
    if len(layout.chunks) == 1:
        return run(layer_input, state, layout.chunks[0][3], slice(None), layout.batch)
    # split, not slicing: the backward of each slice would be a zero-filled full-size tensor.
    parts = layer_input.split([t1 - t0 for t0, t1, _, _ in layout.chunks])
    pieces: list[Tensor] = [layer_input] * len(parts)
    order = range(len(parts) - 1, -1, -1) if reverse else range(len(parts))
    for index in order:
        t0, t1, width, lengths = layout.chunks[index]
        output, final = run(parts[index][:, :width], tuple(s[:width] for s in state),
                            lengths, slice(t0, t1), width)
        # The rows past `width` finished before this chunk (forward) or start after it.
        state = tuple(f if width == layout.batch else torch.cat([f, s[width:]])
                      for f, s in zip(final, state))
        pieces[index] = F.pad(output, (0, 0, 0, layout.batch - width))
    return torch.cat(pieces), state
