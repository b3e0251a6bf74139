"""The one-step streaming path (rnnkit/ops/cpu/stream.py, csrc/stream.cpp): single steps of
layers, cells and Stateful without gradients run compiled from weights packed once per module.

Each test checks that the fast path was taken (its step counter) and holds its result equal to
torch.nn's modules, or, for what torch.nn lacks (other activations, GRU with
`reset_after=False`), to Keras or to rnnkit's reference path.
"""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")  # must precede the first keras import

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils import parametrize, prune  # noqa: E402

import rnnkit  # noqa: E402
from helpers import twin_layers  # noqa: E402
from rnnkit.ops.cpu import _build, _ops, stream  # noqa: E402

INPUT, HIDDEN, BATCH, STEPS = 5, 19, 3, 12  # 19: whole vectors and a partial one

if _build.status() is not None:  # pragma: no cover - the CPU kernels are part of every build
    pytest.fail(f"the compiled CPU kernels are needed here: {_build.status()}", pytrace=False)

TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6}
KINDS = [("RNN", {"nonlinearity": "tanh"}), ("RNN", {"nonlinearity": "relu"}), ("GRU", {}),
         ("LSTM", {}), ("LSTM", {"proj_size": 7})]
CELLS = {"RNN": (nn.RNNCell, rnnkit.RNNCell), "GRU": (nn.GRUCell, rnnkit.GRUCell),
         "LSTM": (nn.LSTMCell, rnnkit.LSTMCell)}


class Served:
    """Counts the steps the fast path ran inside a `with` block."""

    def __enter__(self):
        self.start = stream.served
        return self

    def __exit__(self, *exc):
        self.count = stream.served - self.start


def close(got, expected, dtype):
    torch.testing.assert_close(got, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def random_state(kind, layers, batch, out_size, hidden, dtype):
    lead = (layers,) if batch is None else (layers, batch)
    h = torch.randn(*lead, out_size, dtype=dtype)
    return (h, torch.randn(*lead, hidden, dtype=dtype)) if kind == "LSTM" else h


# layers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,options", KINDS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, BATCH, None])
@pytest.mark.parametrize("batch_first", [False, True])
def test_one_step_layer_equals_torch_nn(kind, options, layers, dtype, batch, batch_first):
    theirs, ours = twin_layers(kind, INPUT, HIDDEN, num_layers=layers, dtype=dtype,
                               batch_first=batch_first, **options)
    out_size = options.get("proj_size") or HIDDEN
    if batch is None:
        x = torch.randn(1, INPUT, dtype=dtype)
    else:
        x = torch.randn(batch, 1, INPUT, dtype=dtype)
        x = x if batch_first else x.transpose(0, 1)
    hx = random_state(kind, layers, batch, out_size, HIDDEN, dtype)
    with torch.no_grad(), Served() as served:
        got = ours(x, hx), ours(x)
    expected = theirs(x, hx), theirs(x)
    assert served.count == 2
    for (output, state), (want_output, want_state) in zip(got, expected):
        assert output.shape == want_output.shape
        close(output, want_output, dtype)
        close(state, want_state, dtype)


@pytest.mark.parametrize("kind,options", KINDS + [("GRU", {"bias": False})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch", [1, BATCH])
def test_steps_over_several_panels_equal_torch_nn(kind, options, dtype, batch):
    """The packed weights keep each gate's columns in panels (csrc/stream.cpp): 150 hidden
    units and a projection of 70 span whole panels and a partial one in both dtypes, for one
    row (vector-matrix products) and a few (the blocked matmul)."""
    options = {**options, "proj_size": 70} if options.get("proj_size") else options
    theirs, ours = twin_layers(kind, 66, 150, num_layers=2, dtype=dtype, **options)
    x = torch.randn(1, batch, 66, dtype=dtype)
    hx = random_state(kind, 2, batch, options.get("proj_size") or 150, 150, dtype)
    with torch.no_grad(), Served() as served:
        got = ours(x, hx)
    expected = theirs(x, hx)
    assert served.count == 1
    close(got[0], expected[0], dtype)
    for got_state, want_state in zip(rnnkit.ops.spec.as_states(got[1]),
                                     rnnkit.ops.spec.as_states(expected[1])):
        close(got_state, want_state, dtype)


@pytest.mark.parametrize("kind,options", KINDS + [("GRU", {"reset_after": False})])
def test_a_step_repeated_gives_the_same_bits(kind, options):
    """Every other call walks the weights' panels backwards (csrc/stream.cpp, for_panels);
    each column is summed in the same order either way, so two calls agree to the bit."""
    layer = getattr(rnnkit, kind)(66, 150, num_layers=2, **options)
    x = torch.randn(1, 1, 66)
    hx = random_state(kind, 2, 1, options.get("proj_size") or 150, 150, torch.float32)
    with torch.no_grad(), Served() as served:
        first, second, third = layer(x, hx), layer(x, hx), layer(x, hx)
    assert served.count == 3
    for other in (second, third):
        assert torch.equal(first[0], other[0])
        for a, b in zip(rnnkit.ops.spec.as_states(first[1]), rnnkit.ops.spec.as_states(other[1])):
            assert torch.equal(a, b)


@pytest.mark.parametrize("nonlinearity", [n for n in _ops.ACTIVATIONS if n not in ("tanh",
                                                                                   "relu")])
def test_named_activations_equal_the_reference_path(nonlinearity):
    # torch.nn has only tanh and relu; the reference path is held against torch's functions.
    fast = rnnkit.RNN(INPUT, HIDDEN, num_layers=2, nonlinearity=nonlinearity, dtype=torch.float64)
    slow = rnnkit.RNN(INPUT, HIDDEN, num_layers=2, nonlinearity=nonlinearity, dtype=torch.float64,
                      backend="reference")
    slow.load_state_dict(fast.state_dict())
    x, h = torch.randn(1, BATCH, INPUT, dtype=torch.float64), torch.randn(2, BATCH, HIDDEN,
                                                                          dtype=torch.float64)
    with torch.no_grad(), Served() as served:
        got = fast(x, h)
        expected = slow(x, h)
    assert served.count == 1  # the reference backend is never served
    close(got[0], expected[0], torch.float64)
    close(got[1], expected[1], torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gru_reset_before_equals_the_reference_path(dtype):
    fast = rnnkit.GRU(INPUT, HIDDEN, num_layers=2, reset_after=False, dtype=dtype)
    slow = rnnkit.GRU(INPUT, HIDDEN, num_layers=2, reset_after=False, dtype=dtype,
                      backend="reference")
    slow.load_state_dict(fast.state_dict())
    x, h = torch.randn(1, BATCH, INPUT, dtype=dtype), torch.randn(2, BATCH, HIDDEN, dtype=dtype)
    with torch.no_grad(), Served() as served:
        got = fast(x, h)
        expected = slow(x, h)
    assert served.count == 1
    close(got[0], expected[0], dtype)
    close(got[1], expected[1], dtype)


def test_gru_reset_before_streams_like_keras():
    """Keras's GRU(reset_after=False) over a whole sequence, against rnnkit stepping it."""
    keras = pytest.importorskip("keras", reason="the keras package (rnnkit[keras]) is missing")
    layer = keras.layers.GRU(HIDDEN, reset_after=False, return_sequences=True)
    layer.build((None, None, INPUT))
    rng = np.random.default_rng(3)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    kernel, recurrent, bias = layer.get_weights()

    def rows(matrix):  # Keras's (z, r, h) column blocks of W^T to torch's (r, z, n) rows
        z, r, h = np.split(matrix, 3, axis=-1)
        return torch.from_numpy(np.concatenate([r, z, h], axis=-1).T.copy())

    ours = rnnkit.GRU(INPUT, HIDDEN, batch_first=True, reset_after=False)
    with torch.no_grad():
        ours.weight_ih_l0.copy_(rows(kernel))
        ours.weight_hh_l0.copy_(rows(recurrent))
        ours.bias_ih_l0.copy_(rows(bias[None])[:, 0])
        ours.bias_hh_l0.zero_()
    x = rng.normal(size=(BATCH, STEPS, INPUT)).astype("float32")
    expected = keras.ops.convert_to_numpy(layer(x))
    streaming = rnnkit.Stateful(ours)
    with torch.no_grad(), Served() as served:
        got = torch.cat([streaming(torch.from_numpy(x[:, t: t + 1])) for t in range(STEPS)], 1)
    assert served.count == STEPS
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,options", [("RNN", {"nonlinearity": "relu"}), ("GRU", {}),
                                          ("GRU", {"reset_after": False}),
                                          ("LSTM", {"proj_size": 40})])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_steps_split_between_threads(kind, options, dtype):
    """Steps of 2M multiply-adds or more split their hidden units between torch's threads
    (264 units: a partial vector at the end); each thread's columns of every gate, and the
    projection's columns after a barrier. torch.nn is the twin where it has the formulation,
    else the reference path."""
    batch, hidden = 32, 264
    make = getattr(rnnkit, kind)
    fast = make(64, hidden, num_layers=2, dtype=dtype, **options)
    if options.get("reset_after") is False:
        twin = make(64, hidden, num_layers=2, dtype=dtype, backend="reference", **options)
        twin.load_state_dict(fast.state_dict())
    else:
        twin = getattr(nn, kind)(64, hidden, num_layers=2, dtype=dtype, **options)
        fast.load_state_dict(twin.state_dict())
    x = torch.randn(1, batch, 64, dtype=dtype)
    hx = random_state(kind, 2, batch, options.get("proj_size") or hidden, hidden, dtype)
    with torch.no_grad(), Served() as served:
        got = fast(x, hx)
        expected = twin(x, hx)
    assert served.count == 1
    close(got[0], expected[0], dtype)
    for got_state, want_state in zip(rnnkit.ops.spec.as_states(got[1]),
                                     rnnkit.ops.spec.as_states(expected[1])):
        close(got_state, want_state, dtype)


# Stateful and cells ------------------------------------------------------------------------


@pytest.mark.parametrize("kind,options", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stateful_layer_over_many_steps_equals_one_torch_call(kind, options, dtype):
    theirs, ours = twin_layers(kind, INPUT, HIDDEN, num_layers=2, dtype=dtype, **options)
    streaming = rnnkit.Stateful(ours)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=dtype)
    with torch.no_grad(), Served() as served:
        outputs = torch.cat([streaming(x[t: t + 1]) for t in range(STEPS)])
    expected, final = theirs(x)
    assert served.count == STEPS
    close(outputs, expected, dtype)
    for got, want in zip(rnnkit.ops.spec.as_states(streaming.state),
                         rnnkit.ops.spec.as_states(final)):
        close(got, want, dtype)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batched", [True, False])
def test_cells_equal_torch_nn(kind, dtype, batched):
    torch_cell, ours_cell = CELLS[kind]
    theirs = torch_cell(INPUT, HIDDEN, dtype=dtype)
    ours = ours_cell(INPUT, HIDDEN, dtype=dtype)
    ours.load_state_dict(theirs.state_dict())
    lead = (BATCH,) if batched else ()
    x = torch.randn(*lead, INPUT, dtype=dtype)
    h = torch.randn(*lead, HIDDEN, dtype=dtype)
    hx = (h, torch.randn(*lead, HIDDEN, dtype=dtype)) if kind == "LSTM" else h
    with torch.no_grad(), Served() as served:
        got = [ours(x, hx), ours(x)]
    expected = [theirs(x, hx), theirs(x)]
    assert served.count == 2
    for a, b in zip(got, expected):
        for got_state, want_state in zip(rnnkit.ops.spec.as_states(a),
                                         rnnkit.ops.spec.as_states(b)):
            assert got_state.shape == want_state.shape
            close(got_state, want_state, dtype)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_stateful_cell_over_many_steps_equals_torch_nn(kind):
    torch_cell, ours_cell = CELLS[kind]
    theirs = torch_cell(INPUT, HIDDEN, dtype=torch.float64)
    ours = ours_cell(INPUT, HIDDEN, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    streaming = rnnkit.Stateful(ours)
    x = torch.randn(STEPS, BATCH, INPUT, dtype=torch.float64)
    state = None
    with torch.no_grad(), Served() as served:
        for t in range(STEPS):
            got = streaming(x[t])
            state = theirs(x[t], state)
            close(got, state[0] if kind == "LSTM" else state, torch.float64)
    assert served.count == STEPS
    if kind == "LSTM":
        close(streaming.state[1], state[1], torch.float64)


# the cache ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_an_optimizer_step_repacks_the_weights(kind):
    theirs, ours = twin_layers(kind, INPUT, HIDDEN, num_layers=2, dtype=torch.float64)
    x = torch.randn(1, BATCH, INPUT, dtype=torch.float64)
    with torch.no_grad():
        ours(x)  # packs
    # A training step on the general path (gradients enabled), then an in-place update.
    optimizer = torch.optim.SGD(ours.parameters(), lr=0.5)
    with Served() as served:
        ours(torch.randn(4, BATCH, INPUT, dtype=torch.float64))[0].square().sum().backward()
    assert served.count == 0
    optimizer.step()
    theirs.load_state_dict(ours.state_dict())
    with torch.no_grad(), Served() as served:
        got = ours(x)
    assert served.count == 1
    close(got[0], theirs(x)[0], torch.float64)


def test_load_state_dict_and_data_assignment_repack_the_weights():
    ours = rnnkit.LSTM(INPUT, HIDDEN, dtype=torch.float64)
    other = nn.LSTM(INPUT, HIDDEN, dtype=torch.float64)
    x = torch.randn(1, BATCH, INPUT, dtype=torch.float64)
    streaming = rnnkit.Stateful(ours)
    with torch.no_grad(), Served() as served:
        before = streaming(x)
        ours.load_state_dict(other.state_dict())
        streaming.reset()
        after = streaming(x)
        replacement = torch.randn_like(ours.weight_hh_l0)
        ours.weight_hh_l0.data = replacement
        other.weight_hh_l0.data = replacement.clone()
        streaming.reset()
        replaced = streaming(x)
    assert served.count == 3
    assert (before - after).abs().max() > 1e-3
    close(replaced, other(x)[0], torch.float64)
    other.weight_hh_l0.data = ours.weight_hh_l0.data.clone()
    with torch.no_grad():
        ours.load_state_dict(other.state_dict())
        close(ours(x)[0], other(x)[0], torch.float64)


def test_a_new_parameter_on_the_same_storage_repacks_the_weights():
    """A parameter replaced by a new one over the same storage, whose version counter then
    catches up with the old one's: same address, same version, other values. The key holds
    each parameter's identity too, so the step sees the change."""
    theirs, ours = twin_layers("GRU", INPUT, HIDDEN, dtype=torch.float64)
    x = torch.randn(1, BATCH, INPUT, dtype=torch.float64)
    hx = torch.randn(1, BATCH, HIDDEN, dtype=torch.float64)  # W_hh counts: no zero state
    old = ours.weight_hh_l0
    with torch.no_grad():
        for _ in range(3):
            old.add_(0.0)
        ours(x, hx)  # packs
        fresh = nn.Parameter(old.data)
        ours.weight_hh_l0 = fresh
        assert fresh._version < old._version and fresh.data_ptr() == old.data_ptr()
        while fresh._version < old._version:
            fresh.mul_(1.5)
        theirs.weight_hh_l0.copy_(fresh)
        with Served() as served:
            got = ours(x, hx)
    assert served.count == 1
    close(got[0], theirs(x, hx)[0], torch.float64)


def test_the_backend_variable_is_read_at_each_step(monkeypatch):
    layer, x = rnnkit.GRU(INPUT, HIDDEN), torch.randn(1, BATCH, INPUT)
    with torch.no_grad():
        for value, count in [("cpu", 1), ("reference", 0), ("auto", 1), ("", 1)]:
            monkeypatch.setenv("RNNKIT_BACKEND", value)
            with Served() as served:
                layer(x)
            assert served.count == count, value
        monkeypatch.delenv("RNNKIT_BACKEND")
        with Served() as served:
            layer(x)
        assert served.count == 1


def test_a_cell_repacks_after_an_in_place_update():
    theirs = nn.GRUCell(INPUT, HIDDEN, dtype=torch.float64)
    ours = rnnkit.GRUCell(INPUT, HIDDEN, dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(BATCH, INPUT, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
        for module in (ours, theirs):
            module.bias_hh.add_(1.0)
            module.weight_ih.mul_(-1.0)
        close(ours(x), theirs(x), torch.float64)


# what stays on the general path --------------------------------------------------------------


def test_with_gradients_the_general_path_runs_and_gradients_match_torch_nn():
    theirs, ours = twin_layers("LSTM", INPUT, HIDDEN, num_layers=2, dtype=torch.float64)
    x = torch.randn(1, BATCH, INPUT, dtype=torch.float64)
    with Served() as served:
        ours(x)[0].sum().backward()
    theirs(x)[0].sum().backward()
    assert served.count == 0
    for mine, theirs_param in zip(ours.parameters(), theirs.parameters()):
        close(mine.grad, theirs_param.grad, torch.float64)
    # Frozen weights and an input without gradient: nothing wants one, so the step is served.
    ours.requires_grad_(False)
    with Served() as served:
        ours(x)
    assert served.count == 1
    # An input that wants its gradient keeps the general path.
    with Served() as served:
        ours(x.clone().requires_grad_())[0].sum().backward()
    assert served.count == 0


@pytest.mark.parametrize(
    "make,call",
    [
        (lambda: rnnkit.GRU(INPUT, HIDDEN, backend="reference"), lambda m, x: m(x)),
        (lambda: rnnkit.GRU(INPUT, HIDDEN), lambda m, x: m(torch.cat([x, x]))),  # two steps
        (lambda: rnnkit.GRU(INPUT, HIDDEN), lambda m, x: m(x, lengths=[1] * BATCH)),
        (lambda: rnnkit.GRU(INPUT, HIDDEN, bidirectional=True), lambda m, x: m(x)),
        (lambda: rnnkit.RNN(INPUT, HIDDEN, nonlinearity=torch.sin), lambda m, x: m(x)),
        (lambda: rnnkit.GRU(INPUT, HIDDEN, recurrent_activation="hard_sigmoid"),
         lambda m, x: m(x)),
        (lambda: rnnkit.GRU(INPUT, HIDDEN, dtype=torch.bfloat16),
         lambda m, x: m(x.to(torch.bfloat16))),
        (lambda: rnnkit.GRU(INPUT, HIDDEN, num_layers=2, dropout=0.5).train(),
         lambda m, x: m(x)),
        (lambda: rnnkit.GRU(INPUT, HIDDEN, recurrent_dropout=0.5).train(), lambda m, x: m(x)),
        (lambda: rnnkit.GRUCell(INPUT, HIDDEN, input_dropout=0.5).train(),
         lambda m, x: m(x[0])),
        (lambda: rnnkit.LSTM(INPUT, HIDDEN, zoneout=0.2).eval(), lambda m, x: m(x)),
        (lambda: rnnkit.GRU(INPUT, HIDDEN, layer_norm=True).eval(), lambda m, x: m(x)),
    ],
    ids=["reference", "two-steps", "lengths", "bidirectional", "callable", "gate-activation",
         "bfloat16", "dropout-training", "recurrent-dropout-training",
         "input-dropout-training", "zoneout", "layer-norm"],
)
def test_other_calls_keep_the_general_path(make, call):
    module = make()
    with torch.no_grad(), Served() as served:
        call(module, torch.randn(1, BATCH, INPUT))
    assert served.count == 0


@pytest.mark.parametrize("how", ["prune", "parametrize"])
def test_computed_weights_keep_the_general_path(how):
    """A weight computed at each call (pruning's forward pre-hook, a parametrization) is no
    parameter to pack: such a module is not served, and runs its current weights."""
    theirs, ours = twin_layers("GRU", INPUT, HIDDEN, dtype=torch.float64)
    if how == "prune":
        prune.random_unstructured(ours, "weight_hh_l0", amount=0.5)
    else:
        parametrize.register_parametrization(ours, "weight_hh_l0", nn.Tanh())
    x = torch.randn(1, BATCH, INPUT, dtype=torch.float64)
    with torch.no_grad(), Served() as served:
        theirs.weight_hh_l0.copy_(ours.weight_hh_l0)
        close(ours(x)[0], theirs(x)[0], torch.float64)
    assert served.count == 0


def test_dropout_in_evaluation_is_served_and_equals_torch_nn():
    theirs, ours = twin_layers("GRU", INPUT, HIDDEN, num_layers=2, dtype=torch.float64,
                               dropout=0.5, ours_kwargs={"recurrent_dropout": 0.3,
                                                         "input_dropout": 0.3})
    ours.eval(), theirs.eval()
    x = torch.randn(1, BATCH, INPUT, dtype=torch.float64)
    with torch.no_grad(), Served() as served:
        close(ours(x)[0], theirs(x)[0], torch.float64)
    assert served.count == 1


def test_wrong_shapes_still_raise_the_general_errors():
    layer, cell = rnnkit.GRU(INPUT, HIDDEN), rnnkit.GRUCell(INPUT, HIDDEN)
    streaming = rnnkit.Stateful(rnnkit.GRU(INPUT, HIDDEN))
    with torch.no_grad():
        with pytest.raises(ValueError, match="input"):
            layer(torch.randn(1, BATCH, INPUT + 1))
        with pytest.raises((ValueError, RuntimeError), match="hx|h_0|hidden"):
            layer(torch.randn(1, BATCH, INPUT), torch.randn(1, BATCH + 1, HIDDEN))
        with pytest.raises(ValueError, match="input"):
            cell(torch.randn(BATCH, INPUT + 1))
        streaming(torch.randn(1, BATCH, INPUT))
        with pytest.raises(ValueError, match="reset"):
            streaming(torch.randn(1, BATCH + 1, INPUT))


@pytest.mark.parametrize("owner,name", [(torch.compiler, "is_compiling"),
                                        (torch.compiler, "is_exporting"),
                                        (torch.jit, "is_tracing")])
def test_not_taken_while_compiling_exporting_or_tracing(monkeypatch, owner, name):
    layer, x = rnnkit.GRU(INPUT, HIDDEN), torch.randn(1, 1, INPUT)
    with torch.no_grad():
        assert stream.serves(layer, x, None) is not None
        monkeypatch.setattr(owner, name, lambda: True)
        assert stream.serves(layer, x, None) is None
