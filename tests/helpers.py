"""Shared test helpers: build torch.nn twins and compare outputs and every gradient."""

from __future__ import annotations

import torch
from torch import nn

import rnnkit

TORCH_LAYERS = {"RNN": nn.RNN, "GRU": nn.GRU, "LSTM": nn.LSTM}
OURS_LAYERS = {"RNN": rnnkit.RNN, "GRU": rnnkit.GRU, "LSTM": rnnkit.LSTM}


def twin_layers(kind: str, *args, dtype=torch.float64, ours_kwargs=None, **kwargs):
    """A torch.nn layer and an rnnkit layer holding the same weights (loaded strictly)."""
    torch_layer = TORCH_LAYERS[kind](*args, dtype=dtype, **kwargs)
    ours = OURS_LAYERS[kind](*args, dtype=dtype, **kwargs, **(ours_kwargs or {}))
    ours.load_state_dict(torch_layer.state_dict(), strict=True)
    return torch_layer, ours


def flatten(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, nn.utils.rnn.PackedSequence):
        return [value.data]
    return [t for item in value for t in flatten(item)]


def outputs_and_grads(module, input, hx, **kwargs):
    """Run ``module`` and return (outputs, grads of input, hx and every parameter)."""
    leaves = [input] + ([] if hx is None else flatten(hx))
    for leaf in leaves:
        leaf.grad = None
    module.zero_grad()
    result = module(input, hx, **kwargs) if hx is not None else module(input, **kwargs)
    outputs = flatten(result)
    total = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
                for o in outputs)
    total.backward()
    grads = [leaf.grad for leaf in leaves] + [p.grad for _, p in module.named_parameters()]
    return [o.detach() for o in outputs], grads


def assert_close_all(a, b, atol, rtol=0.0):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert (x is None) == (y is None), f"item {i}: one is None"
        if x is not None:
            torch.testing.assert_close(
                x, y, atol=atol, rtol=rtol, msg=lambda m, i=i: f"item {i}: {m}"
            )
