"""Recurrent dropout, input dropout, zoneout, gate activations and forget_bias on the layers
and cells: against Keras 3 and torch.nn, statistically, across Stateful chunks, and on bad
input. (The step math itself is held to an independent loop in
test_regularized_reference.py; layer norm in test_layer_norm.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit
from rnnkit import Stateful
from rnnkit.ops import dispatch


@pytest.fixture(scope="module")
def keras():
    import os

    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras", reason="keras 3 is not installed")
    if keras.backend.backend() != "torch":
        pytest.skip(f"these tests need KERAS_BACKEND=torch, got {keras.backend.backend()}")
    return keras


def _randomize(layer, seed):
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(0, 0.4, w.shape).astype(w.dtype)
                       for w in layer.get_weights()])
    return layer


def _fix_keras_masks(layer, input_mask, hidden_mask):
    """Make a Keras layer use the given per-sequence masks for every gate."""
    cell = layer.cell
    count = getattr(cell, "dropout_mask_count", None)

    def repeat(mask):
        return mask if count is None else [mask] * count

    cell.get_dropout_mask = lambda step_input: repeat(input_mask)
    cell.get_recurrent_dropout_mask = lambda step_input: repeat(hidden_mask)


# Keras's torch backend does not reach float64 round-off for float64 layers (~1e-7 apart).
KERAS_ATOL = 1e-6
KERAS_KINDS = ["SimpleRNN", "GRU", "GRU-reset-before", "LSTM"]


def _keras_layer(keras, kind, **options):
    if kind == "GRU-reset-before":
        return keras.layers.GRU(5, reset_after=False, return_sequences=True, dtype="float64",
                                **options)
    return getattr(keras.layers, kind)(5, return_sequences=True, dtype="float64", **options)


@pytest.mark.parametrize("kind", KERAS_KINDS)
def test_keras_recurrent_and_input_dropout_with_fixed_masks(keras, kind):
    layer = _keras_layer(keras, kind, dropout=0.3, recurrent_dropout=0.4)
    layer.build((None, None, 3))
    _randomize(layer, 1)
    ours = rnnkit.interop.from_keras(layer).train()
    assert ours.recurrent_dropout == pytest.approx(0.4)
    assert ours.input_dropout == pytest.approx(0.3)
    torch.manual_seed(0)
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    masks = ours.sequence_masks(4)
    assert set(masks) == {"input_l0", "hidden_l0"}
    _fix_keras_masks(layer, masks["input_l0"], masks["hidden_l0"])
    want = keras.ops.convert_to_numpy(layer(x, training=True))
    got, _ = ours(x, dropout_masks=masks)
    np.testing.assert_allclose(got.detach().numpy(), want, atol=KERAS_ATOL, rtol=0)
    # The masks did something: without them the output differs.
    ours.eval()
    assert not np.allclose(ours(x)[0].detach().numpy(), want, atol=1e-3)


@pytest.mark.parametrize("kind", KERAS_KINDS)
def test_keras_dropout_layers_in_eval_are_exact(keras, kind):
    layer = _keras_layer(keras, kind, dropout=0.3, recurrent_dropout=0.4)
    layer.build((None, None, 3))
    _randomize(layer, 2)
    ours = rnnkit.interop.from_keras(layer).eval()
    x = torch.randn(3, 7, 3, dtype=torch.float64)
    want = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_allclose(ours(x)[0].detach().numpy(), want, atol=KERAS_ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["GRU", "GRU-reset-before", "LSTM"])
@pytest.mark.parametrize("activation,recurrent_activation", [
    ("tanh", "hard_sigmoid"), ("relu", "hard_sigmoid"), ("softsign", "sigmoid"),
])
def test_keras_gate_activations_convert_both_ways(keras, kind, activation,
                                                  recurrent_activation):
    layer = _keras_layer(keras, kind, activation=activation,
                         recurrent_activation=recurrent_activation)
    layer.build((None, None, 3))
    _randomize(layer, 3)
    ours = rnnkit.interop.from_keras(layer)
    assert ours.activation == activation
    assert ours.recurrent_activation == recurrent_activation
    # Pre-activations large enough that hard_sigmoid's clipping is reached.
    x = torch.randn(3, 8, 3, dtype=torch.float64) * 4
    want = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(ours(x)[0].detach().numpy(), want, atol=KERAS_ATOL, rtol=0)
    back = rnnkit.interop.to_keras(ours)
    assert back.cell.recurrent_activation is keras.activations.get(recurrent_activation)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(back(x)), want, atol=KERAS_ATOL)


def test_keras_unit_forget_bias_and_dropout_convert_both_ways(keras):
    layer = keras.layers.LSTM(4, unit_forget_bias=True, dropout=0.1, recurrent_dropout=0.2,
                              return_sequences=True)
    layer.build((None, None, 3))
    ours = rnnkit.interop.from_keras(layer)
    assert ours.forget_bias == 1.0
    back = rnnkit.interop.to_keras(ours)
    assert back.cell.unit_forget_bias is True
    assert back.cell.dropout == pytest.approx(0.1)
    assert back.cell.recurrent_dropout == pytest.approx(0.2)
    plain = rnnkit.interop.to_keras(rnnkit.LSTM(3, 4))
    assert plain.cell.unit_forget_bias is False
    assert plain.cell.dropout == 0 and plain.cell.recurrent_dropout == 0


# Statistics ------------------------------------------------------------------------------

def _linear_rnn(hidden, **options):
    """An RNN with identity activation, W_hh = I, no input and no bias: h_t = h_{t-1} * d."""
    layer = rnnkit.RNN(1, hidden, nonlinearity="identity", bias=False,
                       dtype=torch.float64, **options)
    with torch.no_grad():
        layer.weight_ih_l0.zero_()
        layer.weight_hh_l0.copy_(torch.eye(hidden, dtype=torch.float64))
    return layer


def test_recurrent_dropout_drops_the_same_units_at_every_step():
    p, batch, hidden, steps = 0.3, 50, 40, 6
    layer = _linear_rnn(hidden, recurrent_dropout=p).train()
    torch.manual_seed(1)
    h0 = torch.rand(1, batch, hidden, dtype=torch.float64) + 0.5
    output, _ = layer(torch.zeros(steps, batch, 1, dtype=torch.float64), h0)
    dropped = output == 0
    for t in range(1, steps):
        assert torch.equal(dropped[t], dropped[0])
    kept = ~dropped[0]
    # Kept units grow by 1/(1-p) per step: h_t = h0 / (1-p)^(t+1).
    torch.testing.assert_close(output[-1][kept], (h0[0] / (1 - p) ** steps)[kept])
    n = batch * hidden
    fraction = dropped[0].double().mean().item()
    assert abs(fraction - p) <= 3 * math.sqrt(p * (1 - p) / n)
    # Each sequence has its own mask.
    assert not all(torch.equal(dropped[0][b], dropped[0][0]) for b in range(batch))


def test_input_dropout_is_one_mask_per_sequence_over_time(monkeypatch):
    p = 0.4
    layer = rnnkit.GRU(30, 8, input_dropout=p, dtype=torch.float64).train()
    seen = []
    original = dispatch.run

    def spy(call):
        seen.append(call.input.detach().clone())
        return original(call)

    monkeypatch.setattr(dispatch, "run", spy)
    layer(torch.ones(5, 20, 30, dtype=torch.float64))
    given = seen[0]
    zero = given == 0
    for t in range(5):
        assert torch.equal(zero[t], zero[0])
    assert torch.all(given[~zero] == 1 / (1 - p))
    fraction = zero[0].double().mean().item()
    assert abs(fraction - p) <= 3 * math.sqrt(p * (1 - p) / zero[0].numel())


def test_zoneout_keeps_p_of_the_units():
    p, batch, hidden, steps = 0.25, 20, 30, 10
    layer = rnnkit.RNN(4, hidden, nonlinearity="identity", zoneout=p, dtype=torch.float64)
    torch.manual_seed(2)
    x = torch.randn(steps, batch, 4, dtype=torch.float64)
    h0 = torch.randn(1, batch, hidden, dtype=torch.float64)
    output, _ = layer.train()(x, h0)
    previous = torch.cat([h0, output[:-1]])
    kept = (output == previous)
    n = kept.numel()
    assert abs(kept.double().mean().item() - p) <= 3 * math.sqrt(p * (1 - p) / n)
    # Fresh masks each step: the kept units differ between steps.
    assert not torch.equal(kept[1], kept[2])


def test_eval_is_deterministic_and_zoneout_is_its_expectation():
    p = 0.3
    layer = rnnkit.LSTM(3, 5, zoneout=p, recurrent_dropout=0.4, input_dropout=0.2,
                        dtype=torch.float64).eval()
    plain = rnnkit.LSTM(3, 5, dtype=torch.float64).eval()
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    first, _ = layer(x)
    state = torch.random.get_rng_state()
    second, _ = layer(x)
    assert torch.equal(torch.random.get_rng_state(), state), "eval drew random numbers"
    assert torch.equal(first, second)
    # The expectation, step by step against torch.nn.LSTMCell.
    cell = nn.LSTMCell(3, 5, dtype=torch.float64)
    cell.load_state_dict({k.removesuffix("_l0"): v for k, v in plain.state_dict().items()})
    h = c = torch.zeros(2, 5, dtype=torch.float64)
    for t in range(6):
        h_new, c_new = cell(x[t], (h, c))
        h, c = p * h + (1 - p) * h_new, p * c + (1 - p) * c_new
        torch.testing.assert_close(first[t], h, atol=1e-12, rtol=0)


def test_seed_reproduces_a_training_run_on_every_backend():
    layer = rnnkit.LSTM(3, 6, recurrent_dropout=0.3, zoneout=0.2, input_dropout=0.1,
                        num_layers=2, bidirectional=True)
    x = torch.randn(5, 4, 3)
    runs = []
    for backend in ("reference", "cpu", "auto"):
        layer.backend = backend
        torch.manual_seed(7)
        with pytest.warns(UserWarning, match="recurrent dropout") if backend == "cpu" else \
                _no_warning():
            runs.append(layer.train()(x)[0])
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])
    torch.manual_seed(8)
    assert not torch.equal(layer(x)[0], runs[0])


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# Defaults --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_defaults_draw_nothing_and_match_torch_nn(kind):
    torch.manual_seed(3)
    theirs = getattr(nn, kind)(3, 5, num_layers=2, dtype=torch.float64)
    torch.manual_seed(3)
    ours = getattr(rnnkit, kind)(3, 5, num_layers=2, dtype=torch.float64)
    for (name, a), (other, b) in zip(theirs.named_parameters(), ours.named_parameters(),
                                     strict=True):
        assert name == other and torch.equal(a, b), name
    x = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    ours.train()
    state = torch.random.get_rng_state()
    out, _ = ours(x)
    assert torch.equal(torch.random.get_rng_state(), state), "a default layer drew masks"
    want, _ = theirs(x)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    (gx,) = torch.autograd.grad(out.sum(), x)
    (want_gx,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(gx, want_gx, atol=1e-12, rtol=0)


def test_explicit_defaults_are_bitwise_the_defaults():
    torch.manual_seed(4)
    a = rnnkit.LSTM(3, 5)
    torch.manual_seed(4)
    b = rnnkit.LSTM(3, 5, activation="tanh", recurrent_activation="sigmoid", zoneout=0.0,
                    recurrent_dropout=0.0, input_dropout=0.0, forget_bias=0.0,
                    layer_norm=False)
    x = torch.randn(5, 2, 3)
    assert torch.equal(a(x)[0], b(x)[0])
    assert repr(a) == repr(b) == "LSTM(3, 5)"


def test_forget_bias_is_added_at_initialisation_only():
    torch.manual_seed(5)
    plain = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True)
    torch.manual_seed(5)
    biased = rnnkit.LSTM(3, 4, num_layers=2, bidirectional=True, forget_bias=1.0)
    for name, param in biased.named_parameters():
        other = getattr(plain, name)
        if name.startswith("bias_ih"):
            torch.testing.assert_close(param[4:8], other[4:8] + 1.0)
            assert torch.equal(param[:4], other[:4]) and torch.equal(param[8:], other[8:])
        else:
            assert torch.equal(param, other), name
    # A torch.nn state_dict replaces it.
    biased.load_state_dict(nn.LSTM(3, 4, num_layers=2, bidirectional=True).state_dict())
    assert biased.bias_ih_l0[4:8].abs().max() <= 0.5
    cell = rnnkit.LSTMCell(3, 4, forget_bias=2.0)
    assert cell.bias_ih[4:8].min() >= 1.5


def test_cells_take_the_options():
    torch.manual_seed(6)
    cell = rnnkit.GRUCell(3, 4, recurrent_dropout=0.5, input_dropout=0.5,
                          recurrent_activation="hard_sigmoid", dtype=torch.float64)
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    masks = cell.sequence_masks(2)
    assert set(masks) == {"input", "hidden"}
    got = cell(x, h, dropout_masks=masks)
    step = rnnkit.cells.gru_step(
        torch.nn.functional.linear(x * masks["input"], cell.weight_ih, cell.bias_ih), h,
        cell.weight_hh, cell.bias_hh, recurrent_activation="hard_sigmoid",
        hidden_dropout=masks["hidden"])
    torch.testing.assert_close(got, step, atol=1e-12, rtol=0)
    assert torch.equal(cell.eval()(x, h), cell(x, h))


# Stateful --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_stateful_keeps_the_sequence_masks_across_chunks(kind):
    layer = getattr(rnnkit, kind)(3, 5, num_layers=2, recurrent_dropout=0.4,
                                  input_dropout=0.3, dtype=torch.float64).train()
    x = torch.randn(8, 2, 3, dtype=torch.float64)
    stream = Stateful(layer)
    torch.manual_seed(9)
    chunks = [stream(x[:3]), stream(x[3:5]), stream(x[5:])]
    masks = stream.masks
    whole, _ = layer(x, dropout_masks=masks)
    torch.testing.assert_close(torch.cat(chunks), whole, atol=1e-12, rtol=0)
    # reset(rows) redraws those rows only; reset() forgets them.
    stream.reset([1])
    for key, mask in stream.masks.items():
        assert torch.equal(mask[0], masks[key][0])
    assert any(not torch.equal(stream.masks[k][1], masks[k][1]) for k in masks)
    stream.reset()
    assert stream.masks is None


def test_stateful_cell_keeps_the_masks():
    cell = rnnkit.LSTMCell(3, 4, recurrent_dropout=0.5, dtype=torch.float64).train()
    stream = Stateful(cell)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    outputs = [stream(x[t]) for t in range(5)]
    masks = stream.masks
    h = c = torch.zeros(2, 4, dtype=torch.float64)
    for t in range(5):
        h, c = cell(x[t], (h, c), dropout_masks=masks)
        torch.testing.assert_close(outputs[t], h, atol=1e-12, rtol=0)


# Bad input -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["recurrent_dropout", "input_dropout", "zoneout"])
@pytest.mark.parametrize("value,error", [(1.0, ValueError), (-0.1, ValueError),
                                         (True, TypeError), ("0.1", TypeError)])
def test_probabilities_are_checked(name, value, error):
    with pytest.raises(error, match=rf"{name} must be a number in \[0, 1\)"):
        rnnkit.GRU(3, 4, **{name: value})
    with pytest.raises(error, match=rf"{name} must be a number in \[0, 1\)"):
        rnnkit.LSTMCell(3, 4, **{name: value})


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="layer_norm=True is defined for GRU and LSTM only"):
        rnnkit.RNN(3, 4, layer_norm=True)
    with pytest.raises(ValueError, match="layer_norm=True is defined for GRU and LSTM only"):
        rnnkit.RNNCell(3, 4, layer_norm=True)
    with pytest.raises(ValueError, match="reset-after GRU only"):
        rnnkit.GRU(3, 4, layer_norm=True, reset_after=False)
    with pytest.raises(ValueError, match="recurrent_activation must be one of"):
        rnnkit.LSTM(3, 4, recurrent_activation="hard_sigmoidd")
    with pytest.raises(TypeError, match="activation must be a name or a callable"):
        rnnkit.GRU(3, 4, activation=3)
    with pytest.raises(ValueError, match="forget_bias=1.0 needs bias=True"):
        rnnkit.LSTM(3, 4, bias=False, forget_bias=1.0)
    with pytest.raises(TypeError, match="forget_bias must be a real number"):
        rnnkit.LSTM(3, 4, forget_bias="1")
    with pytest.raises(TypeError, match="unexpected keyword argument 'forget_bias'"):
        rnnkit.GRU(3, 4, forget_bias=1.0)
    layer = rnnkit.GRU(3, 4, recurrent_dropout=0.2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match=r"dropout_masks\['hidden_l0'\] must be a tensor of "
                                         r"shape \(2, 4\), got \(3, 4\)"):
        layer(x, dropout_masks={"hidden_l0": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="no use for 'input_l0'"):
        layer(x, dropout_masks={"input_l0": torch.ones(2, 3)})
    with pytest.raises(TypeError, match="dropout_masks must be a dict"):
        layer(x, dropout_masks=[torch.ones(2, 4)])


@pytest.mark.parametrize("module, option", [
    (rnnkit.GRU(3, 4, recurrent_activation="hard_sigmoid"), "recurrent_activation"),
    (rnnkit.LSTM(3, 4, layer_norm=True), "layer_norm"),
    (rnnkit.LSTMCell(3, 4, zoneout=0.1), "zoneout"),
    (rnnkit.RNN(3, 4, recurrent_dropout=0.2), "recurrent_dropout"),
    (rnnkit.GRUCell(3, 4, activation="relu"), "activation"),
])
def test_to_torch_refuses_what_torch_nn_lacks(module, option):
    with pytest.raises(ValueError, match=f"torch.nn has no {option} for its"):
        rnnkit.interop.to_torch(module)


def test_to_torch_keeps_a_forget_bias_layer():
    layer = rnnkit.LSTM(3, 4, forget_bias=1.0)
    copy = rnnkit.interop.to_torch(layer)
    assert torch.equal(copy.bias_ih_l0, layer.bias_ih_l0)


@pytest.mark.parametrize("make", [
    lambda: rnnkit.GRUCell(3, 4, recurrent_dropout=0.3, input_dropout=0.2, zoneout=0.2,
                           layer_norm=True),
    lambda: rnnkit.LSTM(3, 4, recurrent_dropout=0.3, input_dropout=0.2, zoneout=0.2,
                        layer_norm=True),
], ids=["cell", "layer"])
def test_parametrized_weights_are_computed_once_per_call_with_masks(make):
    from torch.nn.utils import parametrize

    class Counting(nn.Module):
        calls = 0

        def forward(self, weight):
            Counting.calls += 1
            return weight

    module = make().train()
    name = "weight_ih" if hasattr(module, "weight_ih") else "weight_ih_l0"
    parametrize.register_parametrization(module, name, Counting())
    Counting.calls = 0
    x = torch.randn(2, 3) if name == "weight_ih" else torch.randn(5, 2, 3)
    module(x)
    assert Counting.calls == 1
