"""torch.func: vmap over stacked ensembles, jacrev and jvp with respect to inputs.

torch.nn.GRU and torch.nn.LSTM have no vmap batching rule (pytorch/pytorch#134606); rnnkit's
layers run on plain torch ops under every transform, so these all work. Results are held
against per-model loops, torch.autograd and central finite differences.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.func import functional_call, jacrev, jvp, stack_module_state, vmap

import rnnkit

LAYERS = {
    "RNN": lambda: rnnkit.RNN(3, 4, nonlinearity="relu", dtype=torch.float64),
    "GRU": lambda: rnnkit.GRU(3, 4, bidirectional=True, dtype=torch.float64),
    "LSTM": lambda: rnnkit.LSTM(3, 4, num_layers=2, proj_size=2, dtype=torch.float64,
                                learn_initial_state=True),
}


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("use_lengths", [False, True])
def test_vmap_over_an_ensemble_matches_each_model(kind, use_lengths):
    torch.manual_seed(0)
    models = [LAYERS[kind]() for _ in range(3)]
    params, buffers = stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    lengths = torch.tensor([5, 3]) if use_lengths else None

    def run(params, buffers, x):
        output, state = functional_call(skeleton, (params, buffers), (x,), {"lengths": lengths})
        return output, state

    outputs, states = vmap(run, in_dims=(0, 0, None))(params, buffers, x)
    for index, model in enumerate(models):
        want_output, want_state = model(x, lengths=lengths)
        torch.testing.assert_close(outputs[index], want_output, atol=1e-12, rtol=0)
        for got, want in zip(torch.utils._pytree.tree_leaves(states),
                             torch.utils._pytree.tree_leaves(want_state)):
            torch.testing.assert_close(got[index], want, atol=1e-12, rtol=0)


def test_vmap_over_inputs_matches_a_loop():
    torch.manual_seed(0)
    model = rnnkit.GRU(3, 4, dtype=torch.float64)
    xs = torch.randn(4, 6, 2, 3, dtype=torch.float64)  # 4 independent (T, B, H_in) batches
    got = vmap(lambda x: model(x)[0])(xs)
    want = torch.stack([model(x)[0] for x in xs])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def _sequence_fn(kind):
    torch.manual_seed(0)
    model = LAYERS[kind]()
    lengths = torch.tensor([4, 2])

    def fn(x):
        output, _ = model(x, lengths=lengths)
        return output

    return fn


@pytest.mark.parametrize("kind", list(LAYERS))
def test_jacrev_matches_autograd_jacobian(kind):
    fn = _sequence_fn(kind)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    got = jacrev(fn)(x)
    want = torch.autograd.functional.jacobian(fn, x)
    assert got.shape == fn(x).shape + x.shape
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    # Steps past a sequence's length neither output nor depend on anything.
    assert torch.count_nonzero(got[2:, 1]) == 0


@pytest.mark.parametrize("kind", list(LAYERS))
def test_jvp_matches_finite_differences(kind):
    fn = _sequence_fn(kind)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    tangent = torch.randn_like(x)
    value, derivative = jvp(fn, (x,), (tangent,))
    torch.testing.assert_close(value, fn(x), atol=1e-12, rtol=0)
    eps = 1e-6
    finite = (fn(x + eps * tangent) - fn(x - eps * tangent)) / (2 * eps)
    torch.testing.assert_close(derivative, finite, atol=1e-7, rtol=1e-6)
