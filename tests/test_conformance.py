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
          grad=True, seed=0, steps=4, batch=3, hidden=20, features=5, mask=False,
          regularized=()):
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
    fields.update(_regularization(spec, regularized, generator, dtype, device, steps, batch,
                                  sizes, gates, project, grad))
    return Call(**fields)


def _regularization(spec, options, generator, dtype, device, steps, batch, sizes, gates,
                    project, grad):
    """The Call fields of recurrent dropout, zoneout masks and layer norm (see spec.Call)."""
    fields = {}

    def mask(*shape, p):
        return (torch.rand(*shape, generator=generator) < p).to(device, dtype)

    if "dropout" in options:
        fields["hidden_dropout"] = mask(batch, sizes[0], p=0.7) / 0.7
    if "zoneout-train" in options:
        fields["zoneout_h"] = mask(steps, batch, sizes[0], p=0.3)
        if spec.mode == "lstm":
            fields["zoneout_c"] = mask(steps, batch, sizes[1], p=0.3)

    def norm(size):
        gain = 1 + torch.randn(size, generator=generator, dtype=torch.float64) * 0.2
        bias = torch.randn(size, generator=generator, dtype=torch.float64) * 0.2
        return tuple(t.to(device, dtype).requires_grad_(grad) for t in (gain, bias))

    if spec.layer_norm:
        fields["norm_hh"] = norm(gates)
        if project:
            fields["norm_ih"] = norm(gates)
        if spec.mode == "lstm":
            fields["norm_cell"] = norm(sizes[1])
    return fields


# (id, spec, projection size, extra Call fields): every regularized form a backend may serve.
REGULARIZED = [
    (f"{mode}-{name}", CellSpec(mode, reset_after=after, **spec_options), proj, extra)
    for mode, after, proj in [("rnn", True, 0), ("gru", True, 0), ("gru", False, 0),
                              ("lstm", True, 0), ("lstm", True, 3)]
    for name, spec_options, extra in [
        ("dropout", {}, ("dropout",)),
        ("zoneout-train", {"zoneout": 0.3}, ("zoneout-train",)),
        ("zoneout-eval", {"zoneout": 0.3}, ()),
        ("layer-norm", {"layer_norm": True}, ()),
        ("hard-sigmoid", {"recurrent_activation": "hard_sigmoid", "nonlinearity": "softsign"},
         ()),
        ("all", {"zoneout": 0.2, "layer_norm": True}, ("dropout", "zoneout-train")),
    ]
    if not (spec_options.get("layer_norm") and (mode == "rnn" or not after))
    and not (mode == "rnn" and "recurrent_activation" in spec_options)
]


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


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("cell_id, spec, proj, extra", REGULARIZED,
                         ids=[c[0] + (f"-proj{c[2]}" if c[2] else "") for c in REGULARIZED])
@pytest.mark.parametrize("project", [False, True], ids=["gates", "input"])
def test_backend_equals_reference_regularized(name, cell_id, spec, proj, extra, project):
    """Recurrent dropout, zoneout (training masks and evaluation), layer norm and other gate
    activations, with lengths and reverse: a backend serves them equal to the reference path
    or refuses with a reason (the plan then falls back)."""
    device = _device(name)
    dtype = _dtype(name, device)
    _check(name, _make(spec, proj, dtype, device, lengths=True, resets=False, reverse=True,
                       project=project, regularized=extra), dtype)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("cell, options", [
    ("LSTM", {"recurrent_dropout": 0.3, "zoneout": 0.2, "input_dropout": 0.2,
              "layer_norm": True, "bidirectional": True, "num_layers": 2}),
    ("GRU", {"recurrent_dropout": 0.3, "zoneout": 0.2, "layer_norm": True,
             "recurrent_activation": "hard_sigmoid"}),
    ("LSTM", {"recurrent_dropout": 0.25, "proj_size": 2}),
], ids=["lstm-all", "gru-all", "lstm-proj-dropout"])
def test_regularized_layers_on_backend_equal_reference_layers(name, cell, options):
    """A training step of a regularized layer: with the same seed every backend draws the same
    masks (on the CPU), so outputs and gradients equal the reference layer's."""
    device = _device(name)
    dtype = _dtype(name, device)
    config = dict(cell=cell, extra={k: v for k, v in options.items() if k == "proj_size"},
                  num_layers=options.get("num_layers", 1),
                  bidirectional=options.get("bidirectional", False), batch_first=False,
                  batch=3, lengths=True, hx=True, resets=False, seq_len=5)
    torch.manual_seed(0)
    ours = getattr(rnnkit, cell)(3, 5, backend=name, dtype=dtype, device=device, **options)
    twin = getattr(rnnkit, cell)(3, 5, backend="reference", dtype=dtype, device=device,
                                 **options)
    twin.load_state_dict(ours.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a backend that refuses falls back with a warning
        torch.manual_seed(1)
        got = _layer_results(ours.train(), config, dtype, device)
    torch.manual_seed(1)
    want = _layer_results(twin.train(), config, dtype, device)
    tolerance = TOLERANCE[dtype]
    for index, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=tolerance, atol=tolerance,
                                   msg=lambda m, i=index: f"result {i}: {m}")


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


# Issue 14's fields (recurrent dropout, zoneout, gate activations, layer norm), on every fused
# backend that serves them; the Triton kernels serve all of them (norm_hh for LSTM and the
# reset-after GRU only), a backend that does not must name why.

REGULARIZED_CELLS = [
    ("rnn", CellSpec("rnn"), 0),
    ("gru-after", CellSpec("gru"), 0),
    ("gru-before", CellSpec("gru", reset_after=False), 0),
    ("lstm", CellSpec("lstm"), 0),
    ("lstm-proj", CellSpec("lstm"), 3),
]
# (id, spec changes, fields): "dropout", "zoneout" (training masks) and "norms" ask for the
# call's tensors; zoneout without masks is the evaluation expectation.
REGULARIZED_CASES = [
    ("dropout", {}, ("dropout",)),
    ("zoneout-train", {"zoneout": 0.3}, ("zoneout",)),
    ("zoneout-eval", {"zoneout": 0.3}, ()),
    ("gates", {"nonlinearity": "softsign", "recurrent_activation": "hard_sigmoid"}, ()),
    ("layer-norm", {"layer_norm": True}, ("norms",)),
    ("all", {"zoneout": 0.5, "recurrent_activation": "hard_sigmoid", "layer_norm": True},
     ("dropout", "zoneout", "norms", "resets", "mask")),
]


def _regularized(spec, proj, dtype, device, changes, wanted, seed=3):
    """`_make`'s call with issue 14's fields: masks without gradients, norms with them."""
    hidden, batch, steps = 8, 3, 4
    spec = replace(spec, **changes)
    call = _make(spec, proj, dtype, device, lengths=True, resets="resets" in wanted,
                 reverse=True, seed=seed, steps=steps, batch=batch, hidden=hidden,
                 mask="mask" in wanted)
    generator = torch.Generator().manual_seed(seed + 1)

    def draw(*shape, scale=1.0, offset=0.0, grad=False):
        t = torch.randn(*shape, generator=generator, dtype=torch.float64) * scale + offset
        return t.to(device, dtype).requires_grad_(grad)

    def bernoulli(p, *shape):
        return (torch.rand(*shape, generator=generator) < p).to(device, dtype)

    out_size = proj or hidden
    fields = {}
    if "dropout" in wanted:
        fields["hidden_dropout"] = (1 - bernoulli(0.3, batch, out_size)) / 0.7
    if "zoneout" in wanted:
        fields["zoneout_h"] = bernoulli(spec.zoneout, steps, batch, out_size)
        if spec.mode == "lstm":
            fields["zoneout_c"] = bernoulli(spec.zoneout, steps, batch, hidden)
    if "norms" in wanted:
        if spec.mode == "lstm" or (spec.mode == "gru" and spec.reset_after):
            gates = spec.num_gates * hidden
            fields["norm_hh"] = (draw(gates, scale=0.3, offset=1.0, grad=True),
                                 draw(gates, scale=0.2, grad=True))
        if spec.mode == "lstm":
            fields["norm_cell"] = (draw(hidden, scale=0.3, offset=1.0, grad=True),
                                   draw(hidden, scale=0.2, grad=True))
    return replace(call, spec=spec, **fields)


@pytest.mark.parametrize("name", FUSED)
@pytest.mark.parametrize("case, changes, wanted", REGULARIZED_CASES,
                         ids=[c[0] for c in REGULARIZED_CASES])
@pytest.mark.parametrize("cell_id, spec, proj", REGULARIZED_CELLS,
                         ids=[c[0] for c in REGULARIZED_CELLS])
def test_regularized_calls_equal_reference_or_name_why(name, cell_id, spec, proj, case, changes,
                                                       wanted):
    device = _device(name)
    dtype = _dtype(name, device)
    call = _regularized(spec, proj, dtype, device, changes, wanted)
    if name == "triton":  # the Triton kernels serve every one of these calls
        assert dispatch.registered()[name].unsupported_reason(call) is None
    _check(name, call, dtype)
