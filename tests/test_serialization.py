"""Every layer and cell survives state_dict/torch.save, safetensors, pickle and deepcopy exactly,
learnable initial states included."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import rnnkit

MODULES = {
    "RNN": lambda: rnnkit.RNN(3, 5, num_layers=2, nonlinearity="relu", bidirectional=True,
                              learn_initial_state=True),
    "GRU": lambda: rnnkit.GRU(3, 5, reset_after=False, batch_first=True,
                              learn_initial_state=True),
    "LSTM": lambda: rnnkit.LSTM(3, 5, num_layers=2, proj_size=2, bidirectional=True,
                                learn_initial_state=True),
    "RNNCell": lambda: rnnkit.RNNCell(3, 5, nonlinearity="silu", learn_initial_state=True),
    "GRUCell": lambda: rnnkit.GRUCell(3, 5, reset_after=False, learn_initial_state=True),
    "LSTMCell": lambda: rnnkit.LSTMCell(3, 5, learn_initial_state=True),
}


def _perturbed(kind: str) -> torch.nn.Module:
    """A module whose every parameter, initial states included, is non-default."""
    torch.manual_seed(0)
    module = MODULES[kind]()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn_like(param))
    return module


def _run(module: torch.nn.Module) -> list[torch.Tensor]:
    torch.manual_seed(1)
    input = torch.randn(4, 3) if "Cell" in type(module).__name__ else torch.randn(4, 2, 3)
    return torch.utils._pytree.tree_leaves(module(input))


def _assert_same(original: torch.nn.Module, restored: torch.nn.Module) -> None:
    expected, got = original.state_dict(), restored.state_dict()
    assert list(expected) == list(got)
    assert any(name.startswith("initial_") for name in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert type(restored) is type(original)
    assert repr(restored) == repr(original)
    for a, b in zip(_run(original), _run(restored)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind", list(MODULES))
def test_state_dict_through_torch_save_weights_only(kind):
    original = _perturbed(kind)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    restored = MODULES[kind]()
    restored.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    _assert_same(original, restored)


@pytest.mark.parametrize("kind", list(MODULES))
def test_safetensors(kind, tmp_path):
    safetensors_torch = pytest.importorskip(
        "safetensors.torch", reason="safetensors is not installed"
    )
    original = _perturbed(kind)
    path = tmp_path / "weights.safetensors"
    safetensors_torch.save_file(original.state_dict(), str(path))
    restored = MODULES[kind]()
    restored.load_state_dict(safetensors_torch.load_file(str(path)), strict=True)
    _assert_same(original, restored)


@pytest.mark.parametrize("kind", list(MODULES))
def test_pickle_and_torch_save_whole_module(kind):
    original = _perturbed(kind)
    _assert_same(original, pickle.loads(pickle.dumps(original)))
    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    _assert_same(original, torch.load(buffer, weights_only=False))


@pytest.mark.parametrize("kind", list(MODULES))
def test_deepcopy_is_equal_and_independent(kind):
    original = _perturbed(kind)
    clone = copy.deepcopy(original)
    _assert_same(original, clone)
    with torch.no_grad():
        next(clone.parameters()).add_(1.0)
    assert not torch.equal(next(clone.parameters()), next(original.parameters()))


def test_deepcopy_keeps_a_callable_nonlinearity():
    original = rnnkit.RNN(3, 4, nonlinearity=torch.sin)
    clone = copy.deepcopy(original)
    assert clone.nonlinearity is torch.sin
    assert all(torch.equal(a, b) for a, b in zip(_run(original), _run(clone)))
