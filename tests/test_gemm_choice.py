"""Both matrix-product paths of the CPU kernels (csrc/gemm_choice.h): rnnkit's own kernel and
torch's library product, each forced with RNNKIT_GEMM, held equal to torch.

Forced to the library, the input projection is torch's own addmm, bit for bit: that shows
the switch reaches the kernels. Each path's layers match torch.nn, forward and backward
(the weight gradients are the products the switch moves).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close_all, outputs_and_grads, twin_layers
from rnnkit.ops.cpu import BACKEND as cpu_backend
from rnnkit.ops.cpu import _ops

PATHS = ("rnnkit", "library")


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = cpu_backend.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the cpu backend could not be built here: {reason}")


@pytest.fixture(params=PATHS)
def path(request, monkeypatch):
    monkeypatch.setenv("RNNKIT_GEMM", request.param)
    return request.param


# Output widths a whole number of column panels and not (the kernel's remainder columns).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, in_features, out_features", [(300, 64, 96), (7, 5, 13)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear(path, dtype, rows, in_features, out_features, bias):
    torch.manual_seed(0)
    x = torch.randn(rows, in_features, dtype=dtype)
    w = torch.randn(out_features, in_features, dtype=dtype)
    b = torch.randn(out_features, dtype=dtype) if bias else None
    ours, expected = _ops.linear(x, w, b), F.linear(x, w, b)
    if path == "library":
        assert torch.equal(ours, expected)
    else:
        torch.testing.assert_close(ours, expected)


@pytest.mark.parametrize("rows, in_features, out_features", [(300, 64, 96), (7, 5, 13)])
def test_linear_gradients_match_autograd(path, rows, in_features, out_features):
    torch.manual_seed(0)
    x = torch.randn(2, rows, in_features, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out_features, in_features, dtype=torch.float64, requires_grad=True)
    b = torch.randn(out_features, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, rows, out_features, dtype=torch.float64)
    ours = torch.autograd.grad(_ops.linear(x, w, b), (x, w, b), grad)
    expected = torch.autograd.grad(F.linear(x, w, b), (x, w, b), grad)
    assert_close_all(ours, expected, atol=1e-10)


@pytest.mark.parametrize(
    "cell, extra",
    [("GRU", {}), ("GRU", {"bidirectional": True}), ("LSTM", {}), ("LSTM", {"proj_size": 5}),
     ("RNN", {"num_layers": 2})],
)
def test_layers_match_torch_nn(path, cell, extra):
    torch.manual_seed(0)
    theirs, ours = twin_layers(cell, 12, 16, ours_kwargs={"backend": "cpu"}, **extra)
    x = torch.randn(9, 3, 12, dtype=torch.float64, requires_grad=True)
    expected = outputs_and_grads(theirs, x, None)
    got = outputs_and_grads(ours, x, None)
    assert_close_all(got[0], expected[0], atol=1e-10)
    assert_close_all(got[1], expected[1], atol=1e-10)


def test_unknown_setting_is_refused(monkeypatch):
    x, w = torch.randn(40, 8), torch.randn(24, 8)
    monkeypatch.setenv("RNNKIT_GEMM", "blas")
    with pytest.raises(ValueError, match="RNNKIT_GEMM must be"):
        _ops.linear(x, w, None)
