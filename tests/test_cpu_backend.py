"""The compiled CPU backend: its own paths (fused steps, panels, chunked projection, single
steps), torch.nn parity, and clean fallbacks. Its equality with the reference path over the
common grid is in test_conformance.py.

The first test to touch the backend builds the C++ kernels (about 15-25 s on two cores, once
per machine; later runs load the cached build).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pytest
import torch

import rnnkit
from rnnkit.ops import dispatch, reference
from rnnkit.ops.activations import CODES
from rnnkit.ops.cpu import BACKEND as cpu_backend
from rnnkit.ops.cpu import _build, _ops, stream
from rnnkit.ops.spec import Call, CellSpec

# The rows the kernels have a formula for (codes from the table); the rest are refused.
ACTIVATIONS = tuple(name for name in CODES if name in _ops.ACTIVATIONS)


def choose(call, requested):
    """The planned backend's name for ``call``, and why others were passed over."""
    chosen = dispatch.plan(call, requested or dispatch.env_backend())
    return chosen.backend.name, chosen.passed_over


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the cpu backend could not be built here: {reason}")


def _count_calls(monkeypatch, owner, name, record):
    """Wraps ``owner.name`` so that every call appends ``record(args)`` to the returned list."""
    calls = []
    original = getattr(owner, name)

    def wrapper(*args):
        calls.append(record(args))
        return original(*args)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


@pytest.fixture
def counted(monkeypatch):
    """Counts the calls that reach the compiled backend (records each call's spec)."""
    return _count_calls(monkeypatch, _ops, "recurrence", lambda args: args[0])


def _run(module, x, lengths, hx):
    """Output, final state(s) and the gradients of input, given state and every parameter."""
    x = x.clone().requires_grad_(True)
    states = [] if hx is None else list(hx if isinstance(hx, tuple) else (hx,))
    states = [s.clone().requires_grad_(True) for s in states]
    given = None if hx is None else (tuple(states) if isinstance(hx, tuple) else states[0])
    output, final = module(x, given, lengths=lengths)
    finals = list(final) if isinstance(final, tuple) else [final]
    weights = [torch.randn_like(t) for t in (output, *finals)]
    loss = sum((t * w).sum() for t, w in zip((output, *finals), weights))
    params = list(module.parameters())
    grads = torch.autograd.grad(loss, [x, *states, *params])
    return [output, *finals, *grads]


def _run_twins(ours, twin, x, lengths, hx):
    """``_run`` of both layers with the same loss weights (it draws them): (ours, twin's)."""
    torch.manual_seed(2)
    expected = _run(twin, x, lengths, hx)
    torch.manual_seed(2)
    return _run(ours, x, lengths, hx), expected


@pytest.mark.parametrize(
    "cell, extra", [("RNN", {"nonlinearity": "relu"}), ("GRU", {}), ("LSTM", {"proj_size": 3})]
)
def test_cpu_equals_torch_nn(cell, extra):
    """Parity with torch.nn itself (float64), forward and every gradient, batch above and below
    the vector-matrix threshold, with a bidirectional two-layer stack."""
    for batch in (2, 7):
        torch.manual_seed(0)
        peer = getattr(torch.nn, cell)(4, 6, 2, bidirectional=True, dtype=torch.float64, **extra)
        ours = getattr(rnnkit, cell)(
            4, 6, 2, bidirectional=True, dtype=torch.float64, backend="cpu", **extra
        )
        ours.load_state_dict(peer.state_dict())
        x = torch.randn(5, batch, 4, dtype=torch.float64)
        results = []
        for module in (peer, ours):
            xi = x.clone().requires_grad_(True)
            output, final = module(xi)
            finals = final if isinstance(final, tuple) else (final,)
            loss = output.sin().sum() + sum(f.cos().sum() for f in finals)
            grads = torch.autograd.grad(loss, [xi, *module.parameters()])
            results.append([output, *finals, *grads])
        for p, o in zip(*results):
            torch.testing.assert_close(o, p, rtol=0, atol=1e-10)


def test_no_grad_forward_matches_training_forward(counted, counted_layers):
    layer = rnnkit.LSTM(3, 6, backend="cpu", proj_size=2)
    x = torch.randn(7, 5, 3)
    with torch.no_grad():
        inference = layer(x, lengths=[7, 3, 5, 1, 2])
    training = layer(x, lengths=[7, 3, 5, 1, 2])
    assert training[0].requires_grad and not inference[0].requires_grad
    torch.testing.assert_close(inference[0], training[0], rtol=0, atol=0)
    torch.testing.assert_close(inference[1], training[1], rtol=0, atol=0)
    assert len(counted) == 1 and len(counted_layers) == 1  # no grad: projection in the op


def _call(spec, dtype=torch.float32, batch=2, hidden=4, weight_hr=False):
    gates = spec.num_gates * hidden
    out_size = 2 if weight_hr else hidden
    state = tuple(
        torch.zeros(batch, size, dtype=dtype) for size in (out_size, hidden)[: spec.num_states]
    )
    return Call(
        spec=spec,
        gates_x=torch.zeros(3, batch, gates, dtype=dtype),
        state=state,
        weight_hh=torch.zeros(gates, out_size, dtype=dtype),
        bias_hh=torch.zeros(gates, dtype=dtype),
        weight_hr=torch.zeros(out_size, hidden, dtype=dtype) if weight_hr else None,
    )


@pytest.mark.parametrize(
    "spec",
    [CellSpec("rnn", a) for a in ACTIVATIONS]
    + [CellSpec("gru", reset_after=True), CellSpec("gru", reset_after=False), CellSpec("lstm")],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_auto_chooses_cpu(spec, dtype, monkeypatch):
    monkeypatch.delenv("RNNKIT_BACKEND", raising=False)
    assert choose(_call(spec, dtype), "auto") == ("cpu", None)
    assert choose(_call(spec, dtype), None) == ("cpu", None)


def test_projection_is_served():
    assert choose(_call(CellSpec("lstm"), weight_hr=True), "auto") == ("cpu", None)


def test_callable_nonlinearity_falls_back_with_visible_reason(monkeypatch, capsys, counted):
    monkeypatch.setenv("RNNKIT_DEBUG", "1")
    layer = rnnkit.RNN(3, 4, nonlinearity=lambda t: torch.tanh(t) * 0.5)
    peer = rnnkit.RNN(3, 4, nonlinearity=lambda t: torch.tanh(t) * 0.5, backend="reference")
    peer.load_state_dict(layer.state_dict())
    x = torch.randn(5, 2, 3)
    torch.testing.assert_close(layer(x)[0], peer(x)[0])
    printed = capsys.readouterr().out
    assert "callable nonlinearity" in printed and "'reference'" in printed
    assert counted == []
    # Asked for by name, the fallback also warns.
    named = rnnkit.RNN(3, 4, nonlinearity=lambda t: t.sin(), backend="cpu")
    with pytest.warns(UserWarning, match="callable nonlinearity"):
        named(x)


def test_unsupported_dtype_falls_back():
    name, reason = choose(_call(CellSpec("gru"), dtype=torch.bfloat16), "auto")
    assert name == "reference"
    assert "dtype torch.bfloat16" in reason


def test_failed_build_warns_once_and_reports(monkeypatch):
    monkeypatch.setattr(_build, "_loaded", False)
    monkeypatch.setattr(_build, "_error", None)
    monkeypatch.setattr(_build, "_build", lambda: "no C++ compiler found (looked for 'c++')")
    with pytest.warns(RuntimeWarning, match="compiled CPU kernels are unavailable"):
        assert cpu_backend.unavailable_reason().startswith("no C++ compiler found")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_backend.unavailable_reason().startswith("no C++ compiler found")
    name, reason = choose(_call(CellSpec("lstm")), "auto")
    assert name == "reference" and "cpu: no C++ compiler found" in reason


def test_missing_compiler_is_detected(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp_extension

    from rnnkit.ops.cpu import _jit

    monkeypatch.setattr(cpp_extension, "get_cxx_compiler", lambda: "/nonexistent/c++")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no cached build to reuse
    error, library = _jit.build(_build.choose()[0])
    assert error.startswith("no C++ compiler found") and library is None


def _op_inputs(spec, project=False, lengths=True, bias=True, batch=3, hidden=3, seq_len=4):
    generator = torch.Generator().manual_seed(3)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()

    out_size = 2 if project else hidden
    gates = spec.num_gates * hidden
    state = (rand(batch, out_size),) + ((rand(batch, hidden),) if spec.mode == "lstm" else ())
    return (
        rand(seq_len, batch, gates), state, rand(gates, out_size) * 0.5,
        rand(gates) if bias else None, rand(out_size, hidden) if project else None,
        torch.tensor([4, 2, 3][:batch]) if lengths else None,
    )


GRAD_SPECS = [
    (CellSpec("rnn", "tanh"), False), (CellSpec("rnn", "gelu"), False),
    (CellSpec("rnn", "softsign"), False), (CellSpec("gru", reset_after=True), False),
    (CellSpec("gru", reset_after=False), False), (CellSpec("lstm"), True),
]


@pytest.mark.parametrize("spec, project", GRAD_SPECS, ids=lambda v: str(v))
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_and_gradgradcheck(spec, project, reverse):
    gates_x, state, weight_hh, bias_hh, weight_hr, lengths = _op_inputs(spec, project)
    tensors = [gates_x, *state, weight_hh, bias_hh] + ([weight_hr] if project else [])
    count = len(state)

    def fn(gx, *rest):
        w_hr = rest[count + 2] if project else None
        output, final = _ops.recurrence(
            spec, gx, tuple(rest[:count]), rest[count], rest[count + 1], w_hr, lengths, reverse
        )
        return (output, *final)

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


def test_layer_gradgradcheck_on_cpu_backend(counted):
    torch.manual_seed(0)
    layer = rnnkit.GRU(2, 3, backend="cpu", dtype=torch.float64, bidirectional=True)
    x = torch.randn(3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: layer(t, lengths=[3, 2])[0], (x,))
    assert counted


def _forward_args(**given):
    """The forward op's arguments in schema order: those given, None for the other optional
    tensors, zero or False for the other codes."""
    schema = torch.ops.rnnkit.cpu_recurrence_forward.default._schema
    given.setdefault("gate_activation", CODES["sigmoid"])
    args = []
    for argument in schema.arguments:
        if argument.name in given:
            args.append(given.pop(argument.name))
        else:
            kind = str(argument.type)
            assert kind in ("Optional[Tensor]", "int", "float", "bool"), (argument.name, kind)
            args.append({"int": 0, "float": 0.0, "bool": False}.get(kind))
    assert not given, f"not in the schema: {sorted(given)}"
    return tuple(args)


@pytest.mark.parametrize("spec, project", [GRAD_SPECS[1], GRAD_SPECS[4], GRAD_SPECS[5]])
def test_opcheck(spec, project):
    """torch.library's own checks of the schema, fake (meta) rule and autograd registration."""
    gates_x, state, weight_hh, bias_hh, weight_hr, lengths = _op_inputs(spec, project)
    args = _forward_args(
        gates_x=gates_x, h0=state[0], c0=state[1] if spec.mode == "lstm" else None,
        weight_hh=weight_hh, bias_hh=bias_hh, weight_hr=weight_hr, lengths=lengths,
        mode=_ops.MODES.index(spec.mode), activation=ACTIVATIONS.index(spec.nonlinearity),
        reset_after=spec.reset_after, reverse=True, training=True,
    )
    torch.library.opcheck(torch.ops.rnnkit.cpu_recurrence_forward.default, args)


# Reset codes for _op_inputs' (T=4, B=3) calls with lengths [4, 2, 3]: codes 1 and 2 at a
# sequence's first step (either direction), mid-sequence, back to back, and past a length
# (ignored there).
RESET_CODES = torch.tensor([[0, 2, 1], [1, 0, 0], [0, 1, 2], [2, 2, 1]], dtype=torch.int8)


def _reset_state(state, seed=7):
    generator = torch.Generator().manual_seed(seed)
    return tuple(
        torch.randn(s.shape, dtype=s.dtype, generator=generator).requires_grad_() for s in state
    )


def _with_resets(spec, project, lengths, reverse, codes, **options):
    """fn(gates_x, *state, weight_hh, bias_hh, [weight_hr], *reset_state) and its tensors;
    `options` go to the op's wrapper as they are (mask, carry_masked_output)."""
    gates_x, state, weight_hh, bias_hh, weight_hr, _ = _op_inputs(spec, project)
    reset_state = _reset_state(state)
    tensors = [gates_x, *state, weight_hh, bias_hh, *([weight_hr] if project else []),
               *reset_state]
    count = len(state)

    def fn(gx, *rest):
        state, (w_hh, b_hh), rest = rest[:count], rest[count:count + 2], rest[count + 2:]
        w_hr, rest = (rest[0], rest[1:]) if project else (None, rest)
        output, final = _ops.recurrence(
            spec, gx, tuple(state), w_hh, b_hh, w_hr, lengths, reverse, codes, tuple(rest),
            **options,
        )
        return (output, *final)

    return fn, tensors


@pytest.mark.parametrize("spec, project", GRAD_SPECS + [(CellSpec("lstm"), False)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_and_gradgradcheck_with_resets(spec, project, reverse):
    """Every gradient through codes 1 and 2 (reset_state's summed over its code-1 steps, h0's
    and c0's gaining the code-2 steps'), with lengths, in both directions; the second order
    runs on the reference twin."""
    fn, tensors = _with_resets(spec, project, torch.tensor([4, 2, 3]), reverse, RESET_CODES)
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize("spec, project", [GRAD_SPECS[3], GRAD_SPECS[5]], ids=lambda v: str(v))
def test_opcheck_with_resets(spec, project):
    gates_x, state, weight_hh, bias_hh, weight_hr, lengths = _op_inputs(spec, project)
    reset_state = _reset_state(state)
    lstm = spec.mode == "lstm"
    args = _forward_args(
        gates_x=gates_x, h0=state[0], c0=state[1] if lstm else None, weight_hh=weight_hh,
        bias_hh=bias_hh, weight_hr=weight_hr, lengths=lengths, resets=RESET_CODES,
        reset_h=reset_state[0], reset_c=reset_state[1] if lstm else None,
        mode=_ops.MODES.index(spec.mode), reset_after=spec.reset_after, reverse=True,
        training=True,
    )
    torch.library.opcheck(torch.ops.rnnkit.cpu_recurrence_forward.default, args)


# A mask for _op_inputs' (T=4, B=3) calls with lengths [4, 2, 3]: holes mid-sequence, at a
# sequence's first step in either direction, and past a length (where it changes nothing).
HOLES = torch.tensor([[False, True, True], [True, True, False], [False, False, True],
                      [True, True, False]])


@pytest.mark.parametrize("spec, project", GRAD_SPECS, ids=lambda v: str(v))
@pytest.mark.parametrize("reverse, carry", [(False, False), (True, True)],
                         ids=["forward-zero", "reverse-carry"])
def test_gradcheck_and_gradgradcheck_with_mask(spec, project, reverse, carry):
    """Every gradient through masked holes, the skipped steps' output zero or the carried
    state (whose gradient then reaches the state it carries), with resets too."""
    fn, tensors = _with_resets(spec, project, torch.tensor([4, 2, 3]), reverse, RESET_CODES,
                               mask=HOLES, carry_masked_output=carry)
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize("spec, project", [GRAD_SPECS[3], GRAD_SPECS[5]], ids=lambda v: str(v))
def test_opcheck_with_mask(spec, project):
    gates_x, state, weight_hh, bias_hh, weight_hr, lengths = _op_inputs(spec, project)
    args = _forward_args(
        gates_x=gates_x, h0=state[0], c0=state[1] if spec.mode == "lstm" else None,
        weight_hh=weight_hh, bias_hh=bias_hh, weight_hr=weight_hr, lengths=lengths, mask=HOLES,
        mode=_ops.MODES.index(spec.mode), reset_after=spec.reset_after, reverse=True,
        carry_output=True, training=True,
    )
    torch.library.opcheck(torch.ops.rnnkit.cpu_recurrence_forward.default, args)


def test_masks_are_served_by_the_cpu_backend():
    """Masks run on the compiled recurrence; LSTM inference's fused layer path declines them
    (and a carried output), running the projection first instead."""
    call = _call(CellSpec("lstm"))
    with_mask = replace(call, mask=torch.ones(3, 2, dtype=torch.bool))
    assert choose(with_mask, "auto") == ("cpu", None)
    from_input = replace(call, gates_x=None, input=torch.zeros(3, 2, 5),
                         weight_ih=torch.zeros(16, 5))
    assert cpu_backend.fuses_projection(from_input)
    assert not cpu_backend.fuses_projection(replace(from_input, mask=with_mask.mask))
    assert not cpu_backend.fuses_projection(replace(from_input, carry_masked_output=True))


def test_resets_are_served_by_the_cpu_backend():
    call = _call(CellSpec("lstm"))
    codes = torch.zeros(3, 2, dtype=torch.int8)
    with_resets = Call(**{**call.__dict__, "resets": codes, "reset_state": call.state})
    assert choose(with_resets, "auto") == ("cpu", None)
    assert not cpu_backend.fuses_projection(with_resets)


def test_reference_twin_matches_op_directly():
    """The op equals reference.recurrence on the raw interface, reverse with lengths."""
    spec = CellSpec("gru", reset_after=False)
    args = _op_inputs(spec, batch=3, seq_len=4)
    gates_x, state, weight_hh, bias_hh, weight_hr, lengths = args
    got = _ops.recurrence(spec, gates_x, state, weight_hh, bias_hh, weight_hr, lengths, True)
    want = reference.recurrence(spec, gates_x, state, weight_hh, bias_hh, weight_hr, lengths, True)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1][0], want[1][0], rtol=0, atol=1e-12)


WIDE_SPECS = [
    (CellSpec("rnn", "silu"), False), (CellSpec("rnn", "hardtanh"), False),
    (CellSpec("gru", reset_after=True), False), (CellSpec("gru", reset_after=False), False),
    (CellSpec("lstm"), False), (CellSpec("lstm"), True),
]


@pytest.mark.parametrize("spec, project", WIDE_SPECS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype, hidden", [(torch.float64, 40), (torch.float32, 70)], ids=str)
def test_wide_layers_use_register_blocked_products(spec, project, dtype, hidden):
    """Widths past one column panel (32 doubles, 64 floats) and batches past one row block (4),
    with column and row remainders, reverse with lengths: the panel kernels and their tails."""
    generator = torch.Generator().manual_seed(5)
    batch, seq_len, out_size = 7, 4, (33 if project else hidden)
    gates = spec.num_gates * hidden

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, dtype=dtype, generator=generator) * scale
        return t.requires_grad_()

    state = (rand(batch, out_size),) + ((rand(batch, hidden),) if spec.mode == "lstm" else ())
    args = (
        rand(seq_len, batch, gates), state, rand(gates, out_size, scale=0.1), rand(gates),
        rand(out_size, hidden, scale=0.1) if project else None,
        torch.tensor([4, 2, 4, 1, 3, 4, 2]), True,
    )
    results = []
    for fn in (reference.recurrence, _ops.recurrence):
        output, final = fn(spec, *args)
        outs = (output, *final)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum()
                   for o in outs)
        leaves = [args[0], *state, args[2], args[3]] + ([args[4]] if project else [])
        results.append([*outs, *torch.autograd.grad(loss, leaves)])
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)


def test_input_projection_runs_on_the_backend_and_matches_linear(monkeypatch):
    calls = _count_calls(monkeypatch, cpu_backend, "project", lambda args: args[0].shape)
    layer = rnnkit.GRU(70, 9, num_layers=2, backend="auto", dtype=torch.float64)
    x = torch.randn(4, 6, 70, dtype=torch.float64)
    layer(x)
    assert calls == [(4, 6, 70), (4, 6, 9)]
    calls.clear()
    rnnkit.GRU(70, 9, backend="reference", dtype=torch.float64)(x)
    assert calls == []

    generator = torch.Generator().manual_seed(0)
    for rows, features, outputs in [(1, 3, 5), (9, 70, 130), (300, 8, 66)]:
        x = torch.randn(rows, features, dtype=torch.float64, generator=generator)
        w = torch.randn(outputs, features, dtype=torch.float64, generator=generator)
        b = torch.randn(outputs, dtype=torch.float64, generator=generator)
        torch.testing.assert_close(
            _ops.linear(x, w, b), torch.nn.functional.linear(x, w, b), rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            _ops.linear(x, w, None), torch.nn.functional.linear(x, w), rtol=0, atol=1e-12
        )


def test_input_projection_gradcheck_and_gradgradcheck():
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator).requires_grad_()

    for args in [(rand(1, 2, 2), rand(33, 2), rand(33)), (rand(5, 2), rand(3, 2), None)]:
        assert torch.autograd.gradcheck(_ops.linear, args)
        assert torch.autograd.gradgradcheck(_ops.linear, args)
    torch.library.opcheck(torch.ops.rnnkit.cpu_linear.default, (rand(9, 4), rand(66, 4), rand(66)))


@pytest.fixture
def two_threads():
    """The fused LSTM kernels split hidden units between threads only with two or more."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# (dtype, hidden, batch, proj): hidden a multiple of one vector (8 doubles, 16 floats) takes the
# fused LSTM step; these sizes reach its one-row, row-block and remainder cases, and, with
# B * H * 4H >= 2**15, the loops that split the units between two threads (uneven at 96).
FUSED_CASES = [
    (torch.float64, 8, 1, 0), (torch.float64, 16, 13, 0), (torch.float64, 16, 7, 5),
    (torch.float64, 96, 1, 0), (torch.float64, 64, 7, 0), (torch.float64, 32, 40, 0),
    (torch.float32, 32, 6, 0), (torch.float32, 128, 1, 0),
]


def _fused_inputs(dtype, batch, state_sizes):
    """Input (5, batch, 5), unsorted lengths with one full, and a given (2, batch, n) state per
    entry of state_sizes (a tuple for LSTM)."""
    generator = torch.Generator().manual_seed(1)
    seq_len = 5
    x = torch.randn(seq_len, batch, 5, dtype=dtype, generator=generator)
    lengths = torch.randint(1, seq_len + 1, (batch,), generator=generator)
    lengths[-1] = seq_len
    states = tuple(torch.randn(2, batch, n, dtype=dtype, generator=generator)
                   for n in state_sizes)
    return x, lengths, states if len(states) > 1 else states[0]


def _assert_twins_equal(ours, twin, x, lengths, hx, dtype):
    """Outputs, final states and every gradient of ours equal its twin's, and so do the
    no-grad outputs (the inference path keeps no per-step buffers). Returns the tolerance."""
    got, expected = _run_twins(ours, twin, x, lengths, hx)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, hx)[0], twin(x, hx)[0], rtol=tolerance, atol=tolerance)
    return tolerance


@pytest.mark.parametrize("dtype, hidden, batch, proj", FUSED_CASES, ids=str)
def test_fused_lstm_equals_reference(dtype, hidden, batch, proj, two_threads, counted):
    """The fused LSTM forward and the split backward equal the reference path: outputs, final
    states and every gradient, bidirectional (reverse) with unsorted lengths and given state."""
    torch.manual_seed(0)
    kwargs = dict(bidirectional=True, proj_size=proj, dtype=dtype)
    ours = rnnkit.LSTM(5, hidden, backend="cpu", **kwargs)
    twin = rnnkit.LSTM(5, hidden, backend="reference", **kwargs)
    twin.load_state_dict(ours.state_dict())
    x, lengths, hx = _fused_inputs(dtype, batch, (proj or hidden, hidden))
    _assert_twins_equal(ours, twin, x, lengths, hx, dtype)
    assert counted


@pytest.mark.parametrize(
    "dtype, hidden, batch", [c[:3] for c in FUSED_CASES if not c[3]], ids=str
)
@pytest.mark.parametrize("reset_after", [True, False])
def test_fused_gru_equals_reference_and_torch_nn(dtype, hidden, batch, reset_after,
                                                 two_threads, counted):
    """GRU with the reset after the product runs the fused step at these sizes (the other
    formulation the general path): outputs, final states and every gradient equal the
    reference path, bidirectional with unsorted lengths and a given state; torch.nn.GRU too."""
    torch.manual_seed(0)
    kwargs = dict(bidirectional=True, dtype=dtype, reset_after=reset_after)
    ours = rnnkit.GRU(5, hidden, backend="cpu", **kwargs)
    twin = rnnkit.GRU(5, hidden, backend="reference", **kwargs)
    twin.load_state_dict(ours.state_dict())
    x, lengths, hx = _fused_inputs(dtype, batch, (hidden,))
    tolerance = _assert_twins_equal(ours, twin, x, lengths, hx, dtype)
    assert counted
    with torch.no_grad():
        if reset_after:
            peer = torch.nn.GRU(5, hidden, bidirectional=True, dtype=dtype)
            peer.load_state_dict(ours.state_dict())
            for g, e in zip(ours(x, hx), peer(x, hx)):
                torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance)


def test_fused_gru_gradcheck(two_threads):
    spec = CellSpec("gru", reset_after=True)
    gates_x, state, weight_hh, bias_hh, _, lengths = _op_inputs(spec, False, hidden=8, batch=3)

    def fn(gx, h0, w_hh, b_hh):
        output, final = _ops.recurrence(spec, gx, (h0,), w_hh, b_hh, None, lengths, True)
        return (output, *final)

    assert torch.autograd.gradcheck(fn, [gates_x, *state, weight_hh, bias_hh])


# (dtype, hidden, proj): whole vectors of hidden units take the fused LSTM and GRU steps, at
# B * H * G*H >= 2**15 split between two threads; hidden 64 (two float64 column panels) also
# the LSTM backward split by columns; proj 33 the projected step and its tails.
RESET_WIDE_SIZES = [(torch.float64, 40), (torch.float64, 64), (torch.float32, 64)]
RESET_WIDE_CASES = [
    (spec, dtype, hidden, 0)
    for spec in (CellSpec("rnn", "tanh"), CellSpec("gru", reset_after=True),
                 CellSpec("gru", reset_after=False), CellSpec("lstm"))
    for dtype, hidden in RESET_WIDE_SIZES
] + [(CellSpec("lstm"), torch.float64, 48, 33), (CellSpec("lstm"), torch.float32, 64, 33)]


@pytest.mark.parametrize("spec, dtype, hidden, proj", RESET_WIDE_CASES, ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_wide_resets_equal_reference(spec, dtype, hidden, proj, reverse, two_threads):
    """Resets on the fused and panel paths (B=7, row blocks and remainders), with lengths:
    outputs, final states and every gradient, reset_state's included, equal the reference."""
    generator = torch.Generator().manual_seed(9)
    batch, seq_len, out_size = 7, 6, proj or hidden
    gates = spec.num_gates * hidden

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
        return t.to(dtype).requires_grad_()

    sizes = (out_size, hidden)[: spec.num_states]
    state = tuple(rand(batch, n) for n in sizes)
    reset_state = tuple(rand(batch, n) for n in sizes)
    codes = torch.randint(0, 3, (seq_len, batch), generator=generator).to(torch.int8)
    codes[torch.rand(seq_len, batch, generator=generator) < 0.5] = 0
    codes[:, 1] = 0  # one row never resets
    codes[0, 2], codes[-1, 3] = 1, 2  # at a first step in each direction
    lengths = torch.tensor([6, 3, 6, 6, 1, 5, 4])
    weight_hh = rand(gates, out_size, scale=0.1)
    bias_hh = rand(gates)
    weight_hr = rand(out_size, hidden, scale=0.1) if proj else None
    gates_x = rand(seq_len, batch, gates)
    leaves = [gates_x, *state, weight_hh, bias_hh, *([weight_hr] if proj else []),
              *reset_state]
    results = []
    for fn in (reference.recurrence, _ops.recurrence):
        output, final = fn(spec, gates_x, state, weight_hh, bias_hh, weight_hr, lengths,
                           reverse, codes, reset_state)
        outs = (output, *final)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=dtype).view_as(o)).sum()
                   for o in outs)
        results.append([*outs, *torch.autograd.grad(loss, leaves)])
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    for index, (got, want) in enumerate(zip(results[1], results[0])):
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance,
                                   msg=lambda m, i=index: f"result {i}: {m}")


@pytest.mark.parametrize("project", [False, True])
def test_fused_lstm_gradcheck(project, two_threads):
    spec = CellSpec("lstm")
    gates_x, state, weight_hh, bias_hh, weight_hr, lengths = _op_inputs(
        spec, project, hidden=8, batch=3
    )
    tensors = [gates_x, *state, weight_hh, bias_hh] + ([weight_hr] if project else [])

    def fn(gx, h0, c0, w_hh, b_hh, *rest):
        output, final = _ops.recurrence(
            spec, gx, (h0, c0), w_hh, b_hh, rest[0] if project else None, lengths, True
        )
        return (output, *final)

    assert torch.autograd.gradcheck(fn, tensors)


def test_input_projection_packs_whole_panels_directly():
    """Output widths of whole panels (32 doubles) pack the weight as stored."""
    generator = torch.Generator().manual_seed(0)
    for rows, features, outputs in [(7, 5, 32), (300, 70, 96)]:
        x = torch.randn(rows, features, dtype=torch.float64, generator=generator)
        w = torch.randn(outputs, features, dtype=torch.float64, generator=generator)
        b = torch.randn(outputs, dtype=torch.float64, generator=generator)
        torch.testing.assert_close(
            _ops.linear(x, w, b), torch.nn.functional.linear(x, w, b), rtol=0, atol=1e-12
        )


@pytest.fixture
def counted_layers(monkeypatch):
    """Counts the no-grad LSTM layer-directions served with the projection inside the loop."""
    return _count_calls(monkeypatch, _ops, "lstm_layer", lambda args: args[0].shape)


# (dtype, hidden, proj, bias): hidden 16 (a vector of floats, two of doubles) runs the fused
# step, with the projection inside its parallel region when there is no proj_size (else a
# separate product per chunk), 6 the general LSTM step; the steps per chunk (1, 3, all) put
# the chunk edges everywhere, a ragged last chunk included.
CHUNK_CASES = [
    (torch.float64, 16, 0, True), (torch.float64, 6, 0, False), (torch.float64, 16, 5, True),
    (torch.float64, 6, 4, False), (torch.float32, 16, 0, False), (torch.float32, 32, 7, False),
    (torch.float32, 32, 0, True),
    (torch.float64, 64, 0, True),  # B * H * 4H >= 2**15: the units split between two threads
]


@pytest.mark.parametrize("chunk", ["1", "3", "64"])
@pytest.mark.parametrize("dtype, hidden, proj, bias", CHUNK_CASES, ids=str)
def test_no_grad_lstm_with_chunked_projection_equals_reference(
    dtype, hidden, proj, bias, chunk, monkeypatch, counted_layers, two_threads
):
    """Without grad, an LSTM layer computes W_ih x + b_ih a chunk of steps at a time inside
    the op (RNNKIT_LSTM_CHUNK sets the steps per chunk); it equals the reference path,
    bidirectional (reverse) and two layers deep, with unsorted lengths and given state."""
    monkeypatch.setenv("RNNKIT_LSTM_CHUNK", chunk)
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, proj_size=proj, bias=bias, dtype=dtype)
    ours = rnnkit.LSTM(5, hidden, backend="cpu", **kwargs)
    twin = rnnkit.LSTM(5, hidden, backend="reference", **kwargs)
    twin.load_state_dict(ours.state_dict())
    generator = torch.Generator().manual_seed(1)
    seq_len, batch, out_size = 8, 6, proj or hidden
    x = torch.randn(seq_len, batch, 5, dtype=dtype, generator=generator)
    lengths = torch.tensor([8, 1, 5, 3, 8, 7])
    hx = (torch.randn(4, batch, out_size, dtype=dtype, generator=generator),
          torch.randn(4, batch, hidden, dtype=dtype, generator=generator))
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for given_lengths in (None, lengths):
        with torch.no_grad():
            got = ours(x, hx, lengths=given_lengths)
            expected = twin(x, hx, lengths=given_lengths)
        torch.testing.assert_close(got[0], expected[0], rtol=tolerance, atol=tolerance)
        for g, e in zip(got[1], expected[1]):
            torch.testing.assert_close(g, e, rtol=tolerance, atol=tolerance)
    assert len(counted_layers) == 8  # 2 layers x 2 directions x 2 calls


def test_no_grad_lstm_equals_torch_nn(counted_layers):
    """The chunked-projection inference path against torch.nn.LSTM itself (float64)."""
    torch.manual_seed(0)
    peer = torch.nn.LSTM(4, 16, 2, bidirectional=True, proj_size=3, dtype=torch.float64)
    ours = rnnkit.LSTM(4, 16, 2, bidirectional=True, proj_size=3, dtype=torch.float64)
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(9, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        expected, got = peer(x), ours(x)
    assert counted_layers
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=1e-10)
    for g, e in zip(got[1], expected[1]):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)


def test_lstm_needing_grad_keeps_linear_then_recurrence(counted, counted_layers):
    """When a gradient is needed the gates are saved for backward: the usual two ops run."""
    layer = rnnkit.LSTM(3, 16)
    output, _ = layer(torch.randn(4, 2, 3))
    assert output.requires_grad and counted and not counted_layers
    with torch.no_grad():
        layer(torch.randn(4, 2, 3))
    assert len(counted_layers) == 1 and len(counted) == 1


def test_lstm_layer_opcheck():
    """torch.library's checks of the inference op's schema and fake rule."""
    generator = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    args = (r(5, 3, 4), r(64, 4), r(64), r(3, 16), r(3, 16), r(64, 16), r(64), None,
            torch.tensor([5, 2, 4]), True)
    torch.library.opcheck(
        torch.ops.rnnkit.cpu_lstm_layer_forward.default, args,
        test_utils=("test_schema", "test_faketensor"),
    )


def test_no_grad_lstm_compiles_fullgraph(counted_layers):
    """torch.compile(fullgraph=True) of a no-grad LSTM traces the inference op (fake rule)."""
    torch.manual_seed(0)
    layer = rnnkit.LSTM(4, 16, 2, bidirectional=True, backend="cpu")
    x, lengths = torch.randn(6, 3, 4), torch.tensor([6, 2, 4])
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        want = layer(x, lengths=lengths)
        got = compiled(x, lengths=lengths)
    assert len(counted_layers) >= 8  # eager (4) and the traced graph (4)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_large_buffers_equal_torch_nn(counted):
    """Buffers of 16 MiB and more are advised as huge pages before they are filled; the
    values through such buffers (gates_x, saved gates, their gradients) still equal torch.nn."""
    torch.manual_seed(0)
    peer = torch.nn.LSTM(32, 256)
    ours = rnnkit.LSTM(32, 256, backend="cpu")
    ours.load_state_dict(peer.state_dict())
    x = torch.randn(72, 64, 32)  # gates: 72 x 64 x 1024 floats = 18 MiB
    results = []
    for module in (peer, ours):
        xi = x.clone().requires_grad_()
        output, (h, c) = module(xi)
        (output.square().mean() + h.sum() + c.sum()).backward()
        results.append([output, h, c, xi.grad, *(p.grad for p in module.parameters())])
    assert counted
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
def test_weight_gradient_products_equal_matmul(threads):
    """dW = dY^T X with many rows (the path that gathers A into k-major blocks and packs X):
    K past one chunk with a remainder, row and column remainders, against torch.mm (float64)."""
    generator = torch.Generator().manual_seed(3)
    rows, in_features, out_features = 1500, 70, 500
    grad = torch.randn(rows, out_features, dtype=torch.float64, generator=generator)
    x = torch.randn(rows, in_features, dtype=torch.float64, generator=generator)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, generator=generator)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grad_x, grad_w, grad_b = torch.ops.rnnkit.cpu_linear_backward(
            grad, x, weight, True, True, True)
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(grad_w, grad.t() @ x, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_x, grad @ weight, rtol=0, atol=1e-10)
    torch.testing.assert_close(grad_b, grad.sum(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
def test_wide_lstm_weight_gradient_equals_reference(reverse):
    """dW_hh with 4H = 520 rows and (T - 1) x B = 1090 > 1024 terms takes the gathered path
    too (float64, with lengths)."""
    generator = torch.Generator().manual_seed(4)
    spec, batch, seq_len, hidden = CellSpec("lstm"), 5, 219, 130

    def rand(*shape, scale=1.0):
        t = torch.randn(*shape, dtype=torch.float64, generator=generator) * scale
        return t.requires_grad_()

    state = (rand(batch, hidden), rand(batch, hidden))
    args = (rand(seq_len, batch, 4 * hidden), state, rand(4 * hidden, hidden, scale=0.1),
            rand(4 * hidden), None, torch.tensor([219, 3, 219, 1, 150]), reverse)
    results = []
    for fn in (reference.recurrence, _ops.recurrence):
        output, final = fn(spec, *args)
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view_as(o)).sum()
                   for o in (output, *final))
        results.append([output, *final,
                        *torch.autograd.grad(loss, [args[0], *state, args[2], args[3]])])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cell", ["RNNCell", "GRUCell", "LSTMCell"])
def test_auto_runs_small_single_steps_on_reference(cell, counted, counted_layers, monkeypatch,
                                                   capsys):
    """A single step of fewer than 32 rows goes to the reference path under "auto" (with the
    reason under RNNKIT_DEBUG, and no warning); from 32 rows on, or with backend="cpu", the
    compiled path serves it, with the same values."""
    monkeypatch.delenv("RNNKIT_BACKEND", raising=False)
    monkeypatch.setenv("RNNKIT_DEBUG", "1")
    torch.manual_seed(0)
    auto = getattr(rnnkit, cell)(3, 8)
    named = getattr(rnnkit, cell)(3, 8, backend="cpu")
    named.load_state_dict(auto.state_dict())
    x = torch.randn(31, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        expected = auto(x)
    assert counted == []
    assert "single step of fewer than 32 rows" in capsys.readouterr().out
    got = named(x)
    assert len(counted) == 1
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    auto(torch.randn(32, 3))
    assert len(counted) == 2
    # LSTM inference keeps a fused path even for one small step: the streaming one
    # (ops/cpu/stream.py), from weights packed once, rather than the layer path.
    layer = rnnkit.LSTM(3, 8)
    served = stream.served
    with torch.no_grad():
        layer(torch.randn(1, 2, 3))
    assert stream.served == served + 1 and counted_layers == []


def _large_linear():
    """cpu_linear's call: a 2 MiB output (reused across calls), a weight too small to be."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(8192, 16, generator=generator)
    weight = torch.randn(64, 16, generator=generator)
    return x, weight


def test_large_call_buffers_are_reused():
    """A freed call buffer of 1 MiB or more is handed to the next call of its size."""
    x, weight = _large_linear()
    first = _ops.linear(x, weight, None)
    address, expected = first.data_ptr(), first.clone()
    del first
    second = _ops.linear(x, weight, None)
    assert second.data_ptr() == address
    torch.testing.assert_close(second, expected, rtol=0, atol=0)
    torch.testing.assert_close(second, x @ weight.t(), rtol=1e-5, atol=1e-5)


def test_large_call_buffers_are_ordinary_tensors(tmp_path):
    x, weight = _large_linear()
    out = _ops.linear(x, weight, None)
    expected = out.clone()
    torch.save(out, tmp_path / "out.pt")
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected, rtol=0, atol=0)
    out.resize_(2 * out.shape[0], out.shape[1])  # grows its storage through the same cache
    torch.testing.assert_close(out[: expected.shape[0]], expected, rtol=0, atol=0)
    assert out.numpy().shape == (2 * expected.shape[0], expected.shape[1])


def test_large_call_buffers_are_seen_by_the_memory_profiler():
    """The training peak that `rnnkit bench` reports counts cached buffers as torch's own."""
    from torch.profiler import ProfilerActivity, profile

    x, weight = _large_linear()
    _ops.linear(x, weight, None)  # a kept block to reuse
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = _ops.linear(x, weight, None)
        del out
    sizes = [e.cpu_memory_usage for e in prof.events() if e.name == "rnnkit::cpu_linear"]
    assert sizes == [8192 * 64 * 4]


@pytest.mark.parametrize("spec, project", [
    (CellSpec("gru", "softsign", True, "softsign", zoneout=0.3), False),
    (CellSpec("gru", reset_after=False, zoneout=0.3), False),
    (CellSpec("lstm", recurrent_activation="hardtanh", zoneout=0.3), True),
    (CellSpec("rnn", "tanh"), False),
], ids=["gru-coded", "gru-before", "lstm-proj", "rnn"])
def test_gradcheck_and_gradgradcheck_regularized(spec, project):
    """Every gradient through recurrent dropout, zoneout masks and coded activations, with
    lengths, holes and resets; the masks themselves get none. The second order runs on the
    reference twin."""
    gates_x, state, weight_hh, bias_hh, weight_hr, lengths = _op_inputs(spec, project)
    generator = torch.Generator().manual_seed(11)
    out_size, hidden = state[0].shape[1], weight_hh.shape[0] // spec.num_gates
    dropout = (torch.rand(3, out_size, generator=generator) < 0.7).double() / 0.7
    zoned = spec.mode != "rnn"
    zone_h = (torch.rand(4, 3, out_size, generator=generator) < 0.3).double() if zoned else None
    zone_c = (torch.rand(4, 3, hidden, generator=generator) < 0.3).double()
    zone_c = zone_c if spec.mode == "lstm" else None
    fn, tensors = _with_resets(spec, project, lengths, False, RESET_CODES, mask=HOLES,
                               hidden_dropout=dropout, zoneout_h=zone_h, zoneout_c=zone_c)
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


def test_regularized_calls_are_served_or_named():
    """The cpu backend serves dropout, zoneout, layer norm and GRU/LSTM activations whose
    derivative reads off their output, and names each thing it refuses."""
    lstm = _call(CellSpec("lstm"))
    served = [
        replace(lstm, hidden_dropout=torch.ones(2, 4)),
        replace(lstm, spec=CellSpec("lstm", zoneout=0.2), zoneout_h=torch.zeros(3, 2, 4)),
        replace(lstm, spec=CellSpec("lstm", "relu", recurrent_activation="hard_sigmoid")),
        replace(_call(CellSpec("rnn")), hidden_dropout=torch.ones(2, 4)),
        replace(lstm, spec=CellSpec("lstm", layer_norm=True),
                norm_hh=(torch.ones(16), torch.zeros(16)), norm_cell=(torch.ones(4),
                                                                      torch.zeros(4))),
    ]
    for call in served:
        assert choose(call, "auto") == ("cpu", None), call.spec
    refused = {
        "layer norm is defined for the GRU with reset_after=True only": replace(
            _call(CellSpec("gru", reset_after=False)),
            spec=CellSpec("gru", reset_after=False, layer_norm=True),
            norm_hh=(torch.ones(12), torch.zeros(12))),
        "zoneout on an RNN": replace(_call(CellSpec("rnn")), spec=CellSpec("rnn", zoneout=0.1)),
        "recurrent_activation 'silu'": replace(
            lstm, spec=CellSpec("lstm", recurrent_activation="silu")),
        "callable nonlinearity": replace(lstm, spec=CellSpec("lstm", torch.tanh)),
    }
    for words, call in refused.items():
        reason = cpu_backend.unsupported_reason(call)
        assert reason is not None and words in reason, (words, reason)
