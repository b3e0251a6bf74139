"""State resets inside a sequence (``resets=``): CleanRL's per-step loop over torch.nn, the
segment rule on every backend, gradients of every order, Stateful, and clear errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.ops import dispatch

BACKENDS = list(dispatch.registered())


def _backend_or_skip(name: str) -> None:
    reason = dispatch.registered()[name].unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {name!r} is unavailable here: {reason}")


def _cleanrl_loop(lstm_or_rnn, x, state, done):
    """CleanRL's ``get_states``: one torch.nn call per step, the state times ``1 - done``."""
    outputs = []
    for t in range(x.shape[0]):
        keep = (1.0 - done[t]).view(1, -1, 1)
        if isinstance(state, tuple):
            state = tuple(keep * s for s in state)
        else:
            state = keep * state
        output, state = lstm_or_rnn(x[t : t + 1], state)
        outputs.append(output)
    return torch.cat(outputs), state


def _flat(result):
    output, final = result
    return [output, *(final if isinstance(final, tuple) else (final,))]


def _grads(results, leaves):
    torch.manual_seed(3)
    loss = sum((r * torch.randn_like(r)).sum() for r in results)
    return list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("cell", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_one_call_equals_cleanrl_loop_over_torch_nn(cell, num_layers, backend):
    _backend_or_skip(backend)
    dtype = torch.float64 if backend != "triton" else torch.float32
    atol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.manual_seed(0)
    peer = getattr(nn, cell)(5, 7, num_layers=num_layers, dtype=dtype)
    ours = getattr(rnnkit, cell)(5, 7, num_layers=num_layers, dtype=dtype, backend=backend)
    ours.load_state_dict(peer.state_dict())
    steps, batch = 9, 4
    x = torch.randn(steps, batch, 5, dtype=dtype, requires_grad=True)
    done = torch.rand(steps, batch) < 0.25
    done[0, 1] = True  # hx ignored for that row
    done[:, 2] = False  # a row that never resets
    h0 = torch.randn(num_layers, batch, 7, dtype=dtype, requires_grad=True)
    c0 = torch.randn(num_layers, batch, 7, dtype=dtype, requires_grad=True)
    hx = (h0, c0) if cell == "LSTM" else h0
    leaves = [x, h0, *([c0] if cell == "LSTM" else [])]
    expected = _flat(_cleanrl_loop(peer, x, hx, done.to(dtype)))
    expected += _grads(expected, leaves + list(peer.parameters()))
    got = _flat(ours(x, hx, resets=done))
    got += _grads(got, leaves + list(ours.parameters()))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=atol)


def _segment_run(layer, x, hx, resets, lengths):
    """The rule itself: cut each sequence at its reset points and run every segment alone.

    ``x`` is ``(T, B, I)``; returns output ``(T, B, D*H_out)`` and the final state tuple.
    """
    steps, batch = x.shape[:2]
    directions = layer.num_directions
    outputs, finals = [], []
    states = None if hx is None else (hx if isinstance(hx, tuple) else (hx,))
    for b in range(batch):
        end = steps if lengths is None else int(lengths[b])
        points = [t for t in range(end) if resets[t, b]]
        bounds = ([0] if not points or points[0] != 0 else []) + points + [end]
        pieces, first_final, last_final = [], None, None
        for index, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
            use_hx = index == 0 and start == 0 and (not points or points[0] != 0)
            given = None
            if use_hx and states is not None:
                sliced = tuple(s[:, b : b + 1] for s in states)
                given = sliced if len(sliced) == 2 else sliced[0]
            output, final = layer(x[start:stop, b : b + 1], given)
            final = final if isinstance(final, tuple) else (final,)
            pieces.append(output)
            first_final = first_final or final
            last_final = final
        output = torch.cat(pieces)
        if end < steps:
            output = torch.cat([output, output.new_zeros(steps - end, 1, output.shape[-1])])
        outputs.append(output)
        # Forward directions end in the last segment; reverse ones at step 0, in the first.
        rows = [torch.stack([
            (last_final if i % directions == 0 else first_final)[k][i] for i in
            range(layer.num_layers * directions)]) for k in range(len(last_final))]
        finals.append(rows)
    output = torch.cat(outputs, dim=1)
    final = tuple(torch.stack([f[k] for f in finals], dim=1).squeeze(2)
                  for k in range(len(finals[0])))
    return [output, *final]


CASES = [
    # (cell, options, pattern)
    ("LSTM", {}, "random"),
    ("LSTM", {"proj_size": 3, "bidirectional": True}, "random"),
    ("LSTM", {"num_layers": 2, "learn_initial_state": True}, "every-step"),
    ("GRU", {"bidirectional": True, "num_layers": 2}, "random"),
    ("GRU", {"reset_after": False, "learn_initial_state": True, "bidirectional": True}, "first"),
    ("GRU", {}, "none"),
    ("RNN", {"nonlinearity": "relu", "bidirectional": True}, "consecutive"),
    ("RNN", {"learn_initial_state": True}, "random"),
]


def _pattern(name, steps, batch, generator):
    if name == "random":
        resets = torch.rand(steps, batch, generator=generator) < 0.3
        resets[0, 0] = True
    elif name == "every-step":
        resets = torch.ones(steps, batch, dtype=torch.bool)
    elif name == "first":
        resets = torch.zeros(steps, batch, dtype=torch.bool)
        resets[0] = True
    elif name == "consecutive":
        resets = torch.zeros(steps, batch, dtype=torch.bool)
        resets[2:4] = True
    else:
        resets = torch.zeros(steps, batch, dtype=torch.bool)
    return resets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cell, options, pattern", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths"])
def test_equals_the_segment_rule(backend, cell, options, pattern, with_lengths):
    _backend_or_skip(backend)
    dtype = torch.float64 if backend != "triton" else torch.float32
    atol = 1e-10 if dtype == torch.float64 else 5e-5
    torch.manual_seed(0)
    layer = getattr(rnnkit, cell)(3, 5, dtype=dtype, backend=backend, **options)
    if layer.learn_initial_state:
        with torch.no_grad():
            for name in ("initial_h", "initial_c"):
                if hasattr(layer, name):
                    getattr(layer, name).normal_()
    generator = torch.Generator().manual_seed(1)
    steps, batch = 6, 3
    x = torch.randn(steps, batch, 3, dtype=dtype, requires_grad=True)
    resets = _pattern(pattern, steps, batch, generator)
    lengths = torch.tensor([6, 4, 5]) if with_lengths else None
    count = layer.num_layers * layer.num_directions
    h0 = torch.randn(count, batch, layer.proj_size or 5, dtype=dtype, requires_grad=True)
    c0 = torch.randn(count, batch, 5, dtype=dtype, requires_grad=True)
    hx = (h0, c0) if cell == "LSTM" else h0
    if layer.learn_initial_state:
        hx, leaves = None, [x]
    else:
        leaves = [x, h0] + ([c0] if cell == "LSTM" else [])
    leaves += list(layer.parameters())
    got = _flat(layer(x, hx, lengths=lengths, resets=resets))
    got += _grads(got, leaves)
    segment = getattr(rnnkit, cell)(3, 5, dtype=dtype, backend="reference", **options)
    segment.load_state_dict(layer.state_dict())
    expected = _segment_run(segment, x, hx, resets, lengths)
    expected += _grads(expected, leaves[: len(leaves) - len(list(layer.parameters()))]
                       + list(segment.parameters()))
    for index, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, rtol=0, atol=atol, msg=lambda m, i=index: f"{i}: {m}")


def test_batch_first_and_unbatched_resets():
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 4, batch_first=True, dtype=torch.float64)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    resets = torch.tensor([[False, False, True, False, False], [True, False, False, True, False]])
    time_first = rnnkit.GRU(3, 4, dtype=torch.float64)
    time_first.load_state_dict(layer.state_dict())
    got = layer(x, resets=resets)
    want = time_first(x.transpose(0, 1), resets=resets.t())
    torch.testing.assert_close(got[0], want[0].transpose(0, 1), rtol=0, atol=1e-12)
    single = layer(x[1], resets=resets[1])
    torch.testing.assert_close(single[0], got[0][1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", ["RNN", "GRU", "LSTM"])
def test_gradcheck_and_gradgradcheck(cell):
    torch.manual_seed(0)
    options = {"proj_size": 2} if cell == "LSTM" else {}
    layer = getattr(rnnkit, cell)(2, 3, bidirectional=True, dtype=torch.float64, **options)
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    resets = torch.tensor([[False, True], [True, False], [False, False], [False, True]])

    def run(inputs):
        output, final = layer(inputs, lengths=[4, 3], resets=resets)
        return output, *(final if isinstance(final, tuple) else (final,))

    assert torch.autograd.gradcheck(run, (x,))
    assert torch.autograd.gradgradcheck(run, (x,))


def test_stateful_chunks_equal_one_call_with_resets():
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, learn_initial_state=True, dtype=torch.float64)
    with torch.no_grad():
        layer.initial_h.normal_()
    x = torch.randn(12, 2, 3, dtype=torch.float64)
    resets = torch.rand(12, 2) < 0.3
    whole, (h_n, c_n) = layer(x, resets=resets)
    stream = rnnkit.Stateful(layer)
    chunks = [stream(x[i : i + 4], resets=resets[i : i + 4]) for i in range(0, 12, 4)]
    torch.testing.assert_close(torch.cat(chunks), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(stream.state[0], h_n, rtol=0, atol=1e-12)


def test_stateful_reset_of_some_rows():
    torch.manual_seed(0)
    cell = rnnkit.GRUCell(3, 4, learn_initial_state=True)
    with torch.no_grad():
        cell.initial_h.normal_()
    stream = rnnkit.Stateful(cell)
    stream(torch.randn(3, 3))
    before = stream.state.clone()
    stream.reset(torch.tensor([True, False, True]))
    torch.testing.assert_close(stream.state[0], cell.initial_h)
    torch.testing.assert_close(stream.state[1], before[1])
    torch.testing.assert_close(stream.state[2], cell.initial_h)
    stream(torch.randn(3, 3))
    before = stream.state.clone()
    stream.reset([1])
    torch.testing.assert_close(stream.state[1], cell.initial_h)
    torch.testing.assert_close(stream.state[0], before[0])
    # A cell step with resets: those rows start from the initial state first.
    x = torch.randn(3, 3)
    reference = rnnkit.Stateful(cell)
    reference.state = stream.state.clone()
    reference.reset([0])
    torch.testing.assert_close(stream(x, resets=torch.tensor([True, False, False])), reference(x))
    layer_stream = rnnkit.Stateful(rnnkit.LSTM(3, 4, num_layers=2))
    layer_stream(torch.randn(5, 2, 3))
    kept = layer_stream.state[1][:, 1].clone()
    layer_stream.reset(torch.tensor([True, False]))
    assert torch.count_nonzero(layer_stream.state[0][:, 0]) == 0
    torch.testing.assert_close(layer_stream.state[1][:, 1], kept)


@pytest.mark.parametrize(
    "resets, error, match",
    [
        (torch.zeros(5, 2), TypeError, "boolean tensor, got dtype torch.float32"),
        ([[True, False]] * 5, TypeError, "boolean tensor, got list"),
        (torch.zeros(5, 3, dtype=torch.bool), ValueError, r"shape \(5, 2\), \(L, N\)"),
        (torch.zeros(4, 2, dtype=torch.bool), ValueError, r"got \(4, 2\)"),
        (torch.zeros(2, 5, dtype=torch.bool), ValueError, r"shape \(5, 2\)"),
    ],
)
def test_bad_resets_are_clear_errors(resets, error, match):
    layer = rnnkit.GRU(3, 4)
    with pytest.raises(error, match=match):
        layer(torch.randn(5, 2, 3), resets=resets)


def test_resets_with_a_packed_sequence_is_refused():
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="PackedSequence"):
        rnnkit.GRU(3, 4)(packed, resets=torch.zeros(5, 2, dtype=torch.bool))


def test_bad_reset_rows_are_clear_errors():
    stream = rnnkit.Stateful(rnnkit.GRUCell(3, 4))
    stream(torch.randn(3, 3))
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        stream.reset(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="indices must lie in"):
        stream.reset([3])
    with pytest.raises(TypeError, match="boolean mask or integer indices"):
        stream.reset(1.5)


def test_torch_export_with_resets_equals_eager():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = rnnkit.GRU(3, 4, bidirectional=True)

        def forward(self, x, resets):
            return self.gru(x, resets=resets)[0]

    torch.manual_seed(0)
    model = Model()
    steps = torch.export.Dim("steps", min=2)
    program = torch.export.export(
        model, (torch.randn(5, 2, 3), torch.zeros(5, 2, dtype=torch.bool)),
        dynamic_shapes=({0: steps}, {0: steps}))
    x, resets = torch.randn(8, 2, 3), torch.rand(8, 2) < 0.3
    torch.testing.assert_close(program.module()(x, resets), model(x, resets))
