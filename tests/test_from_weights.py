"""Cells and single-layer layers built from given tensors (from_weights), against torch.nn."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import rnnkit

DOCS = Path(__file__).resolve().parents[1] / "docs" / "structured-weights.md"


def _tensors(module: nn.Module, suffix: str = "") -> dict[str, torch.Tensor]:
    """A torch.nn module's weights, cloned, under the names from_weights takes."""
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    return {
        name: getattr(module, name + suffix).detach().clone()
        for name in names
        if getattr(module, name + suffix, None) is not None
    }


# construction, checked against torch.nn -------------------------------------------------------


@pytest.mark.parametrize(
    "torch_cls, kwargs",
    [
        (nn.RNNCell, {"nonlinearity": "tanh"}),
        (nn.RNNCell, {"nonlinearity": "relu"}),
        (nn.GRUCell, {}),
        (nn.LSTMCell, {}),
    ],
)
def test_cell_from_torch_tensors_matches_torch(torch_cls, kwargs):
    torch.manual_seed(0)
    theirs = torch_cls(4, 6, **kwargs)
    cls = getattr(rnnkit, torch_cls.__name__)
    ours = cls.from_weights(**_tensors(theirs), **kwargs)
    assert (ours.input_size, ours.hidden_size, ours.bias) == (4, 6, True)
    x = torch.randn(3, 4)
    if torch_cls is nn.LSTMCell:
        hx = (torch.randn(3, 6), torch.randn(3, 6))
        for got, want in zip(ours(x, hx), theirs(x, hx)):
            torch.testing.assert_close(got, want)
        for got, want in zip(ours(x[0]), theirs(x[0])):  # unbatched, zero state
            torch.testing.assert_close(got, want)
    else:
        hx = torch.randn(3, 6)
        torch.testing.assert_close(ours(x, hx), theirs(x, hx))
        torch.testing.assert_close(ours(x[0]), theirs(x[0]))


@pytest.mark.parametrize(
    "torch_cls, kwargs",
    [
        (nn.RNN, {"nonlinearity": "relu"}),
        (nn.GRU, {}),
        (nn.LSTM, {}),
        (nn.LSTM, {"proj_size": 3}),
    ],
)
def test_layer_from_torch_tensors_matches_torch(torch_cls, kwargs):
    torch.manual_seed(1)
    theirs = torch_cls(4, 6, batch_first=True, **kwargs)
    cls = getattr(rnnkit, torch_cls.__name__)
    given = _tensors(theirs, "_l0")
    weight_hr = given.pop("weight_hr", None)
    options = {k: v for k, v in kwargs.items() if k != "proj_size"}
    ours = cls.from_weights(**given, weight_hr=weight_hr, batch_first=True, **options)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert ours.proj_size == kwargs.get("proj_size", 0)
    x = torch.randn(2, 5, 4)
    got, want = ours(x), theirs(x)
    torch.testing.assert_close(got, want)
    got[0].sum().backward()
    want[0].sum().backward()
    for name, param in theirs.named_parameters():
        torch.testing.assert_close(ours.get_parameter(name).grad, param.grad)


def test_gru_reset_before_equals_constructed_layer():
    # torch.nn has no reset_after=False GRU; the constructor path is the twin.
    torch.manual_seed(2)
    built = rnnkit.GRU(3, 5, reset_after=False)
    ours = rnnkit.GRU.from_weights(**_tensors(built, "_l0"), reset_after=False)
    assert ours.reset_after is False
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(ours(x), built(x))


def test_tensors_become_the_parameters_without_copy():
    weight_ih, weight_hh, bias = torch.randn(5, 4), torch.randn(5, 5), torch.randn(5)
    cell = rnnkit.RNNCell.from_weights(weight_ih, weight_hh, bias)
    assert isinstance(cell.weight_hh, nn.Parameter) and cell.weight_hh.is_leaf
    assert cell.weight_hh.data_ptr() == weight_hh.data_ptr()
    with torch.no_grad():
        cell.weight_hh.add_(1.0)
    torch.testing.assert_close(weight_hh, cell.weight_hh.detach())


def test_non_leaf_tensors_are_detached():
    source = torch.randn(5, 5, requires_grad=True)
    cell = rnnkit.RNNCell.from_weights(torch.randn(5, 4), source * 2)
    assert cell.weight_hh.is_leaf and cell.weight_hh.grad_fn is None
    cell(torch.randn(2, 4), torch.randn(2, 5)).sum().backward()
    assert source.grad is None and cell.weight_hh.grad is not None


@pytest.mark.parametrize("requires_grad", [True, False])
def test_requires_grad_applies_to_every_given_tensor(requires_grad):
    layer = rnnkit.LSTM.from_weights(
        torch.randn(16, 3), torch.randn(16, 2), torch.randn(16), torch.randn(16),
        weight_hr=torch.randn(2, 4), initial_state=(torch.randn(2), torch.randn(4)),
        requires_grad=requires_grad,
    )
    flags = {name: p.requires_grad for name, p in layer.named_parameters()}
    assert set(flags) == {
        "weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0", "weight_hr_l0",
        "initial_h", "initial_c",
    }
    assert all(flag is requires_grad for flag in flags.values())


def test_dtype_and_device_follow_the_tensors():
    layer = rnnkit.GRU.from_weights(
        torch.randn(9, 2, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    )
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert layer(torch.randn(4, 1, 2, dtype=torch.float64))[0].dtype == torch.float64


@pytest.mark.parametrize("cls", [rnnkit.RNNCell, rnnkit.GRU, rnnkit.LSTMCell, rnnkit.LSTM])
def test_building_draws_no_random_numbers_and_leaves_nothing_unset(cls):
    gates = {"RNNCell": 1, "GRU": 3, "LSTMCell": 4, "LSTM": 4}[cls.__name__]
    tensors = (torch.randn(gates * 3, 2), torch.randn(gates * 3, 3), torch.randn(gates * 3))
    torch.manual_seed(7)
    expected = torch.rand(4)
    torch.manual_seed(7)
    module = cls.from_weights(*tensors)
    assert torch.equal(torch.rand(4), expected)
    assert all(t.device.type == "cpu" for t in module.state_dict().values())


def test_no_bias_matches_torch_without_bias():
    torch.manual_seed(3)
    theirs = nn.RNN(3, 4, bias=False)
    ours = rnnkit.RNN.from_weights(theirs.weight_ih_l0.detach(), theirs.weight_hh_l0.detach())
    assert ours.bias is False
    assert dict(ours.named_parameters()).keys() == {"weight_ih_l0", "weight_hh_l0"}
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("given", ["bias_ih", "bias_hh"])
def test_single_bias_is_flux_b_and_the_other_is_a_frozen_zero(given):
    """Flux's RNNCell(tanh, Wi, Wh, b, state0): one bias; the other is zero and never trains."""
    torch.manual_seed(4)
    weight_ih, weight_hh, bias = torch.rand(5, 4), torch.rand(5, 5), torch.rand(5)
    cell = rnnkit.RNNCell.from_weights(weight_ih.clone(), weight_hh.clone(), **{given: bias})
    other = "bias_hh" if given == "bias_ih" else "bias_ih"
    assert getattr(cell, given).requires_grad
    assert not getattr(cell, other).requires_grad
    assert torch.equal(getattr(cell, other), torch.zeros(5))

    twin = nn.RNNCell(4, 5)
    with torch.no_grad():
        twin.weight_ih.copy_(weight_ih)
        twin.weight_hh.copy_(weight_hh)
        getattr(twin, given).copy_(bias)
        getattr(twin, other).zero_()
    x, h = torch.randn(10, 4), torch.randn(10, 5)
    torch.testing.assert_close(cell(x, h), twin(x, h))

    before = bias.clone()  # ``bias`` is the parameter's own storage
    optimizer = torch.optim.SGD(cell.parameters(), lr=0.5)
    cell(x, h).square().sum().backward()
    optimizer.step()
    assert not torch.equal(getattr(cell, given).detach(), before)
    assert torch.equal(getattr(cell, other), torch.zeros(5))


def test_flux_example_initial_state_is_learnable():
    """The seed: RNNCell(tanh, rand(5, 4), Tridiagonal(rand(5, 5)), rand(5), rand(5, 1))."""
    torch.manual_seed(5)
    weight_ih, weight_hh = torch.rand(5, 4), torch.rand(5, 5).triu(-1).tril(1)
    bias, state0 = torch.rand(5), torch.rand(5, 1)
    cell = rnnkit.RNNCell.from_weights(
        weight_ih, weight_hh, bias, initial_state=state0.T.clone(), backend="reference"
    )
    assert cell.learn_initial_state and cell.initial_h.shape == (5,)
    x = torch.rand(10, 4)  # Flux's rand(4, 10): a batch of 10
    out = cell(x)
    assert out.shape == (10, 5)

    twin = nn.RNNCell(4, 5)
    with torch.no_grad():
        twin.weight_ih.copy_(weight_ih)
        twin.weight_hh.copy_(weight_hh)
        twin.bias_ih.copy_(bias)
        twin.bias_hh.zero_()
    torch.testing.assert_close(out, twin(x, state0.T.expand(10, 5)))
    out.sum().backward()
    assert cell.initial_h.grad is not None and cell.initial_h.grad.abs().sum() > 0


@pytest.mark.parametrize("h0_shape", [(3,), (1, 3)])
def test_layer_initial_state_pair_for_lstm(h0_shape):
    torch.manual_seed(6)
    theirs = nn.LSTM(2, 3)
    h0, c0 = torch.randn(h0_shape), torch.randn(h0_shape)
    ours = rnnkit.LSTM.from_weights(**_tensors(theirs, "_l0"), initial_state=(h0, c0))
    assert ours.initial_h.shape == (1, 3) and ours.initial_c.shape == (1, 3)
    x = torch.randn(4, 2, 2)
    state = (h0.reshape(1, 1, 3).expand(1, 2, 3), c0.reshape(1, 1, 3).expand(1, 2, 3))
    got, want = ours(x), theirs(x, state)
    torch.testing.assert_close(got, want)


# errors --------------------------------------------------------------------------------------

W = torch.randn


@pytest.mark.parametrize(
    "cls, args, kwargs, error, message",
    [
        (rnnkit.RNNCell, ([[1.0]], W(5, 5)), {}, TypeError, "weight_ih must be a Tensor, got list"),
        (rnnkit.RNNCell, (W(5, 4), torch.ones(5, 5, dtype=torch.int64)), {}, TypeError,
         "weight_hh must be a floating-point tensor, got dtype torch.int64"),
        (rnnkit.RNNCell, (W(5, 4), W(5)), {}, ValueError, "weight_hh must be 2-D, got 1-D"),
        (rnnkit.RNNCell, (W(5, 4), W(5, 4)), {}, ValueError,
         "weight_hh must have shape (hidden_size, hidden_size) = (5, 5), got (5, 4)"),
        (rnnkit.GRUCell, (W(7, 4), W(7, 2)), {}, ValueError,
         "weight_hh must have 3*hidden_size (gates r, z, n) rows, a positive multiple of 3, "
         "got shape (7, 2)"),
        (rnnkit.GRU, (W(6, 4), W(9, 3)), {}, ValueError,
         "weight_ih must have shape (3*hidden_size (gates r, z, n), input_size) = (9, "
         "input_size) with input_size > 0, got (6, 4)"),
        (rnnkit.LSTMCell, (W(8, 3), W(8, 2), W(4)), {}, ValueError,
         "bias_ih must have shape (4*hidden_size (gates i, f, g, o),) = (8,), got (4,)"),
        (rnnkit.RNN, (W(5, 4), W(5, 5), None, W(5, dtype=torch.float64)), {}, TypeError,
         "bias_hh has dtype torch.float64 but weight_hh has dtype torch.float32"),
        (rnnkit.RNN, (W(5, 4), W(5, 5), W(5, device="meta")), {}, ValueError,
         "bias_ih is on meta but weight_hh is on cpu"),
        (rnnkit.RNN, (W(5, 4), W(5, 5)), {"initial_state": W(4)}, ValueError,
         "initial_state must have shape (5,) or (1, 5), got (4,)"),
        (rnnkit.RNNCell, (W(5, 4), W(5, 5)), {"initial_state": W(2, 5)}, ValueError,
         "initial_state must have shape (5,) or (1, 5), got (2, 5)"),
        (rnnkit.LSTM, (W(8, 3), W(8, 2)), {"initial_state": W(2)}, TypeError,
         "an LSTM's initial_state must be a pair (h0, c0), got Tensor"),
        (rnnkit.LSTMCell, (W(8, 3), W(8, 2)), {"initial_state": (W(2), W(3))}, ValueError,
         "initial_state[1] must have shape (2,) or (1, 2), got (3,)"),
        (rnnkit.LSTM, (W(16, 3), W(16, 2)), {}, ValueError,
         "weight_hh must have shape (4*hidden_size (gates i, f, g, o), hidden_size) = (16, 4), "
         "got (16, 2); for a projected LSTM pass weight_hr"),
        (rnnkit.LSTM, (W(16, 3), W(16, 4)), {"weight_hr": W(4, 4)}, ValueError,
         "weight_hr must have shape (proj_size, hidden_size) = (proj_size, 4) with "
         "0 < proj_size < 4, got (4, 4)"),
        (rnnkit.GRU, (W(6, 3), W(6, 2)), {"weight_hr": W(1, 2)}, ValueError,
         "weight_hr (the LSTM projection) is only accepted by LSTM layers, not by GRU"),
        (rnnkit.GRU, (W(6, 3), W(6, 2)), {"num_layers": 2}, TypeError,
         "from_weights builds a single-layer, unidirectional layer and does not take "
         "num_layers="),
        (rnnkit.RNN, (W(5, 3), W(5, 5)), {"bidirectional": True}, TypeError,
         "does not take bidirectional="),
        (rnnkit.RNNCell, (W(5, 3), W(5, 5)), {"hidden_size": 5}, TypeError,
         "from_weights reads hidden_size from the given tensors; do not pass hidden_size="),
        (rnnkit.RNNCell, (W(5, 3), W(5, 5)), {"requires_grad": 1}, TypeError,
         "requires_grad must be a bool, got int"),
        (rnnkit.GRUCell, (W(6, 3), W(6, 2)), {"nonlinearity": "relu"}, TypeError,
         "unexpected keyword argument 'nonlinearity'"),
    ],
)
def test_bad_tensors_raise_clear_errors(cls, args, kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        cls.from_weights(*args, **kwargs)


# the documented example --------------------------------------------------------------------


def test_docs_example_runs_and_trains():
    """Run the Python blocks of docs/structured-weights.md, which assert what they show."""
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks, f"no python blocks in {DOCS}"
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(DOCS), "exec"), namespace)  # noqa: S102
    losses = namespace["losses"]
    assert losses[-1] < losses[0]
