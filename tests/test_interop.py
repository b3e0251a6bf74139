"""Weight conversion with torch.nn, MLX and Keras 3, held to the real library's output at 1e-5."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.interop import from_keras, from_mlx, from_torch, to_keras, to_mlx, to_torch
from rnnkit.interop.keras import GoBackwards

os.environ["KERAS_BACKEND"] = "torch"  # must precede the first keras import

INPUT, HIDDEN, BATCH, STEPS = 3, 4, 2, 5
TOL = {"rtol": 1e-5, "atol": 1e-5}


def first(result):
    return result[0] if isinstance(result, tuple) else result


def assert_same_run(a, b, x, hx=None):
    """Run two torch-interface modules and compare output and final state."""
    out_a, out_b = a(x, hx), b(x, hx)
    if isinstance(out_a, tuple) and isinstance(out_a[1], tuple):  # LSTM layer
        torch.testing.assert_close(out_a[0], out_b[0], **TOL)
        for s_a, s_b in zip(out_a[1], out_b[1]):
            torch.testing.assert_close(s_a, s_b, **TOL)
    elif isinstance(out_a, tuple):
        for s_a, s_b in zip(out_a, out_b):
            torch.testing.assert_close(s_a, s_b, **TOL)
    else:
        torch.testing.assert_close(out_a, out_b, **TOL)


# torch.nn ---------------------------------------------------------------------------------

TORCH_LAYERS = [
    lambda: nn.RNN(INPUT, HIDDEN),
    lambda: nn.RNN(INPUT, HIDDEN, nonlinearity="relu", num_layers=2, bidirectional=True),
    lambda: nn.GRU(INPUT, HIDDEN, num_layers=2, batch_first=True),
    lambda: nn.GRU(INPUT, HIDDEN, bias=False, bidirectional=True),
    lambda: nn.LSTM(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=2),
    lambda: nn.LSTM(INPUT, HIDDEN, batch_first=True, dtype=torch.float64),
]


def layer_state(module, batch=BATCH):
    weight = module.weight_ih_l0
    count = module.num_layers * (2 if module.bidirectional else 1)
    h = torch.randn(count, batch, module.proj_size or module.hidden_size, dtype=weight.dtype)
    if module.mode == "LSTM" if isinstance(module, nn.RNNBase) else module.spec.mode == "lstm":
        return h, torch.randn(count, batch, module.hidden_size, dtype=weight.dtype)
    return h


@pytest.mark.parametrize("make", TORCH_LAYERS)
def test_torch_layers_both_directions(make):
    torch.manual_seed(0)
    reference = make()
    ours = from_torch(reference)
    assert isinstance(ours, (rnnkit.RNN, rnnkit.GRU, rnnkit.LSTM))
    assert ours.weight_ih_l0.dtype == reference.weight_ih_l0.dtype
    shape = (BATCH, STEPS, INPUT) if reference.batch_first else (STEPS, BATCH, INPUT)
    x = torch.randn(shape, dtype=reference.weight_ih_l0.dtype)
    assert_same_run(reference, ours, x)
    assert_same_run(reference, ours, x, layer_state(reference))
    # Back again, from the rnnkit side: a fresh rnnkit layer with its own weights.
    fresh = from_torch(make())
    with torch.no_grad():
        for p in fresh.parameters():
            p.uniform_(-0.5, 0.5)
    back = to_torch(fresh)
    assert type(back) is type(reference)
    assert_same_run(fresh, back, x, layer_state(fresh))


@pytest.mark.parametrize(
    "cell_cls, kwargs",
    [(nn.RNNCell, {}), (nn.RNNCell, {"nonlinearity": "relu"}), (nn.GRUCell, {}),
     (nn.LSTMCell, {}), (nn.GRUCell, {"bias": False})],
)
def test_torch_cells_both_directions(cell_cls, kwargs):
    torch.manual_seed(1)
    reference = cell_cls(INPUT, HIDDEN, **kwargs)
    ours = from_torch(reference)
    x, h = torch.randn(BATCH, INPUT), torch.randn(BATCH, HIDDEN)
    hx = (h, torch.randn(BATCH, HIDDEN)) if cell_cls is nn.LSTMCell else h
    assert_same_run(reference, ours, x, hx)
    assert_same_run(reference, ours, x)
    back = to_torch(ours)
    assert type(back) is cell_cls
    assert_same_run(ours, back, x, hx)


def test_torch_training_mode_and_device_kept():
    reference = nn.GRU(INPUT, HIDDEN).eval()
    ours = from_torch(reference)
    assert not ours.training
    assert not to_torch(ours.train()).eval().training
    assert to_torch(ours).training


def test_to_torch_refuses_what_torch_cannot_express():
    with pytest.raises(ValueError, match="only nonlinearity 'tanh' or 'relu', got 'silu'"):
        to_torch(rnnkit.RNN(INPUT, HIDDEN, nonlinearity="silu"))
    with pytest.raises(ValueError, match="got 'sin'"):
        to_torch(rnnkit.RNNCell(INPUT, HIDDEN, nonlinearity=torch.sin))
    with pytest.raises(ValueError, match="reset_after=False"):
        to_torch(rnnkit.GRUCell(INPUT, HIDDEN, reset_after=False))
    with pytest.raises(ValueError, match="no learnable initial state"):
        to_torch(rnnkit.LSTM(INPUT, HIDDEN, learn_initial_state=True))
    with pytest.raises(TypeError, match="got Linear"):
        to_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got Linear"):
        from_torch(nn.Linear(2, 2))


# MLX --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlx():
    mx = pytest.importorskip("mlx.core", reason="the mlx package (rnnkit[mlx]) is missing")
    import mlx.nn as mnn

    mx.random.seed(0)
    return mx, mnn


def run_mlx(mx, layer, x: np.ndarray, hidden=None, cell=None) -> np.ndarray:
    args = [mx.array(a) for a in (hidden, cell) if a is not None]
    out = layer(mx.array(x), *args)
    return np.array(out[0] if isinstance(out, tuple) else out)


def run_ours(module, x: np.ndarray, hidden=None, cell=None) -> np.ndarray:
    hx = None
    if hidden is not None:
        hx = torch.from_numpy(hidden)[None]
        if cell is not None:
            hx = (hx, torch.from_numpy(cell)[None])
    out, _ = module(torch.from_numpy(x), hx)
    return out.detach().numpy()


def mlx_inputs(kind: str, batched: bool, with_state: bool):
    rng = np.random.default_rng(2)
    shape = (BATCH, STEPS, INPUT) if batched else (STEPS, INPUT)
    state_shape = (BATCH, HIDDEN) if batched else (HIDDEN,)
    x = rng.normal(size=shape).astype("float32")
    hidden = rng.normal(size=state_shape).astype("float32") if with_state else None
    cell = rng.normal(size=state_shape).astype("float32") if with_state and kind == "LSTM" else None
    return x, hidden, cell


def with_nonlinearity(layer, fn):
    layer.nonlinearity = fn
    return layer


def mlx_layers(mx, mnn):
    """Name -> (constructor, the rnnkit nonlinearity name expected or None)."""
    return {
        "RNN": (lambda: mnn.RNN(INPUT, HIDDEN), "tanh"),
        "RNN-relu": (lambda: mnn.RNN(INPUT, HIDDEN, nonlinearity=mnn.relu), "relu"),
        # MLX's `nonlinearity or tanh` turns an activation module (an empty, falsy dict) into
        # tanh at construction; assigning one afterwards does take effect.
        "RNN-ReLU()": (lambda: mnn.RNN(INPUT, HIDDEN, nonlinearity=mnn.ReLU()), "tanh"),
        "RNN-ReLU()-set": (lambda: with_nonlinearity(mnn.RNN(INPUT, HIDDEN), mnn.ReLU()), "relu"),
        "RNN-GELU()-set": (lambda: with_nonlinearity(mnn.RNN(INPUT, HIDDEN), mnn.GELU()), "gelu"),
        "RNN-mx.tanh": (lambda: mnn.RNN(INPUT, HIDDEN, nonlinearity=mx.tanh), "tanh"),
        "RNN-gelu": (lambda: mnn.RNN(INPUT, HIDDEN, nonlinearity=mnn.gelu), "gelu"),
        "RNN-silu": (lambda: mnn.RNN(INPUT, HIDDEN, nonlinearity=mnn.silu), "silu"),
        "RNN-softplus": (lambda: mnn.RNN(INPUT, HIDDEN, nonlinearity=mnn.softplus), "softplus"),
        "RNN-nobias": (lambda: mnn.RNN(INPUT, HIDDEN, bias=False), "tanh"),
        "GRU": (lambda: mnn.GRU(INPUT, HIDDEN), None),
        "GRU-nobias": (lambda: mnn.GRU(INPUT, HIDDEN, bias=False), None),
        "LSTM": (lambda: mnn.LSTM(INPUT, HIDDEN), None),
        "LSTM-nobias": (lambda: mnn.LSTM(INPUT, HIDDEN, bias=False), None),
    }


MLX_KINDS = [
    "RNN", "RNN-relu", "RNN-ReLU()", "RNN-ReLU()-set", "RNN-GELU()-set", "RNN-mx.tanh",
    "RNN-gelu", "RNN-silu", "RNN-nobias", "GRU", "GRU-nobias", "LSTM", "LSTM-nobias",
]


@pytest.mark.parametrize("kind", MLX_KINDS)
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_from_mlx(mlx, kind, batched, with_state):
    mx, mnn = mlx
    make, name = mlx_layers(mx, mnn)[kind]
    layer = make()
    ours = from_mlx(layer)
    assert ours.batch_first
    if name is not None:
        assert ours.nonlinearity == name  # mapped to a name, so the fast paths apply
    x, hidden, cell = mlx_inputs(kind.split("-")[0], batched, with_state)
    np.testing.assert_allclose(
        run_ours(ours, x, hidden, cell), run_mlx(mx, layer, x, hidden, cell), **TOL
    )


def test_from_mlx_wraps_an_unknown_callable_with_gradients(mlx):
    mx, mnn = mlx
    layer = mnn.RNN(INPUT, HIDDEN, nonlinearity=lambda a: mx.sin(a) * 0.9)
    ours = from_mlx(layer)
    x, hidden, _ = mlx_inputs("RNN", True, True)
    np.testing.assert_allclose(run_ours(ours, x, hidden), run_mlx(mx, layer, x, hidden), **TOL)
    # Its backward pass is MLX's vjp; compare with the same function written in torch.
    twin = rnnkit.RNN(INPUT, HIDDEN, batch_first=True, nonlinearity=lambda a: torch.sin(a) * 0.9)
    twin.load_state_dict(ours.state_dict())
    xt = torch.from_numpy(x).requires_grad_()
    (grad,) = torch.autograd.grad(ours(xt)[0].pow(2).sum(), xt)
    (grad_twin,) = torch.autograd.grad(twin(xt)[0].pow(2).sum(), xt)
    torch.testing.assert_close(grad, grad_twin, **TOL)
    # ... and to_mlx gives back the original callable.
    assert to_mlx(ours).nonlinearity is layer.nonlinearity


RNNKIT_FOR_MLX = {
    "RNN": lambda: rnnkit.RNN(INPUT, HIDDEN),
    "RNN-relu": lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="relu"),
    "RNN-silu": lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="silu"),
    "RNN-identity": lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="identity"),
    "RNN-hardtanh": lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="hardtanh", bias=False),
    "RNN-softplus": lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="softplus"),
    "GRU": lambda: rnnkit.GRU(INPUT, HIDDEN, batch_first=True),
    "GRU-nobias": lambda: rnnkit.GRU(INPUT, HIDDEN, bias=False, batch_first=True),
    "LSTM": lambda: rnnkit.LSTM(INPUT, HIDDEN, batch_first=True),
    "torch-GRU": lambda: nn.GRU(INPUT, HIDDEN, batch_first=True),
}


@pytest.mark.parametrize("kind", list(RNNKIT_FOR_MLX))
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_state", [False, True])
def test_to_mlx(mlx, kind, batched, with_state):
    mx, _ = mlx
    torch.manual_seed(3)
    module = RNNKIT_FOR_MLX[kind]()
    module.batch_first = True  # MLX is NLD; compare in that layout
    layer = to_mlx(module)
    reference = module if isinstance(module, rnnkit.GRU | rnnkit.RNN | rnnkit.LSTM) else (
        from_torch(module)
    )
    x, hidden, cell = mlx_inputs(kind.removeprefix("torch-").split("-")[0], batched, with_state)
    np.testing.assert_allclose(
        run_mlx(mx, layer, x, hidden, cell), run_ours(reference, x, hidden, cell), **TOL
    )


def test_to_mlx_refuses_what_mlx_cannot_express(mlx):
    cases = [
        (rnnkit.GRU(INPUT, HIDDEN, num_layers=2), "no stacked layers.*num_layers=2"),
        (rnnkit.RNN(INPUT, HIDDEN, bidirectional=True), "no bidirectional"),
        (rnnkit.LSTM(INPUT, HIDDEN, proj_size=2), "proj_size=2"),
        (rnnkit.GRU(INPUT, HIDDEN, reset_after=False), "reset_after=False"),
        (rnnkit.LSTM(INPUT, HIDDEN, learn_initial_state=True), "no learnable initial state"),
        (rnnkit.RNN(INPUT, HIDDEN, nonlinearity=torch.sin), "has no MLX equivalent"),
    ]
    for module, message in cases:
        with pytest.raises(ValueError, match=message):
            to_mlx(module)
    with pytest.raises(TypeError, match="got GRUCell"):
        to_mlx(rnnkit.GRUCell(INPUT, HIDDEN))
    with pytest.raises(TypeError, match="from_mlx takes an mlx.nn RNN, GRU or LSTM"):
        from_mlx(nn.GRU(INPUT, HIDDEN))


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_float64_round_trips_through_mlx_exactly(mlx, kind):
    mx, mnn = mlx
    torch.manual_seed(7)
    module = getattr(rnnkit, kind)(INPUT, HIDDEN, batch_first=True, dtype=torch.float64)
    layer = to_mlx(module)
    assert all(v.dtype == mx.float64 for _, v in _mlx_parameters(layer))
    weights = (layer.Wxh, layer.Whh) if kind == "RNN" else (layer.Wx, layer.Wh)
    assert np.array_equal(np.array(weights[0]), module.weight_ih_l0.detach().numpy())
    assert np.array_equal(np.array(weights[1]), module.weight_hh_l0.detach().numpy())
    back = from_mlx(layer)
    assert back.weight_ih_l0.dtype == torch.float64
    # MLX -> rnnkit -> MLX gives back every MLX parameter bit for bit (biases folded).
    again = to_mlx(back)
    for (name, value), (_, other) in zip(_mlx_parameters(layer), _mlx_parameters(again)):
        assert np.array_equal(np.array(value), np.array(other)), name
    x = np.random.default_rng(8).normal(size=(BATCH, STEPS, INPUT))
    got = layer(mx.array(x, dtype=mx.float64))
    got = got[0] if isinstance(got, tuple) else got
    assert got.dtype == mx.float64
    # MLX's float64 sigmoid is only float32-accurate (about 3e-8), so GRU/LSTM agree to ~1e-7.
    tol = 1e-12 if kind == "RNN" else 1e-6
    np.testing.assert_allclose(np.array(got), run_ours(module, x), rtol=tol, atol=tol)


def _mlx_parameters(layer):
    """``(name, array)`` of every parameter of an MLX layer, in name order."""
    return sorted((k, v) for k, v in layer.parameters().items() if v is not None)


def test_float64_to_mlx_off_its_cpu_warns(mlx, monkeypatch):
    mx, _ = mlx
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    with pytest.warns(UserWarning, match=r"float64.*mx.stream\(mx.cpu\)"):
        to_mlx(rnnkit.GRU(INPUT, HIDDEN, dtype=torch.float64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        to_mlx(rnnkit.GRU(INPUT, HIDDEN))


# Keras ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    return pytest.importorskip("keras", reason="the keras package (rnnkit[keras]) is missing")


def randomized(layer, seed: int, input_size: int = INPUT):
    """Build a Keras layer and give every weight, biases included, random values."""
    layer.build((None, None, input_size))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return layer


KERAS_LAYERS = {
    "SimpleRNN": lambda k: k.layers.SimpleRNN(HIDDEN),
    "SimpleRNN-relu": lambda k: k.layers.SimpleRNN(HIDDEN, activation="relu"),
    "SimpleRNN-linear": lambda k: k.layers.SimpleRNN(HIDDEN, activation=None),
    "SimpleRNN-softplus": lambda k: k.layers.SimpleRNN(HIDDEN, activation="softplus"),
    "SimpleRNN-nobias": lambda k: k.layers.SimpleRNN(HIDDEN, use_bias=False),
    "GRU": lambda k: k.layers.GRU(HIDDEN),
    "GRU-before": lambda k: k.layers.GRU(HIDDEN, reset_after=False),
    "GRU-nobias": lambda k: k.layers.GRU(HIDDEN, use_bias=False),
    "LSTM": lambda k: k.layers.LSTM(HIDDEN),
    "LSTM-nobias": lambda k: k.layers.LSTM(HIDDEN, use_bias=False),
}


def run_keras(keras, layer, x, hidden=None, cell=None):
    """Keras output sequence and final states (layer built with return_state=True)."""
    initial = [a for a in (hidden, cell) if a is not None] or None
    out = layer(x, initial_state=initial) if initial else layer(x)
    return [keras.ops.convert_to_numpy(o) for o in out]


def run_ours_with_state(module, x, hidden=None, cell=None):
    hx = None
    if hidden is not None:
        hx = torch.from_numpy(hidden)[None]
        if cell is not None:
            hx = (hx, torch.from_numpy(cell)[None])
    out, final = module(torch.from_numpy(x), hx)
    final = final if isinstance(final, tuple) else (final,)
    return [out.detach().numpy()] + [f[0].detach().numpy() for f in final]


def keras_inputs(kind: str, with_state: bool):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(BATCH, STEPS, INPUT)).astype("float32")
    hidden = rng.normal(size=(BATCH, HIDDEN)).astype("float32") if with_state else None
    lstm_state = with_state and kind == "LSTM"
    cell = rng.normal(size=(BATCH, HIDDEN)).astype("float32") if lstm_state else None
    return x, hidden, cell


@pytest.mark.parametrize("kind", list(KERAS_LAYERS))
@pytest.mark.parametrize("with_state", [False, True])
def test_from_keras(keras, kind, with_state):
    layer = KERAS_LAYERS[kind](keras)
    layer.return_sequences, layer.return_state = True, True
    layer = randomized(layer, seed=5)
    ours = from_keras(layer)
    assert ours.batch_first
    if kind.startswith("GRU"):
        assert ours.reset_after == layer.cell.reset_after
    x, hidden, cell = keras_inputs(kind.split("-")[0], with_state)
    expected = run_keras(keras, layer, x, hidden, cell)
    got = run_ours_with_state(ours, x, hidden, cell)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, **TOL)


RNNKIT_FOR_KERAS = {
    "RNN": lambda: rnnkit.RNN(INPUT, HIDDEN, batch_first=True),
    "RNN-gelu": lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="gelu", batch_first=True),
    "RNN-identity": lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity="identity", bias=False,
                                       batch_first=True),
    "GRU": lambda: rnnkit.GRU(INPUT, HIDDEN, batch_first=True),
    "GRU-before": lambda: rnnkit.GRU(INPUT, HIDDEN, reset_after=False, batch_first=True),
    "GRU-nobias": lambda: rnnkit.GRU(INPUT, HIDDEN, bias=False, batch_first=True),
    "LSTM": lambda: rnnkit.LSTM(INPUT, HIDDEN, batch_first=True),
}


@pytest.mark.parametrize("kind", list(RNNKIT_FOR_KERAS))
@pytest.mark.parametrize("with_state", [False, True])
def test_to_keras(keras, kind, with_state):
    torch.manual_seed(6)
    module = RNNKIT_FOR_KERAS[kind]()
    layer = to_keras(module, return_state=True)
    assert layer.return_sequences
    x, hidden, cell = keras_inputs(kind.split("-")[0], with_state)
    expected = run_ours_with_state(module, x, hidden, cell)
    got = run_keras(keras, layer, x, hidden, cell)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, **TOL)


@pytest.mark.parametrize("kind", list(RNNKIT_FOR_KERAS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_keras_in_half_precision(keras, kind, dtype):
    torch.manual_seed(6)
    module = RNNKIT_FOR_KERAS[kind]().to(dtype)
    layer = to_keras(module, return_state=True)
    assert layer.dtype == str(dtype).removeprefix("torch.")
    # The default initializers stay in the config (only the build skipped them).
    assert type(layer.cell.recurrent_initializer).__name__ == "Orthogonal"
    back = from_keras(layer)
    assert back.weight_ih_l0.dtype == dtype
    assert torch.equal(back.weight_ih_l0, module.weight_ih_l0)
    assert torch.equal(back.weight_hh_l0, module.weight_hh_l0)
    x = torch.randn(BATCH, STEPS, INPUT).to(dtype)
    got = layer(x)
    expected = module(x)
    torch.testing.assert_close(got[0], expected[0], atol=1e-2, rtol=0)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_to_keras_stateful_carries_the_state_across_calls(keras, kind):
    torch.manual_seed(6)
    module = RNNKIT_FOR_KERAS[kind]()
    layer = to_keras(module, stateful=True, batch_size=BATCH)
    x = torch.randn(BATCH, 2 * STEPS, INPUT)
    chunks = [keras.ops.convert_to_numpy(layer(part)) for part in x.split(STEPS, dim=1)]
    expected = module(x)[0].detach().numpy()
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), expected, **TOL)
    layer.reset_state()
    first = keras.ops.convert_to_numpy(layer(x[:, :STEPS]))
    np.testing.assert_allclose(first, expected[:, :STEPS], **TOL)


def test_to_keras_stateful_needs_a_batch_size(keras):
    with pytest.raises(ValueError, match=r"stateful=True needs a static batch size.*batch_size"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN), stateful=True)
    with pytest.raises(ValueError, match="batch_size must be greater than zero, got 0"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN), stateful=True, batch_size=0)


def test_interop_is_reachable_from_the_package_without_mlx_or_keras():
    code = (
        "import sys, rnnkit; rnnkit.interop.from_mlx; rnnkit.interop.to_keras; "
        "print(sorted(m for m in ('mlx', 'keras', 'tensorflow') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


def test_keras_refusals(keras):
    layers = keras.layers
    with pytest.raises(ValueError, match="not built"):
        from_keras(layers.GRU(HIDDEN))
    with pytest.raises(ValueError, match="activation 'elu' has no rnnkit equivalent"):
        from_keras(randomized(layers.GRU(HIDDEN, activation="elu"), 0))
    with pytest.raises(ValueError, match="recurrent_activation 'elu' has no rnnkit"):
        from_keras(randomized(layers.LSTM(HIDDEN, recurrent_activation="elu"), 0))
    with pytest.raises(ValueError, match=r"recurrent_dropout=1.0 drops every unit"):
        from_keras(randomized(layers.LSTM(HIDDEN, recurrent_dropout=1.0), 0))
    with pytest.raises(ValueError, match="no zoneout or layer norm"):
        to_keras(rnnkit.LSTM(INPUT, HIDDEN, zoneout=0.1))
    with pytest.raises(ValueError, match="no zoneout or layer norm"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN, layer_norm=True))
    with pytest.raises(ValueError, match="no activation for the recurrent_activation"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN, recurrent_activation=torch.sigmoid))
    with pytest.raises(ValueError, match="'elu' has no rnnkit equivalent"):
        from_keras(randomized(layers.SimpleRNN(HIDDEN, activation="elu"), 0))
    with pytest.raises(TypeError, match="got Dense"):
        from_keras(layers.Dense(2))
    with pytest.raises(ValueError, match="no stacked layers"):
        to_keras(rnnkit.LSTM(INPUT, HIDDEN, num_layers=2))
    with pytest.raises(ValueError, match="no activation for the nonlinearity"):
        to_keras(rnnkit.RNN(INPUT, HIDDEN, nonlinearity=torch.sin))
    with pytest.raises(ValueError, match=r"sets \['units'\] itself"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN), units=3)
    with pytest.raises(ValueError, match=r"sets \['go_backwards'\] itself"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN), go_backwards=True)


# Keras go_backwards and Bidirectional ---------------------------------------------------

# Right padding with a fully masked row: rnnkit's lengths= is Keras's mask.
MASK_LENGTHS = [3, 5, 0]


def keras_mask(lengths, steps=STEPS):
    return np.arange(steps)[None, :] < np.array(lengths)[:, None]


def sequence_batch(kind: str, directions: int, seed: int):
    """Input (3, STEPS, INPUT) and one Keras initial state per direction, as numpy."""
    rng = np.random.default_rng(seed)
    batch = len(MASK_LENGTHS)
    x = rng.normal(size=(batch, STEPS, INPUT)).astype("float32")
    count = directions * (2 if kind == "LSTM" else 1)
    states = [rng.normal(size=(batch, HIDDEN)).astype("float32") for _ in range(count)]
    return x, states


def as_hx(states, kind: str):
    """Keras's initial_state list ([h, c] per direction, forward first) as rnnkit's hx."""
    per = 2 if kind == "LSTM" else 1
    tensors = [torch.from_numpy(s) for s in states]
    stacked = [torch.stack(tensors[i::per]) for i in range(per)]
    return tuple(stacked) if kind == "LSTM" else stacked[0]


def keras_states(final, kind: str, directions: int):
    """rnnkit's final state as Keras's list of returned states (h, c per direction)."""
    final = final if isinstance(final, tuple) else (final,)
    return [f[d].detach().numpy() for d in range(directions) for f in final]


def run_both(keras, layer, module, kind, directions, x, states, masked):
    lengths = MASK_LENGTHS if masked else None
    mask = keras_mask(MASK_LENGTHS) if masked else None
    expected = layer(x, initial_state=states, mask=mask) if states else layer(x, mask=mask)
    expected = [keras.ops.convert_to_numpy(e) for e in expected]
    hx = as_hx(states, kind) if states else None
    out, final = module(torch.from_numpy(x), hx, lengths=lengths)
    got = [out.detach().numpy()] + keras_states(final, kind, directions)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, **TOL)
    return got


def assert_same_keras_weights(keras, layer, again):
    """Keras -> rnnkit -> Keras gives back every Keras weight bit for bit (biases folded)."""
    assert type(again) is type(layer)
    weights, others = layer.get_weights(), again.get_weights()
    assert len(weights) == len(others)
    for weight, other in zip(weights, others):
        assert weight.dtype == other.dtype and np.array_equal(weight, other)


BACKWARDS_KINDS = ["SimpleRNN", "SimpleRNN-relu", "GRU", "GRU-before", "LSTM", "LSTM-nobias"]


@pytest.mark.parametrize("kind", BACKWARDS_KINDS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_from_keras_go_backwards(keras, kind, with_state, masked):
    layer = KERAS_LAYERS[kind](keras)
    layer.go_backwards, layer.return_sequences, layer.return_state = True, True, True
    layer = randomized(layer, seed=11)
    ours = from_keras(layer)
    assert isinstance(ours, GoBackwards) and ours.layer.batch_first
    name = kind.split("-")[0]
    x, states = sequence_batch(name, 1, seed=12)
    got = run_both(keras, layer, ours, name, 1, x, states if with_state else None, masked)
    if masked:  # Keras reversed the padded whole: the padding comes first, as zeros
        for b, length in enumerate(MASK_LENGTHS):
            assert np.all(got[0][b, : STEPS - length] == 0)


@pytest.mark.parametrize("kind", ["RNN", "GRU-before", "LSTM"])
def test_to_keras_go_backwards_round_trip(keras, kind):
    torch.manual_seed(13)
    module = GoBackwards(RNNKIT_FOR_KERAS[kind]())
    layer = to_keras(module, return_state=True)
    assert layer.go_backwards
    name = {"RNN": "SimpleRNN"}.get(kind, kind.split("-")[0])
    x, states = sequence_batch(name, 1, seed=14)
    for masked in (False, True):
        run_both(keras, layer, module, name, 1, x, states, masked)
    back = from_keras(layer)
    assert isinstance(back, GoBackwards)
    assert_same_keras_weights(keras, layer, to_keras(back, return_state=True))
    assert torch.equal(back.layer.weight_hh_l0, module.layer.weight_hh_l0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_go_backwards_is_the_layer_on_each_sequence_reversed(batch_first):
    layer = rnnkit.LSTM(INPUT, HIDDEN, batch_first=batch_first, dtype=torch.float64)
    module = GoBackwards(layer)
    x = torch.randn(3, STEPS, INPUT, dtype=torch.float64, requires_grad=True)
    time_major = x if batch_first else x.transpose(0, 1)
    out, (h_n, c_n) = module(time_major, lengths=torch.tensor(MASK_LENGTHS))
    out = out if batch_first else out.transpose(0, 1)
    expected_whole, _ = layer(time_major.flip(1 if batch_first else 0))
    whole, _ = module(time_major)
    torch.testing.assert_close(whole, expected_whole, rtol=0, atol=0)
    for b, length in enumerate(MASK_LENGTHS):
        assert torch.all(out[b, : STEPS - length] == 0)
        if length == 0:
            assert torch.all(h_n[:, b] == 0) and torch.all(c_n[:, b] == 0)
            continue
        alone, (h_alone, c_alone) = layer(x[b, :length].flip(0))
        torch.testing.assert_close(out[b, STEPS - length:], alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(h_n[:, b], h_alone, atol=1e-12, rtol=0)
        torch.testing.assert_close(c_n[:, b], c_alone, atol=1e-12, rtol=0)
    # Gradients reach each sequence's own steps and no padding.
    (grad,) = torch.autograd.grad(out.sum() + h_n.sum(), x)
    for b, length in enumerate(MASK_LENGTHS):
        assert torch.all(grad[b, length:] == 0)
        assert torch.all(grad[b, :length].abs().sum(-1) > 0)
    # Unbatched input reads the one sequence backwards too.
    single, _ = module(x[0].detach(), lengths=[3])
    torch.testing.assert_close(single, out[0].detach(), rtol=0, atol=0)


def test_go_backwards_refusals():
    with pytest.raises(ValueError, match="one-direction layer"):
        GoBackwards(rnnkit.GRU(INPUT, HIDDEN, bidirectional=True))
    with pytest.raises(TypeError, match="got GRU"):
        GoBackwards(nn.GRU(INPUT, HIDDEN))
    module = GoBackwards(rnnkit.GRU(INPUT, HIDDEN))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(STEPS, 2, INPUT), [STEPS, 2])
    with pytest.raises(TypeError, match="not a PackedSequence.*lengths="):
        module(packed)
    with pytest.raises(ValueError, match="must not exceed the sequence length"):
        module(torch.randn(STEPS, 2, INPUT), lengths=[STEPS + 1, 1])


BIDIRECTIONAL_KINDS = ["SimpleRNN", "SimpleRNN-nobias", "GRU", "GRU-before", "LSTM"]


@pytest.mark.parametrize("kind", BIDIRECTIONAL_KINDS)
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_from_keras_bidirectional(keras, kind, with_state, masked):
    inner = KERAS_LAYERS[kind](keras)
    inner.return_sequences, inner.return_state = True, True
    layer = keras.layers.Bidirectional(inner)
    layer.build((None, None, INPUT))
    randomized(layer.forward_layer, seed=15)
    randomized(layer.backward_layer, seed=16)
    ours = from_keras(layer)
    assert ours.bidirectional and ours.batch_first and ours.num_layers == 1
    name = kind.split("-")[0]
    x, states = sequence_batch(name, 2, seed=17)
    got = run_both(keras, layer, ours, name, 2, x, states if with_state else None, masked)
    if masked:
        for b, length in enumerate(MASK_LENGTHS):
            assert np.all(got[0][b, length:] == 0)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "GRU-before", "LSTM"])
def test_to_keras_bidirectional_round_trip(keras, kind):
    torch.manual_seed(18)
    module = RNNKIT_FOR_KERAS[kind]()
    module = type(module)(INPUT, HIDDEN, batch_first=True, bidirectional=True,
                          **({"reset_after": False} if kind == "GRU-before" else {}))
    layer = to_keras(module, return_state=True)
    assert isinstance(layer, keras.layers.Bidirectional) and layer.merge_mode == "concat"
    assert layer.backward_layer.go_backwards and not layer.forward_layer.go_backwards
    name = {"RNN": "SimpleRNN"}.get(kind, kind.split("-")[0])
    x, states = sequence_batch(name, 2, seed=19)
    for masked in (False, True):
        run_both(keras, layer, module, name, 2, x, states, masked)
    back = from_keras(layer)
    assert back.bidirectional
    assert_same_keras_weights(keras, layer, to_keras(back, return_state=True))
    assert torch.equal(back.weight_ih_l0_reverse, module.weight_ih_l0_reverse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_keras_bidirectional_in_half_precision(keras, dtype):
    torch.manual_seed(20)
    module = rnnkit.LSTM(INPUT, HIDDEN, batch_first=True, bidirectional=True).to(dtype)
    layer = to_keras(module)
    x = torch.randn(BATCH, STEPS, INPUT).to(dtype)
    got = layer(x)
    assert got.dtype == dtype
    torch.testing.assert_close(got, module(x)[0], atol=1e-2, rtol=0)
    back = from_keras(layer)
    assert back.weight_hh_l0_reverse.dtype == dtype
    assert torch.equal(back.weight_hh_l0_reverse, module.weight_hh_l0_reverse)


def test_to_keras_bidirectional_stateful_chains_both_directions(keras):
    torch.manual_seed(21)
    module = rnnkit.GRU(INPUT, HIDDEN, batch_first=True, bidirectional=True)
    layer = to_keras(module, stateful=True, batch_size=BATCH)
    x = torch.randn(BATCH, 2 * STEPS, INPUT)
    state, expected = None, []
    for part in x.split(STEPS, dim=1):  # each chunk starts both directions from the last h_n
        out, state = module(part, state)
        expected.append(out.detach().numpy())
    chunks = [keras.ops.convert_to_numpy(layer(part)) for part in x.split(STEPS, dim=1)]
    np.testing.assert_allclose(np.concatenate(chunks, 1), np.concatenate(expected, 1), **TOL)


def test_keras_bidirectional_refusals(keras):
    layers = keras.layers
    for mode in ("sum", "ave", "mul", None):
        layer = layers.Bidirectional(layers.GRU(HIDDEN, return_sequences=True), merge_mode=mode)
        layer.build((None, None, INPUT))
        with pytest.raises(ValueError, match=f"merge_mode={mode!r}.*concatenated"):
            from_keras(layer)
    different = layers.Bidirectional(
        layers.LSTM(HIDDEN, return_sequences=True),
        backward_layer=layers.LSTM(HIDDEN + 1, return_sequences=True, go_backwards=True),
    )
    different.build((None, None, INPUT))
    with pytest.raises(ValueError, match="one configuration for both directions"):
        from_keras(different)
    swapped = layers.Bidirectional(
        layers.GRU(HIDDEN, return_sequences=True, go_backwards=True),
        backward_layer=layers.GRU(HIDDEN, return_sequences=True),
    )
    swapped.build((None, None, INPUT))
    with pytest.raises(ValueError, match="forward layer has go_backwards=True"):
        from_keras(swapped)
    mixed = layers.Bidirectional(
        layers.GRU(HIDDEN, return_sequences=True),
        backward_layer=layers.LSTM(HIDDEN, return_sequences=True, go_backwards=True),
    )
    mixed.build((None, None, INPUT))
    with pytest.raises(TypeError, match="got GRU and LSTM"):
        from_keras(mixed)
    with pytest.raises(ValueError, match="not built"):
        from_keras(layers.Bidirectional(layers.GRU(HIDDEN)))
    with pytest.raises(ValueError, match="no stacked layers"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN, num_layers=2, bidirectional=True))


def test_from_keras_guide_examples_run(keras):
    """The conversion examples of docs/from-keras.md run and their asserts hold."""
    import re

    path = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "from-keras.md")
    with open(path, encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), re.S)
    blocks = [block for block in blocks if "rnnkit.interop" in block]
    assert blocks
    for index, block in enumerate(blocks):
        exec(compile(block, f"from-keras.md example {index}", "exec"), {})


# The "coming from" guide ------------------------------------------------------------------

GUIDE = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "coming-from.md")


@pytest.mark.parametrize("index", [0, 1, 2])
def test_coming_from_examples_run(mlx, keras, index):
    """Every Python example of docs/coming-from.md runs and its asserts hold."""
    import re

    with open(GUIDE, encoding="utf-8") as handle:
        blocks = re.findall(r"```python\n(.*?)```", handle.read(), re.S)
    assert len(blocks) == 3
    exec(compile(blocks[index], f"coming-from.md example {index}", "exec"), {})
