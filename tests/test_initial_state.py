"""learn_initial_state: trainable initial_h / initial_c, held to torch.nn given the same h0."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit import Stateful

INPUT, HIDDEN, BATCH, STEPS = 3, 5, 4, 6

LAYERS = [
    (rnnkit.RNN, nn.RNN, {"nonlinearity": "relu"}),
    (rnnkit.GRU, nn.GRU, {}),
    (rnnkit.LSTM, nn.LSTM, {}),
    (rnnkit.LSTM, nn.LSTM, {"proj_size": 2}),
]


def pair(ours_cls, torch_cls, kwargs, **extra):
    torch.manual_seed(0)
    ours = ours_cls(INPUT, HIDDEN, learn_initial_state=True, **kwargs, **extra)
    reference = torch_cls(INPUT, HIDDEN, **kwargs, **extra)
    weights = {k: v for k, v in ours.state_dict().items() if not k.startswith("initial_")}
    reference.load_state_dict(weights)
    return ours, reference


def randomize_initial_state(module):
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.startswith("initial_"):
                param.copy_(torch.randn_like(param))


def broadcast(module, batch: int | None):
    """The initial state as torch.nn's hx: (D*L, N, H) per tensor, or (D*L, H) unbatched."""
    states = [module.initial_h] + ([module.initial_c] if hasattr(module, "initial_c") else [])
    if batch is not None:
        states = [s[:, None, :].expand(s.shape[0], batch, s.shape[1]) for s in states]
    return tuple(states) if len(states) == 2 else states[0]


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", LAYERS)
def test_parameters_start_at_zero_with_the_right_shapes(ours_cls, torch_cls, kwargs):
    ours, reference = pair(ours_cls, torch_cls, kwargs, num_layers=2, bidirectional=True)
    out_size = kwargs.get("proj_size") or HIDDEN
    assert ours.initial_h.shape == (4, out_size)
    assert bool((ours.initial_h == 0).all())
    if ours_cls is rnnkit.LSTM:
        assert ours.initial_c.shape == (4, HIDDEN)
    else:
        assert not hasattr(ours, "initial_c")
    # At zero it is torch.nn's default zero state.
    x = torch.randn(STEPS, BATCH, INPUT)
    torch.testing.assert_close(ours(x)[0], reference(x)[0])
    assert "initial_h" in ours.state_dict()


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", LAYERS)
@pytest.mark.parametrize("batched", [True, False])
def test_used_when_hx_is_none_and_broadcast_over_batch(ours_cls, torch_cls, kwargs, batched):
    ours, reference = pair(ours_cls, torch_cls, kwargs, num_layers=2, bidirectional=True)
    randomize_initial_state(ours)
    x = torch.randn(STEPS, BATCH, INPUT) if batched else torch.randn(STEPS, INPUT)
    got, got_final = ours(x)
    expected, expected_final = reference(x, broadcast(ours, BATCH if batched else None))
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_final, expected_final)


def test_explicit_hx_overrides_the_learned_state():
    ours, reference = pair(rnnkit.GRU, nn.GRU, {})
    randomize_initial_state(ours)
    x, h0 = torch.randn(STEPS, BATCH, INPUT), torch.randn(1, BATCH, HIDDEN)
    torch.testing.assert_close(ours(x, h0)[0], reference(x, h0)[0])


@pytest.mark.parametrize(
    "ours_cls, torch_cls",
    [(rnnkit.RNNCell, nn.RNNCell), (rnnkit.GRUCell, nn.GRUCell), (rnnkit.LSTMCell, nn.LSTMCell)],
)
def test_cells(ours_cls, torch_cls):
    torch.manual_seed(0)
    ours = ours_cls(INPUT, HIDDEN, learn_initial_state=True)
    reference = torch_cls(INPUT, HIDDEN)
    reference.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("initial_")}
    )
    assert ours.initial_h.shape == (HIDDEN,) and bool((ours.initial_h == 0).all())
    randomize_initial_state(ours)
    x = torch.randn(BATCH, INPUT)
    names = ["initial_h", "initial_c"] if ours_cls is rnnkit.LSTMCell else ["initial_h"]
    hx = tuple(getattr(ours, n).expand(BATCH, HIDDEN) for n in names)
    expected = reference(x, hx if len(hx) == 2 else hx[0])
    got = ours(x)
    for g, e in zip(got if isinstance(got, tuple) else (got,),
                    expected if isinstance(expected, tuple) else (expected,)):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", LAYERS)
def test_gradient_equals_summed_torch_gradient_and_training_moves_it(ours_cls, torch_cls, kwargs):
    ours, reference = pair(ours_cls, torch_cls, kwargs, num_layers=2)
    randomize_initial_state(ours)
    x = torch.randn(STEPS, BATCH, INPUT)
    ours(x)[0].pow(2).sum().backward()
    # torch.nn with a leaf h0 of the broadcast value: the learned state's gradient is the
    # batch sum of h0's.
    leaves = [s.detach().clone().requires_grad_() for s in
              (broadcast(ours, BATCH) if ours_cls is rnnkit.LSTM else (broadcast(ours, BATCH),))]
    reference(x, tuple(leaves) if len(leaves) == 2 else leaves[0])[0].pow(2).sum().backward()
    params = [ours.initial_h] + ([ours.initial_c] if ours_cls is rnnkit.LSTM else [])
    for param, leaf in zip(params, leaves):
        assert bool(param.grad.abs().sum() > 0)
        torch.testing.assert_close(param.grad, leaf.grad.sum(1))
    before = ours.initial_h.detach().clone()
    torch.optim.SGD(ours.parameters(), lr=0.5).step()
    assert not torch.equal(ours.initial_h.detach(), before)


@pytest.mark.parametrize("ours_cls, torch_cls, kwargs", LAYERS)
def test_stateful_trains_it_and_reset_returns_to_it(ours_cls, torch_cls, kwargs):
    ours, reference = pair(ours_cls, torch_cls, kwargs)
    stream = Stateful(ours)
    optimizer = torch.optim.Adam(ours.parameters(), lr=0.05)
    before = ours.initial_h.detach().clone()
    chunks = torch.randn(3, 2, BATCH, INPUT)
    for _ in range(2):  # two streamed "epochs" with an optimizer step per chunk
        stream.reset()
        for chunk in chunks:
            optimizer.zero_grad()
            stream(chunk).pow(2).mean().backward()
            optimizer.step()
    assert not torch.equal(ours.initial_h.detach(), before)
    # reset() goes back to the (trained) learned state, not to zeros.
    reference.load_state_dict(
        {k: v for k, v in ours.state_dict().items() if not k.startswith("initial_")}
    )
    stream.reset()
    x = torch.randn(2, BATCH, INPUT)
    expected, _ = reference(x, tuple(s.detach() for s in broadcast(ours, BATCH))
                            if ours_cls is rnnkit.LSTM else broadcast(ours, BATCH).detach())
    torch.testing.assert_close(stream(x), expected)


def test_stateful_first_chunk_reaches_the_learned_state():
    ours = rnnkit.GRU(INPUT, HIDDEN, learn_initial_state=True)
    stream = Stateful(ours)
    stream(torch.randn(2, BATCH, INPUT)).sum().backward()
    assert bool(ours.initial_h.grad.abs().sum() > 0)
    ours.initial_h.grad = None
    stream(torch.randn(2, BATCH, INPUT)).sum().backward()  # truncated: nothing reaches it now
    assert ours.initial_h.grad is None


def test_state_dict_round_trip_and_bad_flag():
    ours = rnnkit.LSTM(INPUT, HIDDEN, learn_initial_state=True)
    randomize_initial_state(ours)
    copy = rnnkit.LSTM(INPUT, HIDDEN, learn_initial_state=True)
    copy.load_state_dict(ours.state_dict())
    torch.testing.assert_close(copy.initial_c, ours.initial_c)
    with pytest.raises(TypeError, match="learn_initial_state must be a bool"):
        rnnkit.GRU(INPUT, HIDDEN, learn_initial_state=1)
