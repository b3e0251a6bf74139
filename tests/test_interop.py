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
    with pytest.raises(ValueError, match="go_backwards"):
        from_keras(randomized(layers.LSTM(HIDDEN, go_backwards=True), 0))
    with pytest.raises(ValueError, match="activation='tanh'"):
        from_keras(randomized(layers.GRU(HIDDEN, activation="relu"), 0))
    with pytest.raises(ValueError, match="recurrent_activation='sigmoid'"):
        from_keras(randomized(layers.LSTM(HIDDEN, recurrent_activation="hard_sigmoid"), 0))
    with pytest.raises(ValueError, match="'elu' has no rnnkit equivalent"):
        from_keras(randomized(layers.SimpleRNN(HIDDEN, activation="elu"), 0))
    with pytest.raises(TypeError, match="got Dense"):
        from_keras(layers.Dense(2))
    with pytest.warns(UserWarning, match="not carried over"):
        from_keras(randomized(layers.GRU(HIDDEN, dropout=0.2), 0))
    with pytest.raises(ValueError, match="no stacked layers"):
        to_keras(rnnkit.LSTM(INPUT, HIDDEN, num_layers=2))
    with pytest.raises(ValueError, match="no activation for the nonlinearity"):
        to_keras(rnnkit.RNN(INPUT, HIDDEN, nonlinearity=torch.sin))
    with pytest.raises(ValueError, match=r"sets \['units'\] itself"):
        to_keras(rnnkit.GRU(INPUT, HIDDEN), units=3)


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
