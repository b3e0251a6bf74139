"""Every registered backend against the reference path, over one grid.

Each backend is run through the one planning point (:func:`rnnkit.ops.dispatch.run`) by name,
so a call it cannot serve falls back there; the harness asserts that it either served the call
(outputs, final states and every gradient equal the reference path's) or named why not. The
grid: every activation of the table, both GRU formulations, LSTM with and without projection,
lengths, both directions, the fused input projection, state resets and masks with holes. Each
backend runs in the most precise dtype it serves here (float64 for the compiled CPU kernels,
float32 for Triton).
"""

from __future__ import annotations

import random
import warnings
from dataclasses import replace

import pytest
import torch

import rnnkit
from rnnkit.ops import dispatch
from rnnkit.ops.activations import TABLE
from rnnkit.ops.spec import Call, CellSpec

FUSED = [name for name in dispatch.registered() if name != "reference"]
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}

SPECS = [CellSpec("rnn", row.name) for row in TABLE] + [
    CellSpec("gru", reset_after=True), CellSpec("gru", reset_after=False), CellSpec("lstm"),
]
# (id, spec, projection size)
CELLS = [(f"{s.mode}-{s.nonlinearity if s.mode == 'rnn' else s.reset_after}", s, 0)
         for s in SPECS] + [("lstm-proj", CellSpec("lstm"), 3)]


def _device(name: str) -> torch.device:
    """The device the backend runs on here, or a skip naming what is missing."""
    backend = dispatch.registered()[name]
    reason = backend.unavailable_reason()
    if reason is not None:
        pytest.skip(f"backend {name!r} is unavailable here: {reason}")
    if "cuda" in backend.device_types and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def _dtype(name: str, device: torch.device) -> torch.dtype:
    """The most precise dtype the backend serves (it must serve float32 or float64)."""
    backend = dispatch.registered()[name]
    for dtype in (torch.float64, torch.float32):
        for spec in (CellSpec("rnn"), CellSpec("gru"), CellSpec("lstm")):
            probe = _make(spec, 0, dtype, device, lengths=False, resets=False)
            if backend.unsupported_reason(probe) is None:
                return dtype
    pytest.fail(f"backend {name!r} serves no float64 or float32 call")


def _make(spec, proj, dtype, device, *, lengths, resets, reverse=False, project=False,
          grad=True, seed=0, steps=4, batch=3, hidden=20, features=5, mask=False):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale)
        return t.to(device, dtype).requires_grad_(grad)

    out_size = proj or hidden
    gates = spec.num_gates * hidden
    sizes = (out_size, hidden)[: spec.num_states]
    fields = dict(
        spec=spec,
        state=tuple(rand(batch, size) for size in sizes),
        weight_hh=rand(gates, out_size, scale=0.3),
        bias_hh=rand(gates, scale=0.3),
        weight_hr=rand(proj, hidden, scale=0.3) if proj else None,
        lengths=torch.tensor([steps, 2, 3][:batch], device=device) if lengths else None,
        reverse=reverse,
    )
    if project:
        fields.update(input=rand(steps, batch, features),
                      weight_ih=rand(gates, features, scale=0.3), bias_ih=rand(gates, scale=0.3))
    else:
        fields["gates_x"] = rand(steps, batch, gates)
    if resets:
        codes = torch.randint(0, 3, (steps, batch), generator=generator).to(torch.int8)
        codes[:, 0] = 0  # one row never resets
        fields.update(resets=codes.to(device),
                      reset_state=tuple(rand(batch, size) for size in sizes))
    if mask:
        holes = torch.rand(steps, batch, generator=generator) < 0.6
        holes[:, 0] = True
        fields.update(mask=holes.to(device), carry_masked_output=seed % 2 == 1)
    return Call(**fields)


def _results(call: Call, backend: str) -> list[torch.Tensor]:
    """Output, final states and, when the call needs them, the gradient of every tensor."""
    output, final = dispatch.run(Call(**{**call.__dict__, "backend": backend}))
    results = [output, *final]
    leaves = [t for t in call.tensors() if t.requires_grad]
    if not leaves:
        return results
    weights = [torch.linspace(-1, 1, r.numel(), dtype=r.dtype, device=r.device).view_as(r)
               for r in results]
    loss = sum((r * w).sum() for r, w in zip(results, weights))
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [r.detach() for r in results] + [
        torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)
    ]


def _check(name: str, call: Call, dtype: torch.dtype) -> None:
    reason = dispatch.registered()[name].unsupported_reason(call)
    if reason is not None:
        # Not served: the backend must say why, and the plan must fall back to the reference.
        assert isinstance(reason, str) and reason.strip()
        chosen = dispatch.plan(call, name)
        assert chosen.backend.name == "reference" and reason in chosen.passed_over
        return
    assert dispatch.plan(call, name).backend.name == name
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        got = _results(call, name)
    want = _results(call, "reference")
    assert len(got) == len(want)
    tolerance = TOLERANCE[dtype]
    for index, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance,
                                   msg=lambda m, i=index: f"{name}, result {i}: {m}")


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("cell_id, spec, proj", CELLS, ids=[c[0] for c in CELLS])
@pytest.mark.parametrize("lengths, reverse", [(False, False), (True, True)],
                         ids=["full", "lengths-reverse"])
def test_backend_equals_reference(name, cell_id, spec, proj, lengths, reverse):
    device = _device(name)
    dtype = _dtype(name, device)
    _check(name, _make(spec, proj, dtype, device, lengths=lengths, resets=False,
                       reverse=reverse), dtype)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("cell_id, spec, proj", [CELLS[0], *CELLS[-4:]],
                         ids=[c[0] for c in [CELLS[0], *CELLS[-4:]]])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_backend_equals_reference_with_resets(name, cell_id, spec, proj, reverse):
    device = _device(name)
    dtype = _dtype(name, device)
    _check(name, _make(spec, proj, dtype, device, lengths=True, resets=True, reverse=reverse),
           dtype)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("cell_id, spec, proj", [CELLS[0], *CELLS[-4:]],
                         ids=[c[0] for c in [CELLS[0], *CELLS[-4:]]])
@pytest.mark.parametrize("seed", [0, 1], ids=["zero-output", "carried-output"])
def test_backend_equals_reference_with_mask(name, cell_id, spec, proj, seed):
    """Masks with holes (Call.mask), with the skipped steps' output zero or carried."""
    device = _device(name)
    dtype = _dtype(name, device)
    _check(name, _make(spec, proj, dtype, device, lengths=True, resets=False, reverse=seed == 1,
                       mask=True, seed=seed), dtype)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("cell_id, spec, proj", [CELLS[-4], CELLS[-2], CELLS[-1]],
                         ids=[CELLS[-4][0], CELLS[-2][0], CELLS[-1][0]])
def test_backend_equals_reference_from_the_input(name, grad, cell_id, spec, proj):
    """Calls that carry the input and W_ih (a layer's), so a backend may fuse the projection."""
    device = _device(name)
    dtype = _dtype(name, device)
    with torch.set_grad_enabled(grad):
        _check(name, _make(spec, proj, dtype, device, lengths=True, resets=False,
                           reverse=True, project=True, grad=grad), dtype)


@pytest.mark.parametrize("name", FUSED)
def test_every_activation_is_served_or_refused_with_a_reason(name):
    device = _device(name)
    dtype = _dtype(name, device)
    backend = dispatch.registered()[name]
    for row in TABLE:
        call = _make(CellSpec("rnn", row.name), 0, dtype, device, lengths=False, resets=False)
        reason = backend.unsupported_reason(call)
        assert reason is None or (isinstance(reason, str) and reason.strip()), row.name


# Layers end to end: stacking, directions, batch_first, given state, lengths, resets.

def _layer_configs(count: int, seed: int):
    rng = random.Random(seed)
    variants = [("RNN", {"nonlinearity": row.name}) for row in TABLE]
    variants += [("GRU", {"reset_after": True}), ("GRU", {"reset_after": False})]
    variants += [("LSTM", {}), ("LSTM", {"proj_size": 2})]
    rng.shuffle(variants)
    return [
        dict(cell=cell, extra=extra, num_layers=rng.choice([1, 2]),
             bidirectional=rng.random() < 0.5, bias=rng.random() < 0.7,
             batch_first=rng.random() < 0.5, batch=rng.choice([1, 3, 6]),
             lengths=rng.random() < 0.5, hx=rng.random() < 0.5, resets=rng.random() < 0.4,
             seq_len=rng.choice([1, 4, 6]))
        for cell, extra in (variants[i % len(variants)] for i in range(count))
    ]


def _layer_results(module, config, dtype, device):
    generator = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(device, dtype)

    batch, steps = config["batch"], config["seq_len"]
    x = rand(*((batch, steps, 3) if config["batch_first"] else (steps, batch, 3)))
    x.requires_grad_(True)
    kwargs = {}
    if config["lengths"]:
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        lengths[0] = steps
        kwargs["lengths"] = lengths
    if config["resets"]:
        resets = torch.rand(steps, batch, generator=generator) < 0.3
        kwargs["resets"] = (resets.t() if config["batch_first"] else resets).to(device)
    states = []
    if config["hx"]:
        count = config["num_layers"] * (2 if config["bidirectional"] else 1)
        sizes = [config["extra"].get("proj_size", 0) or 5] + [5] * (config["cell"] == "LSTM")
        states = [rand(count, batch, size).requires_grad_(True) for size in sizes]
    hx = None if not states else (tuple(states) if len(states) == 2 else states[0])
    output, final = module(x, hx, **kwargs)
    results = [output, *(final if isinstance(final, tuple) else (final,))]
    generator_w = torch.Generator().manual_seed(2)
    loss = sum((r * torch.randn(r.shape, generator=generator_w, dtype=torch.float64)
                .to(device, dtype)).sum() for r in results)
    grads = torch.autograd.grad(loss, [x, *states, *module.parameters()])
    return [r.detach() for r in results] + list(grads)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("config", _layer_configs(12, seed=4), ids=lambda c: c["cell"])
def test_layers_on_backend_equal_reference_layers(name, config):
    device = _device(name)
    dtype = _dtype(name, device)
    kwargs = dict(num_layers=config["num_layers"], bias=config["bias"],
                  batch_first=config["batch_first"], bidirectional=config["bidirectional"],
                  dtype=dtype, device=device, **config["extra"])
    cls = getattr(rnnkit, config["cell"])
    torch.manual_seed(0)
    ours = cls(3, 5, backend=name, **kwargs)
    twin = cls(3, 5, backend="reference", **kwargs)
    twin.load_state_dict(ours.state_dict())
    got = _layer_results(ours, config, dtype, device)
    want = _layer_results(twin, config, dtype, device)
    tolerance = TOLERANCE[dtype]
    for index, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance,
                                   msg=lambda m, i=index: f"result {i}: {m}")


# The compiled CPU kernels in both dtypes, on both of their step paths (hidden 32: the fused
# LSTM/GRU steps, whole vectors of units; hidden 20: the general steps), with masks whose
# holes include a masked first step and a fully masked row, alone and with resets.

CPU_CELLS = [CELLS[0], CELLS[4], *CELLS[-4:]]  # tanh, silu (saves its derivative), GRU, LSTM


def _cpu_dtype_call(spec, proj, dtype, *, hidden, reverse, carry, resets, batch=4, steps=6,
                    seed=3):
    call = _make(spec, proj, dtype, torch.device("cpu"), lengths=True, resets=resets,
                 reverse=reverse, mask=True, seed=seed, steps=steps, batch=batch,
                 hidden=hidden)
    holes = call.mask.clone()
    holes[0 if reverse else steps - 1, 2] = False  # a row's first step (in its direction)
    holes[:, 3] = False  # a row that never runs
    lengths = torch.tensor([steps, 2, steps - 1, steps][:batch])
    return replace(call, mask=holes, lengths=lengths, carry_masked_output=carry)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell_id, spec, proj", CPU_CELLS, ids=[c[0] for c in CPU_CELLS])
@pytest.mark.parametrize("hidden", [32, 20], ids=["fused", "general"])
@pytest.mark.parametrize("reverse, carry, resets", [
    (False, False, False), (True, True, False), (False, True, True), (True, False, True),
], ids=["forward-zero", "reverse-carry", "forward-carry-resets", "reverse-zero-resets"])
def test_cpu_kernels_equal_reference_with_mask(dtype, cell_id, spec, proj, hidden, reverse,
                                               carry, resets):
    if _device("cpu").type != "cpu":
        pytest.fail("the cpu backend runs on the CPU")
    call = _cpu_dtype_call(spec, proj, dtype, hidden=hidden, reverse=reverse, carry=carry,
                           resets=resets)
    assert dispatch.registered()["cpu"].unsupported_reason(call) is None
    _check("cpu", call, dtype)


@pytest.mark.parametrize("cell_id, spec, proj", CPU_CELLS[-3:], ids=[c[0] for c in CPU_CELLS[-3:]])
def test_cpu_kernels_equal_reference_with_mask_threaded(cell_id, spec, proj):
    """Big enough steps that the LSTM's backward splits its loop over threads."""
    call = _cpu_dtype_call(spec, proj, torch.float64, hidden=64, reverse=False, carry=True,
                           resets=False, batch=4, steps=5)
    _check("cpu", call, torch.float64)


# Recurrent dropout, zoneout (training masks, and the evaluation expectation), layer norm and
# GRU/LSTM gate activations (Call.hidden_dropout, zoneout_h/_c, norm_hh/_cell, CellSpec's
# zoneout, layer_norm, nonlinearity and recurrent_activation), alone and together with masks
# and resets, in both dtypes. Hidden 32 runs the CPU kernels' fused steps, 20 their general
# steps; a backend that refuses a case must name why (see _check).

REGULARIZED = {
    "dropout": dict(dropout=True),
    "zoneout-train": dict(zoneout=0.3, zone_masks=True),
    "zoneout-eval": dict(zoneout=0.3),
    "activations": dict(nonlinearity="softsign", recurrent_activation="hard_sigmoid"),
    "layer-norm": dict(layer_norm=True),
    "relu": dict(nonlinearity="relu"),
    # tanh and hard_sigmoid: relu or hardtanh here magnify float32's rounding past the
    # tolerance on either path (both as far from the float64 result)
    "all-with-mask-resets": dict(dropout=True, zoneout=0.2, zone_masks=True, mask=True,
                                 resets=True, recurrent_activation="hard_sigmoid"),
}


def _is_option(case, spec):
    """Gate activations, zoneout and layer norm are GRU/LSTM options; layer norm is defined
    for the reset-after GRU only (test_regularized_reference.py)."""
    options = REGULARIZED[case]
    if spec.mode == "rnn" and set(options) - {"dropout", "mask", "resets"}:
        return False
    return not (options.get("layer_norm") and spec.mode == "gru" and not spec.reset_after)


# (case, id, spec, projection size) for rnn-tanh, both GRUs, LSTM and the projected LSTM
REGULARIZED_GRID = [(case, *cell) for case in REGULARIZED for cell in [CELLS[0], *CELLS[-4:]]
                    if _is_option(case, cell[1])]


def _regularized(spec, proj, dtype, *, hidden, case, reverse):
    options = REGULARIZED[case]
    spec = replace(spec, zoneout=options.get("zoneout", 0.0),
                   layer_norm=options.get("layer_norm", False),
                   **{key: options[key] for key in ("nonlinearity", "recurrent_activation")
                      if key in options})
    call = _make(spec, proj, dtype, torch.device("cpu"), lengths=True,
                 resets=options.get("resets", False), reverse=reverse,
                 mask=options.get("mask", False), seed=5, steps=5, batch=3, hidden=hidden)
    generator = torch.Generator().manual_seed(6)
    batch, steps, out_size = 3, 5, proj or hidden

    def bits(*shape, p):
        return (torch.rand(*shape, generator=generator) < p).to(dtype)

    def rand(*shape, shift=0.0):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * 0.2 + shift
        return t.to(dtype).requires_grad_(True)

    fields = {}
    if options.get("dropout"):
        fields["hidden_dropout"] = bits(batch, out_size, p=0.7) / 0.7
    if options.get("zone_masks"):
        fields["zoneout_h"] = bits(steps, batch, out_size, p=spec.zoneout)
        if spec.mode == "lstm":
            fields["zoneout_c"] = bits(steps, batch, hidden, p=spec.zoneout)
    if spec.layer_norm:
        gates = spec.num_gates * hidden
        fields["norm_hh"] = (rand(gates, shift=1.0), rand(gates))
        if spec.mode == "lstm":
            fields["norm_cell"] = (rand(hidden, shift=1.0), rand(hidden))
    return replace(call, **fields)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case, cell_id, spec, proj", REGULARIZED_GRID,
                         ids=[f"{g[0]}-{g[1]}" for g in REGULARIZED_GRID])
@pytest.mark.parametrize("hidden, reverse", [(32, False), (20, True)],
                         ids=["h32-forward", "h20-reverse"])
def test_backend_equals_reference_regularized(name, dtype, case, cell_id, spec, proj, hidden,
                                              reverse):
    device = _device(name)
    if device.type != "cpu":
        pytest.skip(f"these cases are built on the CPU; {name!r} runs on {device}")
    _check(name, _regularized(spec, proj, dtype, hidden=hidden, case=case, reverse=reverse),
           dtype)
