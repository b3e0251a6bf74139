"""Structured recurrent matrices through torch.nn.utils.parametrize, on every available backend.

A parametrized layer must equal a "materialized twin", the same layer with plain parameters that
hold the parametrized values, in forward and gradients (the stored parameters' gradients are the
twin's gradient pulled back through the parametrization). The twin is checked against torch.nn.
"""

from __future__ import annotations

import copy
import io
import logging
import os
from contextlib import contextmanager

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, weight_norm
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnkit
from rnnkit.ops import dispatch

INPUT, HIDDEN, BATCH, STEPS = 4, 6, 3, 5
BACKENDS = list(dispatch.registered())


def device_for(name: str) -> torch.device:
    """The device a backend runs on here, or a skip that says what is missing."""
    if name == "reference":
        return torch.device("cpu")
    backend = dispatch.registered()[name]
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {name!r} is unavailable here: {reason}")
    for device_type in backend.device_types:
        if device_type == "cpu" or (device_type == "cuda" and torch.cuda.is_available()):
            return torch.device(device_type)
    if name == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")  # the Triton interpreter runs the same kernels on the CPU
    pytest.skip(f"backend {name!r} runs on {backend.device_types}; no such device here")


@contextmanager
def served_without_fallback(caplog):
    """Fail if the dispatch point fell back to the reference path inside the block."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="rnnkit"):
        yield
    fallbacks = [r.getMessage() for r in caplog.records if "cannot serve" in r.getMessage()]
    assert not fallbacks, fallbacks


# parametrizations ---------------------------------------------------------------------------


class Banded(nn.Module):
    """Zero every entry off the diagonals ``|i - j| <= width`` of each gate block.

    ``width=1`` is Flux's Tridiagonal. Gate blocks are the ``(H, cols)`` row blocks of a stacked
    ``(G*H, cols)`` weight.
    """

    def __init__(self, weight: torch.Tensor, gates: int, width: int = 1) -> None:
        super().__init__()
        hidden = weight.shape[0] // gates
        rows = torch.arange(hidden, device=weight.device)[:, None]
        cols = torch.arange(weight.shape[1], device=weight.device)[None, :]
        band = ((rows - cols).abs() <= width).repeat(gates, 1)
        self.register_buffer("mask", band.to(weight.dtype))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class LowRank(nn.Module):
    """``left @ right`` from two stored factors (a parametrization with two originals)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def forward(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return left @ right

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        return u[:, : self.rank] * s[: self.rank], vh[: self.rank]


class Transposed(nn.Module):
    """A non-contiguous materialized weight: backends must not assume a fresh, packed tensor."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.mT


class Counting(nn.Module):
    """The identity, counting how often it is computed."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return weight


GATES = {"RNN": 1, "GRU": 3, "LSTM": 4, "RNNCell": 1, "GRUCell": 3, "LSTMCell": 4}


def structure(module: nn.Module, name: str, kind: str) -> None:
    gates = GATES[type(module).__name__.removeprefix("Parametrized")]
    if kind == "banded":
        parametrize.register_parametrization(module, name, Banded(getattr(module, name), gates))
    elif kind == "orthogonal":
        orthogonal(module, name)
    elif kind == "lowrank":
        parametrize.register_parametrization(module, name, LowRank(rank=2))
    elif kind == "weight_norm":
        weight_norm(module, name)
    elif kind == "transposed":
        parametrize.register_parametrization(module, name, Transposed())
    else:
        raise AssertionError(kind)


# (class, constructor options, [(parameter, structure)])
CASES = {
    "rnn-tridiagonal": (rnnkit.RNN, {}, [("weight_hh_l0", "banded")]),
    "rnn-relu-transposed": (rnnkit.RNN, {"nonlinearity": "relu"}, [("weight_hh_l0", "transposed")]),
    "gru-orthogonal": (rnnkit.GRU, {}, [("weight_hh_l0", "orthogonal")]),
    "gru-reset-before-tridiagonal": (
        rnnkit.GRU, {"reset_after": False}, [("weight_hh_l0", "banded")]
    ),
    "lstm-lowrank-weightnorm": (
        rnnkit.LSTM, {}, [("weight_hh_l0", "lowrank"), ("weight_ih_l0", "weight_norm")]
    ),
    "lstm-proj-orthogonal": (
        rnnkit.LSTM, {"proj_size": 3},
        [("weight_hr_l0", "orthogonal"), ("weight_hh_l0", "banded")],
    ),
}
CELL_CASES = {
    "rnncell-tridiagonal": (rnnkit.RNNCell, {}, [("weight_hh", "banded")]),
    "grucell-orthogonal": (rnnkit.GRUCell, {}, [("weight_hh", "orthogonal")]),
    "lstmcell-lowrank": (rnnkit.LSTMCell, {}, [("weight_hh", "lowrank"), ("bias_ih", "banded")]),
}


def make_pair(cases: dict, case: str, device: torch.device, backend: str, seed: int = 0):
    """A parametrized module and its twin whose plain parameters hold the materialized values."""
    cls, options, structures = cases[case]
    torch.manual_seed(seed)
    module = cls(INPUT, HIDDEN, **options, device=device, backend=backend)
    for name, kind in structures:
        if kind == "banded" and module.get_parameter(name).dim() == 1:
            # A "banded" bias: zero every other entry, so a 1-D parametrization is covered too.
            mask = (torch.arange(module.get_parameter(name).numel(), device=device) % 2).float()
            parametrize.register_parametrization(module, name, _Mask(mask))
        else:
            structure(module, name, kind)
    twin = cls(INPUT, HIDDEN, **options, device=device, backend=backend)
    with torch.no_grad():
        for name, param in twin.named_parameters():
            param.copy_(getattr(module, name))
    return module, twin


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * self.mask


def originals(module: nn.Module, name: str) -> list[torch.Tensor]:
    stored = module.parametrizations[name]
    return [p for n, p in stored.named_parameters(recurse=False) if n.startswith("original")]


def assert_grads_match(module: nn.Module, twin: nn.Module) -> None:
    """Plain parameters: equal grads. Parametrized: the twin's grad pulled back (a VJP)."""
    for name, twin_param in twin.named_parameters():
        assert twin_param.grad is not None, name
        if parametrize.is_parametrized(module, name):
            stored = originals(module, name)
            expected = torch.autograd.grad(getattr(module, name), stored, twin_param.grad)
            for param, want in zip(stored, expected):
                torch.testing.assert_close(param.grad, want, msg=f"grad of {name}'s original")
        else:
            torch.testing.assert_close(module.get_parameter(name).grad, twin_param.grad)


def random_state(module: nn.Module, device: torch.device, layers: bool):
    lead = (1,) if layers else ()
    out_size = getattr(module, "proj_size", 0) or HIDDEN
    h = torch.randn(*lead, BATCH, out_size, device=device, requires_grad=True)
    if "LSTM" in type(module).__name__:
        return h, torch.randn(*lead, BATCH, HIDDEN, device=device, requires_grad=True)
    return h


def flat(state) -> tuple[torch.Tensor, ...]:
    return tuple(state) if isinstance(state, tuple) else (state,)


# equality with the materialized twin -----------------------------------------------------------


@pytest.mark.parametrize("use_lengths", [False, True], ids=["full", "lengths"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_layer_equals_materialized_twin(backend, case, use_lengths, caplog):
    device = device_for(backend)
    layer, twin = make_pair(CASES, case, device, backend)
    x = torch.randn(STEPS, BATCH, INPUT, device=device)
    hx = random_state(layer, device, layers=True)
    lengths = torch.tensor([5, 2, 4]) if use_lengths else None
    inputs = [(x.clone().requires_grad_(), tuple(s.detach().clone().requires_grad_()
                                                 for s in flat(hx))) for _ in range(2)]
    results = []
    with served_without_fallback(caplog):
        for module, (xi, si) in zip((layer, twin), inputs):
            output, state = module(xi, si if len(si) == 2 else si[0], lengths=lengths)
            results.append((output, flat(state)))
    (out, state), (twin_out, twin_state) = results
    torch.testing.assert_close(out, twin_out)
    for got, want in zip(state, twin_state):
        torch.testing.assert_close(got, want)

    torch.manual_seed(1)
    cotangents = [torch.randn_like(t) for t in (out, *state)]
    for output, final in results:
        loss = sum((t * c).sum() for t, c in zip((output, *final), cotangents))
        loss.backward()
    (x1, s1), (x2, s2) = inputs
    torch.testing.assert_close(x1.grad, x2.grad)
    for got, want in zip(s1, s2):
        torch.testing.assert_close(got.grad, want.grad)
    assert_grads_match(layer, twin)


TORCH_CASES = [c for c in CASES if "reset-before" not in c]


@pytest.mark.parametrize("case", TORCH_CASES)
def test_parametrized_layer_equals_torch_nn_holding_the_materialized_weights(case):
    """The twin check against torch.nn itself, through a PackedSequence."""
    layer, _ = make_pair(CASES, case, torch.device("cpu"), "reference")
    cls, options, _ = CASES[case]
    reference_torch = getattr(nn, cls.__name__)(INPUT, HIDDEN, **options)
    with torch.no_grad():
        for name, param in reference_torch.named_parameters():
            param.copy_(getattr(layer, name))
    x = torch.randn(STEPS, BATCH, INPUT)
    packed = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    ours, theirs = layer(packed), reference_torch(packed)
    torch.testing.assert_close(pad_packed_sequence(ours[0])[0], pad_packed_sequence(theirs[0])[0])
    for got, want in zip(flat(ours[1]), flat(theirs[1])):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("case", CELL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_cell_equals_materialized_twin_and_torch(backend, case, caplog):
    device = device_for(backend)
    cell, twin = make_pair(CELL_CASES, case, device, backend)
    x = torch.randn(BATCH, INPUT, device=device)
    hx = random_state(cell, device, layers=False)
    with served_without_fallback(caplog):
        got, want = flat(cell(x, hx)), flat(twin(x, hx))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    sum(t.sum() for t in got).backward()
    sum(t.sum() for t in want).backward()
    assert_grads_match(cell, twin)

    torch_cell = getattr(nn, type(twin).__name__)(INPUT, HIDDEN, device=device)
    torch_cell.load_state_dict(twin.state_dict())
    for a, b in zip(got, flat(torch_cell(x, hx))):
        torch.testing.assert_close(a, b)


# once per call -------------------------------------------------------------------------------


COUNTED = {
    "rnn": lambda **kw: rnnkit.RNN(INPUT, HIDDEN, learn_initial_state=True, **kw),
    "gru-2-layer-bidirectional": lambda **kw: rnnkit.GRU(
        INPUT, HIDDEN, num_layers=2, bidirectional=True, **kw
    ),
    "lstm-proj": lambda **kw: rnnkit.LSTM(
        INPUT, HIDDEN, proj_size=3, learn_initial_state=True, **kw
    ),
    "rnncell": lambda **kw: rnnkit.RNNCell(INPUT, HIDDEN, learn_initial_state=True, **kw),
    "grucell": lambda **kw: rnnkit.GRUCell(INPUT, HIDDEN, **kw),
    "lstmcell": lambda **kw: rnnkit.LSTMCell(INPUT, HIDDEN, learn_initial_state=True, **kw),
}


@pytest.mark.parametrize("kind", COUNTED)
@pytest.mark.parametrize("backend", BACKENDS)
def test_each_parametrized_weight_is_computed_once_per_call(backend, kind, caplog):
    device = device_for(backend)
    module = COUNTED[kind](device=device, backend=backend)
    counters = {}
    for name, _ in list(module.named_parameters()):
        counters[name] = Counting()
        parametrize.register_parametrization(module, name, counters[name])
    is_cell = kind.endswith("cell")
    x = torch.randn(BATCH, INPUT, device=device) if is_cell else torch.randn(
        2 * STEPS, BATCH, INPUT, device=device
    )
    for counter in counters.values():
        counter.calls = 0  # registering computes each once
    with served_without_fallback(caplog):
        result = module(x)
    assert {name: c.calls for name, c in counters.items()} == dict.fromkeys(counters, 1)
    sum(t.sum() for t in flat(result[0] if not is_cell else result)).backward()
    assert {name: c.calls for name, c in counters.items()} == dict.fromkeys(counters, 1)


# training ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_updates_the_stored_parameters_and_keeps_the_structure(backend, caplog):
    device = device_for(backend)
    torch.manual_seed(3)
    rnn = rnnkit.RNN(INPUT, HIDDEN, batch_first=True, device=device, backend=backend)
    structure(rnn, "weight_hh_l0", "banded")
    gru = rnnkit.GRU(HIDDEN, HIDDEN, batch_first=True, device=device, backend=backend)
    structure(gru, "weight_hh_l0", "orthogonal")
    head = nn.Linear(HIDDEN, 1, device=device)
    stored = [originals(rnn, "weight_hh_l0")[0], originals(gru, "weight_hh_l0")[0]]
    before = [p.detach().clone() for p in stored]
    params = [*rnn.parameters(), *gru.parameters(), *head.parameters()]
    assert all(any(p is q for q in params) for p in stored)
    optimizer = torch.optim.Adam(params, lr=0.02)
    x = torch.randn(8, 7, INPUT, device=device)
    target = x[..., :1].cumsum(dim=1).tanh()
    losses = []
    with served_without_fallback(caplog):
        for _ in range(8):
            loss = nn.functional.mse_loss(head(gru(rnn(x)[0])[0]), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    for param, old in zip(stored, before):
        assert not torch.equal(param.detach(), old)
    weight = rnn.weight_hh_l0.detach()
    assert torch.equal(weight, weight.triu(-1).tril(1))
    columns = gru.weight_hh_l0.detach()
    torch.testing.assert_close(columns.T @ columns, torch.eye(HIDDEN, device=device),
                               atol=1e-5, rtol=0)


# state_dict and named_parameters ---------------------------------------------------------------


def test_state_dict_and_named_parameters_follow_torch_conventions():
    layer, _ = make_pair(CASES, "lstm-lowrank-weightnorm", torch.device("cpu"), "reference")
    names = [name for name, _ in layer.named_parameters()]
    assert "weight_hh_l0" not in names
    assert {
        "parametrizations.weight_hh_l0.original0",
        "parametrizations.weight_hh_l0.original1",
        "parametrizations.weight_ih_l0.original0",
        "parametrizations.weight_ih_l0.original1",
        "bias_ih_l0",
        "bias_hh_l0",
    } == set(names)
    assert set(layer.state_dict()) == set(names)
    x = torch.randn(STEPS, BATCH, INPUT)
    expected = layer(x)[0]

    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = make_pair(CASES, "lstm-lowrank-weightnorm", torch.device("cpu"), "reference", 9)
    assert not torch.allclose(fresh(x)[0], expected)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    torch.testing.assert_close(fresh(x)[0], expected)

    clone = copy.deepcopy(layer)
    torch.testing.assert_close(clone(x)[0], expected)
    assert clone.parametrizations.weight_hh_l0.original0 is not (
        layer.parametrizations.weight_hh_l0.original0
    )
    # all_weights (torch.nn's API) gives the materialized values.
    torch.testing.assert_close(layer.all_weights[0][1], layer.weight_hh_l0)


def test_removing_the_parametrization_leaves_a_plain_torch_compatible_layer():
    layer, _ = make_pair(CASES, "rnn-tridiagonal", torch.device("cpu"), "reference")
    x = torch.randn(STEPS, BATCH, INPUT)
    expected = layer(x)[0]
    parametrize.remove_parametrizations(layer, "weight_hh_l0", leave_parametrized=True)
    assert not parametrize.is_parametrized(layer)
    theirs = nn.RNN(INPUT, HIDDEN)
    theirs.load_state_dict(layer.state_dict())
    torch.testing.assert_close(theirs(x)[0], expected)
    torch.testing.assert_close(layer(x)[0], expected)


# streaming ------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gru-orthogonal", "lstm-proj-orthogonal"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parametrized_stateful_stream_equals_whole_sequence(backend, case, caplog):
    device = device_for(backend)
    layer, _ = make_pair(CASES, case, device, backend)
    x = torch.randn(8, BATCH, INPUT, device=device)
    stream = rnnkit.Stateful(layer)
    with served_without_fallback(caplog), torch.no_grad():
        whole = layer(x)[0]
        chunks = [stream(x[start:stop]) for start, stop in ((0, 3), (3, 4), (4, 8))]
    torch.testing.assert_close(torch.cat(chunks), whole)
