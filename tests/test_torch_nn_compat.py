"""torch.nn drop-in details, each held to the real torch.nn on the same inputs.

RNNBase's attributes and helpers (``_flat_weights``, ``mode``, ``check_input``,
``check_forward_args``, ``permute_hidden``, ...), weight_norm and pruning, the arguments
torch.nn accepts (numpy integers, 0/1 flags, zero-sized cells) and complex parameters.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils.rnn import pack_padded_sequence

import rnnkit
from helpers import flatten, twin_layers
from rnnkit.interop import from_torch
from rnnkit.ops import dispatch
from rnnkit.ops.spec import Call, CellSpec

LAYER_CONFIGS = [
    ("RNN", {}),
    ("RNN", {"nonlinearity": "relu", "num_layers": 2, "bidirectional": True}),
    ("GRU", {"bias": False, "batch_first": True}),
    ("GRU", {"num_layers": 3}),
    ("LSTM", {"proj_size": 2, "bidirectional": True, "num_layers": 2}),
    ("LSTM", {"bias": False, "proj_size": 3}),
]
CONFIG_IDS = [f"{kind}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for kind, kw in
              LAYER_CONFIGS]


def outcome(fn, *args):
    """``("ok", result)``, or ``(error type, message)`` when ``fn`` raises."""
    try:
        return "ok", fn(*args)
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error), str(error)


def same_outcome(theirs, ours):
    """Both succeed with equal results, or both raise the same type of error (the wording of
    the messages may differ)."""
    assert theirs[0] == ours[0], (theirs, ours)
    if theirs[0] == "ok" and theirs[1] is not None:
        for a, b in zip(flatten(theirs[1]), flatten(ours[1])):
            assert torch.equal(a, b)


# RNNBase's attributes ---------------------------------------------------------------------


@pytest.mark.parametrize("kind, kwargs", LAYER_CONFIGS, ids=CONFIG_IDS)
def test_flat_weights_and_mode_are_torch_nn_s(kind, kwargs):
    theirs, ours = twin_layers(kind, 4, 5, **kwargs)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert len(ours._flat_weights) == len(theirs._flat_weights)
    for mine, their, name in zip(ours._flat_weights, theirs._flat_weights,
                                 ours._flat_weights_names):
        assert mine is getattr(ours, name)
        assert torch.equal(mine, their)
    assert ours.mode == theirs.mode


def test_mode_of_rnnkit_only_cells():
    assert rnnkit.RNN(3, 4, nonlinearity="silu").mode == "RNN_SILU"
    assert rnnkit.RNN(3, 4, nonlinearity=torch.sin).mode == "RNN_CALLABLE"
    assert rnnkit.GRU(3, 4, reset_after=False).mode == "GRU"


def test_flat_weights_follow_legacy_weight_norm():
    theirs, ours = twin_layers("GRU", 3, 4, num_layers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the legacy API is deprecated
        for module in (theirs, ours):
            nn.utils.weight_norm(module, "weight_hh_l0")
            nn.utils.weight_norm(module, "weight_ih_l1")
    with torch.no_grad():
        for module in (theirs, ours):
            module.weight_hh_l0_g.mul_(1.5)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for a, b in zip(flatten(theirs(x)), flatten(ours(x))):
        torch.testing.assert_close(a, b)
    # torch.nn's list is refreshed by weight_norm's pre-forward hook; ours is read at access.
    index = ours._flat_weights_names.index("weight_hh_l0")
    assert ours._flat_weights[index] is ours.weight_hh_l0
    for mine, their in zip(ours._flat_weights, theirs._flat_weights):
        torch.testing.assert_close(mine, their)
    assert not isinstance(ours._flat_weights[index], nn.Parameter)


def test_flat_weights_follow_parametrizations():
    theirs, ours = twin_layers("LSTM", 3, 4, proj_size=2)
    for module in (theirs, ours):
        weight_norm(module, "weight_hr_l0")
        with torch.no_grad():
            module.parametrizations.weight_hr_l0.original0.mul_(0.5)
    index = ours._flat_weights_names.index("weight_hr_l0")
    torch.testing.assert_close(ours._flat_weights[index], theirs.weight_hr_l0)
    torch.testing.assert_close(ours._flat_weights[index], ours.weight_hr_l0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for a, b in zip(flatten(theirs(x)), flatten(ours(x))):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_pruned_layer_equals_pruned_torch_nn(kind):
    theirs, ours = twin_layers(kind, 3, 6, bidirectional=True)
    for module in (theirs, ours):
        prune.l1_unstructured(module, "weight_hh_l0", amount=0.5)
        prune.ln_structured(module, "weight_ih_l0_reverse", amount=0.3, n=2, dim=0)
    index = ours._flat_weights_names.index("weight_hh_l0")
    pruned = ours._flat_weights[index]
    assert (pruned == 0).sum() == pruned.numel() // 2
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    want, got = flatten(theirs(x)), flatten(ours(x))
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b)
    grads = [torch.autograd.grad(sum(o.sum() for o in outs), m.weight_hh_l0_orig)[0]
             for outs, m in ((want, theirs), (got, ours))]
    torch.testing.assert_close(grads[1], grads[0])
    assert torch.all(grads[1][pruned == 0] == 0)
    for mine, their in zip(ours._flat_weights, theirs._flat_weights):
        torch.testing.assert_close(mine, their)


# RNNBase's helpers ------------------------------------------------------------------------


@pytest.mark.parametrize("kind, kwargs", LAYER_CONFIGS, ids=CONFIG_IDS)
def test_check_helpers_agree_with_torch_nn(kind, kwargs):
    theirs, ours = twin_layers(kind, 4, 5, **kwargs)
    batch_first = kwargs.get("batch_first", False)
    count = kwargs.get("num_layers", 1) * (2 if kwargs.get("bidirectional") else 1)
    out_size = kwargs.get("proj_size") or 5
    double = torch.float64
    good = torch.randn((3, 7, 4) if batch_first else (7, 3, 4), dtype=double)
    packed = pack_padded_sequence(torch.randn(7, 3, 4, dtype=double), [7, 5, 2])
    inputs = [
        (good, None),
        (packed.data, packed.batch_sizes),
        (good[0], None),  # 2-D without batch sizes
        (good, packed.batch_sizes),  # 3-D with batch sizes
        (torch.randn(7, 3, 6, dtype=double), None),  # features
        (good.float(), None),  # dtype
    ]
    for x, batch_sizes in inputs:
        same_outcome(outcome(theirs.check_input, x, batch_sizes),
                     outcome(ours.check_input, x, batch_sizes))
        expected = outcome(theirs.get_expected_hidden_size, x, batch_sizes)
        assert outcome(ours.get_expected_hidden_size, x, batch_sizes) == expected
        if kind == "LSTM":
            expected = outcome(theirs.get_expected_cell_size, x, batch_sizes)
            assert outcome(ours.get_expected_cell_size, x, batch_sizes) == expected

    h = torch.randn(count, 3, out_size, dtype=double)
    c = torch.randn(count, 3, 5, dtype=double)
    wrong = torch.randn(count, 2, out_size, dtype=double)
    for hidden in [h, wrong, torch.randn(count + 1, 3, out_size, dtype=double)]:
        for module in (theirs, ours):
            assert module.get_expected_hidden_size(good, None) == (count, 3, out_size)
        ours_result = outcome(ours.check_hidden_size, hidden, (count, 3, out_size))
        assert ours_result == outcome(theirs.check_hidden_size, hidden, (count, 3, out_size))
    states = [(h, c), (h, wrong), (wrong, c), (h, h)] if kind == "LSTM" else [h, wrong]
    for state in states:
        for x in (good, good.float()):
            same_outcome(outcome(theirs.check_forward_args, x, state, None),
                         outcome(ours.check_forward_args, x, state, None))
        # The size messages are torch.nn's own, word for word.
        assert outcome(ours.check_forward_args, good, state, None) == outcome(
            theirs.check_forward_args, good, state, None)

    permutation = torch.tensor([2, 0, 1])
    state = (h, c) if kind == "LSTM" else h
    for order in (permutation, None):
        same_outcome(outcome(theirs.permute_hidden, state, order),
                     outcome(ours.permute_hidden, state, order))


def test_check_input_accepts_other_dtypes_under_autocast():
    theirs, ours = twin_layers("LSTM", 4, 5, dtype=torch.float32)
    x = torch.randn(7, 3, 4, dtype=torch.bfloat16)
    assert outcome(ours.check_input, x, None)[0] is ValueError
    with torch.autocast("cpu", dtype=torch.bfloat16):
        same_outcome(outcome(theirs.check_input, x, None), outcome(ours.check_input, x, None))
        assert outcome(ours.check_input, x, None) == ("ok", None)


# Arguments --------------------------------------------------------------------------------


def test_numpy_integers_and_integer_flags_build_the_torch_nn_layer():
    theirs = nn.LSTM(3, 5, num_layers=np.int64(2), bias=False, batch_first=True,
                     bidirectional=True, proj_size=np.int64(2), dtype=torch.float64)
    ours = rnnkit.LSTM(np.int64(3), np.int32(5), num_layers=np.int64(2), bias=0,
                       batch_first=np.bool_(True), bidirectional=1, proj_size=np.int64(2),
                       dtype=torch.float64)
    for name in ("input_size", "hidden_size", "num_layers", "proj_size"):
        assert type(getattr(ours, name)) is int
    for name in ("bias", "batch_first", "bidirectional"):
        assert getattr(ours, name) is getattr(theirs, name)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    for a, b in zip(flatten(theirs(x)), flatten(ours(x))):
        torch.testing.assert_close(a, b)
    assert ours.extra_repr() == rnnkit.LSTM(3, 5, 2, False, True, 0.0, True, 2).extra_repr()


@pytest.mark.parametrize("cls", [rnnkit.RNNCell, rnnkit.GRUCell, rnnkit.LSTMCell])
def test_cells_take_numpy_sizes_and_integer_flags(cls):
    cell = cls(np.int64(3), np.uint8(4), bias=0)
    assert type(cell.input_size) is int and type(cell.hidden_size) is int
    assert cell.bias is False and cell.bias_ih is None
    assert cls(3, 4, bias=1).bias is True


@pytest.mark.parametrize(
    "factory, error, match",
    [
        (lambda: rnnkit.GRU(3, 4, bias=2), ValueError, r"bias must be a bool \(or 0 or 1\), got 2"),
        (lambda: rnnkit.GRU(3, 4, bidirectional="yes"), TypeError, "bidirectional must be a bool"),
        (lambda: rnnkit.LSTM(3, 4, batch_first=1.0), TypeError, "got float 1.0"),
        (lambda: rnnkit.GRUCell(3, 4, bias=np.int64(-1)), ValueError, "got -1"),
        (lambda: rnnkit.GRU(3, 4, reset_after=None), TypeError, "reset_after must be a bool"),
        # rnnkit's own flags have no torch.nn code to stay compatible with: bools only.
        (lambda: rnnkit.GRU(3, 4, reset_after=1), TypeError, "reset_after must be a bool, got int"),
        (lambda: rnnkit.LSTMCell(3, 4, learn_initial_state=0), TypeError, "got int 0"),
        (lambda: rnnkit.RNN(np.float64(3), 4), TypeError, "input_size must be an int, got float64"),
        (lambda: rnnkit.RNN(3, np.bool_(True)), TypeError, "hidden_size must be an int, got bool"),
        (lambda: rnnkit.LSTM(3, 4, proj_size=1.0), TypeError, "proj_size must be an int"),
        (lambda: rnnkit.LSTMCell(-1, 4), ValueError, "input_size must be zero or positive"),
    ],
)
def test_what_stays_refused(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("sizes", [(0, 4), (4, 0)])
def test_zero_sized_layers_are_refused_as_in_torch_nn(kind, sizes):
    with pytest.raises(ValueError):
        getattr(nn, kind)(*sizes)
    with pytest.raises(ValueError, match="must be greater than zero, got 0"):
        getattr(rnnkit, kind)(*sizes)


@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
@pytest.mark.parametrize("sizes", [(0, 4), (3, 0), (0, 0)])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_zero_sized_cells_equal_torch_nn(kind, sizes, batched, backend):
    theirs = getattr(nn, kind)(*sizes, dtype=torch.float64)
    ours = getattr(rnnkit, kind)(*sizes, dtype=torch.float64, backend=backend)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    input_size, hidden_size = sizes
    lead = (3,) if batched else ()
    x = torch.randn(*lead, input_size, dtype=torch.float64)
    h = torch.randn(*lead, hidden_size, dtype=torch.float64)
    hx = (h, torch.randn_like(h)) if kind == "LSTMCell" else h
    for args in [(x,), (x, hx)]:
        want, got = flatten(theirs(*args)), flatten(ours(*args))
        assert [w.shape for w in want] == [g.shape for g in got]
        for w, g in zip(want, got):
            torch.testing.assert_close(g, w)
        if input_size == 0 and hidden_size:
            assert got[0].abs().sum() > 0  # the biases and hx still act


def test_zero_input_size_on_the_cpu_backend():
    reason = dispatch.registered()["cpu"].unavailable_reason()
    if reason is not None:
        pytest.skip(f"the cpu backend is unavailable here: {reason}")
    theirs = nn.GRUCell(0, 4)
    ours = rnnkit.GRUCell(0, 4, backend="cpu")
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(40, 0)
    torch.testing.assert_close(ours(x), theirs(x))


# Complex ----------------------------------------------------------------------------------

COMPLEX_MODULES = {
    "RNN": lambda dtype: nn.RNN(3, 4, num_layers=2, bidirectional=True, dtype=dtype),
    "GRU": lambda dtype: nn.GRU(3, 4, num_layers=2, batch_first=True, dtype=dtype),
    "LSTM": lambda dtype: nn.LSTM(3, 4, bidirectional=True, dtype=dtype),
    "LSTM-proj": lambda dtype: nn.LSTM(3, 4, proj_size=2, dtype=dtype),
    "RNNCell": lambda dtype: nn.RNNCell(3, 4, dtype=dtype),
    "GRUCell": lambda dtype: nn.GRUCell(3, 4, dtype=dtype),
    "LSTMCell": lambda dtype: nn.LSTMCell(3, 4, dtype=dtype),
}


def _loss(result) -> torch.Tensor:
    """A real scalar that depends on the real and imaginary part of every output."""
    total = torch.zeros((), dtype=torch.float64)
    for index, out in enumerate(flatten(result)):
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out) * (1 + index)
        total = total + (out * weights).real.sum() + (out * 1j).real.pow(2).sum()
    return total


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
@pytest.mark.parametrize("name", list(COMPLEX_MODULES))
def test_complex_modules_equal_torch_nn(name, dtype):
    theirs = COMPLEX_MODULES[name](dtype)
    ours = from_torch(theirs, backend="auto")
    assert all(p.dtype == dtype for p in ours.parameters())
    layer = isinstance(theirs, nn.RNNBase)
    x = torch.randn((2, 5, 3) if layer else (2, 3), dtype=dtype, requires_grad=True)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.complex64 else {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" takes the reference path silently
        got = ours(x)
    want = theirs(x)
    for w, g in zip(flatten(want), flatten(got)):
        assert g.dtype == dtype
        torch.testing.assert_close(g, w, **tol)
    grads = [torch.autograd.grad(_loss(result), [x, *module.parameters()])
             for result, module in ((want, theirs), (got, ours))]
    for w, g in zip(*grads):
        torch.testing.assert_close(g, w, **tol)


def test_complex_with_lengths_matches_packed_torch_nn():
    theirs = nn.GRU(3, 4, bidirectional=True, dtype=torch.complex128)
    ours = from_torch(theirs)
    x = torch.randn(6, 3, 3, dtype=torch.complex128)
    lengths = torch.tensor([6, 2, 4])
    packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
    want_out, want_h = theirs(packed)
    got_out, got_h = ours(x, lengths=lengths)
    want_out = nn.utils.rnn.pad_packed_sequence(want_out)[0]
    torch.testing.assert_close(got_out, want_out)
    torch.testing.assert_close(got_h, want_h)


def test_complex_relu_fails_as_in_torch_nn():
    theirs = nn.RNN(3, 4, nonlinearity="relu", dtype=torch.complex64)
    ours = from_torch(theirs)
    x = torch.randn(5, 2, 3, dtype=torch.complex64)
    for module in (theirs, ours):
        with pytest.raises(NotImplementedError, match="complex"):
            module(x)


def test_compiled_cpu_backend_refuses_complex_at_the_plan():
    dtype = torch.complex64
    call = Call(
        spec=CellSpec("gru"),
        state=(torch.zeros(2, 4, dtype=dtype),),
        weight_hh=torch.randn(12, 4, dtype=dtype),
        input=torch.randn(5, 2, 3, dtype=dtype),
        weight_ih=torch.randn(12, 3, dtype=dtype),
    )
    chosen = dispatch.plan(call, "cpu")
    assert chosen.backend.name == "reference"
    assert "complex64" in chosen.passed_over
    if dispatch.registered()["cpu"].unavailable_reason() is None:
        assert "dtype" in chosen.passed_over
    theirs = nn.GRU(3, 4, dtype=dtype)
    ours = from_torch(theirs, backend="cpu")
    with pytest.warns(UserWarning, match="using 'reference'"):
        got = ours(call.input)
    torch.testing.assert_close(got[0], theirs(call.input)[0], atol=1e-5, rtol=1e-5)
