"""Both GRU formulations, against their equations written out here and against Keras and torch.nn.

reset_after=True  (torch, cuDNN, MLX, Keras default): n = tanh(W_n x + b_in + r * (U_n h + b_hn))
reset_after=False (Cho et al. 2014, Keras reset_after=False, Flux GRUv3):
                                                      n = tanh(W_n x + b_in + U_n (r * h) + b_hn)
both: r = sigmoid(W_r x + b_ir + U_r h + b_hr), z = sigmoid(W_z x + b_iz + U_z h + b_hz),
      h' = (1 - z) * n + z * h
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.cells import gru_step

os.environ["KERAS_BACKEND"] = "torch"  # must precede the first keras import

INPUT, HIDDEN, BATCH, STEPS = 3, 4, 2, 5


def sigmoid(a):
    return 1.0 / (1.0 + np.exp(-a))


def gates(params: dict[str, np.ndarray], suffix: str = "_l0"):
    """Split the stacked (r, z, n) torch-layout parameters into per-gate numpy matrices."""
    def split(name):
        return np.split(params[name + suffix], 3)

    return split("weight_ih"), split("weight_hh"), split("bias_ih"), split("bias_hh")


def gru_equations(x, h, params, reset_after, suffix="_l0"):
    """The formulas of the module docstring, one time step at a time, in float64 numpy.

    x: (T, B, D); h: (B, H). Returns all hidden states (T, B, H).
    """
    (w_r, w_z, w_n), (u_r, u_z, u_n), (bi_r, bi_z, bi_n), (bh_r, bh_z, bh_n) = gates(
        params, suffix
    )
    outputs = []
    for x_t in x:
        r = sigmoid(x_t @ w_r.T + bi_r + h @ u_r.T + bh_r)
        z = sigmoid(x_t @ w_z.T + bi_z + h @ u_z.T + bh_z)
        if reset_after:
            n = np.tanh(x_t @ w_n.T + bi_n + r * (h @ u_n.T + bh_n))
        else:
            n = np.tanh(x_t @ w_n.T + bi_n + (r * h) @ u_n.T + bh_n)
        h = (1 - z) * n + z * h
        outputs.append(h)
    return np.stack(outputs)


def numpy_params(module) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("reset_after", [True, False])
def test_layer_follows_its_equations(reset_after):
    torch.manual_seed(0)
    layer = rnnkit.GRU(INPUT, HIDDEN, reset_after=reset_after, dtype=torch.float64)
    x, h0 = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64), torch.randn(
        1, BATCH, HIDDEN, dtype=torch.float64
    )
    expected = gru_equations(x.numpy(), h0[0].numpy(), numpy_params(layer), reset_after)
    output, h_n = layer(x, h0)
    np.testing.assert_allclose(output.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(h_n[0].detach().numpy(), expected[-1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("reset_after", [True, False])
def test_cell_and_step_function_follow_their_equations(reset_after):
    torch.manual_seed(1)
    cell = rnnkit.GRUCell(INPUT, HIDDEN, reset_after=reset_after, dtype=torch.float64)
    x, h = torch.randn(BATCH, INPUT, dtype=torch.float64), torch.randn(
        BATCH, HIDDEN, dtype=torch.float64
    )
    params = {k + "_l0": v for k, v in numpy_params(cell).items()}
    expected = gru_equations(x.numpy()[None], h.numpy(), params, reset_after)[0]
    np.testing.assert_allclose(cell(x, h).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    gates_x = torch.nn.functional.linear(x, cell.weight_ih, cell.bias_ih)
    stepped = gru_step(gates_x, h, cell.weight_hh, cell.bias_hh, reset_after)
    np.testing.assert_allclose(stepped.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_reset_before_with_directions_and_lengths():
    torch.manual_seed(2)
    layer = rnnkit.GRU(
        INPUT, HIDDEN, reset_after=False, bidirectional=True, dtype=torch.float64
    )
    x = torch.randn(STEPS, 3, INPUT, dtype=torch.float64)
    lengths = [5, 2, 4]
    output, h_n = layer(x, lengths=lengths)
    params = numpy_params(layer)
    zero = np.zeros((1, HIDDEN))
    for b, length in enumerate(lengths):
        seq = x[:length, b : b + 1].numpy()
        forward = gru_equations(seq, zero, params, False)
        backward = gru_equations(seq[::-1], zero, params, False, suffix="_l0_reverse")[::-1]
        got = output[:, b].detach().numpy()
        np.testing.assert_allclose(got[:length, :HIDDEN], forward[:, 0], atol=1e-12)
        np.testing.assert_allclose(got[:length, HIDDEN:], backward[:, 0], atol=1e-12)
        assert not got[length:].any()
        np.testing.assert_allclose(h_n[0, b].detach().numpy(), forward[-1, 0], atol=1e-12)
        np.testing.assert_allclose(h_n[1, b].detach().numpy(), backward[0, 0], atol=1e-12)


def test_the_two_formulations_really_differ():
    torch.manual_seed(3)
    after = rnnkit.GRU(INPUT, HIDDEN)
    before = rnnkit.GRU(INPUT, HIDDEN, reset_after=False)
    before.load_state_dict(after.state_dict())
    x = torch.randn(STEPS, BATCH, INPUT)
    h0 = torch.randn(1, BATCH, HIDDEN)
    assert (after(x, h0)[0] - before(x, h0)[0]).abs().max() > 1e-3


def test_reset_after_true_is_torch_nn():
    torch.manual_seed(4)
    ours = rnnkit.GRU(INPUT, HIDDEN, num_layers=2)
    reference = nn.GRU(INPUT, HIDDEN, num_layers=2)
    reference.load_state_dict(ours.state_dict())
    x, h0 = torch.randn(STEPS, BATCH, INPUT), torch.randn(2, BATCH, HIDDEN)
    torch.testing.assert_close(ours(x, h0)[0], reference(x, h0)[0])
    with pytest.raises(TypeError, match="reset_after must be a bool"):
        rnnkit.GRU(INPUT, HIDDEN, reset_after="no")


# Keras ------------------------------------------------------------------------------------


def keras_gru_with_random_weights(reset_after: bool, seed: int):
    keras = pytest.importorskip("keras", reason="the keras package (rnnkit[keras]) is missing")
    layer = keras.layers.GRU(HIDDEN, reset_after=reset_after, return_sequences=True)
    layer.build((None, None, INPUT))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    return keras, layer


def hand_mapped(layer, reset_after: bool) -> rnnkit.GRU:
    """Keras (z, r, h) column blocks of kernel^T to torch's (r, z, n) rows, written out."""
    kernel, recurrent, bias = layer.get_weights()

    def rows(matrix):
        z, r, h = np.split(matrix, 3, axis=-1)
        return torch.from_numpy(np.concatenate([r, z, h], axis=-1).T.copy())

    ours = rnnkit.GRU(INPUT, HIDDEN, batch_first=True, reset_after=reset_after)
    with torch.no_grad():
        ours.weight_ih_l0.copy_(rows(kernel))
        ours.weight_hh_l0.copy_(rows(recurrent))
        if reset_after:  # bias[0] is the input bias, bias[1] the recurrent one
            ours.bias_ih_l0.copy_(rows(bias[0][None])[:, 0])
            ours.bias_hh_l0.copy_(rows(bias[1][None])[:, 0])
        else:  # a single input bias
            ours.bias_ih_l0.copy_(rows(bias[None])[:, 0])
            ours.bias_hh_l0.zero_()
    return ours


@pytest.mark.parametrize("reset_after", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_keras_gru(reset_after, with_state):
    keras, layer = keras_gru_with_random_weights(reset_after, seed=5)
    ours = hand_mapped(layer, reset_after)
    rng = np.random.default_rng(6)
    x = rng.normal(size=(BATCH, STEPS, INPUT)).astype("float32")
    h0 = rng.normal(size=(BATCH, HIDDEN)).astype("float32")
    if with_state:
        expected = keras.ops.convert_to_numpy(layer(x, initial_state=[h0]))
        got, _ = ours(torch.from_numpy(x), torch.from_numpy(h0)[None])
    else:
        expected = keras.ops.convert_to_numpy(layer(x))
        got, _ = ours(torch.from_numpy(x))
    np.testing.assert_allclose(got.detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_keras_formulations_are_distinguished():
    """A reset_after=False Keras GRU is not matched by our reset_after=True form."""
    keras, layer = keras_gru_with_random_weights(False, seed=7)
    wrong = rnnkit.GRU(INPUT, HIDDEN, batch_first=True, reset_after=True)
    wrong.load_state_dict(hand_mapped(layer, False).state_dict())  # same weights, other form
    x = np.random.default_rng(8).normal(size=(BATCH, STEPS, INPUT)).astype("float32")
    h0 = np.ones((BATCH, HIDDEN), dtype="float32")
    expected = keras.ops.convert_to_numpy(layer(x, initial_state=[h0]))
    got, _ = wrong(torch.from_numpy(x), torch.from_numpy(h0)[None])
    assert np.abs(got.detach().numpy() - expected).max() > 1e-3
