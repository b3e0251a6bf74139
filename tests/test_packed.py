"""PackedSequence input, run in chunks of time over the sorted batch (rnnkit._packed).

torch.nn's packed path is the reference; each test runs with the chunks cut at every change
of batch size (`CALL_COST_ROWS = 0`), with the default cut, and as a single chunk.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnkit
from helpers import assert_close_all, outputs_and_grads, twin_layers
from rnnkit import _packed

KINDS = [("RNN", {}), ("GRU", {}), ("LSTM", {}), ("LSTM", {"proj_size": 2})]
LENGTHS = [5, 9, 1, 9, 3, 7, 2, 5]  # unsorted, with ties, one of length 1


@pytest.fixture(params=[0, _packed.CALL_COST_ROWS, 10**9], ids=["every", "default", "one"])
def call_cost(request, monkeypatch):
    monkeypatch.setattr(_packed, "CALL_COST_ROWS", request.param)
    return request.param


def _packed_input(lengths, features, enforce_sorted=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(max(lengths), len(lengths), features, dtype=torch.float64,
                    generator=generator)
    packed = pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=enforce_sorted)
    return PackedSequence(packed.data.requires_grad_(), packed.batch_sizes,
                          packed.sorted_indices, packed.unsorted_indices)


def _state(kind, extra, count, batch, hidden):
    out_size = extra.get("proj_size", hidden)
    h0 = torch.randn(count, batch, out_size, dtype=torch.float64, requires_grad=True)
    if kind != "LSTM":
        return h0
    return h0, torch.randn(count, batch, hidden, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("kind,extra", KINDS)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("with_hx", [False, True])
def test_packed_equals_torch_nn(kind, extra, backend, with_hx, call_cost):
    torch_layer, layer = twin_layers(kind, 3, 4, num_layers=2, bidirectional=True, **extra,
                                     ours_kwargs={"backend": backend})
    packed = _packed_input(LENGTHS, 3)
    hx = _state(kind, extra, 4, len(LENGTHS), 4) if with_hx else None
    expected = outputs_and_grads(torch_layer, packed, hx)
    got = outputs_and_grads(layer, packed, hx)
    assert_close_all(got[0], expected[0], atol=1e-10)
    assert_close_all(got[1], expected[1], atol=1e-10)


@pytest.mark.parametrize("kind,extra", KINDS)
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_layout_and_state_order_match_torch_nn(kind, extra, enforce_sorted, call_cost):
    torch_layer, layer = twin_layers(kind, 2, 3, bidirectional=True, **extra)
    lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS
    packed = _packed_input(lengths, 2, enforce_sorted=enforce_sorted)
    out, state = layer(packed)
    out_t, state_t = torch_layer(packed)
    assert torch.equal(out.batch_sizes, out_t.batch_sizes)
    for mine, theirs in [(out.sorted_indices, out_t.sorted_indices),
                         (out.unsorted_indices, out_t.unsorted_indices)]:
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)
    torch.testing.assert_close(out.data, out_t.data, atol=1e-10, rtol=0)
    states, states_t = (state, state_t) if kind == "LSTM" else ((state,), (state_t,))
    for mine, theirs in zip(states, states_t):
        torch.testing.assert_close(mine, theirs, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_packed_equals_lengths_with_given_dropout_masks(kind, call_cost):
    """Training with per-sequence masks given in the caller's order: each sequence keeps its
    own masks, as with lengths= on the padded batch."""
    layer = getattr(rnnkit, kind)(3, 4, num_layers=2, bidirectional=True, dtype=torch.float64,
                                  input_dropout=0.3, recurrent_dropout=0.3).train()
    packed = _packed_input(LENGTHS, 3)
    masks = layer.sequence_masks(len(LENGTHS))
    out, state = layer(packed, dropout_masks=masks)
    padded, lengths = pad_packed_sequence(packed)
    out_lengths, state_lengths = layer(padded, lengths=lengths, dropout_masks=masks)
    torch.testing.assert_close(pad_packed_sequence(out)[0], out_lengths, atol=1e-12, rtol=0)
    states = (state, state_lengths) if kind == "GRU" else (state[0], state_lengths[0])
    torch.testing.assert_close(*states, atol=1e-12, rtol=0)


def test_packed_equals_lengths_with_given_zoneout_masks(call_cost):
    layer = rnnkit.LSTM(3, 4, bidirectional=True, dtype=torch.float64, zoneout=0.4).train()
    packed = _packed_input(LENGTHS, 3)
    steps, batch = max(LENGTHS), len(LENGTHS)
    generator = torch.Generator().manual_seed(1)
    masks = {f"zoneout_{state}_l0{suffix}": torch.bernoulli(
                 torch.full((steps, batch, 4), 0.4, dtype=torch.float64), generator=generator)
             for state in ("h", "c") for suffix in ("", "_reverse")}
    out, (h_n, c_n) = layer(packed, dropout_masks=masks)
    padded, lengths = pad_packed_sequence(packed)
    out_lengths, (h_lengths, c_lengths) = layer(padded, lengths=lengths, dropout_masks=masks)
    torch.testing.assert_close(pad_packed_sequence(out)[0], out_lengths, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n, h_lengths, atol=1e-12, rtol=0)
    torch.testing.assert_close(c_n, c_lengths, atol=1e-12, rtol=0)


def test_dropout_between_layers_reaches_the_next_layer(call_cost):
    """dropout=1 zeroes the first layer's output, so the second layer sees zero input."""
    torch_layer, layer = twin_layers("GRU", 3, 4, num_layers=2)
    layer.dropout = 1.0
    layer.train()
    packed = _packed_input(LENGTHS, 3)
    out, h_n = layer(packed)
    zero_input = PackedSequence(torch.zeros_like(packed.data[:, :1]).expand(-1, 4),
                                packed.batch_sizes, packed.sorted_indices,
                                packed.unsorted_indices)
    second = torch.nn.GRU(4, 4, dtype=torch.float64)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(second, f"{name}_l0").data.copy_(getattr(torch_layer, f"{name}_l1"))
    out_t, h_t = second(zero_input)
    torch.testing.assert_close(out.data, out_t.data, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n[1], h_t[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize("call_cost", [0, 3, 16, 10**9])
def test_chunks_cover_each_step_once_with_the_rows_running_at_their_start(call_cost,
                                                                           monkeypatch):
    monkeypatch.setattr(_packed, "CALL_COST_ROWS", call_cost)
    packed = _packed_input([12, 12, 11, 8, 8, 5, 2, 1, 1], 1)
    layout = _packed.PackedLayout(packed)
    sizes = packed.batch_sizes.tolist()
    assert layout.chunks[0][0] == 0 and layout.chunks[-1][1] == len(sizes)
    for (t0, t1, _, _), following in zip(layout.chunks, layout.chunks[1:]):
        assert t1 == following[0] and t0 < t1
    for t0, t1, width, lengths in layout.chunks:
        assert width == sizes[t0]
        wasted = sum(width - size for size in sizes[t0:t1])
        assert wasted <= call_cost, "a chunk carries no more padded rows than a call costs"
        running = [sum(size > b for size in sizes[t0:t1]) for b in range(width)]
        if lengths is None:
            assert running == [t1 - t0] * width
        else:
            assert lengths.tolist() == running
    if call_cost == 0:
        assert len(layout.chunks) == len(set(sizes)), "a cut at every change of batch size"
    if call_cost == 10**9:
        assert len(layout.chunks) == 1


def test_blocks_hold_the_padded_sorted_batch_chunk_by_chunk(call_cost):
    packed = _packed_input(LENGTHS, 2)
    layout = _packed.PackedLayout(packed)
    blocks = layout.blocks(packed.data)
    order = packed.sorted_indices
    padded, lengths = pad_packed_sequence(packed)
    padded = padded[:, order]
    assert torch.equal(layout.lengths, lengths[order])
    parts = blocks.split([(t1 - t0) * width for t0, t1, width, _ in layout.chunks])
    assert sum(len(part) for part in parts) == layout.rows == len(blocks)
    for part, (t0, t1, width, _) in zip(parts, layout.chunks):
        assert torch.equal(part.view(t1 - t0, width, 2), padded[t0:t1, :width])
    assert torch.equal(layout.packed_data(blocks), packed.data)
    sequences = torch.cat([torch.arange(width).repeat(t1 - t0)
                           for t0, t1, width, _ in layout.chunks])
    per_sequence = torch.randn(len(LENGTHS), 3)
    assert torch.equal(layout.per_row(per_sequence), per_sequence[sequences])


def test_a_packed_sequence_without_steps_is_refused():
    layer = rnnkit.GRU(3, 4)
    empty = PackedSequence(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least one time step"):
        layer(empty)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_packed_under_autocast_matches_lengths(kind, call_cost):
    """Under autocast every chunk's state comes back in bfloat16; so does the whole h_n."""
    layer = getattr(rnnkit, kind)(3, 4, bidirectional=True)
    packed = _packed_input(LENGTHS, 3)
    packed = PackedSequence(packed.data.detach().float(), packed.batch_sizes,
                            packed.sorted_indices, packed.unsorted_indices)
    padded, lengths = pad_packed_sequence(packed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = layer(packed)
        out_lengths, state_lengths = layer(padded, lengths=lengths)
    states = state if kind == "LSTM" else (state,)
    states_lengths = state_lengths if kind == "LSTM" else (state_lengths,)
    assert out.data.dtype == out_lengths.dtype
    torch.testing.assert_close(pad_packed_sequence(out)[0], out_lengths)
    for mine, theirs in zip(states, states_lengths):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine, theirs)


def test_off_the_cpu_a_packed_batch_runs_as_one_chunk():
    sizes = torch.tensor([4, 3, 3, 2, 1, 1])
    data = torch.empty(int(sizes.sum()), 2, device="meta")
    layout = _packed.PackedLayout(PackedSequence(data, sizes))
    assert [chunk[:3] for chunk in layout.chunks] == [(0, 6, 4)]
    assert layout.positions.device.type == "meta"
