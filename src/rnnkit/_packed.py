"""PackedSequence input run in chunks of time over the rows still running, and back.

A PackedSequence's `data` is time-first and sorted: step `t` holds rows `[0, batch_sizes[t])`
of the sequences in descending order of length. The kernels compute every row of every step,
so a padded batch of short and long sequences wastes the work of the finished rows (3x the
packed rows on real sentence lengths). The layers therefore run a packed batch in a few
chunks of time, chunk `[t0, t1)` over the rows `[0, batch_sizes[t0])` still running at its
start, each carrying on the state of the last (forward) or next (reverse) one.

Between layers the sequences stay in this block layout: the chunks' `(t1 - t0, width, F)`
blocks, flattened and stacked into one `(R, F)` tensor. Only the state is permuted (`hx` by
`sorted_indices`, `h_n` back by `unsorted_indices`), as torch.nn does; the data moves once
in and once out, each a single index copy or select over rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from rnnkit.ops.spec import State


class PackedLayout:
    """The chunks a PackedSequence runs in, and where each of its rows sits in their blocks.

    Attributes:
        steps: `T`, the longest sequence's length.
        batch: `B`, the number of sequences.
        lengths: `(B,)` int64, the sequences' lengths in sorted (descending) order.
        chunks: `(t0, t1, width, lengths)` in time order: the steps `[t0, t1)` run the rows
            `[0, width)`, with `lengths` `(width,)` counted from `t0` (`None`: all run to
            `t1`). Its block is `(t1 - t0, width, F)`, zero past each length.
        rows: `R`, the rows of all blocks together.
        positions: `(N,)` int64, row `i` of `data` is row `positions[i]` of the blocks.
        sequences: `(R,)` int64, the sorted sequence each row of the blocks belongs to.
    """

    def __init__(self, packed: PackedSequence) -> None:
        """Raises:
            ValueError: `packed` has no time step.
        """
        batch_sizes = packed.batch_sizes  # on the CPU, as torch keeps it
        device = packed.data.device
        sizes = batch_sizes.tolist()
        if not sizes:
            raise ValueError("input must have at least one time step, got a PackedSequence "
                             "with empty batch_sizes")
        self.steps, self.batch = len(sizes), sizes[0]
        # Sequence b (sorted) is running at step t while b < batch_sizes[t].
        slots = torch.arange(self.batch)
        lengths = (slots[:, None] < batch_sizes[None, :]).sum(1)
        self.lengths = lengths.to(device)
        self.chunks: list[tuple[int, int, int, Tensor | None]] = []
        start_of_step: list[int] = []
        sequences: list[Tensor] = []
        offset = 0
        # A GPU runs the rows of a step in parallel, so padded rows cost little beside a call.
        chunked = device.type == "cpu"
        for t0, t1 in _chunk_bounds(sizes) if chunked else [(0, len(sizes))]:
            width = sizes[t0]
            in_chunk = None
            if sizes[t1 - 1] < width:  # some rows finish inside the chunk
                in_chunk = (lengths[:width] - t0).clamp(max=t1 - t0).to(device)
            self.chunks.append((t0, t1, width, in_chunk))
            # The block's row of step t, slot b is offset + (t - t0) * width + b.
            start_of_step += [offset + (t - t0) * width for t in range(t0, t1)]
            sequences.append(slots[:width].repeat(t1 - t0))
            offset += (t1 - t0) * width
        self.rows = offset
        step_of_row = torch.repeat_interleave(torch.arange(self.steps), batch_sizes)
        first_row = torch.cumsum(batch_sizes, 0) - batch_sizes
        slot_of_row = torch.arange(len(step_of_row)) - first_row[step_of_row]
        self.positions = (torch.tensor(start_of_step)[step_of_row] + slot_of_row).to(device)
        self.sequences = torch.cat(sequences).to(device)

    def blocks(self, data: Tensor) -> Tensor:
        """`data` `(N, F)` in the block layout `(R, F)`."""
        flat = data.new_zeros(self.rows, data.shape[-1])
        return flat.index_copy(0, self.positions, data)

    def packed_data(self, blocks: Tensor) -> Tensor:
        """The rows of the block layout `(R, F)` that a PackedSequence keeps, `(N, F)`."""
        return blocks.index_select(0, self.positions)

    def per_row(self, per_sequence: Tensor) -> Tensor:
        """A per-sequence tensor `(B, F)` in sorted order, repeated to each row `(R, F)`."""
        return per_sequence.index_select(0, self.sequences)


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
    blocks: Tensor,
    state: State,
    reverse: bool,
) -> tuple[Tensor, State]:
    """One direction over the block layout `(R, F)`, chunk by chunk.

    `run(input, state, lengths, steps, width)` runs one chunk: input `(t1 - t0, width, F)`,
    the state's first `width` rows, `steps` the slice `t0:t1`. Returns the output in the
    block layout `(R, H_out)` and the final state `(B, ...)` of every sequence.
    """
    # split, not slicing: the backward of each slice would be a zero-filled full-size tensor.
    parts = list(blocks.split([(t1 - t0) * width for t0, t1, width, _ in layout.chunks]))
    order = range(len(parts) - 1, -1, -1) if reverse else range(len(parts))
    for index in order:
        t0, t1, width, lengths = layout.chunks[index]
        chunk = parts[index].reshape(t1 - t0, width, -1)
        output, final = run(chunk, tuple(s[:width] for s in state), lengths, slice(t0, t1),
                            width)
        # The rows past `width` finished before this chunk (forward) or start after it.
        # (Under autocast the final state comes back in the autocast dtype.)
        state = tuple(f if width == layout.batch else torch.cat([f, s[width:].to(f.dtype)])
                      for f, s in zip(final, state))
        parts[index] = output.reshape((t1 - t0) * width, -1)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)), state
