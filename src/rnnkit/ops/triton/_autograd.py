"""Host side of the triton backend: buffers, launch schedules and the autograd Function."""

from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from rnnkit.ops import reference
from rnnkit.ops.cell_math import LAYER_NORM_EPS
from rnnkit.ops.spec import CellSpec

SCHEDULES = ("persistent", "step")


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


_kernels_module = None


def kernels():
    """The kernel module, decorated for the interpreter or the GPU as the environment says now.

    `triton.jit` decides between the two when a function is decorated, so if the module was
    first imported under the other setting (another import set `TRITON_INTERPRET` later), it
    is imported again.
    """
    global _kernels_module
    from triton.runtime.interpreter import InterpretedFunction

    if _kernels_module is None:
        _kernels_module = importlib.import_module("rnnkit.ops.triton._kernels")
    if isinstance(_kernels_module.forward_kernel, InterpretedFunction) != interpreting():
        _kernels_module = importlib.reload(_kernels_module)
    return _kernels_module


def schedule() -> str:
    """`RNNKIT_TRITON_SCHEDULE`, else `persistent` on GPU and `step` under the interpreter."""
    value = os.environ.get("RNNKIT_TRITON_SCHEDULE", "")
    if not value:
        return "step" if interpreting() else "persistent"
    if value not in SCHEDULES:
        raise ValueError(f"RNNKIT_TRITON_SCHEDULE must be one of {SCHEDULES}, got {value!r}")
    return value


def mode_code(spec: CellSpec, weight_hr: Tensor | None) -> int:
    k = kernels()
    if spec.mode == "rnn":
        return k.RNN
    if spec.mode == "gru":
        return k.GRU_AFTER if spec.reset_after else k.GRU_BEFORE
    return k.LSTM if weight_hr is None else k.LSTM_PROJ


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _sm_count(device: torch.device) -> int:
    index = torch.cuda.current_device() if device.index is None else device.index
    return _multiprocessors(index)


def _blocks(batch: int, hidden: int, device: torch.device) -> dict[str, int]:
    block_b = min(64, max(16, triton.next_power_of_2(batch)))
    if device.type == "cpu":  # the interpreter: small tiles, so tests cover several of them
        return {"BLOCK_B": block_b, "BLOCK_N": 16, "BLOCK_K": 16}
    # Narrow column blocks while that still leaves SMs idle: the step's latency is set by the
    # slowest program, and more programs split the weight reads.
    sms = _sm_count(device)
    tiles_wide = triton.cdiv(batch, block_b) * triton.cdiv(hidden, 32)
    return {"BLOCK_B": block_b, "BLOCK_N": 16 if tiles_wide < sms else 32, "BLOCK_K": 64}


def _launch(kernel, args: tuple, sizes: tuple, consts: dict, num_phases: int, phase_columns,
            seq_len: int, backward: bool, device: torch.device) -> None:
    """Run `kernel` over all steps, one launch per step and phase or one persistent launch.

    `phase_columns[p]` is the number of columns phase `p` produces; `sizes` is
    `(T, B, H, H_OUT)`.
    """
    k = kernels()
    batch = sizes[1]
    tiles = [
        triton.cdiv(batch, consts["BLOCK_B"]) * triton.cdiv(columns, consts["BLOCK_N"])
        for columns in phase_columns
    ]
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device:
        if schedule() == "persistent":
            if device.type == "cuda":
                # At most one program per SM, so that all are resident and the barrier ends.
                programs = max(1, min(max(tiles), _sm_count(device)))
            else:  # the interpreter runs programs one after another: one program, no barrier
                programs = 1
            sync = (k.SYNC_GRID if programs > 1 else k.SYNC_PROGRAM).value
            start = seq_len - 1 if backward else 0
            kernel[(programs,)](*args, counter, *sizes, start, seq_len, **consts,
                                PHASE_FIRST=0, PHASE_LAST=num_phases - 1, SYNC=sync)
            return
        for s in range(seq_len - 1, -1, -1) if backward else range(seq_len):
            for phase in range(num_phases):
                kernel[(tiles[phase],)](*args, counter, *sizes, s, 1, **consts,
                                        PHASE_FIRST=phase, PHASE_LAST=phase,
                                        SYNC=k.SYNC_NONE.value)


def _phase_columns(mode: int, hidden: int, hidden_out: int, backward: bool,
                   norm_hh: bool = False, norm_cell: bool = False) -> list[int]:
    """The columns each phase of a step produces, in the order the kernels run them.

    Forward: [the raw `W_hh h_in` (layer norm)], the gates and the cell, [`h` from
    `LN(c)`], [GRU_BEFORE's candidate, LSTM_PROJ's `W_hr`]. Backward: [LSTM_PROJ's
    `W_hr`], [`LN(c)`'s output], the cell, [GRU_BEFORE's `W_hn (r * h_in)`],
    [`LN(W_hh h_in)`], `dh_prev`.
    """
    k = kernels()
    if not backward:
        second = {k.GRU_BEFORE: [hidden], k.LSTM_PROJ: [hidden_out]}.get(mode, [])
        return [hidden] * norm_hh + [hidden] + [hidden] * norm_cell + second
    first = [hidden_out] if mode == k.LSTM_PROJ else []
    through_w_hn = [hidden] if mode == k.GRU_BEFORE else []
    return (first + [hidden] * norm_cell + [hidden] + through_w_hn + [hidden] * norm_hh
            + [hidden_out])


def _precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 matmuls: IEEE, or TF32 on CUDA where torch lets cuDNN's RNNs use TF32 too."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _reset_args(resets: Tensor | None, reset_h: Tensor | None, reset_c: Tensor | None,
                dummy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernels' `rs_ptr, rh_ptr, rc_ptr`: codes and reset states, contiguous, or dummies."""
    if resets is None:
        return dummy, dummy, dummy
    return (resets.to(device=dummy.device, dtype=torch.int8).contiguous(), reset_h.contiguous(),
            dummy if reset_c is None else reset_c.contiguous())


def _mask_arg(mask: Tensor | None, dummy: Tensor) -> Tensor:
    """The kernels' `mk_ptr`: the `(T, B)` mask as contiguous int8, or a dummy."""
    if mask is None:
        return dummy
    return mask.to(device=dummy.device, dtype=torch.int8).contiguous()


def _regularizer_args(spec: CellSpec, hidden_dropout: Tensor | None,
                      zoneout_h: Tensor | None, zoneout_c: Tensor | None,
                      dummy: Tensor) -> tuple[tuple, dict[str, int | bool]]:
    """The kernels' `hd_ptr, zh_ptr, zc_ptr, zoneout_p` and their constexpr switches.

    Zoneout follows `rnnkit.ops.cell_math.zoned`: none when `spec.zoneout` is 0; the
    training masks when `zoneout_h` is given (`c` takes `zoneout_c`, or the expectation
    without it); otherwise the evaluation expectation with `p = spec.zoneout`.
    """
    k = kernels()

    def slab(tensor):
        return dummy if tensor is None else tensor.to(dummy.device).contiguous()

    zone_h = zone_c = k.ZONE_NONE.value
    if spec.zoneout:
        zone_h = k.ZONE_MASK.value if zoneout_h is not None else k.ZONE_EXPECT.value
        if spec.mode == "lstm":
            masked = zoneout_h is not None and zoneout_c is not None
            zone_c = k.ZONE_MASK.value if masked else k.ZONE_EXPECT.value
    args = (slab(hidden_dropout), slab(zoneout_h if zone_h == k.ZONE_MASK.value else None),
            slab(zoneout_c if zone_c == k.ZONE_MASK.value else None), float(spec.zoneout))
    return args, {"HAS_DROPOUT": hidden_dropout is not None, "ZONE_H": zone_h,
                  "ZONE_C": zone_c}


def _activation_codes(spec: CellSpec) -> dict[str, int]:
    """`ACT` (RNN's nonlinearity, GRU's candidate, LSTM's cell activation) and `GATE`."""
    codes = kernels().ACTIVATION_CODES
    gate = codes[spec.recurrent_activation] if spec.mode != "rnn" else 0
    return {"ACT": codes[spec.nonlinearity], "GATE": gate}


def forward(spec: CellSpec, gates_x: Tensor, h0: Tensor, c0: Tensor | None, weight_hh: Tensor,
            bias_hh: Tensor | None, weight_hr: Tensor | None, lengths: Tensor | None,
            reverse: bool, resets: Tensor | None = None, reset_h: Tensor | None = None,
            reset_c: Tensor | None = None, mask: Tensor | None = None,
            carry_masked_output: bool = False, hidden_dropout: Tensor | None = None,
            zoneout_h: Tensor | None = None, zoneout_c: Tensor | None = None,
            norm_hh: tuple[Tensor, Tensor] | None = None,
            norm_cell: tuple[Tensor, Tensor] | None = None) -> dict[str, Tensor]:
    """Run the forward kernels; returns the output, the state sequences and saved buffers.

    With `resets`, `hseq`/`cseq` hold the carried states (before each step's reset).
    `mask` `(T, B)` skips its false steps; with `carry_masked_output` a skipped step
    (a hole, or past a length) outputs the carried `h` instead of zeros. `hidden_dropout`
    multiplies the start state where it enters `W_hh`; zoneout (`spec.zoneout`, with the
    masks `zoneout_h`/`zoneout_c` in training) mixes the new state with the start state.
    `norm_hh`/`norm_cell` are the `(gain, bias)` of the layer norms; the raw products
    `W_hh h_in` (`raw`) and the cells `c` before zoneout (`craw`) are kept for backward.
    """
    k = kernels()
    mode = mode_code(spec, weight_hr)
    seq_len, batch, gate_size = gates_x.shape
    hidden = gate_size // spec.num_gates
    hidden_out = weight_hh.shape[1]
    device, dtype = gates_x.device, gates_x.dtype
    f32 = {"device": device, "dtype": torch.float32}
    dummy = torch.zeros(1, **f32)
    hseq = torch.empty(seq_len + 1, batch, hidden_out, device=device, dtype=dtype)
    hseq[0] = h0
    cseq = dummy
    if spec.mode == "lstm":
        cseq = torch.empty(seq_len + 1, batch, hidden, **f32)
        cseq[0] = c0
    out = torch.empty(seq_len, batch, hidden_out, device=device, dtype=dtype)
    pre = torch.empty(seq_len, batch, gate_size, **f32)
    aux = torch.empty(seq_len, batch, hidden, **f32) if mode in (
        k.GRU_AFTER, k.GRU_BEFORE, k.LSTM_PROJ) else dummy
    weight_hh = weight_hh.contiguous()
    regularizers, switches = _regularizer_args(spec, hidden_dropout, zoneout_h, zoneout_c, dummy)
    norms = tuple(dummy if norm is None else part.contiguous()
                  for norm in (norm_hh, norm_cell) for part in (norm or (None, None)))
    raw = torch.empty(seq_len, batch, gate_size, **f32) if norm_hh is not None else dummy
    craw = torch.empty(seq_len, batch, hidden, **f32) if norm_cell is not None else dummy
    args = (
        gates_x.contiguous(), weight_hh,
        weight_hh if bias_hh is None else bias_hh.contiguous(),
        weight_hh if weight_hr is None else weight_hr.contiguous(),
        dummy if lengths is None else lengths.contiguous(),
        _mask_arg(mask, dummy),
        *_reset_args(resets, reset_h, reset_c, dummy),
        *regularizers, *norms, raw, craw,
        hseq, cseq, out, pre, aux,
    )
    consts = dict(
        MODE=mode, **_activation_codes(spec),
        G=spec.num_gates, HAS_BIAS=bias_hh is not None, HAS_LENGTHS=lengths is not None,
        REVERSE=reverse, HAS_RESETS=resets is not None, HAS_MASK=mask is not None,
        CARRY_OUT=bool(carry_masked_output) and (mask is not None or lengths is not None),
        **switches, NORM_HH=norm_hh is not None, NORM_CELL=norm_cell is not None,
        PRECISION=_precision(dtype, device),
        **_blocks(batch, hidden, device),
    )
    columns = _phase_columns(mode, hidden, hidden_out, False, consts["NORM_HH"],
                             consts["NORM_CELL"])
    _launch(k.forward_kernel, args, (seq_len, batch, hidden, hidden_out), consts, len(columns),
            columns, seq_len, False, device)
    return {"out": out, "hseq": hseq, "cseq": cseq, "pre": pre, "aux": aux, "mode": mode,
            "consts": consts, "regularizers": regularizers, "norms": norms, "raw": raw,
            "craw": craw}


def backward(spec: CellSpec, saved: dict, weight_hh: Tensor, weight_hr: Tensor | None,
             lengths: Tensor | None, reverse: bool, grad_out: Tensor, grad_h: Tensor,
             grad_c: Tensor | None, resets: Tensor | None = None, reset_h: Tensor | None = None,
             reset_c: Tensor | None = None, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Run the backward kernels, then the weight gradients as single matmuls over all steps.

    With `resets`, the kernels sum each reset row's start-state gradient into `dreset_h`
    / `dreset_c` (plane 0: code 1, towards `reset_state`; plane 1: code 2, towards
    `h0`/`c0`).
    """
    k = kernels()
    mode = saved["mode"]
    hseq, aux = saved["hseq"], saved["aux"]
    seq_len, batch, hidden_out = hseq.shape[0] - 1, hseq.shape[1], hseq.shape[2]
    gate_size = saved["pre"].shape[-1]
    hidden = gate_size // spec.num_gates
    device = grad_out.device
    f32 = {"device": device, "dtype": torch.float32}
    dummy = torch.zeros(1, **f32)
    dhseq = torch.empty(seq_len + 1, batch, hidden_out, **f32)
    dhseq[seq_len] = grad_h
    dcseq = dummy
    if spec.mode == "lstm":
        dcseq = torch.empty(seq_len + 1, batch, hidden, **f32)
        dcseq[seq_len] = grad_c
    dgx = torch.empty(seq_len, batch, gate_size, **f32)
    gru = mode in (k.GRU_AFTER, k.GRU_BEFORE)
    dghh = torch.empty(seq_len, batch, gate_size, **f32) if gru else dgx
    gaux = torch.empty(seq_len, batch, hidden_out, **f32) if mode in (
        k.GRU_BEFORE, k.LSTM_PROJ) else dummy
    consts = {key: value for key, value in saved["consts"].items() if key != "HAS_BIAS"}
    raw, craw = saved["raw"], saved["craw"]
    # The gradients of the raw products W_hh h_in and of LN(c)'s output, for layer norm.
    draw = torch.empty(seq_len, batch, gate_size, **f32) if consts["NORM_HH"] else dummy
    dcy = torch.empty(seq_len, batch, hidden, **f32) if consts["NORM_CELL"] else dummy
    norm_hh_gain, _, norm_cell_gain, norm_cell_bias = saved["norms"]
    dreset_h = dreset_c = dummy
    if resets is not None:
        dreset_h = torch.zeros(2, batch, hidden_out, **f32)
        if spec.mode == "lstm":
            dreset_c = torch.zeros(2, batch, hidden, **f32)
    reset_args = _reset_args(resets, reset_h, reset_c, dummy)
    weight_hh = weight_hh.contiguous()
    args = (
        weight_hh, weight_hh if weight_hr is None else weight_hr.contiguous(),
        dummy if lengths is None else lengths.contiguous(), _mask_arg(mask, dummy), *reset_args,
        *saved["regularizers"], norm_hh_gain, norm_cell_gain, norm_cell_bias, raw, craw, draw,
        dcy, hseq, saved["cseq"], saved["pre"], aux,
        grad_out.float().contiguous(), dhseq, dcseq, dgx, dghh, gaux, dreset_h, dreset_c,
    )
    columns = _phase_columns(mode, hidden, hidden_out, True, consts["NORM_HH"],
                             consts["NORM_CELL"])
    _launch(k.backward_kernel, args, (seq_len, batch, hidden, hidden_out), consts, len(columns),
            columns, seq_len, True, device)
    # Weight gradients: one matmul over all steps (masked steps hold zero gradients); with
    # layer norm, W_hh's from the gradient of its raw product.
    flat = (draw if consts["NORM_HH"] else dghh).reshape(-1, gate_size)
    h_prev = hseq[:seq_len]
    if resets is not None:  # the state each step starts from, by processing step
        codes, reset_h = reset_args[0], reset_args[1]
        codes = (codes.flip(0) if reverse else codes).unsqueeze(-1)
        h_prev = torch.where(codes == 1, reset_h, torch.where(codes == 2, hseq[0], h_prev))
    h_prev = h_prev.float()
    if saved["consts"]["HAS_DROPOUT"]:  # W_hh saw h_in = h_start * hidden_dropout
        h_prev = h_prev * saved["regularizers"][0]
    h_prev = h_prev.reshape(-1, hidden_out)
    if mode == k.GRU_BEFORE:
        grad_w_hh = torch.cat([
            flat[:, : 2 * hidden].T @ h_prev, flat[:, 2 * hidden:].T @ aux.reshape(-1, hidden)
        ])
    else:
        grad_w_hh = flat.T @ h_prev
    result = {
        "gates_x": dgx.flip(0) if reverse else dgx,
        "h0": dhseq[0],
        "c0": dcseq[0] if spec.mode == "lstm" else None,
        "weight_hh": grad_w_hh,
        "bias_hh": dghh.reshape(-1, gate_size).sum(0),
        "weight_hr": None,
        "reset_h": None,
        "reset_c": None,
    }
    if resets is not None:
        result["h0"] = result["h0"] + dreset_h[1]
        result["reset_h"] = dreset_h[0]
        if spec.mode == "lstm":
            result["c0"] = result["c0"] + dreset_c[1]
            result["reset_c"] = dreset_c[0]
    if mode == k.LSTM_PROJ:
        result["weight_hr"] = gaux.reshape(-1, hidden_out).T @ aux.reshape(-1, hidden)
    # The norms' gains and biases: sums over all steps of the gradient of LN(x) * gain + bias
    # (zero on skipped steps), against x's normalized values.
    for name, grad_y, x, on in (("norm_hh", dghh, raw, consts["NORM_HH"]),
                                ("norm_cell", dcy, craw, consts["NORM_CELL"])):
        if on:
            normalized = F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS)
            result[f"{name}_gain"] = (grad_y * normalized).sum((0, 1))
            result[f"{name}_bias"] = grad_y.sum((0, 1))
    return result


class TritonRecurrence(torch.autograd.Function):
    """One layer-direction through the triton kernels, with a triton backward.

    Outputs `(output, h_n)` or, for LSTM, `(output, h_n, c_n)`. When the backward itself
    is differentiated (`create_graph=True`) it recomputes through the reference path, so
    higher-order gradients stay exact.
    """

    @staticmethod
    def forward(ctx, spec, reverse, gates_x, h0, c0, weight_hh, bias_hh, weight_hr, lengths,
                resets, reset_h, reset_c, mask=None, carry_masked_output=False,
                hidden_dropout=None, zoneout_h=None, zoneout_c=None, norm_hh_gain=None,
                norm_hh_bias=None, norm_cell_gain=None, norm_cell_bias=None):
        norm_hh = None if norm_hh_gain is None else (norm_hh_gain, norm_hh_bias)
        norm_cell = None if norm_cell_gain is None else (norm_cell_gain, norm_cell_bias)
        saved = forward(spec, gates_x, h0, c0, weight_hh, bias_hh, weight_hr, lengths, reverse,
                        resets, reset_h, reset_c, mask, carry_masked_output, hidden_dropout,
                        zoneout_h, zoneout_c, norm_hh, norm_cell)
        ctx.spec, ctx.reverse = spec, reverse
        ctx.carry_masked_output = carry_masked_output
        # The masks are inputs without gradients; saved for double backward's reference run.
        ctx.masks = (hidden_dropout, zoneout_h, zoneout_c)
        optional = (c0, bias_hh, weight_hr, lengths, resets, reset_h, reset_c, mask,
                    norm_hh_gain, norm_hh_bias, norm_cell_gain, norm_cell_bias)
        ctx.has = [x is not None for x in optional]
        ctx.buffers = {key: saved[key] for key in ("mode", "consts", "regularizers", "norms",
                                                   "raw", "craw")}
        inputs = [x for x in (gates_x, h0, weight_hh, *optional) if x is not None]
        # Not the output itself: changing it in place must not break backward.
        ctx.save_for_backward(*inputs, saved["hseq"], saved["cseq"], saved["pre"], saved["aux"])
        seq_len = gates_x.shape[0]
        # Copies, so that changing h_n in place cannot corrupt what backward reads.
        h_n = saved["hseq"][seq_len].clone()
        if spec.mode == "lstm":
            c_n = saved["cseq"][seq_len].to(gates_x.dtype, copy=True)
            return saved["out"], h_n, c_n
        return saved["out"], h_n

    @staticmethod
    def backward(ctx, grad_out, grad_h, grad_c=None):
        tensors = list(ctx.saved_tensors)
        hseq, cseq, pre, aux = tensors[-4:]
        inputs = iter(tensors[:-4])
        gates_x, h0, weight_hh = next(inputs), next(inputs), next(inputs)
        (c0, bias_hh, weight_hr, lengths, resets, reset_h, reset_c, mask, *norms) = (
            next(inputs) if has else None for has in ctx.has)
        differentiable = (gates_x, h0, c0, weight_hh, bias_hh, weight_hr, reset_h, reset_c,
                          *norms)
        needs = (*ctx.needs_input_grad[2:8], *ctx.needs_input_grad[10:12],
                 *ctx.needs_input_grad[17:21])
        if torch.is_grad_enabled():
            grads = _reference_grads(ctx, differentiable, needs, lengths, resets, mask,
                                     grad_out, grad_h, grad_c)
        else:
            saved = {"hseq": hseq, "cseq": cseq, "pre": pre, "aux": aux,
                     **ctx.buffers}
            result = backward(ctx.spec, saved, weight_hh, weight_hr, lengths, ctx.reverse,
                              grad_out, grad_h, grad_c, resets, reset_h, reset_c, mask)
            names = ("gates_x", "h0", "c0", "weight_hh", "bias_hh", "weight_hr", "reset_h",
                     "reset_c", "norm_hh_gain", "norm_hh_bias", "norm_cell_gain",
                     "norm_cell_bias")
            grads = [
                None if tensor is None or not need else result[name].to(tensor.dtype)
                for name, tensor, need in zip(names, differentiable, needs)
            ]
        return (None, None, *grads[:6], None, None, *grads[6:8], None, None, None, None, None,
                *grads[8:])


def _reference_grads(ctx, inputs, needs, lengths, resets, mask, grad_out, grad_h, grad_c):
    """Gradients through the reference path, themselves differentiable (double backward)."""
    gates_x, h0, c0, weight_hh, bias_hh, weight_hr, reset_h, reset_c, *norms = inputs
    state = (h0,) if c0 is None else (h0, c0)
    reset_state = None
    if resets is not None:
        reset_state = (reset_h,) if reset_c is None else (reset_h, reset_c)
    hidden_dropout, zoneout_h, zoneout_c = ctx.masks
    output, final = reference.recurrence(ctx.spec, gates_x, state, weight_hh, bias_hh,
                                         weight_hr, lengths, ctx.reverse, resets, reset_state,
                                         mask, ctx.carry_masked_output,
                                         hidden_dropout=hidden_dropout, zoneout_h=zoneout_h,
                                         zoneout_c=zoneout_c,
                                         norm_hh=None if norms[0] is None else tuple(norms[:2]),
                                         norm_cell=None if norms[2] is None else tuple(norms[2:]))
    wanted = [i for i, (tensor, need) in enumerate(zip(inputs, needs))
              if tensor is not None and need]
    outputs = (output, *final)
    grad_outputs = (grad_out, grad_h) if c0 is None else (grad_out, grad_h, grad_c)
    found = torch.autograd.grad(outputs, [inputs[i] for i in wanted], grad_outputs,
                                create_graph=True, allow_unused=True)
    grads: list[Tensor | None] = [None] * len(inputs)
    for i, grad in zip(wanted, found):
        grads[i] = grad
    return grads


def recurrence(spec: CellSpec, gates_x: Tensor, state: tuple[Tensor, ...], weight_hh: Tensor,
               bias_hh: Tensor | None, weight_hr: Tensor | None, lengths: Tensor | None,
               reverse: bool, resets: Tensor | None = None,
               reset_state: tuple[Tensor, ...] | None = None, mask: Tensor | None = None,
               carry_masked_output: bool = False, *, hidden_dropout: Tensor | None = None,
               zoneout_h: Tensor | None = None, zoneout_c: Tensor | None = None,
               norm_hh: tuple[Tensor, Tensor] | None = None,
               norm_cell: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, ...]]:
    """[`rnnkit.ops.reference.recurrence`][]'s contract, served by the triton kernels."""
    if (resets is None) != (reset_state is None):
        raise ValueError("resets and reset_state go together")
    c0 = state[1] if len(state) > 1 else None
    reset_h = reset_c = None
    if reset_state is not None:
        reset_h = reset_state[0]
        reset_c = reset_state[1] if len(reset_state) > 1 else None
    results = TritonRecurrence.apply(spec, reverse, gates_x, state[0], c0, weight_hh, bias_hh,
                                     weight_hr, lengths, resets, reset_h, reset_c, mask,
                                     bool(carry_masked_output), hidden_dropout, zoneout_h,
                                     zoneout_c, *(norm_hh or (None, None)),
                                     *(norm_cell or (None, None)))
    return results[0], tuple(results[1:])
