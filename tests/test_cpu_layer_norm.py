"""Layer norm in the compiled CPU kernels (Call.norm_hh, norm_cell): gradcheck in float64,
layers on backend "cpu" against the same layers on the reference path (outputs and every
gradient, the norms' gains and biases included), the op's schema checks, and the calls the
kernels still refuse. The regularized conformance grids (test_conformance.py) hold the
kernels equal to the reference path with lengths, resets, masks, dropout and zoneout too."""

from __future__ import annotations

import warnings

import pytest
import torch

import rnnkit
from rnnkit.ops import dispatch
from rnnkit.ops.cpu import BACKEND as cpu_backend
from rnnkit.ops.cpu import _ops
from rnnkit.ops.spec import Call, CellSpec


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the cpu backend could not be built here: {reason}")


@pytest.fixture
def counted(monkeypatch):
    """The specs of the calls that reach the compiled recurrence."""
    calls = []
    original = _ops.recurrence

    def wrapper(spec, *args):
        norm_hh, norm_cell = args[-2:]  # CpuBackend.run passes every argument in order
        calls.append((spec, norm_hh is not None, norm_cell is not None))
        return original(spec, *args)

    monkeypatch.setattr(_ops, "recurrence", wrapper)
    return calls


def _perturb(module, seed):
    """Every parameter moved off its initial value (the norms' gains start at 1, biases 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * 0.3)


@pytest.mark.parametrize("kind, extra", [("LSTM", {}), ("LSTM", {"proj_size": 2}),
                                         ("GRU", {})], ids=["lstm", "lstm-proj", "gru"])
def test_gradcheck_on_cpu_backend(kind, extra, counted):
    """First-order gradients of the compiled forward and backward (the second order reruns
    on the reference path, test_cpu_backend.py), bidirectional, with lengths."""
    torch.manual_seed(0)
    layer = getattr(rnnkit, kind)(2, 3, layer_norm=True, bidirectional=True, backend="cpu",
                                  dtype=torch.float64, **extra)
    _perturb(layer, 1)
    names = [n for n, _ in layer.named_parameters()]
    x = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]

    def run(x, *values):
        out, _ = torch.func.functional_call(layer, dict(zip(names, values)), (x,),
                                            {"lengths": [4, 2, 3]})
        return out

    assert torch.autograd.gradcheck(run, (x, *params))
    assert counted and all(hh and cell == (kind == "LSTM") for _, hh, cell in counted)


def _results(layer, x, lengths):
    """Output, final state(s) and the gradients of the input and every parameter."""
    x = x.clone().requires_grad_(True)
    output, final = layer(x, lengths=lengths)
    finals = list(final) if isinstance(final, tuple) else [final]
    generator = torch.Generator().manual_seed(9)
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype)).sum()
               for t in (output, *finals))
    names = [n for n, _ in layer.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return dict(zip(["output", *(f"final{i}" for i in range(len(finals))), "input", *names],
                    [output, *finals, *grads]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind, hidden, batch, extra", [
    ("LSTM", 64, 9, {}),                 # rows split over threads, whole vectors
    ("LSTM", 20, 3, {"proj_size": 7}),   # partial vectors, projection, one thread
    ("LSTM", 24, 10, {"proj_size": 7}),  # projection with the rows split
    ("GRU", 48, 9, {}),
    ("GRU", 13, 2, {}),
], ids=["lstm-64", "lstm-20-proj", "lstm-24-proj-split", "gru-48", "gru-13"])
def test_layers_equal_reference_path(dtype, kind, hidden, batch, extra, counted):
    torch.manual_seed(3)
    ours = getattr(rnnkit, kind)(5, hidden, 2, layer_norm=True, bidirectional=True,
                                 backend="cpu", dtype=dtype, **extra)
    _perturb(ours, 4)
    twin = getattr(rnnkit, kind)(5, hidden, 2, layer_norm=True, bidirectional=True,
                                 backend="reference", dtype=dtype, **extra)
    twin.load_state_dict(ours.state_dict())
    x = torch.randn(6, batch, 5, dtype=dtype)
    lengths = torch.randint(1, 7, (batch,))
    lengths[0] = 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        got = _results(ours, x, lengths)
    want = _results(twin, x, lengths)
    assert len(counted) == 4  # two layers, two directions, all compiled
    tolerance = 1e-10 if dtype == torch.float64 else 2e-4
    assert any(name.startswith("layer_norm_cell") for name in got) == (kind == "LSTM")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=tolerance, atol=tolerance,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kind, extra", [("LSTM", {}), ("LSTM", {"proj_size": 5}),
                                         ("GRU", {})], ids=["lstm", "lstm-proj", "gru"])
def test_rows_split_over_threads_give_the_same_bits(kind, extra):
    """The layer-norm loops give each thread a block of rows: every row is computed the same
    way on one thread as on two (the recurrence's outputs and gradients, bit for bit)."""
    torch.manual_seed(5)
    layer = getattr(rnnkit, kind)(6, 16, 1, layer_norm=True, backend="cpu", **extra)
    _perturb(layer, 2)
    x = torch.randn(5, 13, 6)
    lengths = torch.randint(1, 6, (13,))
    lengths[0] = 5
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(_results(layer, x, lengths))
    finally:
        torch.set_num_threads(threads)
    # The input's norm (layer_norm_ih_*) is torch's own, outside the kernels.
    names = [name for name in results[0] if not name.startswith("layer_norm_ih")]
    assert "weight_hh_l0" in names and "layer_norm_hh_weight_l0" in names
    for name in names:
        assert torch.equal(results[0][name], results[1][name]), name


def test_inference_equals_training_forward():
    """Without gradients the op keeps one step of its buffers and saves no norms."""
    torch.manual_seed(5)
    layer = rnnkit.LSTM(4, 16, layer_norm=True, backend="cpu")
    _perturb(layer, 6)
    x = torch.randn(5, 3, 4)
    trained, _ = layer(x)
    with torch.no_grad():
        inferred, _ = layer(x)
    torch.testing.assert_close(inferred, trained.detach(), rtol=0, atol=0)


def _norm_call(mode, reset_after=True):
    torch.manual_seed(7)
    hidden = 4
    gates = {"rnn": 1, "gru": 3, "lstm": 4}[mode] * hidden
    state = (torch.zeros(2, hidden),) * (2 if mode == "lstm" else 1)
    return Call(spec=CellSpec(mode, reset_after=reset_after, layer_norm=True), state=state,
                weight_hh=torch.randn(gates, hidden), gates_x=torch.randn(3, 2, gates),
                norm_hh=(torch.ones(gates), torch.zeros(gates)))


def test_gru_with_the_reset_before_is_refused_with_a_reason():
    call = _norm_call("gru", reset_after=False)
    reason = cpu_backend.unsupported_reason(call)
    assert reason is not None and "reset_after" in reason
    assert cpu_backend.unsupported_reason(_norm_call("gru")) is None
    assert dispatch.plan(_norm_call("lstm"), "cpu").backend.name == "cpu"


def test_op_checks_the_norms_shapes():
    gates_x = torch.randn(3, 2, 12)
    args = dict(gates_x=gates_x, h0=torch.zeros(2, 4), weight_hh=torch.randn(12, 4),
                mode=_ops.MODES.index("gru"), reset_after=True, gate_activation=3)
    with pytest.raises(RuntimeError, match="norm_hh's gain must have shape"):
        torch.ops.rnnkit.cpu_recurrence_forward(*_forward_args(
            **args, norm_hh_gain=torch.ones(8), norm_hh_bias=torch.zeros(8)))
    with pytest.raises(RuntimeError, match="gain and bias together"):
        torch.ops.rnnkit.cpu_recurrence_forward(*_forward_args(
            **args, norm_hh_gain=torch.ones(12)))
    with pytest.raises(RuntimeError, match="norm_cell is defined for LSTM only"):
        torch.ops.rnnkit.cpu_recurrence_forward(*_forward_args(
            **args, norm_cell_gain=torch.ones(4), norm_cell_bias=torch.zeros(4)))


def _forward_args(**given):
    """The forward op's arguments in schema order: those given, None or zero otherwise."""
    schema = torch.ops.rnnkit.cpu_recurrence_forward.default._schema
    return tuple(given.pop(a.name) if a.name in given else
                 {"int": 0, "float": 0.0, "bool": False}.get(str(a.type))
                 for a in schema.arguments)


@pytest.mark.parametrize("mode", ["lstm", "gru"])
def test_opcheck_with_norms(mode):
    """torch.library's checks of the schema, fake rule and autograd registration."""
    torch.manual_seed(8)
    hidden, batch, steps = 4, 3, 5
    gates = (4 if mode == "lstm" else 3) * hidden

    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    args = dict(gates_x=leaf(steps, batch, gates), h0=leaf(batch, hidden),
                weight_hh=leaf(gates, hidden), bias_hh=leaf(gates),
                lengths=torch.tensor([5, 2, 4]), norm_hh_gain=leaf(gates),
                norm_hh_bias=leaf(gates), mode=_ops.MODES.index(mode), reset_after=True,
                reverse=True, gate_activation=3, training=True)
    if mode == "lstm":
        args.update(c0=leaf(batch, hidden), norm_cell_gain=leaf(hidden),
                    norm_cell_bias=leaf(hidden))
    torch.library.opcheck(torch.ops.rnnkit.cpu_recurrence_forward.default,
                          _forward_args(**args))


def test_gradgradcheck_reruns_the_norms_on_the_reference_path(counted):
    """create_graph=True differentiates the reference twin of the op's call, norms included."""
    torch.manual_seed(10)
    layer = rnnkit.LSTM(2, 3, layer_norm=True, backend="cpu", dtype=torch.float64)
    _perturb(layer, 11)
    names = [n for n, _ in layer.named_parameters()]
    chosen = [i for i, n in enumerate(names) if n.startswith(("layer_norm_hh", "layer_norm_cell"))]
    params = [p.detach().clone().requires_grad_(True) for p in layer.parameters()]
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)

    def run(x, *norms):
        values = list(params)
        for i, value in zip(chosen, norms):
            values[i] = value
        return torch.func.functional_call(layer, dict(zip(names, values)), (x,))[0]

    assert torch.autograd.gradgradcheck(run, (x, *[params[i] for i in chosen]))
    assert counted
