"""The compiled recurrence as `torch.library` custom ops, with fake and autograd rules.

Two ops, declared here and given CPU kernels by `csrc/` (forward.cpp, backward.cpp):

- `rnnkit::cpu_recurrence_forward` runs the whole time loop and, when `training`, also
  returns what backward needs (gate activations, LSTM cells, projection inputs). With
  `resets` (`(T, B)` int8 codes, see [`rnnkit.ops.spec.Call`][]), a row starts a step
  from `reset_h`/`reset_c` (code 1) or `h0`/`c0` (code 2) instead of the carried state.
  With `mask` (`(T, B)` bool), a false step is skipped as a step past a length is: the
  state carries over, and the output is zero, or the carried `h` with `carry_output`.
  `hidden_dropout` (`(B, H_out)`) multiplies `h` where it enters $W_{hh} h$;
  `zoneout_h`/`zoneout_c` (`(T, B, H_out)`, `(T, B, H)`) keep a unit's start value where
  1, and without them a nonzero `zoneout` keeps that proportion (evaluation); GRU and LSTM
  run `activation` (the candidate's and cell's) and `gate_activation` (the gates').
  `norm_hh_gain`/`norm_hh_bias` (`(G*H,)`, LSTM and the reset-after GRU) layer-normalize
  each step's $W_{hh} h$ over the whole gate vector, `norm_cell_gain`/`norm_cell_bias`
  (`(H,)`, LSTM) the new cell before the output activation (Call.norm_hh, norm_cell); in
  training the op then also returns the normalized values (`normed`, `(T, B, G*H [+ H])`)
  and their 1/std (`norm_rstd`, `(T, B, 2)`), empty without layer norm.
- `rnnkit::cpu_recurrence_backward` runs backpropagation through time and returns the
  gradients of `gates_x`, the initial state(s), `weight_hh`, `bias_hh`, `weight_hr`
  and, with resets, `reset_h` and `reset_c` (empty without), then those of the norms' gains
  and biases (empty without).

The fake rules give torch.compile and torch.export the output shapes without running
anything. When backward itself is differentiated (`create_graph=True`), the segment is
recomputed on the reference path under autograd, so higher-order gradients stay exact.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnkit.ops import reference
from rnnkit.ops.activations import CODES, TABLE, code
from rnnkit.ops.cpu import _build
from rnnkit.ops.spec import Call, CellSpec

MODES = ("rnn", "gru", "lstm")

# Whether the kernels apply per-step state resets (Call.resets).
SERVES_RESETS = True
# The named activations csrc/vec_math.h has a formula for, in the order of its codes (which
# must be their rows in the table: see served_activation).
ACTIVATIONS = ("tanh", "relu", "identity", "sigmoid", "silu", "gelu", "softsign", "hardtanh",
               "softplus", "hard_sigmoid")
# Those whose derivative the kernels read off their output: the GRU/LSTM activations they run.
CELL_ACTIVATIONS = ("tanh", "relu", "identity", "sigmoid", "softsign", "hardtanh",
                    "hard_sigmoid")


def served_activation(name: object, among: tuple[str, ...] = ACTIVATIONS) -> bool:
    """Whether the kernels have `name`'s formula under the code the table gives it."""
    return (isinstance(name, str) and name in among and name in CODES
            and CODES[name] == ACTIVATIONS.index(name))

FORWARD = "rnnkit::cpu_recurrence_forward"
BACKWARD = "rnnkit::cpu_recurrence_backward"

torch.library.define(
    FORWARD,
    "(Tensor gates_x, Tensor h0, Tensor? c0, Tensor weight_hh, Tensor? bias_hh, "
    "Tensor? weight_hr, Tensor? lengths, Tensor? resets, Tensor? reset_h, Tensor? reset_c, "
    "Tensor? mask, Tensor? hidden_dropout, Tensor? zoneout_h, Tensor? zoneout_c, "
    "Tensor? norm_hh_gain, Tensor? norm_hh_bias, Tensor? norm_cell_gain, "
    "Tensor? norm_cell_bias, int mode, "
    "int activation, bool reset_after, bool reverse, bool carry_output, int gate_activation, "
    "float zoneout, bool training) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
torch.library.define(
    BACKWARD,
    "(Tensor grad_output, Tensor grad_h_n, Tensor grad_c_n, Tensor h0, Tensor? c0, "
    "Tensor weight_hh, Tensor? weight_hr, Tensor? lengths, Tensor? resets, Tensor? reset_h, "
    "Tensor? reset_c, Tensor? mask, Tensor? hidden_dropout, Tensor? zoneout_h, "
    "Tensor? zoneout_c, Tensor? norm_hh_gain, Tensor? norm_hh_bias, Tensor? norm_cell_gain, "
    "Tensor? norm_cell_bias, Tensor output, Tensor gates, Tensor cells, Tensor projected, "
    "Tensor normed, Tensor norm_rstd, int mode, "
    "int activation, bool reset_after, bool reverse, bool carry_output, int gate_activation, "
    "float zoneout, bool has_bias) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
    "Tensor, Tensor)",
)


LINEAR = "rnnkit::cpu_linear"
LINEAR_BACKWARD = "rnnkit::cpu_linear_backward"

torch.library.define(LINEAR, "(Tensor input, Tensor weight, Tensor? bias) -> Tensor")
torch.library.define(
    LINEAR_BACKWARD,
    "(Tensor grad, Tensor input, Tensor weight, bool input_grad, bool weight_grad, "
    "bool has_bias) -> (Tensor, Tensor, Tensor)",
)


LSTM_LAYER = "rnnkit::cpu_lstm_layer_forward"

# Inference only (no autograd rule): called when no gradient is needed.
torch.library.define(
    LSTM_LAYER,
    "(Tensor input, Tensor weight_ih, Tensor? bias_ih, Tensor h0, Tensor c0, "
    "Tensor weight_hh, Tensor? bias_hh, Tensor? weight_hr, Tensor? lengths, bool reverse) "
    "-> (Tensor, Tensor, Tensor)",
)


def _num_gates(mode: int) -> int:
    return (1, 3, 4)[mode]


@torch.library.register_fake(FORWARD)
def _forward_fake(
    gates_x, h0, c0, weight_hh, bias_hh, weight_hr, lengths, resets, reset_h, reset_c, mask,
    hidden_dropout, zoneout_h, zoneout_c, norm_hh_gain, norm_hh_bias, norm_cell_gain,
    norm_cell_bias, mode, activation, reset_after, reverse, carry_output, gate_activation,
    zoneout, training,
):
    # Tracing is the last moment before a compiled graph may call the kernel: build it now.
    _build.status()
    seq_len, batch, gate_size = gates_x.shape
    hidden = gate_size // _num_gates(mode)
    out_size = h0.shape[1]
    lstm = mode == MODES.index("lstm")
    new = gates_x.new_empty
    if training:
        if mode == MODES.index("rnn"):
            saved_width = hidden if TABLE[activation].saves_derivative else 0
        else:
            saved_width = 4 * hidden
        gates = new((seq_len, batch, saved_width))
        cells = new((seq_len if lstm else 0, batch, hidden))
        projected = new((seq_len if weight_hr is not None else 0, batch, hidden))
    else:
        gates, cells, projected = new((0,)), new((0,)), new((0,))
    width = _normed_width(gate_size, hidden, norm_hh_gain, norm_cell_gain)
    if training and width:
        normed, norm_rstd = new((seq_len, batch, width)), new((seq_len, batch, 2))
    else:
        normed, norm_rstd = new((0,)), new((0,))
    c_n = new((batch, hidden)) if lstm else new((0,))
    return (new((seq_len, batch, out_size)), new((batch, out_size)), c_n, gates, cells,
            projected, normed, norm_rstd)


def _normed_width(gate_size, hidden, norm_hh_gain, norm_cell_gain) -> int:
    """The width of a saved row of normalized values: the product's G*H, then the cell's H."""
    return (gate_size if norm_hh_gain is not None else 0) + (
        hidden if norm_cell_gain is not None else 0)


@torch.library.register_fake(BACKWARD)
def _backward_fake(
    grad_output, grad_h_n, grad_c_n, h0, c0, weight_hh, weight_hr, lengths, resets, reset_h,
    reset_c, mask, hidden_dropout, zoneout_h, zoneout_c, norm_hh_gain, norm_hh_bias,
    norm_cell_gain, norm_cell_bias, output, gates, cells, projected, normed, norm_rstd, mode,
    activation, reset_after, reverse, carry_output, gate_activation, zoneout, has_bias,
):
    seq_len, batch, out_size = output.shape
    gate_size = weight_hh.shape[0]
    hidden = gate_size // _num_gates(mode)
    new = output.new_empty
    return (
        new((seq_len, batch, gate_size)),
        new((batch, out_size)),
        new((batch, hidden)) if mode == MODES.index("lstm") else new((0,)),
        new((gate_size, out_size)),
        new((gate_size,)) if has_bias else new((0,)),
        new((out_size, hidden)) if weight_hr is not None else new((0,)),
        new((batch, out_size)) if resets is not None else new((0,)),
        new((batch, hidden)) if resets is not None and reset_c is not None else new((0,)),
        *(new(norm.shape) if norm is not None else new((0,))
          for norm in (norm_hh_gain, norm_hh_bias, norm_cell_gain, norm_cell_bias)),
    )


# The forward op's tensor inputs, in schema order; those in _DIFFERENTIABLE have a gradient.
# Then its codes (_CODES), and training.
_INPUTS = ("gates_x", "h0", "c0", "weight_hh", "bias_hh", "weight_hr", "lengths", "resets",
           "reset_h", "reset_c", "mask", "hidden_dropout", "zoneout_h", "zoneout_c",
           "norm_hh_gain", "norm_hh_bias", "norm_cell_gain", "norm_cell_bias")
_CODES = ("mode", "activation", "reset_after", "reverse", "carry_output", "gate_activation",
          "zoneout")
_NORMS = ("norm_hh_gain", "norm_hh_bias", "norm_cell_gain", "norm_cell_bias")
_DIFFERENTIABLE = ("gates_x", "h0", "c0", "weight_hh", "bias_hh", "weight_hr", "reset_h",
                   "reset_c", *_NORMS)


def _setup_context(ctx, inputs, output) -> None:
    count = len(_INPUTS)
    ctx.codes = dict(zip(_CODES, inputs[count:count + len(_CODES)]))
    ctx.training = inputs[count + len(_CODES)]
    out, _, _, gates, cells, projected, normed, norm_rstd = output
    ctx.mark_non_differentiable(gates, cells, projected, normed, norm_rstd)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:count], out, gates, cells, projected, normed, norm_rstd)


def _backward(ctx, grad_output, grad_h_n, grad_c_n, *unused):
    saved = dict(zip(_INPUTS, ctx.saved_tensors))
    out, gates, cells, projected, normed, norm_rstd = ctx.saved_tensors[len(_INPUTS):]
    h0, c0, lengths = saved["h0"], saved["c0"], saved["lengths"]
    resets, reset_h, reset_c = saved["resets"], saved["reset_h"], saved["reset_c"]
    codes = ctx.codes
    needs = dict(zip(_INPUTS, ctx.needs_input_grad))
    if torch.is_grad_enabled():
        grads = _reference_backward(ctx, grad_output, grad_h_n, grad_c_n)
    else:
        if not ctx.training:
            raise RuntimeError(
                "rnnkit: cpu_recurrence_forward ran with training=False, so it saved nothing "
                "for backward; call it with training=True when gradients are needed"
            )
        lstm = codes["mode"] == MODES.index("lstm")
        grad_output = torch.zeros_like(out) if grad_output is None else grad_output
        grad_h_n = torch.zeros_like(h0) if grad_h_n is None else grad_h_n
        if grad_c_n is None:
            grad_c_n = torch.zeros_like(c0) if lstm else out.new_empty((0,))
        found = torch.ops.rnnkit.cpu_recurrence_backward(
            grad_output, grad_h_n, grad_c_n, h0, c0, saved["weight_hh"], saved["weight_hr"],
            lengths, resets, reset_h, reset_c, saved["mask"], saved["hidden_dropout"],
            saved["zoneout_h"], saved["zoneout_c"], *(saved[name] for name in _NORMS), out,
            gates, cells, projected, normed, norm_rstd, *codes.values(),
            saved["bias_hh"] is not None,
        )
        grads = [
            g if saved[name] is not None and needs[name] else None
            for g, name in zip(found, _DIFFERENTIABLE)
        ]
    by_name = dict(zip(_DIFFERENTIABLE, grads))
    return (*(by_name.get(name) for name in _INPUTS), *(None for _ in _CODES), None)


def _reference_backward(ctx, grad_output, grad_h_n, grad_c_n) -> list[Tensor | None]:
    """Differentiable gradients for create_graph=True: rerun the segment on the reference path.

    Returns the gradients of the tensors named in `_DIFFERENTIABLE`, in that order.
    """
    saved = dict(zip(_INPUTS, ctx.saved_tensors))
    codes = ctx.codes
    norm_hh = norm_cell = None
    if saved["norm_hh_gain"] is not None:
        norm_hh = (saved["norm_hh_gain"], saved["norm_hh_bias"])
    if saved["norm_cell_gain"] is not None:
        norm_cell = (saved["norm_cell_gain"], saved["norm_cell_bias"])
    spec = CellSpec(
        MODES[codes["mode"]], TABLE[codes["activation"]].name, codes["reset_after"],
        recurrent_activation=TABLE[codes["gate_activation"]].name, zoneout=codes["zoneout"],
        layer_norm=norm_hh is not None or norm_cell is not None,
    )
    h0, c0, reset_h, reset_c = saved["h0"], saved["c0"], saved["reset_h"], saved["reset_c"]
    state = (h0,) if c0 is None else (h0, c0)
    reset_state = None
    if saved["resets"] is not None:
        reset_state = (reset_h,) if c0 is None else (reset_h, reset_c)
    output, final = reference.BACKEND.run(Call(
        spec=spec, state=state, weight_hh=saved["weight_hh"], bias_hh=saved["bias_hh"],
        weight_hr=saved["weight_hr"], gates_x=saved["gates_x"], lengths=saved["lengths"],
        reverse=codes["reverse"], resets=saved["resets"], reset_state=reset_state,
        mask=saved["mask"], carry_masked_output=codes["carry_output"],
        hidden_dropout=saved["hidden_dropout"], zoneout_h=saved["zoneout_h"],
        zoneout_c=saved["zoneout_c"], norm_hh=norm_hh, norm_cell=norm_cell,
    ))
    pairs = [(o, g) for o, g in zip((output, *final), (grad_output, grad_h_n, grad_c_n))]
    pairs = [(o, g) for o, g in pairs if g is not None and o.requires_grad]
    inputs = tuple(saved[name] for name in _DIFFERENTIABLE)
    needs = dict(zip(_INPUTS, ctx.needs_input_grad))
    wanted = [
        i for i, (name, t) in enumerate(zip(_DIFFERENTIABLE, inputs))
        if t is not None and needs[name] and t.requires_grad
    ]
    grads: list[Tensor | None] = [None] * len(inputs)
    if not pairs or not wanted:
        return grads
    found = torch.autograd.grad(
        [o for o, _ in pairs], [inputs[i] for i in wanted], [g for _, g in pairs],
        create_graph=True, allow_unused=True,
    )
    for i, g in zip(wanted, found):
        grads[i] = g if g is not None else torch.zeros_like(inputs[i])
    return grads


torch.library.register_autograd(FORWARD, _backward, setup_context=_setup_context)


@torch.library.register_fake(LSTM_LAYER)
def _lstm_layer_fake(
    input, weight_ih, bias_ih, h0, c0, weight_hh, bias_hh, weight_hr, lengths, reverse
):
    _build.status()
    seq_len, batch = input.shape[:2]
    new = input.new_empty
    return new((seq_len, batch, h0.shape[1])), new(h0.shape), new(c0.shape)


@torch.library.register_fake(LINEAR)
def _linear_fake(input, weight, bias):
    _build.status()
    return input.new_empty((*input.shape[:-1], weight.shape[0]))


@torch.library.register_fake(LINEAR_BACKWARD)
def _linear_backward_fake(grad, input, weight, input_grad, weight_grad, has_bias):
    new = grad.new_empty
    return (
        new(input.shape) if input_grad else new((0,)),
        new(weight.shape) if weight_grad else new((0,)),
        new((weight.shape[0],)) if has_bias else new((0,)),
    )


def _linear_setup_context(ctx, inputs, output) -> None:
    input, weight, bias = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight)


def _linear_backward(ctx, grad):
    input, weight = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph: differentiable torch formulas
        grad_input = grad @ weight if need_input else None
        flat_grad = grad.reshape(-1, weight.shape[0])
        grad_weight = flat_grad.t() @ input.reshape(-1, weight.shape[1]) if need_weight else None
        grad_bias = flat_grad.sum(0) if need_bias and ctx.has_bias else None
        return grad_input, grad_weight, grad_bias
    grad_input, grad_weight, grad_bias = torch.ops.rnnkit.cpu_linear_backward(
        grad, input, weight, need_input, need_weight, ctx.has_bias and need_bias
    )
    return (
        grad_input if need_input else None,
        grad_weight if need_weight else None,
        grad_bias if ctx.has_bias and need_bias else None,
    )


torch.library.register_autograd(LINEAR, _linear_backward, setup_context=_linear_setup_context)


def linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`F.linear(input, weight, bias)` on the compiled kernels (float32/float64, CPU)."""
    error = None if torch.compiler.is_compiling() else _build.status()
    if error is not None:
        raise RuntimeError(f"rnnkit: the cpu backend is unavailable: {error}")
    return torch.ops.rnnkit.cpu_linear(input, weight, bias)


def recurrence(
    spec: CellSpec,
    gates_x: Tensor,
    state: tuple[Tensor, ...],
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    resets: Tensor | None = None,
    reset_state: tuple[Tensor, ...] | None = None,
    mask: Tensor | None = None,
    carry_masked_output: bool = False,
    hidden_dropout: Tensor | None = None,
    zoneout_h: Tensor | None = None,
    zoneout_c: Tensor | None = None,
    norm_hh: tuple[Tensor, Tensor] | None = None,
    norm_cell: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The compiled twin of [`rnnkit.ops.reference.recurrence`][] (same arguments, results).

    `resets` (`(T, B)` codes, any integer or bool dtype) and `reset_state` (shaped like
    `state`) come together or not at all. `mask`, `carry_masked_output`, `hidden_dropout`,
    `zoneout_h` and `zoneout_c` are the fields of [`Call`][rnnkit.ops.spec.Call]; the zoneout
    masks act only when `spec.zoneout` is nonzero. `norm_hh` (LSTM, reset-after GRU) and
    `norm_cell` (LSTM) are the `(gain, bias)` layer norms of the Call's fields.

    Raises:
        RuntimeError: the kernels could not be built (dispatch checks this first).
        ValueError: `resets` without `reset_state`, or the other way round.
    """
    # While tracing, the fake rule builds the kernels instead (no locks or I/O in the graph).
    error = None if torch.compiler.is_compiling() else _build.status()
    if error is not None:
        raise RuntimeError(f"rnnkit: the cpu backend is unavailable: {error}")
    if (resets is None) != (reset_state is None):
        raise ValueError("resets and reset_state go together")
    lstm = spec.mode == "lstm"
    reset_h = reset_c = None
    if resets is not None:
        resets = resets.to(torch.int8)
        reset_h, reset_c = reset_state[0], (reset_state[1] if lstm else None)
    norms = (*(norm_hh or (None, None)), *(norm_cell or (None, None)))
    tensors = (gates_x, *state, weight_hh, bias_hh, weight_hr, reset_h, reset_c, *norms)
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    )
    c0 = state[1] if lstm else None
    if not spec.zoneout:  # as the reference path: the masks act only with a zoneout probability
        zoneout_h = zoneout_c = None
    output, h_n, c_n, *_ = torch.ops.rnnkit.cpu_recurrence_forward(
        gates_x, state[0], c0, weight_hh, bias_hh, weight_hr, lengths, resets, reset_h, reset_c,
        mask, hidden_dropout, zoneout_h, zoneout_c, *norms, MODES.index(spec.mode),
        code(spec.nonlinearity), spec.reset_after, reverse, carry_masked_output,
        code(spec.recurrent_activation), float(spec.zoneout), training,
    )
    return output, ((h_n, c_n) if lstm else (h_n,))


def lstm_layer(
    input: Tensor,
    weight_ih: Tensor,
    bias_ih: Tensor | None,
    state: tuple[Tensor, Tensor],
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer-direction for inference, the input projection computed inside the loop.

    Equals `recurrence(spec, F.linear(input, weight_ih, bias_ih), state, ...)` for an LSTM
    spec, with input (T, B, I); W_ih x + b_ih is computed a few steps at a time into a small
    reused buffer instead of all at once. Saves nothing for backward: call it only when no
    gradient is needed (the op has no autograd rule).

    Raises:
        RuntimeError: the kernels could not be built (the backend checks this first).
    """
    error = None if torch.compiler.is_compiling() else _build.status()
    if error is not None:
        raise RuntimeError(f"rnnkit: the cpu backend is unavailable: {error}")
    output, h_n, c_n = torch.ops.rnnkit.cpu_lstm_layer_forward(
        input, weight_ih, bias_ih, state[0], state[1], weight_hh, bias_hh, weight_hr, lengths,
        reverse,
    )
    return output, (h_n, c_n)
