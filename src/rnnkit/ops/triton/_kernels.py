"""The @triton.jit code of the triton backend: step phases, and the kernels that schedule them.

Layout of the buffers (all contiguous, `GH = G * H`, `s` is the processing index, `t`
the time index: `t = s`, or `T - 1 - s` when running in reverse):

- `gates_x` `(T, B, GH)` and `out` `(T, B, H_OUT)` are indexed by `t`;
- `hseq` `(T+1, B, H_OUT)` and `cseq` `(T+1, B, H)` hold the state carried into step
  `s` at `[s]` (`h0`/`c0` at `[0]`) and the final state at `[T]`; `pre`
  `(T, B, GH)` and `aux` `(T, B, H)` hold what backward needs, by `s`;
- in backward, `dhseq`/`dcseq` mirror `hseq`/`cseq`, and `dgx`/`dghh`
  `(T, B, GH)` receive the gradients of the input and recurrent pre-activations.

Holes (constexpr `HAS_MASK`): `mask` `(T, B)` int8, by `t`; a step runs where
`t < lengths[b]` (with `HAS_LENGTHS`) and `mask[t, b] != 0`, and is skipped otherwise
(state carried, output zero). With constexpr `CARRY_OUT` a skipped step outputs the carried
`h` instead, and backward adds that output's gradient to the carried state's.

State resets (constexpr `HAS_RESETS`): `resets` `(T, B)` int8 holds the codes by `t`,
`reset_h` `(B, H_OUT)` and `reset_c` `(B, H)` the state code 1 starts from. `hseq[s]`
stays the *carried* state (what an inactive step passes on); wherever a step reads its
previous state it reads the *start* state instead, selected per row from the code: the
carried state (0), `reset_h`/`reset_c` (1) or `hseq[0]`/`cseq[0]` (2). Backward
recomputes the same selection. At a reset row of an active step, the gradient of the start
state goes to `dreset_h` `(2, B, H_OUT)` / `dreset_c` `(2, B, H)` (plane 0: code 1,
plane 1: code 2; summed over steps, each tile by its one owner, so no atomics) and the carried
state gets none.

Issue 14's fields (constexpr switches, each off by default): `HAS_DROPOUT` multiplies the
start state by `hidden_dropout` `(B, H_OUT)` where it enters `W_hh` (and GRU_BEFORE's
`W_hn (r * h)`); `ZONE_H`/`ZONE_C` mix the new state with the start state after the cell
(`ZONE_MASK`: the masks `zoneout_h` `(T, B, H_OUT)` / `zoneout_c` `(T, B, H)` by
`t`; `ZONE_EXPECT`: the probability `zoneout_p`); `ACT` and `GATE` pick the cell's
activation and the gates' from the table. `NORM_HH` keeps the raw `W_hh h_in` in `raw`
`(T, B, GH)` and normalizes it with `nhg`/`nhb` a phase later (backward: `draw`, its
gradient); `NORM_CELL` keeps LSTM's new `c` in `craw` `(T, B, H)` and forms
`h = o * act(LN(c) * ncg + ncb)` a phase later (backward: `dcy`, the gradient of
`LN(c) * ncg + ncb`). The cell phase keeps each cell's gate math; the norms change only
where its recurrent gates come from and, for LSTM, the phase that forms `h`.

A *phase* is the part of a step that needs no other program's result of the same step. Each
phase is a loop over `(batch block, column block)` tiles, `for tile in range(pid, tiles,
nprog)`, so the same code runs one tile per program (one launch per step and phase) or many
tiles per program (one persistent launch for the whole sequence).

Only triton.language *builtins* are used, never its own `@triton.jit` helpers (`tl.cdiv`,
`tl.zeros`, ...): those are decorated when triton is imported, so if triton was imported
before `TRITON_INTERPRET=1` was set, the interpreter could not call them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rnnkit.ops.activations import CODES

# Cell modes (constexpr MODE).
RNN = 0
GRU_AFTER = 1  # reset_after=True: n = tanh(x_n + r * (W_hn h + b_hn))
GRU_BEFORE = 2  # reset_after=False: n = tanh(x_n + W_hn (r * h) + b_hn)
LSTM = 3
LSTM_PROJ = 4

# The same codes as constexpr globals, for use inside @triton.jit code.
MODE_RNN = tl.constexpr(RNN)
MODE_GRU_AFTER = tl.constexpr(GRU_AFTER)
MODE_GRU_BEFORE = tl.constexpr(GRU_BEFORE)
MODE_LSTM = tl.constexpr(LSTM)
MODE_LSTM_PROJ = tl.constexpr(LSTM_PROJ)

FORWARD_PHASES = {RNN: 1, GRU_AFTER: 1, GRU_BEFORE: 2, LSTM: 1, LSTM_PROJ: 2}
BACKWARD_PHASES = {RNN: 2, GRU_AFTER: 2, GRU_BEFORE: 3, LSTM: 2, LSTM_PROJ: 3}

# Named RNN activations (constexpr ACT): their codes come from rnnkit.ops.activations.TABLE.
ACT_TANH = tl.constexpr(CODES["tanh"])
ACT_RELU = tl.constexpr(CODES["relu"])
ACT_IDENTITY = tl.constexpr(CODES["identity"])
ACT_SIGMOID = tl.constexpr(CODES["sigmoid"])
ACT_SILU = tl.constexpr(CODES["silu"])
ACT_GELU = tl.constexpr(CODES["gelu"])
ACT_SOFTSIGN = tl.constexpr(CODES["softsign"])
ACT_HARDTANH = tl.constexpr(CODES["hardtanh"])
ACT_SOFTPLUS = tl.constexpr(CODES["softplus"])
ACT_HARD_SIGMOID = tl.constexpr(CODES["hard_sigmoid"])
# The activations _activate and _activate_grad have a formula for: RNN's nonlinearity, GRU's
# candidate and LSTM's cell activation (constexpr ACT), GRU/LSTM gates (constexpr GATE).
ACTIVATION_CODES = {
    name: CODES[name]
    for name in ("tanh", "relu", "identity", "sigmoid", "silu", "gelu", "softsign", "hardtanh",
                 "softplus", "hard_sigmoid")
}

# Zoneout of a state (constexpr ZONE_H, ZONE_C): none, the evaluation expectation with the
# probability zoneout_p, or the training masks (1 keeps the step's start state).
ZONE_NONE = tl.constexpr(0)
ZONE_EXPECT = tl.constexpr(1)
ZONE_MASK = tl.constexpr(2)

LAYER_NORM_EPS = tl.constexpr(1e-5)  # torch.nn.LayerNorm's, as rnnkit.ops.cell_math

# Synchronisation between phases (constexpr SYNC).
SYNC_NONE = tl.constexpr(0)  # one launch per phase: the launch boundary is the barrier
SYNC_PROGRAM = tl.constexpr(1)  # one persistent program: only its own threads need to agree
SYNC_GRID = tl.constexpr(2)  # several persistent programs: a grid-wide barrier (GPU only)


# --- elementwise math (exp-based, so the interpreter and the GPU run the same formulas) ---


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # Written with exp(-2|x|) so that it never overflows.
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x >= 0, y, -y)


@triton.jit
def _activate(x, ACT: tl.constexpr):
    if ACT == ACT_TANH:
        y = _tanh(x)
    elif ACT == ACT_RELU:
        y = tl.maximum(x, 0.0)
    elif ACT == ACT_IDENTITY:
        y = x
    elif ACT == ACT_SIGMOID:
        y = _sigmoid(x)
    elif ACT == ACT_SILU:
        y = x * _sigmoid(x)
    elif ACT == ACT_GELU:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == ACT_SOFTSIGN:
        y = x / (1.0 + tl.abs(x))
    elif ACT == ACT_HARDTANH:
        y = tl.minimum(tl.maximum(x, -1.0), 1.0)
    elif ACT == ACT_SOFTPLUS:  # linear past torch's threshold of 20
        y = tl.where(x > 20.0, x, tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x))))
    else:  # hard_sigmoid, Keras 3's clip(x / 6 + 1 / 2, 0, 1)
        y = tl.minimum(tl.maximum(x / 6.0 + 0.5, 0.0), 1.0)
    return y


@triton.jit
def _activate_grad(x, ACT: tl.constexpr):
    """d activation / dx at the pre-activation `x` (torch's conventions at the kinks)."""
    if ACT == ACT_TANH:
        y = _tanh(x)
        d = 1.0 - y * y
    elif ACT == ACT_RELU:
        d = tl.where(x > 0, 1.0, 0.0)
    elif ACT == ACT_IDENTITY:
        d = x * 0.0 + 1.0
    elif ACT == ACT_SIGMOID:
        y = _sigmoid(x)
        d = y * (1.0 - y)
    elif ACT == ACT_SILU:
        y = _sigmoid(x)
        d = y * (1.0 + x * (1.0 - y))
    elif ACT == ACT_GELU:
        cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
        d = cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == ACT_SOFTSIGN:
        a = 1.0 + tl.abs(x)
        d = 1.0 / (a * a)
    elif ACT == ACT_HARDTANH:
        d = tl.where((x > -1.0) & (x < 1.0), 1.0, 0.0)
    elif ACT == ACT_SOFTPLUS:
        d = tl.where(x > 20.0, 1.0, _sigmoid(x))
    else:  # hard_sigmoid
        d = tl.where((x > -3.0) & (x < 3.0), 1.0 / 6.0, 0.0)
    return d


# --- tiles, loads and the one matmul helper ---


@triton.jit
def _tile(tile, tiles_n, B, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_b = (tile // tiles_n) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_n = (tile % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    b_mask = offs_b < B
    n_mask = offs_n < N
    return offs_b, offs_n, b_mask, n_mask, b_mask[:, None] & n_mask[None, :]


@triton.jit
def _active(len_ptr, mk_ptr, t, B, offs_b, b_mask, HAS_LENGTHS: tl.constexpr,
            HAS_MASK: tl.constexpr):
    """`(BLOCK_B, 1)` mask: step `t` runs for sequence `b`.

    It runs when it lies inside the sequence (`t < lengths[b]`, with `HAS_LENGTHS`) and
    is not a hole of the mask (`mask[t, b] != 0`, with `HAS_MASK`).
    """
    if HAS_LENGTHS:
        lens = tl.load(len_ptr + offs_b, mask=b_mask, other=0)
        active = t < lens
    else:
        active = offs_b >= 0
    if HAS_MASK:
        keep = tl.load(mk_ptr + t * B + offs_b, mask=b_mask, other=0)
        active = active & (keep != 0)
    return active[:, None]


@triton.jit
def _codes(rs_ptr, t, B, offs_b, b_mask, HAS_RESETS: tl.constexpr):
    """`(BLOCK_B, 1)` int32 reset codes of time step `t` (zeros, unused, without resets)."""
    if HAS_RESETS:
        code = tl.load(rs_ptr + t * B + offs_b, mask=b_mask, other=0).to(tl.int32)
    else:
        code = offs_b * 0
    return code[:, None]


@triton.jit
def _start(prev_ptr, init_ptr, reset_ptr, code, row_stride, offs_b, offs_n, mask,
           HAS_RESETS: tl.constexpr):
    """A tile of the state a step starts from, in `prev_ptr`'s dtype.

    `prev_ptr` (the carried state), `init_ptr` (the initial state) and `reset_ptr` (the
    code-1 state) are row-major `(B, row_stride)` slabs; `code` is `(BLOCK_B, 1)`.
    Without resets this is the plain load of the carried state.
    """
    offs = offs_b[:, None] * row_stride + offs_n[None, :]
    if HAS_RESETS:
        fresh = code == 1
        first = code == 2
        x = tl.load(prev_ptr + offs, mask=mask & (code != 1) & (code != 2), other=0.0)
        x = tl.where(fresh, tl.load(reset_ptr + offs, mask=mask & fresh, other=0.0).to(x.dtype), x)
        x = tl.where(first, tl.load(init_ptr + offs, mask=mask & first, other=0.0).to(x.dtype), x)
    else:
        x = tl.load(prev_ptr + offs, mask=mask, other=0.0)
    return x


@triton.jit
def _add_reset_grad(acc_ptr, row_stride, B, code, active, offs_b, offs_n, mask, grad):
    """`acc[code - 1] += grad` on the active rows with code 1 or 2.

    `acc` is `(2, B, row_stride)` fp32. Steps run one after another and a tile has one
    owner in every step, so a plain load and store suffice, in a fixed order.
    """
    hit = mask & active & ((code == 1) | (code == 2))
    plane = tl.where(code == 2, 1, 0).to(tl.int64)
    ptrs = acc_ptr + plane * B * row_stride + offs_b[:, None] * row_stride + offs_n[None, :]
    tl.store(ptrs, tl.load(ptrs, mask=hit, other=0.0) + grad, mask=hit)


@triton.jit
def _load(ptr, row_stride, offs_b, offs_n, mask):
    """A `(BLOCK_B, BLOCK_N)` tile of a row-major `(B, row_stride)` slab, as fp32."""
    return tl.load(ptr + offs_b[:, None] * row_stride + offs_n[None, :], mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _keep(ptr, row_stride, offs_b, offs_n, mask, p, ZONE: tl.constexpr):
    """Zoneout's keep factor $m$ of a tile: the training mask (`ZONE_MASK`, a row-major
    `(B, row_stride)` slab) or the probability `p` itself (`ZONE_EXPECT`)."""
    if ZONE == ZONE_MASK:
        keep = _load(ptr, row_stride, offs_b, offs_n, mask)
    else:
        keep = p
    return keep


@triton.jit
def _store(ptr, row_stride, offs_b, offs_n, mask, value):
    tl.store(ptr + offs_b[:, None] * row_stride + offs_n[None, :],
             value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mm(a_ptr, a_stride, offs_b, b_mask, K, w_ptr, w_stride_k, w_stride_n, offs_n, n_mask,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PRECISION: tl.constexpr):
    """`acc[b, n] = sum_k A[b, k] W[k, n]` over `k < K`, accumulated in fp32 in a fixed order.

    `A` is row-major with row stride `a_stride`; `W[k, n]` lives at
    `w_ptr + k * w_stride_k + n * w_stride_n`, so one helper serves `h @ W_hh^T`
    (`w_stride_k=1`) and `dgates @ W_hh` (`w_stride_n=1`). `A` is cast to `W`'s dtype
    so fp16/bf16 weights use the tensor cores.
    """
    acc = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_b[:, None] * a_stride + offs_k[None, :],
                    mask=b_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * w_stride_k + offs_n[None, :] * w_stride_n,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _recurrent_gates(h_ptr, init_ptr, reset_ptr, code, hd_ptr, offs_b, b_mask, H_OUT, w_hh_ptr,
                     b_hh_ptr, H, offs_n, n_mask,
                     NUM_GATES: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESETS: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     PRECISION: tl.constexpr):
    """`h_in @ W_hh[g*H + n, :]^T + b_hh[g*H + n]` for gates `g < NUM_GATES` (at most 4).

    `h_in` is the start state (`_start`), times the recurrent-dropout multipliers
    `hidden_dropout` `(B, H_OUT)` with `HAS_DROPOUT`. One pass over `k` loads each
    block of `h_in` once for all gates. Gates past `NUM_GATES` come back as zeros.
    """
    acc0 = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    acc1 = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    acc2 = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    acc3 = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    gate_stride = H * H_OUT
    for k0 in range(0, H_OUT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H_OUT
        w_ptrs = w_hh_ptr + offs_k[:, None] + offs_n[None, :] * H_OUT
        w_mask = k_mask[:, None] & n_mask[None, :]
        w = tl.load(w_ptrs, mask=w_mask, other=0.0)
        hk_mask = b_mask[:, None] & k_mask[None, :]
        h = _start(h_ptr, init_ptr, reset_ptr, code, H_OUT, offs_b, offs_k, hk_mask, HAS_RESETS)
        if HAS_DROPOUT:
            h = h.to(tl.float32) * _load(hd_ptr, H_OUT, offs_b, offs_k, hk_mask)
        h = h.to(w.dtype)
        acc0 = tl.dot(h, w, acc0, input_precision=PRECISION)
        if NUM_GATES > 1:
            w = tl.load(w_ptrs + gate_stride, mask=w_mask, other=0.0)
            acc1 = tl.dot(h, w, acc1, input_precision=PRECISION)
        if NUM_GATES > 2:
            w = tl.load(w_ptrs + 2 * gate_stride, mask=w_mask, other=0.0)
            acc2 = tl.dot(h, w, acc2, input_precision=PRECISION)
        if NUM_GATES > 3:
            w = tl.load(w_ptrs + 3 * gate_stride, mask=w_mask, other=0.0)
            acc3 = tl.dot(h, w, acc3, input_precision=PRECISION)
    if HAS_BIAS:
        acc0, acc1, acc2, acc3 = _add_gate_bias(acc0, acc1, acc2, acc3, b_hh_ptr, H, offs_n,
                                                n_mask, NUM_GATES)
    return acc0, acc1, acc2, acc3


@triton.jit
def _add_gate_bias(acc0, acc1, acc2, acc3, b_hh_ptr, H, offs_n, n_mask,
                   NUM_GATES: tl.constexpr):
    """The accumulators of gates `g < NUM_GATES` plus `b_hh[g*H + n]`."""
    acc0 += tl.load(b_hh_ptr + offs_n, mask=n_mask, other=0.0)[None, :]
    if NUM_GATES > 1:
        acc1 += tl.load(b_hh_ptr + H + offs_n, mask=n_mask, other=0.0)[None, :]
    if NUM_GATES > 2:
        acc2 += tl.load(b_hh_ptr + 2 * H + offs_n, mask=n_mask, other=0.0)[None, :]
    if NUM_GATES > 3:
        acc3 += tl.load(b_hh_ptr + 3 * H + offs_n, mask=n_mask, other=0.0)[None, :]
    return acc0, acc1, acc2, acc3


@triton.jit
def _normed_gates(raw_ptr, gain_ptr, bias_ptr, b_hh_ptr, offs_b, b_mask, H, offs_n, n_mask, mask,
                  NUM_GATES: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """`LN(W_hh h_in) * gain + bias + b_hh` at `g*H + n` for gates `g < NUM_GATES`, the
    raw product `W_hh h_in` read from `raw` `(B, NUM_GATES*H)` and normalized over the
    whole row (as `_recurrent_gates`, gates past `NUM_GATES` are zeros)."""
    GH = NUM_GATES * H
    mean, rstd = _row_stats(raw_ptr, GH, offs_b, b_mask, GH, BLOCK_B, BLOCK_N)
    acc0 = _normed(raw_ptr, gain_ptr, bias_ptr, GH, offs_b, offs_n, mask, n_mask, mean, rstd)
    acc1 = acc0 * 0.0
    acc2 = acc0 * 0.0
    acc3 = acc0 * 0.0
    if NUM_GATES > 1:
        acc1 = _normed(raw_ptr + H, gain_ptr + H, bias_ptr + H, GH, offs_b, offs_n, mask, n_mask,
                       mean, rstd)
    if NUM_GATES > 2:
        acc2 = _normed(raw_ptr + 2 * H, gain_ptr + 2 * H, bias_ptr + 2 * H, GH, offs_b, offs_n,
                       mask, n_mask, mean, rstd)
    if NUM_GATES > 3:
        acc3 = _normed(raw_ptr + 3 * H, gain_ptr + 3 * H, bias_ptr + 3 * H, GH, offs_b, offs_n,
                       mask, n_mask, mean, rstd)
    if HAS_BIAS:
        acc0, acc1, acc2, acc3 = _add_gate_bias(acc0, acc1, acc2, acc3, b_hh_ptr, H, offs_n,
                                                n_mask, NUM_GATES)
    return acc0, acc1, acc2, acc3


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _row_sum(x):
    """`(BLOCK_B, 1)` sums of the rows of `x` (`tl.reduce` with this module's own
    combine function: `tl.sum` is one of triton's `@triton.jit` helpers)."""
    return tl.reduce(x, 1, _add)[:, None]


@triton.jit
def _row_stats(ptr, row_stride, offs_b, b_mask, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Mean and `1 / sqrt(var + 1e-5)` of the first `N` columns of each row, `(BLOCK_B,
    1)` each: layer norm's statistics (biased variance, as torch), in two passes."""
    total = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        total += _load(ptr, row_stride, offs_b, offs, b_mask[:, None] & (offs < N)[None, :])
    mean = _row_sum(total) / N
    total = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        tile_mask = b_mask[:, None] & (offs < N)[None, :]
        centered = tl.where(tile_mask, _load(ptr, row_stride, offs_b, offs, tile_mask) - mean, 0.0)
        total += centered * centered
    return mean, 1.0 / tl.sqrt(_row_sum(total) / N + LAYER_NORM_EPS)


@triton.jit
def _normed(x_ptr, gain_ptr, bias_ptr, row_stride, offs_b, offs_n, mask, n_mask, mean, rstd):
    """A tile of `LN(x) * gain + bias`, columns `offs_n` (the row statistics given)."""
    gain = tl.load(gain_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return (_load(x_ptr, row_stride, offs_b, offs_n, mask) - mean) * rstd * gain + bias


@triton.jit
def _norm_grad_stats(dy_ptr, x_ptr, gain_ptr, row_stride, offs_b, b_mask, N, mean, rstd,
                     BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr):
    """Row means of `dy * gain` and of `dy * gain * xhat`, `(BLOCK_B, 1)` each: what
    layer norm's backward subtracts."""
    total = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    total_x = tl.full((BLOCK_B, BLOCK_N), 0.0, dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs < N
        tile_mask = b_mask[:, None] & n_mask[None, :]
        gain = tl.load(gain_ptr + offs, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        dxhat = _load(dy_ptr, row_stride, offs_b, offs, tile_mask) * gain
        xhat = (_load(x_ptr, row_stride, offs_b, offs, tile_mask) - mean) * rstd
        total += dxhat
        total_x += tl.where(tile_mask, dxhat * xhat, 0.0)
    return _row_sum(total) / N, _row_sum(total_x) / N


@triton.jit
def _norm_grad(dy_ptr, x_ptr, gain_ptr, row_stride, offs_b, offs_n, mask, n_mask, mean, rstd,
               mean_dxhat, mean_dxhat_xhat):
    """A tile of layer norm's input gradient, `rstd * (dxhat - mean(dxhat) - xhat *
    mean(dxhat * xhat))` with `dxhat = dy * gain`."""
    gain = tl.load(gain_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    xhat = (_load(x_ptr, row_stride, offs_b, offs_n, mask) - mean) * rstd
    dxhat = _load(dy_ptr, row_stride, offs_b, offs_n, mask) * gain
    return rstd * (dxhat - mean_dxhat - xhat * mean_dxhat_xhat)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Wait until every program has arrived; `target` grows by `nprog` at each barrier.

    The counter only ever increases, so it needs no reset between barriers. Only the value
    reached matters, never the order of the additions, so results stay deterministic.
    """
    tl.debug_barrier()  # this program's stores happen before its arrival
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _sync(counter_ptr, nprog, count, SYNC: tl.constexpr):
    if SYNC == SYNC_GRID:
        _grid_barrier(counter_ptr, nprog * count)
    elif SYNC == SYNC_PROGRAM:
        tl.debug_barrier()


# --- forward ---


@triton.jit
def _forward_phase(
    PHASE: tl.constexpr, s, pid, nprog,
    gx_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, len_ptr, mk_ptr, rs_ptr, rh_ptr, rc_ptr,
    hd_ptr, zh_ptr, zc_ptr, zoneout_p, nhg_ptr, nhb_ptr, ncg_ptr, ncb_ptr, raw_ptr, craw_ptr,
    hseq_ptr, cseq_ptr, out_ptr, pre_ptr, aux_ptr,
    T, B, H, H_OUT,
    MODE: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, G: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr, CARRY_OUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    NORM_HH: tl.constexpr, NORM_CELL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    if REVERSE:
        t = T - 1 - s
    else:
        t = s
    GH = G * H
    # The phases of a step (see forward_phases): [raw W_hh h_in, with NORM_HH], the gates and
    # the cell, [h = o * act(LN(c)), with NORM_CELL], [GRU_BEFORE's candidate or LSTM_PROJ's
    # W_hr]; the last one writes h.
    CELL: tl.constexpr = 1 if NORM_HH else 0
    CELL_OUT: tl.constexpr = CELL + 1 if NORM_CELL else CELL
    SECOND: tl.constexpr = CELL_OUT + 1
    TWO_PHASES: tl.constexpr = MODE == MODE_GRU_BEFORE or MODE == MODE_LSTM_PROJ
    WRITE_H: tl.constexpr = PHASE == (SECOND if TWO_PHASES else CELL_OUT)
    # LSTM_PROJ's projection produces h (H_OUT columns); every other phase H columns.
    if MODE == MODE_LSTM_PROJ and PHASE == SECOND:
        N = H_OUT
    else:
        N = H
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    tiles = (B + BLOCK_B - 1) // BLOCK_B * tiles_n
    h_prev = hseq_ptr + s * B * H_OUT
    h_next = hseq_ptr + (s + 1) * B * H_OUT
    gx = gx_ptr + t * B * GH
    pre = pre_ptr + s * B * GH
    aux = aux_ptr + s * B * H
    out = out_ptr + t * B * H_OUT
    raw = raw_ptr + s * B * GH
    craw = craw_ptr + s * B * H
    for tile in range(pid, tiles, nprog):
        offs_b, offs_n, b_mask, n_mask, mask = _tile(tile, tiles_n, B, N, BLOCK_B, BLOCK_N)
        active = _active(len_ptr, mk_ptr, t, B, offs_b, b_mask, HAS_LENGTHS, HAS_MASK)
        code = _codes(rs_ptr, t, B, offs_b, b_mask, HAS_RESETS)
        if NORM_HH and PHASE == 0:
            # The raw recurrent product of every gate this tile owns, normalized next phase.
            hh0, hh1, hh2, hh3 = _recurrent_gates(
                h_prev, hseq_ptr, rh_ptr, code, hd_ptr, offs_b, b_mask, H_OUT, w_hh_ptr,
                b_hh_ptr, H, offs_n, n_mask, G, False, HAS_RESETS, HAS_DROPOUT,
                BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
            _store(raw, GH, offs_b, offs_n, mask, hh0)
            _store(raw + H, GH, offs_b, offs_n, mask, hh1)
            if G > 2:
                _store(raw + 2 * H, GH, offs_b, offs_n, mask, hh2)
            if G > 3:
                _store(raw + 3 * H, GH, offs_b, offs_n, mask, hh3)
        elif MODE == MODE_LSTM_PROJ and PHASE == SECOND:
            # h = W_hr m, m = o * act(c) from phase 0.
            h_new = _mm(aux, H, offs_b, b_mask, H, w_hr_ptr, 1, H, offs_n, n_mask,
                        BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
        elif MODE == MODE_GRU_BEFORE and PHASE == SECOND:
            # n = act(x_n + W_hn (r * h_in) + b_hn), r * h_in from phase 0.
            n_pre = _load(gx + 2 * H, GH, offs_b, offs_n, mask) + _mm(
                aux, H, offs_b, b_mask, H, w_hh_ptr + 2 * H * H_OUT, 1, H_OUT, offs_n, n_mask,
                BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
            if HAS_BIAS:
                n_pre += tl.load(b_hh_ptr + 2 * H + offs_n, mask=n_mask, other=0.0)[None, :]
            _store(pre + 2 * H, GH, offs_b, offs_n, mask, n_pre)
            update = _activate(_load(pre + H, GH, offs_b, offs_n, mask), GATE)
            h_old = _start(h_prev, hseq_ptr, rh_ptr, code, H_OUT, offs_b, offs_n, mask,
                           HAS_RESETS).to(tl.float32)
            h_new = (1.0 - update) * _activate(n_pre, ACT) + update * h_old
        elif NORM_CELL and PHASE == CELL_OUT:
            # h = o * act(LN(c) * gain + bias), c from the cell phase (carried unnormalized).
            mean, rstd = _row_stats(craw, H, offs_b, b_mask, H, BLOCK_B, BLOCK_N)
            shown = _normed(craw, ncg_ptr, ncb_ptr, H, offs_b, offs_n, mask, n_mask, mean, rstd)
            h_new = _activate(_load(pre + 3 * H, GH, offs_b, offs_n, mask), GATE) * _activate(
                shown, ACT)
            if MODE == MODE_LSTM_PROJ:
                _store(aux, H, offs_b, offs_n, mask, h_new)
        else:
            # The cell phase: the recurrent gates this tile owns (the matmul, or the layer norm
            # of the raw product), then the cell math.
            NUM_GATES: tl.constexpr = 2 if MODE == MODE_GRU_BEFORE else G
            if NORM_HH:
                hh0, hh1, hh2, hh3 = _normed_gates(
                    raw, nhg_ptr, nhb_ptr, b_hh_ptr, offs_b, b_mask, H, offs_n, n_mask, mask,
                    NUM_GATES, HAS_BIAS, BLOCK_B, BLOCK_N)
            else:
                hh0, hh1, hh2, hh3 = _recurrent_gates(
                    h_prev, hseq_ptr, rh_ptr, code, hd_ptr, offs_b, b_mask, H_OUT, w_hh_ptr,
                    b_hh_ptr, H, offs_n, n_mask, NUM_GATES, HAS_BIAS, HAS_RESETS, HAS_DROPOUT,
                    BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
            a0 = _load(gx, GH, offs_b, offs_n, mask) + hh0
            _store(pre, GH, offs_b, offs_n, mask, a0)
            if MODE == MODE_RNN:
                h_new = _activate(a0, ACT)
            else:
                a1 = _load(gx + H, GH, offs_b, offs_n, mask) + hh1
                _store(pre + H, GH, offs_b, offs_n, mask, a1)
                if MODE == MODE_GRU_BEFORE:
                    h_in = _start(h_prev, hseq_ptr, rh_ptr, code, H_OUT, offs_b, offs_n, mask,
                                  HAS_RESETS).to(tl.float32)
                    if HAS_DROPOUT:
                        h_in = h_in * _load(hd_ptr, H_OUT, offs_b, offs_n, mask)
                    _store(aux, H, offs_b, offs_n, mask, _activate(a0, GATE) * h_in)
                elif MODE == MODE_GRU_AFTER:
                    # hh2 is W_hn h_in + b_hn, kept for the reset gate's gradient.
                    _store(aux, H, offs_b, offs_n, mask, hh2)
                    n_pre = _load(gx + 2 * H, GH, offs_b, offs_n, mask) + _activate(a0, GATE) * hh2
                    _store(pre + 2 * H, GH, offs_b, offs_n, mask, n_pre)
                    update = _activate(a1, GATE)
                    h_old = _start(h_prev, hseq_ptr, rh_ptr, code, H_OUT, offs_b, offs_n, mask,
                                   HAS_RESETS).to(tl.float32)
                    h_new = (1.0 - update) * _activate(n_pre, ACT) + update * h_old
                else:
                    a2 = _load(gx + 2 * H, GH, offs_b, offs_n, mask) + hh2
                    a3 = _load(gx + 3 * H, GH, offs_b, offs_n, mask) + hh3
                    _store(pre + 2 * H, GH, offs_b, offs_n, mask, a2)
                    _store(pre + 3 * H, GH, offs_b, offs_n, mask, a3)
                    c_old = _start(cseq_ptr + s * B * H, cseq_ptr, rc_ptr, code, H, offs_b, offs_n,
                                   mask, HAS_RESETS).to(tl.float32)
                    c_new = _activate(a1, GATE) * c_old + _activate(a0, GATE) * _activate(a2, ACT)
                    if NORM_CELL:  # h in the next phase, from the whole row of c
                        _store(craw, H, offs_b, offs_n, mask, c_new)
                    else:
                        h_new = _activate(a3, GATE) * _activate(c_new, ACT)
                        if MODE == MODE_LSTM_PROJ:
                            _store(aux, H, offs_b, offs_n, mask, h_new)
                    if ZONE_C != ZONE_NONE:  # after the cell: h above saw the new c
                        keep = _keep(zc_ptr + t * B * H, H, offs_b, offs_n, mask, zoneout_p,
                                     ZONE_C)
                        c_new = keep * c_old + (1.0 - keep) * c_new
                    if HAS_RESETS:  # an inactive step carries the state it was given
                        c_keep = _load(cseq_ptr + s * B * H, H, offs_b, offs_n, mask)
                    else:
                        c_keep = c_old
                    _store(cseq_ptr + (s + 1) * B * H, H, offs_b, offs_n, mask,
                           tl.where(active, c_new, c_keep))
        if WRITE_H:
            if ZONE_H != ZONE_NONE:  # against the state the step started from
                keep = _keep(zh_ptr + t * B * H_OUT, H_OUT, offs_b, offs_n, mask, zoneout_p,
                             ZONE_H)
                h_start = _start(h_prev, hseq_ptr, rh_ptr, code, H_OUT, offs_b, offs_n, mask,
                                 HAS_RESETS).to(tl.float32)
                h_new = keep * h_start + (1.0 - keep) * h_new
            h_keep = tl.load(h_prev + offs_b[:, None] * H_OUT + offs_n[None, :], mask=mask)
            h_cast = h_new.to(h_keep.dtype)
            tl.store(h_next + offs_b[:, None] * H_OUT + offs_n[None, :],
                     tl.where(active, h_cast, h_keep), mask=mask)
            if CARRY_OUT:  # a skipped step outputs the state it carries
                skipped = h_keep
            else:
                skipped = 0.0
            tl.store(out + offs_b[:, None] * H_OUT + offs_n[None, :],
                     tl.where(active, h_cast, skipped).to(h_cast.dtype), mask=mask)


# step_start changes every launch of the step schedule: one compiled variant serves all.
@triton.jit(do_not_specialize=["step_start"])
def forward_kernel(
    gx_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, len_ptr, mk_ptr, rs_ptr, rh_ptr, rc_ptr,
    hd_ptr, zh_ptr, zc_ptr, zoneout_p, nhg_ptr, nhb_ptr, ncg_ptr, ncb_ptr, raw_ptr, craw_ptr,
    hseq_ptr, cseq_ptr, out_ptr, pre_ptr, aux_ptr, counter_ptr,
    T, B, H, H_OUT, step_start, num_steps,
    MODE: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, G: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr,
    HAS_RESETS: tl.constexpr, HAS_MASK: tl.constexpr, CARRY_OUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    NORM_HH: tl.constexpr, NORM_CELL: tl.constexpr,
    PHASE_FIRST: tl.constexpr, PHASE_LAST: tl.constexpr, SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Steps `step_start .. step_start + num_steps - 1`, phases `PHASE_FIRST..PHASE_LAST`.

    One launch per step and phase: `num_steps=1`, `PHASE_FIRST == PHASE_LAST`,
    `SYNC_NONE`. Persistent: `num_steps=T`, every phase, `SYNC_PROGRAM` or `SYNC_GRID`.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for i in range(num_steps):
        s = (step_start + i).to(tl.int64)  # 64-bit offsets for long, wide sequences
        for phase in tl.static_range(PHASE_FIRST, PHASE_LAST + 1):
            _forward_phase(
                phase, s, pid, nprog,
                gx_ptr, w_hh_ptr, b_hh_ptr, w_hr_ptr, len_ptr, mk_ptr, rs_ptr, rh_ptr, rc_ptr,
                hd_ptr, zh_ptr, zc_ptr, zoneout_p, nhg_ptr, nhb_ptr, ncg_ptr, ncb_ptr, raw_ptr,
                craw_ptr, hseq_ptr, cseq_ptr, out_ptr, pre_ptr, aux_ptr,
                T, B, H, H_OUT,
                MODE, ACT, GATE, G, HAS_BIAS, HAS_LENGTHS, REVERSE, HAS_RESETS, HAS_MASK,
                CARRY_OUT, HAS_DROPOUT, ZONE_H, ZONE_C, NORM_HH, NORM_CELL,
                BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
            )
            _sync(counter_ptr, nprog, i * (PHASE_LAST - PHASE_FIRST + 1) + phase - PHASE_FIRST + 1,
                  SYNC)


# --- backward ---


@triton.jit
def _cell_grad_h(s, t, B, H, H_OUT, w_hr_ptr, dhseq_ptr, dout_ptr, gaux_ptr, zh_ptr, zoneout_p,
                 offs_b, b_mask, offs_n, n_mask, mask,
                 MODE: tl.constexpr, ZONE_H: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 PRECISION: tl.constexpr):
    """The gradient of the cell's own `h` (before zoneout; LSTM_PROJ: of `o * act(c)`)."""
    if MODE == MODE_LSTM_PROJ:
        grad_h = _mm(gaux_ptr + s * B * H_OUT, H_OUT, offs_b, b_mask, H_OUT, w_hr_ptr, H, 1,
                     offs_n, n_mask, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
    else:
        grad_h = _load(dhseq_ptr + (s + 1) * B * H_OUT, H_OUT, offs_b, offs_n, mask) + _load(
            dout_ptr + t * B * H_OUT, H_OUT, offs_b, offs_n, mask)
        if ZONE_H != ZONE_NONE:
            grad_h = grad_h * (1.0 - _keep(zh_ptr + t * B * H_OUT, H_OUT, offs_b, offs_n, mask,
                                           zoneout_p, ZONE_H))
    return grad_h


@triton.jit
def _backward_phase(
    PHASE: tl.constexpr, s, pid, nprog,
    w_hh_ptr, w_hr_ptr, len_ptr, mk_ptr, rs_ptr, rh_ptr, rc_ptr,
    hd_ptr, zh_ptr, zc_ptr, zoneout_p, nhg_ptr, ncg_ptr, ncb_ptr, raw_ptr, craw_ptr, draw_ptr,
    dcy_ptr, hseq_ptr, cseq_ptr, pre_ptr, aux_ptr,
    dout_ptr, dhseq_ptr, dcseq_ptr, dgx_ptr, dghh_ptr, gaux_ptr, drh_ptr, drc_ptr,
    T, B, H, H_OUT,
    MODE: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, G: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESETS: tl.constexpr,
    HAS_MASK: tl.constexpr, CARRY_OUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    NORM_HH: tl.constexpr, NORM_CELL: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    if REVERSE:
        t = T - 1 - s
    else:
        t = s
    GH = G * H
    # The phases of a step, backward (see phase_columns): [LSTM_PROJ: the gradient of W_hr's
    # output], [NORM_CELL: the gradient of LN(c) and of o], the cell's gradients,
    # [GRU_BEFORE: through W_hn (r * h_in)], [NORM_HH: through LN(W_hh h_in)], dh_prev.
    CELL: tl.constexpr = (1 if MODE == MODE_LSTM_PROJ else 0) + (1 if NORM_CELL else 0)
    LAST: tl.constexpr = PHASE == (
        CELL + 1 + (1 if MODE == MODE_GRU_BEFORE else 0) + (1 if NORM_HH else 0))
    # The last phase and LSTM_PROJ's first produce H_OUT columns; the others H columns.
    if LAST or (MODE == MODE_LSTM_PROJ and PHASE == 0):
        N = H_OUT
    else:
        N = H
    tiles_n = (N + BLOCK_N - 1) // BLOCK_N
    tiles = (B + BLOCK_B - 1) // BLOCK_B * tiles_n
    dh_next = dhseq_ptr + (s + 1) * B * H_OUT
    dh_prev = dhseq_ptr + s * B * H_OUT
    dout = dout_ptr + t * B * H_OUT
    pre = pre_ptr + s * B * GH
    aux = aux_ptr + s * B * H
    gaux = gaux_ptr + s * B * H_OUT
    dgx = dgx_ptr + s * B * GH
    dghh = dghh_ptr + s * B * GH
    zh = zh_ptr + t * B * H_OUT
    raw = raw_ptr + s * B * GH
    craw = craw_ptr + s * B * H
    draw = draw_ptr + s * B * GH
    dcy = dcy_ptr + s * B * H
    for tile in range(pid, tiles, nprog):
        offs_b, offs_n, b_mask, n_mask, mask = _tile(tile, tiles_n, B, N, BLOCK_B, BLOCK_N)
        active = _active(len_ptr, mk_ptr, t, B, offs_b, b_mask, HAS_LENGTHS, HAS_MASK)
        code = _codes(rs_ptr, t, B, offs_b, b_mask, HAS_RESETS)
        if LAST:
            carry = _load(dh_next, H_OUT, offs_b, offs_n, mask)
            grad_out = _load(dout, H_OUT, offs_b, offs_n, mask)
            grad_h = carry + grad_out  # of the step's h (after zoneout), where it ran
            # dh_prev = (dgates_hh @ W_hh) * hidden_dropout, plus the direct terms (GRU's
            # update mix, zoneout's kept part), or the carry when idle.
            if MODE == MODE_GRU_BEFORE:
                K = 2 * H
            else:
                K = GH
            if NORM_HH:  # the gradient of the raw product, from the phase before
                d_raw = draw
            else:
                d_raw = dghh
            dh = _mm(d_raw, GH, offs_b, b_mask, K, w_hh_ptr, H_OUT, 1, offs_n, n_mask,
                     BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
            if MODE == MODE_GRU_BEFORE:
                dh += _load(gaux, H_OUT, offs_b, offs_n, mask)  # through W_hn (r * h_in)
            if HAS_DROPOUT:
                dh = dh * _load(hd_ptr, H_OUT, offs_b, offs_n, mask)
            if ZONE_H != ZONE_NONE:
                keep = _keep(zh, H_OUT, offs_b, offs_n, mask, zoneout_p, ZONE_H)
                dh += grad_h * keep
                grad_h = grad_h * (1.0 - keep)  # what reaches the cell's own h
            if MODE == MODE_GRU_AFTER or MODE == MODE_GRU_BEFORE:
                dh += grad_h * _activate(_load(pre + H, GH, offs_b, offs_n, mask), GATE)
            if HAS_RESETS:  # a reset row's start state is not the carried one
                _add_reset_grad(drh_ptr, H_OUT, B, code, active, offs_b, offs_n, mask, dh)
                dh = tl.where((code == 1) | (code == 2), 0.0, dh)
            if CARRY_OUT:  # a skipped step's output is the carried state itself
                carry += grad_out
            _store(dh_prev, H_OUT, offs_b, offs_n, mask, tl.where(active, dh, carry))
        elif MODE == MODE_LSTM_PROJ and PHASE == 0:
            grad_h = _load(dh_next, H_OUT, offs_b, offs_n, mask) + _load(
                dout, H_OUT, offs_b, offs_n, mask)
            if ZONE_H != ZONE_NONE:
                grad_h = grad_h * (1.0 - _keep(zh, H_OUT, offs_b, offs_n, mask, zoneout_p, ZONE_H))
            _store(gaux, H_OUT, offs_b, offs_n, mask, tl.where(active, grad_h, 0.0))
        elif NORM_HH and PHASE == CELL + 1:
            # Through the layer norm of W_hh h_in: every gate of this tile's columns.
            mean, rstd = _row_stats(raw, GH, offs_b, b_mask, GH, BLOCK_B, BLOCK_N)
            mean_dxhat, mean_dxhat_xhat = _norm_grad_stats(
                dghh, raw, nhg_ptr, GH, offs_b, b_mask, GH, mean, rstd, BLOCK_B, BLOCK_N)
            for g in tl.static_range(G):
                _store(draw + g * H, GH, offs_b, offs_n, mask, _norm_grad(
                    dghh + g * H, raw + g * H, nhg_ptr + g * H, GH, offs_b, offs_n, mask, n_mask,
                    mean, rstd, mean_dxhat, mean_dxhat_xhat))
        elif NORM_CELL and PHASE == CELL - 1:
            # h = o * act(y), y = LN(c) * gain + bias: the gradients of y (kept for the next
            # phase's row sums) and of o.
            grad_h = _cell_grad_h(s, t, B, H, H_OUT, w_hr_ptr, dhseq_ptr, dout_ptr, gaux_ptr,
                                  zh_ptr, zoneout_p, offs_b, b_mask, offs_n, n_mask, mask,
                                  MODE, ZONE_H, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
            mean, rstd = _row_stats(craw, H, offs_b, b_mask, H, BLOCK_B, BLOCK_N)
            shown = _normed(craw, ncg_ptr, ncb_ptr, H, offs_b, offs_n, mask, n_mask, mean, rstd)
            o_pre = _load(pre + 3 * H, GH, offs_b, offs_n, mask)
            d_shown = grad_h * _activate(o_pre, GATE) * _activate_grad(shown, ACT)
            d_o = grad_h * _activate(shown, ACT) * _activate_grad(o_pre, GATE)
            _store(dcy, H, offs_b, offs_n, mask, tl.where(active, d_shown, 0.0))
            _store(dgx + 3 * H, GH, offs_b, offs_n, mask, tl.where(active, d_o, 0.0))
        elif MODE == MODE_GRU_BEFORE and PHASE == CELL + 1:
            # d(r*h_in) = dn_pre @ W_hn; then the reset gate, and d(r*h_in) * r towards dh_prev.
            d_rh = _mm(dghh + 2 * H, GH, offs_b, b_mask, H, w_hh_ptr + 2 * H * H_OUT, H_OUT, 1,
                       offs_n, n_mask, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
            r_pre = _load(pre, GH, offs_b, offs_n, mask)
            h_in = _start(hseq_ptr + s * B * H_OUT, hseq_ptr, rh_ptr, code, H_OUT, offs_b, offs_n,
                          mask, HAS_RESETS).to(tl.float32)
            if HAS_DROPOUT:
                h_in = h_in * _load(hd_ptr, H_OUT, offs_b, offs_n, mask)
            d_reset = tl.where(active, d_rh * h_in * _activate_grad(r_pre, GATE), 0.0)
            _store(dgx, GH, offs_b, offs_n, mask, d_reset)
            _store(dghh, GH, offs_b, offs_n, mask, d_reset)
            _store(gaux, H_OUT, offs_b, offs_n, mask, d_rh * _activate(r_pre, GATE))
        else:
            # The cell's own gradients: H columns, all elementwise. grad_h is the gradient of
            # the cell's h, before zoneout (with NORM_CELL, the phase before used it).
            if not NORM_CELL:
                grad_h = _cell_grad_h(s, t, B, H, H_OUT, w_hr_ptr, dhseq_ptr, dout_ptr, gaux_ptr,
                                      zh_ptr, zoneout_p, offs_b, b_mask, offs_n, n_mask, mask,
                                      MODE, ZONE_H, BLOCK_B, BLOCK_N, BLOCK_K, PRECISION)
            if MODE == MODE_RNN:
                d_a = grad_h * _activate_grad(_load(pre, GH, offs_b, offs_n, mask), ACT)
                _store(dgx, GH, offs_b, offs_n, mask, tl.where(active, d_a, 0.0))
            elif MODE == MODE_GRU_AFTER or MODE == MODE_GRU_BEFORE:
                r_pre = _load(pre, GH, offs_b, offs_n, mask)
                z_pre = _load(pre + H, GH, offs_b, offs_n, mask)
                n_pre = _load(pre + 2 * H, GH, offs_b, offs_n, mask)
                update = _activate(z_pre, GATE)
                cand = _activate(n_pre, ACT)
                h_old = _start(hseq_ptr + s * B * H_OUT, hseq_ptr, rh_ptr, code, H_OUT, offs_b,
                               offs_n, mask, HAS_RESETS).to(tl.float32)
                d_update = tl.where(active, grad_h * (h_old - cand) * _activate_grad(z_pre, GATE),
                                    0.0)
                d_cand = tl.where(active, grad_h * (1.0 - update) * _activate_grad(n_pre, ACT),
                                  0.0)
                _store(dgx + H, GH, offs_b, offs_n, mask, d_update)
                _store(dgx + 2 * H, GH, offs_b, offs_n, mask, d_cand)
                _store(dghh + H, GH, offs_b, offs_n, mask, d_update)
                if MODE == MODE_GRU_AFTER:
                    hn = _load(aux, H, offs_b, offs_n, mask)
                    d_reset = d_cand * hn * _activate_grad(r_pre, GATE)
                    _store(dgx, GH, offs_b, offs_n, mask, d_reset)
                    _store(dghh, GH, offs_b, offs_n, mask, d_reset)
                    _store(dghh + 2 * H, GH, offs_b, offs_n, mask,
                           d_cand * _activate(r_pre, GATE))
                else:
                    _store(dghh + 2 * H, GH, offs_b, offs_n, mask, d_cand)
            else:
                i_pre = _load(pre, GH, offs_b, offs_n, mask)
                f_pre = _load(pre + H, GH, offs_b, offs_n, mask)
                g_pre = _load(pre + 2 * H, GH, offs_b, offs_n, mask)
                o_pre = _load(pre + 3 * H, GH, offs_b, offs_n, mask)
                a_i = _activate(i_pre, GATE)
                a_f = _activate(f_pre, GATE)
                a_g = _activate(g_pre, ACT)
                c_old = _start(cseq_ptr + s * B * H, cseq_ptr, rc_ptr, code, H, offs_b, offs_n,
                               mask, HAS_RESETS).to(tl.float32)
                # dc_carry is the gradient of the carried c (after zoneout).
                dc_carry = _load(dcseq_ptr + (s + 1) * B * H, H, offs_b, offs_n, mask)
                if ZONE_C != ZONE_NONE:
                    keep_c = _keep(zc_ptr + t * B * H, H, offs_b, offs_n, mask, zoneout_p, ZONE_C)
                    dc = dc_carry * (1.0 - keep_c)
                else:
                    dc = dc_carry
                if NORM_CELL:  # through LN(c); o's gradient came from the phase before
                    mean, rstd = _row_stats(craw, H, offs_b, b_mask, H, BLOCK_B, BLOCK_N)
                    mean_dxhat, mean_dxhat_xhat = _norm_grad_stats(
                        dcy, craw, ncg_ptr, H, offs_b, b_mask, H, mean, rstd, BLOCK_B, BLOCK_N)
                    dc = dc + _norm_grad(dcy, craw, ncg_ptr, H, offs_b, offs_n, mask, n_mask, mean,
                                         rstd, mean_dxhat, mean_dxhat_xhat)
                else:
                    c_new = a_f * c_old + a_i * a_g
                    dc = dc + grad_h * _activate(o_pre, GATE) * _activate_grad(c_new, ACT)
                    d_o = grad_h * _activate(c_new, ACT) * _activate_grad(o_pre, GATE)
                    _store(dgx + 3 * H, GH, offs_b, offs_n, mask, tl.where(active, d_o, 0.0))
                d_i = tl.where(active, dc * a_g * _activate_grad(i_pre, GATE), 0.0)
                d_f = tl.where(active, dc * c_old * _activate_grad(f_pre, GATE), 0.0)
                d_g = tl.where(active, dc * a_i * _activate_grad(g_pre, ACT), 0.0)
                _store(dgx, GH, offs_b, offs_n, mask, d_i)
                _store(dgx + H, GH, offs_b, offs_n, mask, d_f)
                _store(dgx + 2 * H, GH, offs_b, offs_n, mask, d_g)
                dc_prev = dc * a_f
                if ZONE_C != ZONE_NONE:
                    dc_prev += dc_carry * keep_c
                if HAS_RESETS:
                    _add_reset_grad(drc_ptr, H, B, code, active, offs_b, offs_n, mask, dc_prev)
                    dc_prev = tl.where((code == 1) | (code == 2), 0.0, dc_prev)
                _store(dcseq_ptr + s * B * H, H, offs_b, offs_n, mask,
                       tl.where(active, dc_prev, dc_carry))


@triton.jit(do_not_specialize=["step_start"])
def backward_kernel(
    w_hh_ptr, w_hr_ptr, len_ptr, mk_ptr, rs_ptr, rh_ptr, rc_ptr, hd_ptr, zh_ptr, zc_ptr,
    zoneout_p, nhg_ptr, ncg_ptr, ncb_ptr, raw_ptr, craw_ptr, draw_ptr, dcy_ptr,
    hseq_ptr, cseq_ptr, pre_ptr, aux_ptr,
    dout_ptr, dhseq_ptr, dcseq_ptr, dgx_ptr, dghh_ptr, gaux_ptr, drh_ptr, drc_ptr, counter_ptr,
    T, B, H, H_OUT, step_start, num_steps,
    MODE: tl.constexpr, ACT: tl.constexpr, GATE: tl.constexpr, G: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, REVERSE: tl.constexpr, HAS_RESETS: tl.constexpr,
    HAS_MASK: tl.constexpr, CARRY_OUT: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, ZONE_H: tl.constexpr, ZONE_C: tl.constexpr,
    NORM_HH: tl.constexpr, NORM_CELL: tl.constexpr,
    PHASE_FIRST: tl.constexpr, PHASE_LAST: tl.constexpr, SYNC: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Backward through processing steps `step_start` down to `step_start - num_steps + 1`."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    for i in range(num_steps):
        s = (step_start - i).to(tl.int64)
        for phase in tl.static_range(PHASE_FIRST, PHASE_LAST + 1):
            _backward_phase(
                phase, s, pid, nprog,
                w_hh_ptr, w_hr_ptr, len_ptr, mk_ptr, rs_ptr, rh_ptr, rc_ptr,
                hd_ptr, zh_ptr, zc_ptr, zoneout_p, nhg_ptr, ncg_ptr, ncb_ptr, raw_ptr, craw_ptr,
                draw_ptr, dcy_ptr, hseq_ptr, cseq_ptr, pre_ptr, aux_ptr,
                dout_ptr, dhseq_ptr, dcseq_ptr, dgx_ptr, dghh_ptr, gaux_ptr, drh_ptr, drc_ptr,
                T, B, H, H_OUT,
                MODE, ACT, GATE, G, HAS_LENGTHS, REVERSE, HAS_RESETS, HAS_MASK, CARRY_OUT,
                HAS_DROPOUT, ZONE_H, ZONE_C, NORM_HH, NORM_CELL,
                BLOCK_B, BLOCK_N, BLOCK_K, PRECISION,
            )
            _sync(counter_ptr, nprog, i * (PHASE_LAST - PHASE_FIRST + 1) + phase - PHASE_FIRST + 1,
                  SYNC)
