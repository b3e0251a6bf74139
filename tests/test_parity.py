"""Parity with the real torch.nn over a seeded randomized grid: outputs, states, every gradient."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

import rnnkit
from helpers import assert_close_all, flatten, outputs_and_grads, twin_layers


def _configs(count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.choice(["RNN", "GRU", "LSTM"])
        hidden = rng.randint(2, 7)
        config = {
            "kind": kind,
            "input_size": rng.randint(1, 5),
            "hidden_size": hidden,
            "num_layers": rng.randint(1, 3),
            "bias": rng.random() < 0.8,
            "batch_first": rng.random() < 0.5,
            "bidirectional": rng.random() < 0.5,
            "batched": rng.random() < 0.8,
            "with_hx": rng.random() < 0.5,
            "seq_len": rng.randint(1, 6),
            "batch": rng.randint(1, 4),
        }
        if kind == "RNN":
            config["nonlinearity"] = rng.choice(["tanh", "relu"])
        if kind == "LSTM" and rng.random() < 0.5 and hidden > 1:
            config["proj_size"] = rng.randint(1, hidden - 1)
        yield config


def _build_and_run(config, dtype, backend="auto"):
    kwargs = {k: config[k] for k in ("num_layers", "bias", "batch_first", "bidirectional")}
    for optional in ("nonlinearity", "proj_size"):
        if optional in config:
            kwargs[optional] = config[optional]
    torch_layer, ours = twin_layers(
        config["kind"], config["input_size"], config["hidden_size"], dtype=dtype,
        ours_kwargs={"backend": backend}, **kwargs,
    )
    seq, batch = config["seq_len"], config["batch"]
    if not config["batched"]:
        shape = (seq, config["input_size"])
    elif config["batch_first"]:
        shape = (batch, seq, config["input_size"])
    else:
        shape = (seq, batch, config["input_size"])
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    hx = None
    if config["with_hx"]:
        count = config["num_layers"] * (2 if config["bidirectional"] else 1)
        lead = (count, batch) if config["batched"] else (count,)
        out_size = config.get("proj_size") or config["hidden_size"]
        h0 = torch.randn(*lead, out_size, dtype=dtype, requires_grad=True)
        if config["kind"] == "LSTM":
            c0 = torch.randn(*lead, config["hidden_size"], dtype=dtype, requires_grad=True)
            hx = (h0, c0)
        else:
            hx = h0
    expected = outputs_and_grads(torch_layer, x, hx)
    got = outputs_and_grads(ours, x, hx)
    return expected, got


def _config_id(config: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in sorted(config.items()))


# "auto" runs the compiled CPU kernels where they serve the call; "reference" is the torch loop.
BACKENDS = ["auto", "reference"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(_configs(60, seed=1234)), ids=_config_id)
def test_float64_parity(config, backend):
    (out_t, grad_t), (out_r, grad_r) = _build_and_run(config, torch.float64, backend)
    assert_close_all(out_r, out_t, atol=1e-10)
    assert_close_all(grad_r, grad_t, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config", list(_configs(12, seed=99)), ids=_config_id)
def test_float32_parity(config, backend):
    (out_t, grad_t), (out_r, grad_r) = _build_and_run(config, torch.float32, backend)
    assert_close_all(out_r, out_t, atol=1e-5, rtol=1e-5)
    assert_close_all(grad_r, grad_t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_initialisation_matches_torch_under_the_same_seed(kind):
    kwargs = {"proj_size": 2} if kind == "LSTM" else {}
    torch.manual_seed(7)
    expected = getattr(nn, kind)(3, 5, 2, bidirectional=True, **kwargs).state_dict()
    torch.manual_seed(7)
    got = getattr(rnnkit, kind)(3, 5, 2, bidirectional=True, **kwargs).state_dict()
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


@pytest.mark.parametrize("kind", ["RNNCell", "GRUCell", "LSTMCell"])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
def test_cells_match_torch(kind, batched, with_hx):
    torch.manual_seed(3)
    cell_t = getattr(nn, kind)(4, 6, dtype=torch.float64)
    torch.manual_seed(3)
    ours = getattr(rnnkit, kind)(4, 6, dtype=torch.float64)
    assert all(torch.equal(a, b) for a, b in zip(cell_t.state_dict().values(),
                                                 ours.state_dict().values()))
    ours.load_state_dict(cell_t.state_dict(), strict=True)
    lead = (3,) if batched else ()
    x = torch.randn(*lead, 4, dtype=torch.float64, requires_grad=True)
    hx = None
    if with_hx:
        hx = torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True)
        if kind == "LSTMCell":
            hx = (hx, torch.randn(*lead, 6, dtype=torch.float64, requires_grad=True))
    expected = outputs_and_grads(cell_t, x, hx)
    got = outputs_and_grads(ours, x, hx)
    assert_close_all(got[0], expected[0], atol=1e-10)
    assert_close_all(got[1], expected[1], atol=1e-10)


def test_relu_cell_matches_torch():
    cell_t = nn.RNNCell(3, 4, nonlinearity="relu", dtype=torch.float64)
    ours = rnnkit.RNNCell(3, 4, nonlinearity="relu", dtype=torch.float64)
    ours.load_state_dict(cell_t.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), cell_t(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_dropout_between_layers_in_training_only(kind):
    torch_layer, ours = twin_layers(kind, 3, 5, num_layers=3, dropout=0.5)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    ours.eval()
    torch_layer.eval()
    torch.testing.assert_close(flatten(ours(x)), flatten(torch_layer(x)), atol=1e-10, rtol=0)
    ours.train()
    first, second = ours(x)[0], ours(x)[0]
    assert not torch.allclose(first, second), "dropout must be random in training"
    # Dropout sits between layers: a single layer is unaffected.
    single_t, single = twin_layers(kind, 3, 5, num_layers=1)
    single.dropout = 0.5
    single.train()
    torch.testing.assert_close(single(x)[0], single_t(x)[0], atol=1e-10, rtol=0)


def test_callable_nonlinearity_equals_named():
    torch.manual_seed(0)
    named = rnnkit.RNN(3, 4, nonlinearity="tanh", dtype=torch.float64)
    torch.manual_seed(0)
    custom = rnnkit.RNN(3, 4, nonlinearity=lambda t: torch.tanh(t), dtype=torch.float64)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    # The callable runs on the reference path, the name may run on a compiled kernel.
    torch.testing.assert_close(custom(x)[0], named(x)[0], atol=1e-12, rtol=0)


def test_any_callable_nonlinearity_follows_the_elman_equation():
    def softplus(t):
        return torch.nn.functional.softplus(t)

    layer = rnnkit.RNN(3, 4, nonlinearity=softplus, dtype=torch.float64)
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    h = torch.zeros(2, 4, dtype=torch.float64)
    expected = []
    for t in range(6):
        h = softplus(x[t] @ layer.weight_ih_l0.T + layer.bias_ih_l0 + h @ layer.weight_hh_l0.T
                     + layer.bias_hh_l0)
        expected.append(h)
    output, h_n = layer(x)
    torch.testing.assert_close(output, torch.stack(expected), atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n[0], h, atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", sorted(rnnkit.ACTIVATIONS))
def test_named_activations_follow_the_elman_equation(name):
    cell = rnnkit.RNNCell(3, 4, nonlinearity=name, dtype=torch.float64)
    x, h = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    pre = x @ cell.weight_ih.T + cell.bias_ih + h @ cell.weight_hh.T + cell.bias_hh
    reference = {
        "tanh": torch.tanh, "relu": torch.relu, "identity": lambda t: t,
        "sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu,
        "gelu": torch.nn.functional.gelu, "softsign": lambda t: t / (1 + t.abs()),
        "hardtanh": lambda t: t.clamp(-1, 1),
        "softplus": lambda t: torch.where(t > 20, t, torch.log1p(torch.exp(t))),
        "hard_sigmoid": lambda t: (t / 6 + 0.5).clamp(0, 1),  # Keras 3's definition
    }[name]
    torch.testing.assert_close(cell(x, h), reference(pre), atol=1e-12, rtol=0)


def test_never_calls_torch_rnn_kernels(monkeypatch):
    """No aten RNN op runs (seen at the dispatcher and at torch._VF); no torch.nn module runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    forbidden = ("rnn_tanh", "rnn_relu", "gru", "lstm", "_thnn_fused", "mkldnn_rnn", "cudnn_rnn")
    seen: list[str] = []

    class RecordOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func.__name__)
            return func(*args, **(kwargs or {}))

    def refuse(*args, **kwargs):
        raise AssertionError("rnnkit must not call torch.nn's recurrent modules")

    for module in [nn.RNN, nn.GRU, nn.LSTM, nn.RNNCell, nn.GRUCell, nn.LSTMCell]:
        monkeypatch.setattr(module, "forward", refuse)
    # Composite ops such as gru decompose before the dispatcher, so refuse their Python entry too.
    for name in ["rnn_tanh", "rnn_relu", "gru", "lstm", "rnn_tanh_cell", "rnn_relu_cell",
                 "gru_cell", "lstm_cell"]:
        monkeypatch.setattr(torch._VF, name, refuse, raising=False)
    x = torch.randn(3, 2, 4, requires_grad=True)
    with RecordOps():
        for layer in [rnnkit.RNN(4, 5), rnnkit.GRU(4, 5, bidirectional=True), rnnkit.LSTM(4, 5)]:
            layer(x)[0].sum().backward()
            layer(x, lengths=[3, 1])[0].sum().backward()
        for cell in [rnnkit.RNNCell(4, 5), rnnkit.GRUCell(4, 5), rnnkit.LSTMCell(4, 5)]:
            cell(x[0])
    assert seen, "the dispatch mode recorded nothing"
    bad = sorted({op for op in seen if op.split(".")[0].startswith(forbidden)})
    assert not bad, bad
