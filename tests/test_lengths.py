"""Variable-length batches: lengths= in any order, PackedSequence, and per-sequence equality."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from helpers import assert_close_all, outputs_and_grads, twin_layers

KINDS = [("RNN", {}), ("GRU", {}), ("LSTM", {}), ("LSTM", {"proj_size": 2})]


def _layer(kind, extra, **kwargs):
    return twin_layers(kind, 3, 4, num_layers=2, bidirectional=True, **extra, **kwargs)


@pytest.mark.parametrize("kind,extra", KINDS)
@pytest.mark.parametrize("as_type", ["list", "tensor"])
def test_lengths_equal_each_sequence_run_alone(kind, extra, as_type):
    _, layer = _layer(kind, extra)
    lengths = [2, 5, 1, 4]
    x = torch.randn(5, 4, 3, dtype=torch.float64)
    given = lengths if as_type == "list" else torch.tensor(lengths, dtype=torch.int32)
    output, state = layer(x, lengths=given)
    h_n = state[0] if kind == "LSTM" else state
    for b, length in enumerate(lengths):
        alone_out, alone_state = layer(x[:length, b])
        alone_h = alone_state[0] if kind == "LSTM" else alone_state
        torch.testing.assert_close(output[:length, b], alone_out, atol=1e-12, rtol=0)
        assert torch.all(output[length:, b] == 0), "output past a sequence's length is zero"
        torch.testing.assert_close(h_n[:, b], alone_h, atol=1e-12, rtol=0)
        if kind == "LSTM":
            torch.testing.assert_close(state[1][:, b], alone_state[1], atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind,extra", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_lengths_match_torch_packed_path(kind, extra, batch_first):
    torch_layer, layer = _layer(kind, extra, batch_first=batch_first)
    lengths = torch.tensor([3, 6, 1, 6, 2])
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    if not batch_first:
        x = x.transpose(0, 1).contiguous()
    x.requires_grad_(True)
    packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    out_t, state_t = torch_layer(packed)
    padded_t, _ = pad_packed_sequence(out_t, batch_first=batch_first, total_length=6)
    out_r, state_r = layer(x, lengths=lengths)
    torch.testing.assert_close(out_r, padded_t, atol=1e-10, rtol=0)
    states_t = state_t if kind == "LSTM" else (state_t,)
    states_r = state_r if kind == "LSTM" else (state_r,)
    for a, b in zip(states_r, states_t):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    # Gradients through both paths.
    (grad_t,) = torch.autograd.grad(padded_t.sum() + sum(s.sum() for s in states_t), x)
    (grad_r,) = torch.autograd.grad(out_r.sum() + sum(s.sum() for s in states_r), x)
    torch.testing.assert_close(grad_r, grad_t, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind,extra", KINDS)
@pytest.mark.parametrize("enforce_sorted", [False, True])
def test_packed_sequence_in_packed_sequence_out(kind, extra, enforce_sorted):
    torch_layer, layer = _layer(kind, extra)
    lengths = [6, 4, 4, 1] if enforce_sorted else [4, 6, 1, 4]
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    packed = PackedSequence(packed.data.requires_grad_(), packed.batch_sizes,
                            packed.sorted_indices, packed.unsorted_indices)
    count = 2 * 2
    out_size = extra.get("proj_size", 4)
    h0 = torch.randn(count, 4, out_size, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn(count, 4, 4, dtype=torch.float64, requires_grad=True)) \
        if kind == "LSTM" else h0
    expected = outputs_and_grads(torch_layer, packed, hx)
    got = outputs_and_grads(layer, packed, hx)
    assert_close_all(got[0], expected[0], atol=1e-10)
    assert_close_all(got[1], expected[1], atol=1e-10)
    out = layer(packed, hx)[0]
    reference = torch_layer(packed, hx)[0]
    assert torch.equal(out.batch_sizes, reference.batch_sizes)
    for mine, theirs in [(out.sorted_indices, reference.sorted_indices),
                         (out.unsorted_indices, reference.unsorted_indices)]:
        assert (mine is None and theirs is None) or torch.equal(mine, theirs)


def test_reverse_direction_starts_at_each_sequences_last_step():
    layer = twin_layers("GRU", 2, 3, bidirectional=True)[1]
    x = torch.randn(5, 2, 2, dtype=torch.float64)
    output, _ = layer(x, lengths=[2, 5])
    backward_half = output[:2, 0, 3:]
    alone_out, _ = layer(x[:2, 0:1])
    torch.testing.assert_close(backward_half, alone_out[:, 0, 3:], atol=1e-12, rtol=0)


def test_lengths_with_unbatched_input():
    layer = twin_layers("LSTM", 3, 4)[1]
    x = torch.randn(5, 3, dtype=torch.float64)
    out, (h, c) = layer(x, lengths=torch.tensor([3]))
    alone, (h_alone, _) = layer(x[:3])
    torch.testing.assert_close(out[:3], alone, atol=1e-12, rtol=0)
    assert out.shape == (5, 4) and torch.all(out[3:] == 0)
    torch.testing.assert_close(h, h_alone, atol=1e-12, rtol=0)
