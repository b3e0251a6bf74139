"""Variable-length batches: lengths= in any order, PackedSequence, and per-sequence equality."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

import rnnkit
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


# Sequences of length 0 -------------------------------------------------------------------


def _random_state(layer, batch, requires_grad=True):
    count = layer.num_layers * layer.num_directions
    out_size = layer.proj_size or layer.hidden_size
    h0 = torch.randn(count, batch, out_size, dtype=torch.float64, requires_grad=requires_grad)
    if layer.spec.mode != "lstm":
        return h0
    return h0, torch.randn(count, batch, layer.hidden_size, dtype=torch.float64,
                           requires_grad=requires_grad)


def _states(state):
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("kind,extra", KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_length_zero_keeps_the_initial_state_and_outputs_zero(kind, extra, batch_first, backend):
    _, layer = _layer(kind, extra, batch_first=batch_first, ours_kwargs={"backend": backend})
    lengths = torch.tensor([0, 5, 2, 0])
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    x = (x if batch_first else x.transpose(0, 1).contiguous()).requires_grad_(True)
    hx = _random_state(layer, 4)
    output, state = layer(x, hx, lengths=lengths)
    rows = output if batch_first else output.transpose(0, 1)
    for b in (0, 3):
        assert torch.all(rows[b] == 0)
        for final, initial in zip(_states(state), _states(hx)):
            assert torch.equal(final[:, b], initial[:, b])
    # The other sequences are as if the empty ones were not in the batch.
    keep = torch.tensor([1, 2])
    sub_x = x[keep] if batch_first else x[:, keep]
    sub_hx = tuple(s[:, keep] for s in _states(hx))
    sub_out, sub_state = layer(sub_x, sub_hx if kind == "LSTM" else sub_hx[0],
                               lengths=lengths[keep])
    torch.testing.assert_close(rows[keep], sub_out if batch_first else sub_out.transpose(0, 1),
                               atol=1e-12, rtol=0)
    for final, alone in zip(_states(state), _states(sub_state)):
        torch.testing.assert_close(final[:, keep], alone, atol=1e-12, rtol=0)
    # Gradients: an empty sequence's final state is its initial state, so d(h_n)/d(h_0) is the
    # identity there, and none of its input is read.
    weights = [torch.randn_like(s) for s in _states(state)]
    loss = (output * torch.randn_like(output)).sum() + sum(
        (w * s).sum() for w, s in zip(weights, _states(state)))
    grads = torch.autograd.grad(loss, [x, *_states(hx)])
    x_grad = grads[0] if batch_first else grads[0].transpose(0, 1)
    for b in (0, 3):
        assert torch.all(x_grad[b] == 0)
        for weight, grad in zip(weights, grads[1:]):
            assert torch.equal(grad[:, b], weight[:, b])
    assert torch.all(x_grad[1].abs().sum(-1) > 0)


@pytest.mark.parametrize("kind,extra", KINDS)
def test_all_lengths_zero(kind, extra):
    _, layer = _layer(kind, extra)
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    hx = _random_state(layer, 3)
    output, state = layer(x, hx, lengths=[0, 0, 0])
    assert output.shape == (4, 3, 2 * (extra.get("proj_size") or 4))
    assert torch.all(output == 0)
    for final, initial in zip(_states(state), _states(hx)):
        assert torch.equal(final, initial)
    loss = output.sum() + sum(s.sum() for s in _states(state))
    loss.backward()
    assert torch.all(x.grad == 0)
    for initial in _states(hx):
        assert torch.all(initial.grad == 1)
    for name, param in layer.named_parameters():
        assert param.grad is None or torch.all(param.grad == 0), name


def test_length_zero_keeps_the_learnable_initial_state_and_trains_it():
    layer = rnnkit.GRU(3, 4, bidirectional=True, learn_initial_state=True, dtype=torch.float64)
    with torch.no_grad():
        layer.initial_h.normal_()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    output, h_n = layer(x, lengths=[0, 5])
    torch.testing.assert_close(h_n[:, 0], layer.initial_h, rtol=0, atol=0)
    assert torch.all(output[:, 0] == 0)
    (grad,) = torch.autograd.grad(h_n[:, 0].sum(), layer.initial_h)
    assert torch.all(grad == 1)


def test_length_zero_unbatched():
    layer = twin_layers("LSTM", 3, 4)[1]
    x = torch.randn(5, 3, dtype=torch.float64)
    hx = (torch.randn(1, 4, dtype=torch.float64), torch.randn(1, 4, dtype=torch.float64))
    out, (h, c) = layer(x, hx, lengths=[0])
    assert out.shape == (5, 4) and torch.all(out == 0)
    assert torch.equal(h, hx[0]) and torch.equal(c, hx[1])


def test_length_zero_rows_beside_the_packed_path():
    """torch.nn's packed path refuses length 0; the other rows equal it exactly."""
    torch_layer, layer = _layer("GRU", {})
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    lengths = torch.tensor([3, 0, 6, 2])
    with pytest.raises(RuntimeError, match="greater than 0"):
        pack_padded_sequence(x, lengths, enforce_sorted=False)
    keep = lengths > 0
    packed = pack_padded_sequence(x[:, keep], lengths[keep], enforce_sorted=False)
    out_t, h_t = torch_layer(packed)
    padded_t, _ = pad_packed_sequence(out_t, total_length=6)
    out, h_n = layer(x, lengths=lengths)
    torch.testing.assert_close(out[:, keep], padded_t, atol=1e-10, rtol=0)
    torch.testing.assert_close(h_n[:, keep], h_t, atol=1e-10, rtol=0)
    assert torch.all(out[:, 1] == 0) and torch.all(h_n[:, 1] == 0)


@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU", "LSTM"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_length_zero_is_keras_fully_masked_row(kind, bidirectional):
    """A Keras row whose mask is all False keeps its initial state and outputs zeros."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="the keras package (rnnkit[keras]) is missing")
    from rnnkit.interop import from_keras

    inner = getattr(keras.layers, kind)(4, return_sequences=True, return_state=True,
                                        zero_output_for_mask=True)
    layer = keras.layers.Bidirectional(inner) if bidirectional else inner
    layer.build((None, None, 3))
    rng = np.random.default_rng(0)
    parts = [layer.forward_layer, layer.backward_layer] if bidirectional else [layer]
    for part in parts:
        part.set_weights([rng.normal(0, 0.5, w.shape).astype(w.dtype)
                          for w in part.get_weights()])
    lengths = [0, 5, 2]
    x = rng.normal(size=(3, 5, 3)).astype("float32")
    directions = 2 if bidirectional else 1
    per = 2 if kind == "LSTM" else 1
    initial = [rng.normal(size=(3, 4)).astype("float32") for _ in range(directions * per)]
    mask = np.arange(5)[None, :] < np.array(lengths)[:, None]
    expected = [keras.ops.convert_to_numpy(e)
                for e in layer(x, initial_state=initial, mask=mask)]
    tensors = [torch.from_numpy(s) for s in initial]
    hx = tuple(torch.stack(tensors[i::per]) for i in range(per))
    ours = from_keras(layer)
    out, state = ours(torch.from_numpy(x), hx if kind == "LSTM" else hx[0], lengths=lengths)
    got = [out] + [s[d] for d in range(directions) for s in _states(state)]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g.detach().numpy(), e, rtol=1e-5, atol=1e-5)
    assert np.all(expected[0][0] == 0)
    for e, i in zip(expected[1:], initial):
        np.testing.assert_array_equal(e[0], i[0])


def test_negative_and_too_long_lengths_are_refused():
    layer = rnnkit.GRU(3, 4)
    with pytest.raises(ValueError, match=r"lengths must be at least 0, got \[2, -1\]"):
        layer(torch.randn(3, 2, 3), lengths=[2, -1])
    with pytest.raises(ValueError, match="must not exceed the sequence length 3"):
        layer(torch.randn(3, 2, 3), lengths=[0, 4])
