"""Mixed precision: torch.autocast("cpu", dtype=torch.bfloat16).

Under autocast the input projection runs in bf16 (autocast's own rule for linear) and the
recurrence runs wholly in bf16, state included, as torch.nn.LSTM does on CPU. Results are held
to the fp32 run of the same module, which the parity tests hold to torch.nn:
outputs and final states within 0.02 absolute (bf16 keeps 8 bits of mantissa and the error
grows with the number of steps; measured worst 0.0066 at T=10, H=8), parameter gradients within
0.03 of max(1, largest fp32 gradient) (measured worst 0.011).
"""

from __future__ import annotations

import pytest
import torch

import rnnkit

TOLERANCE = 2e-2
GRAD_TOLERANCE = 3e-2

LAYERS = {
    "RNN": lambda: rnnkit.RNN(6, 8, num_layers=2, bidirectional=True),
    "GRU": lambda: rnnkit.GRU(6, 8, batch_first=True, learn_initial_state=True),
    "GRU-reset-before": lambda: rnnkit.GRU(6, 8, reset_after=False),
    "LSTM": lambda: rnnkit.LSTM(6, 8, num_layers=2, proj_size=4, bidirectional=True),
}


def _leaves(value):
    return torch.utils._pytree.tree_leaves(value)


@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("use_lengths", [False, True])
def test_bf16_autocast_matches_fp32(kind, use_lengths):
    torch.manual_seed(0)
    model = LAYERS[kind]()
    x = torch.randn(3, 10, 6) if model.batch_first else torch.randn(10, 3, 6)
    lengths = torch.tensor([10, 4, 7]) if use_lengths else None

    want = _leaves(model(x, lengths=lengths))
    sum(w.sum() for w in want).backward()
    want_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _leaves(model(x, lengths=lengths))
    assert all(g.dtype == torch.bfloat16 for g in got)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w, atol=TOLERANCE, rtol=0)
    sum(g.float().sum() for g in got).backward()
    for param, want_grad in zip(model.parameters(), want_grads):
        assert param.grad.dtype == torch.float32
        scale = want_grad.abs().max().clamp_min(1.0)
        torch.testing.assert_close(
            param.grad / scale, want_grad / scale, atol=GRAD_TOLERANCE, rtol=0
        )


def test_fp32_initial_state_is_accepted_under_autocast():
    torch.manual_seed(0)
    model = rnnkit.LSTM(6, 8)
    x = torch.randn(5, 2, 6)
    state = (torch.randn(1, 2, 8), torch.randn(1, 2, 8))
    want = model(x, state)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, state)[0]
    torch.testing.assert_close(got.float(), want, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("cls", [rnnkit.RNNCell, rnnkit.GRUCell, rnnkit.LSTMCell])
def test_cells_under_autocast(cls):
    torch.manual_seed(0)
    cell = cls(6, 8)
    x = torch.randn(4, 6)
    want = _leaves(cell(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _leaves(cell(x))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w, atol=TOLERANCE, rtol=0)


# oneDNN's words when it has no bf16 LSTM kernel for this CPU.
ONEDNN_NO_KERNEL = "could not create a primitive descriptor"


def run_peer_or_skip(module, *args):
    """``module(*args)``, or a skip where torch.nn itself cannot run the case on this CPU.

    torch.nn.LSTM under CPU bf16 autocast runs oneDNN's bf16 LSTM, which needs AVX-512 BF16
    (``avx512_bf16`` in /proc/cpuinfo); without it torch.nn fails before rnnkit is compared.
    """
    try:
        return module(*args)
    except RuntimeError as error:
        if ONEDNN_NO_KERNEL not in str(error):
            raise
        pytest.skip(
            f"torch.nn.{type(module).__name__} cannot run bf16 on this CPU: oneDNN's bf16 "
            f"kernel needs AVX-512 BF16 (avx512_bf16), which it lacks ({error})"
        )


def test_run_peer_or_skip_skips_only_the_missing_kernel():
    def missing(_):
        raise RuntimeError(f"{ONEDNN_NO_KERNEL} for the LSTM forward propagation primitive")

    def broken(_):
        raise RuntimeError("something else")

    with pytest.raises(pytest.skip.Exception, match="avx512_bf16"):
        run_peer_or_skip(missing, None)
    with pytest.raises(RuntimeError, match="something else"):
        run_peer_or_skip(broken, None)


def test_torch_nn_lstm_agrees_on_dtype_and_values():
    """torch.nn.LSTM under CPU autocast also returns bf16; ours stays close to it."""
    torch.manual_seed(0)
    theirs = torch.nn.LSTM(6, 8)
    ours = rnnkit.LSTM(6, 8)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(10, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _leaves(run_peer_or_skip(theirs, x))
        got = _leaves(ours(x))
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == torch.bfloat16
        torch.testing.assert_close(g.float(), w.float(), atol=TOLERANCE, rtol=0)


def test_autocast_inside_torch_compile_matches_eager_autocast():
    torch.manual_seed(0)
    model = rnnkit.LSTM(6, 8, num_layers=2)
    x, lengths = torch.randn(5, 2, 6), torch.tensor([5, 2])

    def run(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x, lengths=lengths)[0]

    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True, backend="aot_eager")(x)
    want = run(x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
