"""Stateful: chunked streaming equals one whole-sequence call, for every layer and cell kind."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import rnnkit
from rnnkit import Stateful

INPUT, HIDDEN, BATCH, STEPS = 3, 5, 4, 9
CHUNKS = [4, 1, 4]  # uneven on purpose


def make_layer(kind: str, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    if kind == "rnn_relu":
        return rnnkit.RNN(INPUT, HIDDEN, nonlinearity="relu", **kwargs)
    if kind == "rnn_silu":
        return rnnkit.RNN(INPUT, HIDDEN, nonlinearity="silu", **kwargs)
    if kind == "gru_before":
        return rnnkit.GRU(INPUT, HIDDEN, reset_after=False, **kwargs)
    if kind == "lstm_proj":
        return rnnkit.LSTM(INPUT, HIDDEN, proj_size=2, **kwargs)
    return {"rnn": rnnkit.RNN, "gru": rnnkit.GRU, "lstm": rnnkit.LSTM}[kind](
        INPUT, HIDDEN, **kwargs
    )


LAYER_KINDS = ["rnn", "rnn_relu", "rnn_silu", "gru", "gru_before", "lstm", "lstm_proj"]


def split_time(x: torch.Tensor, batch_first: bool) -> list[torch.Tensor]:
    return list(x.split(CHUNKS, dim=1 if batch_first else 0))


def chunk_lengths(lengths: torch.Tensor) -> list[torch.Tensor]:
    out, offset = [], 0
    for size in CHUNKS:
        out.append((lengths - offset).clamp(0, size))
        offset += size
    return out


def as_tuple(state) -> tuple[torch.Tensor, ...]:
    return state if isinstance(state, tuple) else (state,)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_chunks_equal_whole_sequence(kind, batch_first, num_layers):
    layer = make_layer(kind, batch_first=batch_first, num_layers=num_layers)
    shape = (BATCH, STEPS, INPUT) if batch_first else (STEPS, BATCH, INPUT)
    x = torch.randn(shape)
    whole, final = layer(x)
    stream = Stateful(layer)
    outputs = [stream(chunk) for chunk in split_time(x, batch_first)]
    torch.testing.assert_close(torch.cat(outputs, dim=1 if batch_first else 0), whole)
    for carried, expected in zip(as_tuple(stream.state), as_tuple(final)):
        torch.testing.assert_close(carried, expected)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("batch_first", [False, True])
def test_chunks_equal_whole_sequence_with_lengths(kind, batch_first):
    layer = make_layer(kind, batch_first=batch_first, num_layers=2)
    shape = (BATCH, STEPS, INPUT) if batch_first else (STEPS, BATCH, INPUT)
    x = torch.randn(shape)
    # 9 fills every chunk, 3 ends in the first chunk, 4 exactly at its end, 5 in the middle one.
    lengths = torch.tensor([9, 3, 4, 5])
    whole, final = layer(x, lengths=lengths)
    stream = Stateful(layer)
    pieces = zip(split_time(x, batch_first), chunk_lengths(lengths))
    outputs = []
    for chunk, chunk_len in pieces:
        before = [s.clone() for s in as_tuple(stream.state)] if stream.state is not None else None
        outputs.append(stream(chunk, lengths=chunk_len))
        ended = chunk_len == 0
        if before is not None and bool(ended.any()):
            # A finished sequence keeps its state and yields zeros.
            for old, new in zip(before, as_tuple(stream.state)):
                torch.testing.assert_close(new[:, ended], old[:, ended], rtol=0, atol=0)
            out = outputs[-1]
            finished = out[ended] if batch_first else out[:, ended]
            assert bool((finished == 0).all())
    torch.testing.assert_close(torch.cat(outputs, dim=1 if batch_first else 0), whole)
    for carried, expected in zip(as_tuple(stream.state), as_tuple(final)):
        torch.testing.assert_close(carried, expected)


def test_chunked_layer_matches_torch_nn():
    """The streamed result is also torch.nn's whole-sequence result (same weights)."""
    layer = make_layer("lstm", num_layers=2)
    reference = nn.LSTM(INPUT, HIDDEN, num_layers=2)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(STEPS, BATCH, INPUT)
    expected, (h_n, c_n) = reference(x)
    stream = Stateful(layer)
    got = torch.cat([stream(chunk) for chunk in split_time(x, False)])
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(stream.state[0], h_n)
    torch.testing.assert_close(stream.state[1], c_n)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_unbatched_chunks(kind):
    layer = make_layer(kind)
    x = torch.randn(STEPS, INPUT)
    whole, final = layer(x)
    stream = Stateful(layer)
    got = torch.cat([stream(chunk) for chunk in split_time(x, False)])
    torch.testing.assert_close(got, whole)
    for carried, expected in zip(as_tuple(stream.state), as_tuple(final)):
        torch.testing.assert_close(carried, expected)
    # An unbatched sequence that has ended gives zeros and keeps its state.
    kept = [s.clone() for s in as_tuple(stream.state)]
    out = stream(torch.randn(2, INPUT), lengths=[0])
    assert out.shape == (2, HIDDEN) and bool((out == 0).all())
    for old, new in zip(kept, as_tuple(stream.state)):
        torch.testing.assert_close(new, old, rtol=0, atol=0)


def test_packed_sequence_chunks():
    layer = make_layer("gru")
    x = torch.randn(STEPS, BATCH, INPUT)
    whole, final = layer(x)
    stream = Stateful(layer)
    outputs = []
    for chunk in split_time(x, False):
        lengths = torch.full((BATCH,), chunk.shape[0])
        packed = nn.utils.rnn.pack_padded_sequence(chunk, lengths)
        out, _ = nn.utils.rnn.pad_packed_sequence(stream(packed))
        outputs.append(out)
    torch.testing.assert_close(torch.cat(outputs), whole)
    torch.testing.assert_close(stream.state, final)


CELL_PAIRS = [
    (rnnkit.RNNCell, nn.RNN, {}),
    (rnnkit.RNNCell, nn.RNN, {"nonlinearity": "relu"}),
    (rnnkit.GRUCell, nn.GRU, {}),
    (rnnkit.LSTMCell, nn.LSTM, {}),
]


def cell_and_layer(cell_cls, layer_cls, kwargs):
    torch.manual_seed(1)
    cell = cell_cls(INPUT, HIDDEN, **kwargs)
    layer = layer_cls(INPUT, HIDDEN, **kwargs)
    layer.load_state_dict({k + "_l0": v for k, v in cell.state_dict().items()})
    return cell, layer


@pytest.mark.parametrize("cell_cls, layer_cls, kwargs", CELL_PAIRS)
def test_cell_steps_equal_torch_layer(cell_cls, layer_cls, kwargs):
    cell, layer = cell_and_layer(cell_cls, layer_cls, kwargs)
    x = torch.randn(STEPS, BATCH, INPUT)
    expected, final = layer(x)
    stream = Stateful(cell)
    got = torch.stack([stream(x_t) for x_t in x])
    torch.testing.assert_close(got, expected)
    for carried, want in zip(as_tuple(stream.state), as_tuple(final)):
        torch.testing.assert_close(carried, want[0])


@pytest.mark.parametrize("cell_cls, layer_cls, kwargs", CELL_PAIRS)
def test_cell_steps_with_lengths(cell_cls, layer_cls, kwargs):
    cell, layer = cell_and_layer(cell_cls, layer_cls, kwargs)
    x = torch.randn(STEPS, BATCH, INPUT)
    lengths = torch.tensor([9, 2, 5, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    expected, final = layer(packed)
    expected, _ = nn.utils.rnn.pad_packed_sequence(expected, total_length=STEPS)
    stream = Stateful(cell)
    got = torch.stack([stream(x_t, lengths=(lengths > t).long()) for t, x_t in enumerate(x)])
    torch.testing.assert_close(got, expected)
    for carried, want in zip(as_tuple(stream.state), as_tuple(final)):
        torch.testing.assert_close(carried, want[0])


def test_lstm_cell_returns_h_and_keeps_h_c():
    cell = rnnkit.LSTMCell(INPUT, HIDDEN)
    stream = Stateful(cell)
    x = torch.randn(BATCH, INPUT)
    h = stream(x)
    h_ref, c_ref = cell(x)
    torch.testing.assert_close(h, h_ref)
    torch.testing.assert_close(stream.state[0], h_ref)
    torch.testing.assert_close(stream.state[1], c_ref)


def test_unbatched_cell():
    cell = rnnkit.GRUCell(INPUT, HIDDEN)
    stream = Stateful(cell)
    x = torch.randn(3, INPUT)
    hidden = torch.zeros(HIDDEN)
    for x_t in x:
        hidden = cell(x_t, hidden)
        torch.testing.assert_close(stream(x_t), hidden)
    assert stream.state.shape == (HIDDEN,)


@pytest.mark.parametrize("module", [rnnkit.GRU(INPUT, HIDDEN), rnnkit.GRUCell(INPUT, HIDDEN)])
def test_batch_change_raises_and_reset_recovers(module):
    stream = Stateful(module)
    is_cell = isinstance(module, rnnkit.GRUCell)
    x4 = torch.randn(BATCH, INPUT) if is_cell else torch.randn(2, BATCH, INPUT)
    x3 = torch.randn(3, INPUT) if is_cell else torch.randn(2, 3, INPUT)
    stream(x4)
    with pytest.raises(ValueError, match=r"batch of 4 but this call has a batch of 3.*reset\(\)"):
        stream(x3)
    with pytest.raises(ValueError, match=r"unbatched input.*reset\(\)"):
        stream(x3[0])
    stream.reset()
    torch.testing.assert_close(stream(x3), module(x3) if is_cell else module(x3)[0])


def test_reset_restarts_from_zeros():
    layer = make_layer("lstm")
    stream = Stateful(layer)
    x = torch.randn(3, BATCH, INPUT)
    first = stream(x)
    assert not torch.equal(stream(x), first)  # the carried state changes the result
    stream.reset()
    assert stream.state is None
    torch.testing.assert_close(stream(x), first)


def test_truncated_bptt_stops_gradients_at_call_boundaries():
    layer = make_layer("gru")
    x1 = torch.randn(3, BATCH, INPUT, requires_grad=True)
    x2 = torch.randn(3, BATCH, INPUT)
    stream = Stateful(layer)
    stream(x1)
    assert not stream.state.requires_grad
    stream(x2).sum().backward()
    assert x1.grad is None
    assert layer.weight_hh_l0.grad is not None and bool(layer.weight_hh_l0.grad.abs().sum() > 0)


def test_detach_false_keeps_the_whole_graph():
    layer = make_layer("lstm")
    x = torch.randn(6, BATCH, INPUT, requires_grad=True)
    stream = Stateful(layer, detach=False)
    streamed = torch.cat([stream(x[:3]), stream(x[3:])])
    (grad_streamed,) = torch.autograd.grad(streamed[-1].sum(), x)
    (grad_whole,) = torch.autograd.grad(layer(x)[0][-1].sum(), x)
    assert bool(grad_streamed[:3].abs().sum() > 0)
    torch.testing.assert_close(grad_streamed, grad_whole)


def test_training_loop_with_truncated_bptt_runs():
    layer = make_layer("lstm")
    stream = Stateful(layer)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    before = layer.weight_ih_l0.detach().clone()
    for chunk in torch.randn(4, 2, BATCH, INPUT):  # backward per chunk, no retain_graph
        optimizer.zero_grad()
        stream(chunk).pow(2).mean().backward()
        optimizer.step()
    assert not torch.equal(layer.weight_ih_l0, before)


def test_bidirectional_is_refused():
    with pytest.raises(ValueError, match="bidirectional layer cannot stream"):
        Stateful(rnnkit.LSTM(INPUT, HIDDEN, bidirectional=True))


def test_non_rnnkit_modules_are_refused():
    with pytest.raises(TypeError, match="from_torch"):
        Stateful(nn.GRU(INPUT, HIDDEN))
    with pytest.raises(TypeError, match="rnnkit layer or cell"):
        Stateful(nn.Linear(INPUT, HIDDEN))
    with pytest.raises(TypeError, match="detach must be a bool"):
        Stateful(rnnkit.GRU(INPUT, HIDDEN), detach="yes")


def test_bad_lengths_are_refused():
    stream = Stateful(rnnkit.GRU(INPUT, HIDDEN))
    x = torch.randn(3, 2, INPUT)
    with pytest.raises(ValueError, match="at least 0"):
        stream(x, lengths=[-1, 2])
    with pytest.raises(ValueError, match="must not exceed the sequence length 3"):
        stream(x, lengths=[4, 2])
    cell_stream = Stateful(rnnkit.GRUCell(INPUT, HIDDEN))
    with pytest.raises(ValueError, match="must not exceed the sequence length 1"):
        cell_stream(torch.randn(2, INPUT), lengths=[2, 1])
    with pytest.raises(ValueError, match="PackedSequence"):
        packed = nn.utils.rnn.pack_padded_sequence(x, [3, 3])
        stream(packed, lengths=[3, 3])


def test_parameters_and_repr():
    layer = make_layer("gru")
    stream = Stateful(layer, detach=False)
    assert list(stream.parameters()) == list(layer.parameters())
    assert "detach=False" in repr(stream)
    stream(torch.randn(2, 3, INPUT))
    # The carried state is runtime data, not a saved tensor.
    assert set(stream.state_dict()) == {"module." + name for name in layer.state_dict()}


@settings(max_examples=20, deadline=None)
@given(
    kind=st.sampled_from(["rnn_relu", "gru_before", "lstm_proj"]),
    cuts=st.lists(st.integers(1, STEPS - 1), max_size=4, unique=True),
    lengths=st.lists(st.integers(1, STEPS), min_size=3, max_size=3),
    batch_first=st.booleans(),
)
def test_any_chunking_equals_whole_sequence(kind, cuts, lengths, batch_first):
    layer = make_layer(kind, batch_first=batch_first)
    time_dim = 1 if batch_first else 0
    x = torch.randn((3, STEPS, INPUT) if batch_first else (STEPS, 3, INPUT))
    lengths = torch.tensor(lengths)
    whole, final = layer(x, lengths=lengths)
    bounds = [0, *sorted(cuts), STEPS]
    stream = Stateful(layer)
    outputs = [
        stream(x.narrow(time_dim, start, stop - start),
               lengths=(lengths - start).clamp(0, stop - start))
        for start, stop in zip(bounds, bounds[1:])
    ]
    torch.testing.assert_close(torch.cat(outputs, dim=time_dim), whole)
    for carried, expected in zip(as_tuple(stream.state), as_tuple(final)):
        torch.testing.assert_close(carried, expected)


@pytest.mark.parametrize("is_cell", [False, True], ids=["LSTM", "GRUCell"])
def test_carried_state_follows_dtype_and_device_conversions(is_cell):
    """.double() and .to() convert the carried state with the parameters: the stream goes on
    in the new dtype and equals the whole sequence run in that dtype."""
    torch.manual_seed(0)
    module = rnnkit.GRUCell(3, 5) if is_cell else rnnkit.LSTM(3, 5)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    stream = Stateful(module)
    first = [stream(x[t].float()) for t in range(3)] if is_cell else [stream(x[:3].float())]
    stream.double()
    states = stream.state if isinstance(stream.state, tuple) else (stream.state,)
    assert all(s.dtype == torch.float64 for s in states)
    rest = [stream(x[t]) for t in range(3, 6)] if is_cell else [stream(x[3:])]
    assert rest[0].dtype == torch.float64
    whole = Stateful(module)  # already float64: the same weights, no conversion on the way
    expected = [whole(x[t]) for t in range(6)] if is_cell else [whole(x)]
    got = torch.stack(first + rest) if is_cell else torch.cat(first + rest)
    want = torch.stack(expected) if is_cell else expected[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    stream.to("meta")
    states = stream.state if isinstance(stream.state, tuple) else (stream.state,)
    assert all(s.device.type == "meta" for s in states)
