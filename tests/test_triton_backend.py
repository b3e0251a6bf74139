"""The triton backend under the Triton CPU interpreter, held equal to the reference path.

``TRITON_INTERPRET=1`` must be set before any ``@triton.jit`` function is decorated, so it is set
here first. If another test module of the same pytest worker imported rnnkit's kernel module
earlier without it, :func:`rnnkit.ops.triton._autograd.kernels` notices (its kernels are
``JITFunction``s, not ``InterpretedFunction``s) and imports the module again, decorated for the
interpreter; ``test_kernels_follow_the_interpreter_setting`` checks exactly that switch.
Importing ``triton`` itself earlier is harmless too: the kernels call only triton.language
builtins, never triton's own ``@triton.jit`` helpers, which are decorated at triton's import.

Sizes are tiny (the interpreter runs every tile in numpy): H <= 24, T <= 5, B <= 5.
Tolerances: fp32 to 2e-5 absolute; fp16 is compared, like the fp16 reference path, with an
fp32 reference run on the same (fp16-rounded) inputs, to 2e-2 absolute.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from dataclasses import replace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

triton = pytest.importorskip("triton", reason="triton is not installed")

import rnnkit  # noqa: E402
from rnnkit.activations import ACTIVATIONS  # noqa: E402
from rnnkit.ops import dispatch, reference  # noqa: E402
from rnnkit.ops import triton as triton_package  # noqa: E402
from rnnkit.ops.spec import Call, CellSpec  # noqa: E402
from rnnkit.ops.triton import BACKEND  # noqa: E402
from rnnkit.ops.triton import _autograd as host  # noqa: E402

FP32_ATOL = 2e-5
FP16_ATOL = 2e-2


def make_call(spec, *, hidden=20, proj=0, seq_len=4, batch=3, lengths=None, bias=True,
              dtype=torch.float32, seed=0, resets=None, mask=None, carry_masked_output=False,
              dropout=0.0, zoneout_masks=False, norms=()):
    """Random inputs of one layer-direction; every floating tensor requires grad.

    ``resets``: the ``(T, B)`` reset codes as nested lists; a random ``reset_state`` comes
    with them. ``mask``: the ``(T, B)`` steps that run, as nested lists of 0/1. ``dropout``:
    random recurrent-dropout multipliers (0 or ``1/(1-p)``); ``zoneout_masks``: random
    training masks with keep probability ``spec.zoneout`` (``c``'s too for LSTM). Masks
    never require grad. ``norms``: ``"hh"`` and/or ``"cell"``, random layer-norm gains
    (around 1) and biases for ``norm_hh`` / ``norm_cell``.
    """
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=generator) * scale).to(dtype).requires_grad_()

    hidden_out = proj or hidden
    gate_size = spec.num_gates * hidden
    state = (rand(batch, hidden_out),)
    if spec.mode == "lstm":
        state = state + (rand(batch, hidden),)
    call = dict(
        gates_x=rand(seq_len, batch, gate_size),
        state=state,
        weight_hh=rand(gate_size, hidden_out, scale=0.3),
        bias_hh=rand(gate_size, scale=0.3) if bias else None,
        weight_hr=rand(proj, hidden, scale=0.3) if proj else None,
        lengths=None if lengths is None else torch.tensor(lengths),
    )
    if resets is not None:
        call["resets"] = torch.tensor(resets, dtype=torch.int8)
        call["reset_state"] = tuple(rand(*s.shape) for s in state)
    if mask is not None:
        call["mask"] = torch.tensor(mask, dtype=torch.bool)
        call["carry_masked_output"] = carry_masked_output

    def bernoulli(p, *shape):
        return (torch.rand(*shape, generator=generator) < p).to(dtype)

    if dropout:
        call["hidden_dropout"] = (1 - bernoulli(dropout, batch, hidden_out)) / (1 - dropout)
    if zoneout_masks:
        call["zoneout_h"] = bernoulli(spec.zoneout, seq_len, batch, hidden_out)
        if spec.mode == "lstm":
            call["zoneout_c"] = bernoulli(spec.zoneout, seq_len, batch, hidden)
    for norm in norms:
        size = gate_size if norm == "hh" else hidden
        call[f"norm_{norm}"] = ((1 + rand(size, scale=0.3)).detach().requires_grad_(),
                                rand(size, scale=0.2))
    return call


REGULARIZERS = ("hidden_dropout", "zoneout_h", "zoneout_c")
OPTIONS = (*REGULARIZERS, "norm_hh", "norm_cell")  # the keyword-only fields of a call


def leaves(call):
    tensors = [call["gates_x"], *call["state"], call["weight_hh"], call["bias_hh"],
               call["weight_hr"], *call.get("reset_state", ()), *call.get("norm_hh", ()),
               *call.get("norm_cell", ())]
    return [t for t in tensors if t is not None]


def run(fn, spec, call, reverse):
    """Outputs, final states and the gradients of every input of one layer-direction."""
    output, final = fn(spec, call["gates_x"], call["state"], call["weight_hh"], call["bias_hh"],
                       call["weight_hr"], call["lengths"], reverse, call.get("resets"),
                       call.get("reset_state"), call.get("mask"),
                       call.get("carry_masked_output", False),
                       **{name: call[name] for name in OPTIONS if name in call})
    results = [output, *final]
    # A weighted sum, so every output position gets a different gradient.
    loss = sum((r.float() * torch.linspace(-1, 1, r.numel()).view_as(r)).sum() for r in results)
    grads = torch.autograd.grad(loss, leaves(call))
    return [r.detach() for r in results] + list(grads)


def assert_close_all(actual, expected, atol, rtol=1e-6):
    """Max abs error <= ``atol + rtol * max|expected|`` for every tensor of the two lists."""
    assert len(actual) == len(expected)
    for index, (a, e) in enumerate(zip(actual, expected)):
        assert a.shape == e.shape, index
        error = (a.float() - e.float()).abs().max().item()
        bound = atol + rtol * e.float().abs().max().item()
        assert error <= bound, f"tensor {index}: max error {error} > {bound}"


@st.composite
def configurations(draw):
    mode = draw(st.sampled_from(["rnn", "gru", "lstm"]))
    # The rows the kernels have a formula for (the rest are refused, test_conformance), as
    # the activation of every mode and the gate activation of GRU/LSTM.
    served = sorted(name for name in ACTIVATIONS if name in host.kernels().ACTIVATION_CODES)
    spec = CellSpec(mode, draw(st.sampled_from(served)), draw(st.booleans()),
                    recurrent_activation=draw(st.sampled_from(served)))
    hidden = draw(st.integers(1, 24))
    batch = draw(st.integers(1, 5))
    seq_len = draw(st.integers(1, 4))
    proj = draw(st.integers(0, hidden - 1)) if mode == "lstm" else 0
    lengths = draw(st.none() | st.lists(st.integers(1, seq_len), min_size=batch, max_size=batch))
    options = dict(hidden=hidden, proj=proj, seq_len=seq_len, batch=batch, lengths=lengths,
                   bias=draw(st.booleans()))
    return spec, options, draw(st.booleans()), draw(st.sampled_from(host.SCHEDULES))


@settings(max_examples=12, deadline=None, derandomize=True)
@given(configurations())
def test_random_configurations_equal_reference(configuration):
    spec, options, reverse, schedule = configuration
    call = make_call(spec, **options)
    # (hypothesis reruns the body, so a function-scoped monkeypatch would not reset between runs)
    previous = os.environ.get("RNNKIT_TRITON_SCHEDULE")
    os.environ["RNNKIT_TRITON_SCHEDULE"] = schedule
    try:
        actual = run(host.recurrence, spec, call, reverse)
    finally:
        if previous is None:
            del os.environ["RNNKIT_TRITON_SCHEDULE"]
        else:
            os.environ["RNNKIT_TRITON_SCHEDULE"] = previous
    assert_close_all(actual, run(reference.recurrence, spec, call, reverse), FP32_ATOL, 1e-5)


@pytest.mark.parametrize("name,spec,options", [
    ("rnn", CellSpec("rnn"), {"lengths": [3, 4, 2]}),
    ("gru-after", CellSpec("gru"), {}),
    ("gru-before", CellSpec("gru", reset_after=False), {"lengths": [3, 4, 2]}),
    ("lstm-proj", CellSpec("lstm"), {"proj": 12}),
], ids=lambda x: x if isinstance(x, str) else "")
def test_fp16_is_as_close_to_fp32_as_stated(name, spec, options):
    call16 = make_call(spec, dtype=torch.float16, **options)
    # The fp32 reference on exactly the fp16-rounded inputs.
    call32 = {key: value for key, value in call16.items()}
    for key in ("gates_x", "weight_hh", "bias_hh", "weight_hr"):
        if call16[key] is not None:
            call32[key] = call16[key].detach().float().requires_grad_()
    call32["state"] = tuple(s.detach().float().requires_grad_() for s in call16["state"])
    expected = run(reference.recurrence, spec, call32, True)
    actual = run(host.recurrence, spec, call16, True)
    assert all(a.dtype == torch.float16 for a in actual)
    assert_close_all(actual, expected, FP16_ATOL)


@pytest.mark.parametrize("spec,options", [
    (CellSpec("gru", reset_after=False), {"lengths": [1, 3, 2], "seq_len": 3}),
    (CellSpec("lstm"), {"proj": 12, "lengths": [3, 1, 2], "seq_len": 3}),
], ids=["gru-before", "lstm-proj"])
def test_persistent_schedule_matches_step_schedule_bitwise(spec, options, monkeypatch):
    # The persistent kernel (one program owning every tile under the interpreter) runs the same
    # phase code as one launch per step; the tiles are summed in the same order, so bitwise.
    call = make_call(spec, **options)
    monkeypatch.setenv("RNNKIT_TRITON_SCHEDULE", "step")
    step = run(host.recurrence, spec, call, True)
    monkeypatch.setenv("RNNKIT_TRITON_SCHEDULE", "persistent")
    persistent = run(host.recurrence, spec, call, True)
    for a, b in zip(step, persistent):
        assert torch.equal(a, b)
    assert_close_all(persistent, run(reference.recurrence, spec, call, True), FP32_ATOL)


# One cell of each mode the kernels tell apart (RNN, GRU both ways, LSTM with and without
# projection), for the resets and masks tests.
EVERY_MODE = [
    (CellSpec("rnn", "silu"), 0),
    (CellSpec("gru"), 0),
    (CellSpec("gru", reset_after=False), 0),
    (CellSpec("lstm"), 0),
    (CellSpec("lstm"), 12),
]
EVERY_MODE_IDS = ["rnn", "gru-after", "gru-before", "lstm", "lstm-proj"]


# (T, B) = (4, 3) codes: each row resets to reset_state (1) and to the initial state (2). With
# lengths [4, 2, 3], rows 1 and 2 carry codes on steps past their length, which must be ignored.
RESET_CODES = [[1, 2, 0], [0, 1, 2], [2, 0, 1], [0, 1, 2]]


@pytest.mark.parametrize("schedule", host.SCHEDULES)
@pytest.mark.parametrize("spec,proj", EVERY_MODE, ids=EVERY_MODE_IDS)
def test_resets_equal_reference(spec, proj, schedule, monkeypatch):
    # Outputs, final states and every gradient, reset_state's included: forward at full
    # length, and reverse with lengths.
    monkeypatch.setenv("RNNKIT_TRITON_SCHEDULE", schedule)
    for reverse, lengths in [(False, None), (True, [4, 2, 3])]:
        call = make_call(spec, proj=proj, lengths=lengths, resets=RESET_CODES)
        actual = run(host.recurrence, spec, call, reverse)
        assert_close_all(actual, run(reference.recurrence, spec, call, reverse), FP32_ATOL,
                         1e-5)
        # The reset states really got gradients (the last leaves).
        for grad in actual[-len(call["reset_state"]):]:
            assert grad.abs().max() > 0


# (T, B) = (5, 3) holes: row 0 skips its first step, row 1 its last step within length 3, row 2
# the steps 2 and 3 in a row; with lengths [5, 3, 4], steps past a length are skipped as well.
MASK = [[0, 1, 1], [1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1]]


@pytest.mark.parametrize("schedule", host.SCHEDULES)
@pytest.mark.parametrize("carry", [False, True], ids=["zero-output", "carried-output"])
@pytest.mark.parametrize("spec,proj", EVERY_MODE, ids=EVERY_MODE_IDS)
def test_masks_with_holes_equal_reference(spec, proj, carry, schedule, monkeypatch):
    # Outputs, final states and every gradient: forward at full length, and reverse with
    # lengths. With carried output, a skipped step's output is the carried h, so its gradient
    # must flow into the carried state.
    monkeypatch.setenv("RNNKIT_TRITON_SCHEDULE", schedule)
    for reverse, lengths in [(False, None), (True, [5, 3, 4])]:
        call = make_call(spec, proj=proj, seq_len=5, lengths=lengths, mask=MASK,
                         carry_masked_output=carry)
        actual = run(host.recurrence, spec, call, reverse)
        expected = run(reference.recurrence, spec, call, reverse)
        assert_close_all(actual, expected, FP32_ATOL, 1e-5)
        skipped = ~call["mask"]
        if lengths is not None:
            skipped |= torch.arange(5)[:, None] >= torch.tensor(lengths)[None, :]
        assert (actual[0][skipped].abs().max() > 0) == carry


# Recurrent dropout and zoneout (issue 14): (id, spec changes, make_call options). The last
# case combines them with state resets and holes whose skipped steps output the carried h.
REGULARIZED = [
    ("dropout", {}, {"dropout": 0.4}),
    ("zoneout-train", {"zoneout": 0.3}, {"zoneout_masks": True}),
    ("zoneout-eval", {"zoneout": 0.3}, {}),
    ("all-with-resets-and-holes", {"zoneout": 0.5},
     {"dropout": 0.25, "zoneout_masks": True, "resets": RESET_CODES, "mask": MASK[:4],
      "carry_masked_output": True}),
]


@pytest.mark.parametrize("case,changes,options", REGULARIZED, ids=[c[0] for c in REGULARIZED])
@pytest.mark.parametrize("spec,proj", EVERY_MODE, ids=EVERY_MODE_IDS)
def test_dropout_and_zoneout_equal_reference(spec, proj, case, changes, options):
    # Outputs, final states and every gradient (reset_state's included; the masks get none):
    # forward at full length, and reverse with lengths.
    spec = replace(spec, **changes)
    for reverse, lengths in [(False, None), (True, [4, 2, 3])]:
        call = make_call(spec, proj=proj, hidden=8, lengths=lengths, **options)
        actual = run(host.recurrence, spec, call, reverse)
        assert_close_all(actual, run(reference.recurrence, spec, call, reverse), FP32_ATOL,
                         1e-5)
        # The fields really acted: without them the kernels give another output.
        plain = {key: value for key, value in call.items() if key not in REGULARIZERS}
        assert not torch.allclose(actual[0], run(host.recurrence, replace(spec, zoneout=0.0),
                                                 plain, reverse)[0])


@pytest.mark.parametrize("schedule", host.SCHEDULES)
@pytest.mark.parametrize("spec,proj", [(CellSpec("gru", reset_after=False), 0),
                                       (CellSpec("lstm"), 12)], ids=["gru-before", "lstm-proj"])
def test_dropout_and_zoneout_on_both_schedules(spec, proj, schedule, monkeypatch):
    monkeypatch.setenv("RNNKIT_TRITON_SCHEDULE", schedule)
    spec = replace(spec, zoneout=0.3)
    call = make_call(spec, proj=proj, hidden=8, lengths=[4, 2, 3], dropout=0.3,
                     zoneout_masks=True)
    assert_close_all(run(host.recurrence, spec, call, True),
                     run(reference.recurrence, spec, call, True), FP32_ATOL, 1e-5)


# Every row of the table with a Triton formula, as GRU's candidate / LSTM's cell activation and
# as their gate activation at once (both GRU formulations in turn).
SERVED_ROWS = sorted(host.kernels().ACTIVATION_CODES)


@pytest.mark.parametrize("mode", ["gru", "lstm"])
@pytest.mark.parametrize("row", SERVED_ROWS)
def test_gate_activations_equal_reference(mode, row):
    spec = CellSpec(mode, row, reset_after=SERVED_ROWS.index(row) % 2 == 0,
                    recurrent_activation=row)
    assert BACKEND.unsupported_reason(Call(spec=spec, **{
        key: value for key, value in make_call(spec, hidden=4).items()
        if key in ("gates_x", "state", "weight_hh")})) is None
    for reverse, lengths in [(False, None), (True, [4, 2, 3])]:
        call = make_call(spec, hidden=8, lengths=lengths)
        assert_close_all(run(host.recurrence, spec, call, reverse),
                         run(reference.recurrence, spec, call, reverse), FP32_ATOL, 1e-5)


def test_fp16_dropout_and_zoneout_are_as_close_to_fp32_as_stated():
    spec = CellSpec("lstm", zoneout=0.3, recurrent_activation="hard_sigmoid")
    call16 = make_call(spec, dtype=torch.float16, hidden=8, proj=4, lengths=[4, 2, 3],
                       dropout=0.3, zoneout_masks=True)
    call32 = {key: value for key, value in call16.items()}
    for key in ("gates_x", "weight_hh", "bias_hh", "weight_hr"):
        call32[key] = call16[key].detach().float().requires_grad_()
    for key in REGULARIZERS:
        call32[key] = call16[key].float()
    call32["state"] = tuple(s.detach().float().requires_grad_() for s in call16["state"])
    actual = run(host.recurrence, spec, call16, True)
    assert all(a.dtype == torch.float16 for a in actual)
    assert_close_all(actual, run(reference.recurrence, spec, call32, True), FP16_ATOL)


def test_double_backward_with_dropout_and_zoneout_equals_reference():
    spec = CellSpec("lstm", zoneout=0.3)
    call = make_call(spec, hidden=8, seq_len=3, batch=2, lengths=[3, 2], dropout=0.3,
                     zoneout_masks=True)
    results = []
    for fn in (reference.recurrence, host.recurrence):
        output, final = fn(spec, call["gates_x"], call["state"], call["weight_hh"],
                           call["bias_hh"], None, call["lengths"], False,
                           **{name: call[name] for name in REGULARIZERS})
        loss = (output**2).sum() + final[-1].sum()
        grad_w, = torch.autograd.grad(loss, call["weight_hh"], create_graph=True)
        second = torch.autograd.grad((grad_w**2).sum(), [call["gates_x"], call["weight_hh"]])
        results.append([grad_w.detach(), *second])
    assert_close_all(results[1], results[0], FP32_ATOL, rtol=1e-5)


# Layer norm: (id, spec, projection size, norms, further make_call options). The last cases
# combine it with dropout, zoneout, resets and holes, and with other activations.
LAYER_NORM = [
    ("gru-hh", CellSpec("gru"), 0, ("hh",), {}),
    ("lstm-hh", CellSpec("lstm"), 0, ("hh",), {}),
    ("lstm-cell", CellSpec("lstm"), 0, ("cell",), {}),
    ("lstm-both", CellSpec("lstm"), 0, ("hh", "cell"), {}),
    ("lstm-proj-both", CellSpec("lstm"), 6, ("hh", "cell"), {}),
    ("lstm-proj-cell-all", CellSpec("lstm", zoneout=0.4), 6, ("cell",),
     {"dropout": 0.3, "zoneout_masks": True, "resets": RESET_CODES, "mask": MASK[:4],
      "carry_masked_output": True}),
    ("gru-hh-all", CellSpec("gru", "softsign", recurrent_activation="hard_sigmoid",
                            zoneout=0.3), 0, ("hh",),
     {"dropout": 0.3, "resets": RESET_CODES, "mask": MASK[:4]}),
    ("lstm-both-eval-zoneout", CellSpec("lstm", "relu", recurrent_activation="hard_sigmoid",
                                        zoneout=0.3), 0, ("hh", "cell"), {"dropout": 0.3}),
]


@pytest.mark.parametrize("case,spec,proj,norms,options", LAYER_NORM,
                         ids=[c[0] for c in LAYER_NORM])
def test_layer_norm_equals_reference(case, spec, proj, norms, options):
    # Outputs, final states and every gradient, the norms' gains and biases included: forward
    # at full length, and reverse with lengths.
    for reverse, lengths in [(False, None), (True, [4, 2, 3])]:
        call = make_call(spec, proj=proj, hidden=8, lengths=lengths, norms=norms, **options)
        actual = run(host.recurrence, spec, call, reverse)
        assert_close_all(actual, run(reference.recurrence, spec, call, reverse), FP32_ATOL,
                         1e-5)
        # Every gain and bias got a gradient (the last leaves).
        for grad in actual[-2 * len(norms):]:
            assert grad.abs().max() > 0


@pytest.mark.parametrize("schedule", host.SCHEDULES)
def test_layer_norm_on_both_schedules(schedule, monkeypatch):
    monkeypatch.setenv("RNNKIT_TRITON_SCHEDULE", schedule)
    spec = CellSpec("lstm", zoneout=0.3)
    call = make_call(spec, proj=6, hidden=8, lengths=[4, 2, 3], norms=("hh", "cell"),
                     dropout=0.3, zoneout_masks=True)
    assert_close_all(run(host.recurrence, spec, call, True),
                     run(reference.recurrence, spec, call, True), FP32_ATOL, 1e-5)


def test_fp16_layer_norm_is_as_close_to_fp32_as_stated():
    spec = CellSpec("lstm")
    call16 = make_call(spec, dtype=torch.float16, hidden=8, lengths=[4, 2, 3],
                       norms=("hh", "cell"))
    call32 = {key: value for key, value in call16.items()}
    for key in ("gates_x", "weight_hh", "bias_hh"):
        call32[key] = call16[key].detach().float().requires_grad_()
    for key in ("state", "norm_hh", "norm_cell"):
        call32[key] = tuple(t.detach().float().requires_grad_() for t in call16[key])
    actual = run(host.recurrence, spec, call16, False)
    assert all(a.dtype == torch.float16 for a in actual)
    assert_close_all(actual, run(reference.recurrence, spec, call32, False), FP16_ATOL)


def test_double_backward_with_layer_norm_equals_reference():
    spec = CellSpec("lstm")
    call = make_call(spec, hidden=8, seq_len=3, batch=2, lengths=[3, 2], norms=("hh", "cell"))
    wrt = [call["gates_x"], call["weight_hh"], *call["norm_hh"], *call["norm_cell"]]
    results = []
    for fn in (reference.recurrence, host.recurrence):
        output, final = fn(spec, call["gates_x"], call["state"], call["weight_hh"],
                           call["bias_hh"], None, call["lengths"], False,
                           norm_hh=call["norm_hh"], norm_cell=call["norm_cell"])
        loss = (output**2).sum() + final[-1].sum()
        grad_w, = torch.autograd.grad(loss, call["weight_hh"], create_graph=True)
        second = torch.autograd.grad((grad_w**2).sum(), wrt)
        results.append([grad_w.detach(), *second])
    assert_close_all(results[1], results[0], FP32_ATOL, rtol=1e-5)


def packed_and_lengths(batch_first_input, lengths):
    return pack_padded_sequence(batch_first_input, torch.tensor(lengths), batch_first=True,
                                enforce_sorted=False)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_bidirectional_two_layer_with_unsorted_lengths_equals_torch_nn(kind):
    options = dict(input_size=5, hidden_size=16, num_layers=2, bidirectional=True,
                   batch_first=True)
    if kind == "LSTM":
        options["proj_size"] = 8
    torch_layer = getattr(nn, kind)(**options)
    ours = getattr(rnnkit, kind)(**options, backend="triton")
    ours.load_state_dict(torch_layer.state_dict(), strict=True)
    lengths = [3, 5, 2]
    x = torch.randn(3, 5, 5)
    results = []
    for layer in (torch_layer, ours):
        xi = x.clone().requires_grad_()
        output, state = layer(packed_and_lengths(xi, lengths))
        flat = [output.data, *(state if isinstance(state, tuple) else (state,))]
        loss = sum((t * torch.linspace(-1, 1, t.numel()).view_as(t)).sum() for t in flat)
        params = list(layer.parameters())
        grads = torch.autograd.grad(loss, [xi, *params])
        results.append([t.detach() for t in flat] + list(grads))
    assert ours.backend == "triton"
    assert_close_all(results[1], results[0], 5e-5)


def lstm_with_dropout_run(seed):
    torch.manual_seed(seed)
    layer = rnnkit.LSTM(4, 12, num_layers=2, dropout=0.5, backend="triton")
    layer.train()
    x = torch.randn(3, 2, 4, requires_grad=True)
    output, (h_n, c_n) = layer(x, lengths=torch.tensor([3, 2]))
    loss = (output * torch.linspace(-1, 1, output.numel()).view_as(output)).sum()
    loss = loss + h_n.sum() + (2 * c_n).sum()
    grads = torch.autograd.grad(loss, [x, *layer.parameters()])
    return [output.detach(), h_n.detach(), c_n.detach(), *grads]


def test_two_runs_are_bitwise_identical_with_dropout_under_a_fixed_seed():
    first = lstm_with_dropout_run(7)
    second = lstm_with_dropout_run(7)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The dropout really acted: the same weights in eval mode (no dropout) give another output.
    torch.manual_seed(7)
    layer = rnnkit.LSTM(4, 12, num_layers=2, dropout=0.5, backend="triton").eval()
    x = torch.randn(3, 2, 4)
    with torch.no_grad():
        assert not torch.equal(layer(x, lengths=torch.tensor([3, 2]))[0], first[0])


def test_backend_triton_is_really_used():
    spec = CellSpec("gru")
    call = make_call(spec, seq_len=2)
    request = Call(spec=spec, gates_x=call["gates_x"], state=call["state"],
                   weight_hh=call["weight_hh"], bias_hh=call["bias_hh"], backend="triton")
    chosen = dispatch.plan(request, "triton")
    assert chosen.backend is BACKEND and chosen.passed_over is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        output, _ = dispatch.run(request)
    assert type(output.grad_fn).__name__ == "TritonRecurrenceBackward"
    # "auto" does not pick triton for CPU tensors: it claims only CUDA.
    assert BACKEND.device_types == ("cuda",)
    assert dispatch.plan(request, "auto").backend is not BACKEND


def test_cells_run_on_triton_and_equal_torch_nn():
    torch_cell = nn.GRUCell(6, 16)
    ours = rnnkit.GRUCell(6, 16, backend="triton")
    ours.load_state_dict(torch_cell.state_dict())
    x, h = torch.randn(3, 6), torch.randn(3, 16)
    assert torch.allclose(ours(x, h), torch_cell(x, h), atol=FP32_ATOL)


def test_callable_nonlinearity_falls_back_with_a_reason(monkeypatch):
    # dispatch warns once per message; start from a clean slate whatever ran before.
    monkeypatch.setattr(dispatch, "_warned", set())
    layer = rnnkit.RNN(3, 8, nonlinearity=torch.sin, backend="triton")
    x = torch.randn(2, 2, 3)
    with pytest.warns(UserWarning, match="callable"):
        output, _ = layer(x)
    assert output.grad_fn is not None
    assert type(output.grad_fn).__name__ != "TritonRecurrenceBackward"
    reference_layer = rnnkit.RNN(3, 8, nonlinearity=torch.sin, backend="reference")
    reference_layer.load_state_dict(layer.state_dict())
    assert torch.equal(output, reference_layer(x)[0])


def test_unsupported_calls_give_reasons(monkeypatch):
    spec = CellSpec("rnn")
    call = make_call(spec, seq_len=2)

    def reason(**changes):
        fields = dict(spec=spec, gates_x=call["gates_x"], state=call["state"],
                      weight_hh=call["weight_hh"], bias_hh=call["bias_hh"], weight_hr=None,
                      lengths=None, reverse=False)
        fields.update(changes)
        return BACKEND.unsupported_reason(Call(**fields))

    assert reason() is None
    assert "float64" in reason(gates_x=call["gates_x"].double())
    assert "mixed dtypes" in reason(weight_hh=call["weight_hh"].half())
    assert "callable" in reason(spec=CellSpec("rnn", torch.sin))
    assert "'mish' has no triton kernel" in reason(spec=CellSpec("rnn", "mish"))
    gru = make_call(CellSpec("gru"), seq_len=2)
    gru_fields = dict(gates_x=gru["gates_x"], state=gru["state"], weight_hh=gru["weight_hh"],
                      bias_hh=gru["bias_hh"])
    assert "recurrent_activation is a callable" in reason(
        spec=CellSpec("gru", recurrent_activation=torch.sigmoid), **gru_fields)
    assert "'mish' has no triton kernel" in reason(
        spec=CellSpec("gru", recurrent_activation="mish"), **gru_fields)
    gain = torch.ones(60)
    assert "reset_after=True only" in reason(
        spec=CellSpec("gru", reset_after=False, layer_norm=True), norm_hh=(gain, gain * 0),
        **gru_fields)
    assert "reset_after=True only" in reason(norm_hh=(gain[:20], gain[:20] * 0))
    assert "norm_cell) is served for LSTM only" in reason(
        spec=CellSpec("gru", layer_norm=True), norm_cell=(gain[:20], gain[:20] * 0),
        **gru_fields)
    assert reason(spec=CellSpec("gru", layer_norm=True), norm_hh=(gain, gain * 0),
                  **gru_fields) is None
    # Recurrent dropout, zoneout and gate activations are served.
    assert reason(spec=CellSpec("gru", "relu", recurrent_activation="hard_sigmoid",
                                zoneout=0.2), hidden_dropout=torch.ones(3, 20),
                  zoneout_h=torch.ones(2, 3, 20), **gru_fields) is None
    assert "bfloat16" in reason(
        gates_x=call["gates_x"].bfloat16(), state=(call["state"][0].bfloat16(),),
        weight_hh=call["weight_hh"].bfloat16(), bias_hh=call["bias_hh"].bfloat16())
    assert BACKEND.unavailable_reason() is None
    monkeypatch.setattr(triton_package, "_IMPORT_ERROR", "triton is not installed (test)")
    assert "not installed" in BACKEND.unavailable_reason()
    monkeypatch.setattr(triton_package, "_IMPORT_ERROR", None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in reason()
    if not torch.cuda.is_available():
        assert "TRITON_INTERPRET" in BACKEND.unavailable_reason()


def test_kernels_follow_the_interpreter_setting(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not isinstance(host.kernels().forward_kernel, InterpretedFunction)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(host.kernels().forward_kernel, InterpretedFunction)


def test_bad_schedule_name_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RNNKIT_TRITON_SCHEDULE", "fastest")
    with pytest.raises(ValueError, match="RNNKIT_TRITON_SCHEDULE must be one of"):
        host.schedule()


@pytest.mark.parametrize("spec,resets,mask", [
    (CellSpec("rnn", "silu"), None, None),
    (CellSpec("lstm"), None, None),
    (CellSpec("lstm"), [[1, 0], [2, 1], [0, 2]], None),
    (CellSpec("gru"), None, [[0, 1], [1, 0], [1, 1]]),
], ids=["rnn", "lstm", "lstm-resets", "gru-holes-carried-output"])
def test_double_backward_equals_reference(spec, resets, mask):
    call = make_call(spec, hidden=8, seq_len=3, batch=2, lengths=[3, 2], resets=resets,
                     mask=mask, carry_masked_output=True)
    wrt = [call["gates_x"], call["weight_hh"], *call.get("reset_state", ())]
    results = []
    for fn in (reference.recurrence, host.recurrence):
        output, final = fn(spec, call["gates_x"], call["state"], call["weight_hh"],
                           call["bias_hh"], None, call["lengths"], False, call.get("resets"),
                           call.get("reset_state"), call.get("mask"),
                           call.get("carry_masked_output", False))
        loss = (output**2).sum() + final[-1].sum()
        grad_w, = torch.autograd.grad(loss, call["weight_hh"], create_graph=True)
        second = torch.autograd.grad((grad_w**2).sum(), wrt)
        results.append([grad_w.detach(), *second])
    assert_close_all(results[1], results[0], FP32_ATOL, rtol=1e-5)


COMPILE_FOR_HOPPER = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rnnkit.ops.triton import _kernels as k


def compile_for_hopper(kernel, mode, pointer_types, phases, resets, mask=False,
                      regularized=False, norms=False):
    consts = dict(MODE=mode, ACT=5, G=4 if mode >= k.LSTM else 3, HAS_BIAS=True,
                  HAS_LENGTHS=True, REVERSE=True, HAS_RESETS=resets, HAS_MASK=mask,
                  CARRY_OUT=mask, GATE=k.ACTIVATION_CODES["hard_sigmoid"] if regularized else 3,
                  HAS_DROPOUT=regularized, ZONE_H=k.ZONE_MASK.value if regularized else 0,
                  ZONE_C=k.ZONE_EXPECT.value if regularized else 0,
                  NORM_HH=norms, NORM_CELL=norms and mode >= k.LSTM,
                  PHASE_FIRST=0, PHASE_LAST=phases - 1,
                  SYNC=k.SYNC_GRID.value, BLOCK_B=16, BLOCK_N=32, BLOCK_K=64, PRECISION="ieee")
    pointers = iter(pointer_types)
    signature, constexprs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name.endswith("_ptr"):
            signature[name] = next(pointers)
        elif name in consts:
            signature[name] = "constexpr"
            constexprs[(index,)] = consts[name]
        elif name == "zoneout_p":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(kernel, signature, constexprs),
                              target=GPUTarget("cuda", 90, 32))
    return {"cubin_bytes": len(compiled.asm["cubin"]), "ptx": compiled.asm["ptx"]}


half, f32 = "*fp16", "*fp32"
# (zoneout_p sits between the mask pointers and the norms' pointers; pointers only here.)
forward = [half] * 4 + ["*i64", "*i8", "*i8", half, half] + [half] * 3 + [half] * 4 + [
    f32, f32] + [half, f32, half, f32, f32, "*i32"]
backward = [half, half, "*i64", "*i8", "*i8", half, half] + [half] * 3 + [half] * 3 + [
    f32] * 4 + [half] + [f32] * 11 + ["*i32"]
json.dump([
    compile_for_hopper(k.forward_kernel, k.LSTM_PROJ, forward, k.FORWARD_PHASES[k.LSTM_PROJ],
                       False),
    compile_for_hopper(k.backward_kernel, k.GRU_BEFORE, backward,
                       k.BACKWARD_PHASES[k.GRU_BEFORE], False),
    # With state resets: every select and both reset-gradient accumulators.
    compile_for_hopper(k.forward_kernel, k.LSTM_PROJ, forward, k.FORWARD_PHASES[k.LSTM_PROJ],
                       True),
    compile_for_hopper(k.backward_kernel, k.GRU_BEFORE, backward,
                       k.BACKWARD_PHASES[k.GRU_BEFORE], True),
    compile_for_hopper(k.backward_kernel, k.LSTM_PROJ, backward,
                       k.BACKWARD_PHASES[k.LSTM_PROJ], True),
    # With holes and carried outputs.
    compile_for_hopper(k.forward_kernel, k.GRU_BEFORE, forward, k.FORWARD_PHASES[k.GRU_BEFORE],
                       False, True),
    compile_for_hopper(k.backward_kernel, k.LSTM_PROJ, backward,
                       k.BACKWARD_PHASES[k.LSTM_PROJ], False, True),
    # With recurrent dropout, zoneout (masks for h, the expectation for c), hard_sigmoid gates.
    compile_for_hopper(k.forward_kernel, k.LSTM_PROJ, forward, k.FORWARD_PHASES[k.LSTM_PROJ],
                       True, True, True),
    compile_for_hopper(k.backward_kernel, k.LSTM_PROJ, backward,
                       k.BACKWARD_PHASES[k.LSTM_PROJ], True, True, True),
    compile_for_hopper(k.backward_kernel, k.GRU_BEFORE, backward,
                       k.BACKWARD_PHASES[k.GRU_BEFORE], False, False, True),
    # With both layer norms (one more phase each) on top of everything else.
    compile_for_hopper(k.forward_kernel, k.LSTM_PROJ, forward,
                       k.FORWARD_PHASES[k.LSTM_PROJ] + 2, True, True, True, True),
    compile_for_hopper(k.backward_kernel, k.LSTM_PROJ, backward,
                       k.BACKWARD_PHASES[k.LSTM_PROJ] + 2, True, True, True, True),
    compile_for_hopper(k.backward_kernel, k.GRU_AFTER, backward,
                       k.BACKWARD_PHASES[k.GRU_AFTER] + 1, False, False, True, True),
], sys.stdout)
"""


def test_persistent_kernels_compile_for_the_gpu_with_their_grid_barrier():
    # The interpreter never runs the SYNC_GRID branch; compiling for sm_90 (Triton's bundled
    # ptxas, no GPU needed) checks that the GPU path type-checks and lowers, and that the
    # barrier is there (a release add, then an acquire spin). It runs in a fresh process: this
    # one has triton's own jit functions decorated for the interpreter.
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"Triton's bundled ptxas is missing ({ptxas})")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_HOPPER], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for kernel in json.loads(done.stdout):
        assert kernel["cubin_bytes"] > 0
        ptx = kernel["ptx"]
        assert "red.global.gpu.release.add" in ptx or "atom.global.gpu.release.add" in ptx
        assert "ld.global.gpu.acquire" in ptx or "atom.global.gpu.acquire" in ptx


def test_changing_the_outputs_in_place_keeps_backward_right():
    grads = []
    for backend in ("triton", "reference"):
        torch.manual_seed(3)
        layer = rnnkit.GRU(3, 8, backend=backend)
        x = torch.randn(3, 2, 3, requires_grad=True)
        output, h_n = layer(x)
        output.mul_(2)
        h_n.add_(1)
        (output.sum() + (h_n**2).sum()).backward()
        grads.append([x.grad, *(p.grad for p in layer.parameters())])
    assert_close_all(grads[0], grads[1], FP32_ATOL, 1e-5)
