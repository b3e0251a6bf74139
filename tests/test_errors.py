"""Bad input raises a clear ValueError or TypeError naming what was expected and what came."""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_wrong_feature_size_names_both_sizes(kind):
    layer = getattr(rnnkit, kind)(4, 5)
    with pytest.raises(ValueError, match=r"4 features.*got 3"):
        layer(torch.randn(2, 1, 3))


@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 4)])
def test_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"2-D \(unbatched\) or 3-D \(batched\), got \d-D"):
        rnnkit.GRU(4, 5)(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 3, 4), ()])
def test_cell_wrong_rank(shape):
    with pytest.raises(ValueError, match=r"1-D \(unbatched\) or 2-D \(batched\)"):
        rnnkit.RNNCell(4, 5)(torch.randn(shape))


@pytest.mark.parametrize(
    "hx_shape,match",
    [
        ((1, 3, 5), r"h_0 must have shape \(2, 3, 5\), got \(1, 3, 5\)"),  # layer count
        ((2, 2, 5), r"h_0 must have shape \(2, 3, 5\), got \(2, 2, 5\)"),  # batch
        ((2, 3, 6), r"h_0 must have shape \(2, 3, 5\), got \(2, 3, 6\)"),  # hidden size
        ((2, 5), r"batched 3-D input, h_0 must be 3-D"),  # rank
    ],
)
def test_bad_hx(hx_shape, match):
    layer = rnnkit.RNN(4, 5, num_layers=2)
    with pytest.raises(ValueError, match=match):
        layer(torch.randn(7, 3, 4), torch.randn(hx_shape))


def test_bad_lstm_cell_state():
    layer = rnnkit.LSTM(4, 5, proj_size=2)
    h0, c0 = torch.zeros(1, 3, 2), torch.zeros(1, 3, 5)
    layer(torch.randn(7, 3, 4), (h0, c0))
    with pytest.raises(ValueError, match=r"c_0 must have shape \(1, 3, 5\), got \(1, 3, 2\)"):
        layer(torch.randn(7, 3, 4), (h0, torch.zeros(1, 3, 2)))
    with pytest.raises(TypeError, match=r"pair \(h, c\)"):
        layer(torch.randn(7, 3, 4), h0)


def test_bad_cell_hx():
    with pytest.raises(ValueError, match=r"hx must have shape \(3, 5\), got \(2, 5\)"):
        rnnkit.GRUCell(4, 5)(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"cx must have shape \(3, 5\), got \(3, 4\)"):
        rnnkit.LSTMCell(4, 5)(torch.randn(3, 4), (torch.randn(3, 5), torch.randn(3, 4)))


def test_dtype_mismatch():
    layer = rnnkit.GRU(4, 5)
    with pytest.raises(TypeError, match=r"input has dtype torch.float64 but the parameters have "
                                        r"dtype torch.float32"):
        layer(torch.randn(2, 1, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"h_0 has dtype torch.float64"):
        layer(torch.randn(2, 1, 4), torch.zeros(1, 1, 5, dtype=torch.float64))


def test_device_mismatch():
    layer = rnnkit.GRU(4, 5)
    with pytest.raises(ValueError, match=r"input is on meta but the parameters are on cpu"):
        layer(torch.randn(2, 1, 4, device="meta"))


@pytest.mark.parametrize("bad", [torch.ones(2, 1, 4, dtype=torch.int64), "not a tensor", [1.0]])
def test_non_floating_or_non_tensor_input(bad):
    with pytest.raises(TypeError, match=r"floating-point|must be a Tensor"):
        rnnkit.LSTM(4, 5)(bad)


@pytest.mark.parametrize(
    "lengths,error,match",
    [
        ([], ValueError, "must not be empty"),
        (torch.tensor([2.0, 1.0]), TypeError, "must hold integers"),
        ([2.0, 1.0], TypeError, "must hold integers"),
        ([True, 1], TypeError, "must hold integers"),
        ([2, -1], ValueError, "must be at least 0"),
        ([2, 4], ValueError, "must not exceed the sequence length 3"),
        ([2, 1, 1], ValueError, "expected 2, got 3"),
        (torch.tensor([[1, 2]]), ValueError, "must be 1-D"),
        (3, TypeError, "1-D integer tensor or a list of ints"),
    ],
)
def test_bad_lengths(lengths, error, match):
    with pytest.raises(error, match=match):
        rnnkit.GRU(4, 5)(torch.randn(3, 2, 4), lengths=lengths)


def test_lengths_with_packed_input():
    packed = pack_padded_sequence(torch.randn(3, 2, 4), [3, 2])
    with pytest.raises(ValueError, match="lengths must not be given with a PackedSequence"):
        rnnkit.GRU(4, 5)(packed, lengths=[3, 2])


@pytest.mark.parametrize(
    "factory,error,match",
    [
        (lambda: rnnkit.RNN(4, 5, nonlinearity="swish"), ValueError, "nonlinearity must be one of"),
        (lambda: rnnkit.RNN(4, 5, nonlinearity=3), TypeError, "a name or a callable"),
        (lambda: rnnkit.RNNCell(4, 5, nonlinearity="sine"), ValueError, "got 'sine'"),
        (lambda: rnnkit.GRU(0, 5), ValueError, "input_size must be greater than zero, got 0"),
        (lambda: rnnkit.GRU(4, -1), ValueError, "hidden_size must be greater than zero, got -1"),
        (lambda: rnnkit.GRU(4, 5, num_layers=0), ValueError, "num_layers must be greater"),
        (lambda: rnnkit.GRU(4.0, 5), TypeError, "input_size must be an int, got float"),
        (lambda: rnnkit.GRUCell(4, -1), ValueError, "hidden_size must be zero or positive"),
        (lambda: rnnkit.GRU(4, 5, dropout=1.5), ValueError, r"a number in \[0, 1\]"),
        (lambda: rnnkit.GRU(4, 5, dropout=-0.1), ValueError, "got -0.1"),
        (lambda: rnnkit.LSTM(4, 5, proj_size=5), ValueError, "proj_size must be smaller than"),
        (lambda: rnnkit.LSTM(4, 5, proj_size=-1), ValueError, "zero or positive"),
        (lambda: rnnkit.RNN(4, 5, proj_size=2), ValueError, "only supported by LSTM"),
        (lambda: rnnkit.GRU(4, 5, proj_size=2), ValueError, "only supported by LSTM"),
        (lambda: rnnkit.GRU(4, 5, batch_first=2), ValueError, r"a bool \(or 0 or 1\), got 2"),
        (lambda: rnnkit.GRU(4, 5, batch_first="no"), TypeError, "batch_first must be a bool"),
        (lambda: rnnkit.GRU(4, 5, backend="cuda-magic"), ValueError, "backend must be one of"),
    ],
)
def test_bad_constructor_arguments(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_bad_environment_backend(monkeypatch):
    monkeypatch.setenv("RNNKIT_BACKEND", "fastest")
    with pytest.raises(ValueError, match="RNNKIT_BACKEND must be one of"):
        rnnkit.GRU(4, 5)(torch.randn(2, 1, 4))


def test_empty_sequence():
    with pytest.raises(ValueError, match="at least one time step"):
        rnnkit.GRU(4, 5)(torch.randn(0, 2, 4))
