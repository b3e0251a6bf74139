"""Higher-order gradients: gradcheck and gradgradcheck in float64 for every layer and cell."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import functional_call

import rnnkit

LAYERS = [
    ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}),
    ("RNN", {"nonlinearity": torch.nn.functional.softplus}),
    ("GRU", {}),
    ("GRU", {"reset_after": False}),
    ("LSTM", {}),
    ("LSTM", {"proj_size": 2}),
]


def _check_module(module, x, hx, lengths=None):
    names = [n for n, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in module.parameters()]
    hx_list = [] if hx is None else (list(hx) if isinstance(hx, tuple) else [hx])

    def run(x, *rest):
        states = rest[: len(hx_list)]
        weights = dict(zip(names, rest[len(hx_list):]))
        state = None
        if states:
            state = tuple(states) if len(states) == 2 else states[0]
        kwargs = {} if lengths is None else {"lengths": lengths}
        args = (x,) if state is None else (x, state)
        out = functional_call(module, weights, args, kwargs)
        flat = [out] if isinstance(out, torch.Tensor) else [
            t for item in out for t in ([item] if isinstance(item, torch.Tensor) else item)]
        return tuple(flat)

    inputs = (x, *hx_list, *params)
    assert gradcheck(run, inputs, atol=1e-6)
    assert gradgradcheck(run, inputs, atol=1e-6)


@pytest.mark.parametrize("kind,kwargs", LAYERS, ids=lambda v: str(v))
def test_layers_gradcheck_and_gradgradcheck(kind, kwargs):
    module = getattr(rnnkit, kind)(2, 3, bidirectional=True, dtype=torch.float64, **kwargs)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    out_size = kwargs.get("proj_size", 3)
    h0 = torch.randn(2, 2, out_size, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)) \
        if kind == "LSTM" else h0
    _check_module(module, x, hx, lengths=[3, 2])


@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
def test_cells_gradcheck_and_gradgradcheck(kind):
    module = getattr(rnnkit, kind)(2, 3, dtype=torch.float64)
    x = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    hx = (h, torch.randn(2, 3, dtype=torch.float64, requires_grad=True)) \
        if kind == "LSTMCell" else h
    _check_module(module, x, hx)


def test_stacked_layer_gradgradcheck():
    module = rnnkit.GRU(2, 2, num_layers=2, dtype=torch.float64)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    _check_module(module, x, None)
