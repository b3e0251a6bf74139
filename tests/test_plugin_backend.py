"""A backend registered from outside the package: picked by name and by "auto", listed by
``rnnkit info``, and held to the conformance harness like the bundled ones."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import rnnkit
import test_conformance as harness
from rnnkit.cli import info_lines
from rnnkit.ops import dispatch
from rnnkit.ops.activations import resolve_activation
from rnnkit.ops.backend import BackendBase
from rnnkit.ops.spec import CellSpec


class ElmanLoopBackend(BackendBase):
    """A tiny plug-in: Elman RNN steps in a plain loop, callable nonlinearities included."""

    name = "elman-loop"
    device_types = ("cpu",)

    def __init__(self) -> None:
        self.served = 0

    def unsupported_reason(self, call):
        if call.spec.mode != "rnn":
            return "only Elman RNN calls"
        if call.leading.dtype not in (torch.float32, torch.float64):
            return f"dtype {call.leading.dtype} is not served"
        if call.mask is not None:
            return "masks with holes are not served"
        return None

    def run(self, call):
        self.served += 1
        activation = resolve_activation(call.spec.nonlinearity)
        steps = call.gates_x.shape[0]
        hidden, initial = call.state[0], call.state[0]
        outputs = [None] * steps
        order = range(steps - 1, -1, -1) if call.reverse else range(steps)
        for t in order:
            start = hidden
            if call.resets is not None:
                code = call.resets[t].view(-1, 1)
                start = torch.where(code == 1, call.reset_state[0],
                                    torch.where(code == 2, initial, hidden))
            new = activation(call.gates_x[t] + F.linear(start, call.weight_hh, call.bias_hh))
            if call.lengths is not None:
                active = (t < call.lengths).view(-1, 1)
                new_output = torch.where(active, new, torch.zeros_like(new))
                new = torch.where(active, new, hidden)
            else:
                new_output = new
            hidden, outputs[t] = new, new_output
        return torch.stack(outputs), (hidden,)


@pytest.fixture
def plugin():
    backend = ElmanLoopBackend()
    dispatch.register(backend)
    yield backend
    dispatch.unregister(backend.name)


def test_selected_by_name(plugin):
    torch.manual_seed(0)
    layer = rnnkit.RNN(3, 4, backend="elman-loop", dtype=torch.float64)
    twin = rnnkit.RNN(3, 4, backend="reference", dtype=torch.float64)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        output, _ = layer(x)
    assert plugin.served == 1
    torch.testing.assert_close(output, twin(x)[0], rtol=0, atol=1e-12)


def test_picked_by_auto_where_the_bundled_backends_pass(plugin, monkeypatch):
    monkeypatch.delenv("RNNKIT_BACKEND", raising=False)
    layer = rnnkit.RNN(3, 4, nonlinearity=torch.sin)  # the compiled cpu kernels refuse callables
    layer(torch.randn(5, 2, 3))
    assert plugin.served == 1
    rnnkit.RNN(3, 4)(torch.randn(5, 2, 3))  # the cpu backend comes first for named ones
    assert plugin.served == 1
    monkeypatch.setenv("RNNKIT_BACKEND", "elman-loop")  # the environment names it too
    rnnkit.RNN(3, 4)(torch.randn(5, 2, 3))
    assert plugin.served == 2


def test_listed_and_accepted_everywhere_by_its_name(plugin):
    assert "elman-loop" in dispatch.names()
    assert any(line.startswith("  elman-loop (cpu): available") for line in info_lines())
    with pytest.raises(ValueError, match="elman-loop"):
        rnnkit.GRU(3, 4, backend="no-such-backend")
    # A call it cannot serve falls back at the plan, with its reason.
    with pytest.warns(UserWarning, match="only Elman RNN calls"):
        rnnkit.GRU(3, 4, backend="elman-loop")(torch.randn(2, 1, 3))


def test_unregistered_names_are_refused(plugin):
    dispatch.unregister("elman-loop")
    with pytest.raises(ValueError, match="backend must be one of"):
        rnnkit.RNN(3, 4, backend="elman-loop")
    dispatch.register(plugin)
    with pytest.raises(ValueError, match="already registered"):
        dispatch.register(ElmanLoopBackend())
    with pytest.raises(ValueError, match="cannot be registered as 'auto'"):
        dispatch.register(type("Auto", (ElmanLoopBackend,), {"name": "auto"})())


@pytest.mark.parametrize("cell_id, spec, proj", harness.CELLS, ids=[c[0] for c in harness.CELLS])
@pytest.mark.parametrize("lengths, reverse, resets",
                         [(False, False, False), (True, True, False), (True, False, True),
                          (True, True, True)])
def test_passes_the_conformance_harness(plugin, cell_id, spec, proj, lengths, reverse, resets):
    device = harness._device(plugin.name)
    dtype = harness._dtype(plugin.name, device)
    assert dtype == torch.float64
    call = harness._make(spec, proj, dtype, device, lengths=lengths, resets=resets,
                         reverse=reverse)
    harness._check(plugin.name, call, dtype)
    if spec.mode == "rnn":
        assert plugin.served >= 1


def test_a_callable_nonlinearity_is_served_and_matches(plugin):
    call = harness._make(CellSpec("rnn", torch.sin), 0, torch.float64, torch.device("cpu"),
                         lengths=True, resets=True, reverse=True)
    harness._check(plugin.name, call, torch.float64)
    assert plugin.served >= 1
