"""torch.compile(fullgraph=True) of models with rnnkit layers: no graph break, eager results.

torch.nn.GRU and torch.nn.LSTM graph-break by design (pytorch/pytorch#91439). Here every CPU
backend path is compiled with ``fullgraph=True`` (which raises on any graph break) and held to
eager outputs and gradients. The sweep uses the ``aot_eager`` compiler backend, which traces
forward and backward through AOTAutograd exactly as inductor does but skips code generation
(inductor takes minutes on 2 cores); one small case goes through inductor itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import rnnkit
from rnnkit.ops import dispatch

BACKENDS = ["reference", "cpu"]


def _require(backend: str) -> None:
    if backend != "reference" and backend not in dispatch.registered():
        pytest.skip(f"{backend} backend not registered (compiled kernels not merged)")


class Tagger(nn.Module):
    """An embedding-free sequence model: recurrent layer, then a linear head."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer = layer
        self.head = nn.Linear(features, 2)

    def forward(self, x, lengths=None):
        output, _ = self.layer(x, lengths=lengths)
        return self.head(output)


CASES = {
    "RNN": lambda backend: Tagger(
        rnnkit.RNN(3, 4, nonlinearity="relu", backend=backend), 4),
    "GRU": lambda backend: Tagger(
        rnnkit.GRU(3, 4, bidirectional=True, batch_first=True, backend=backend), 8),
    "GRU-reset-before": lambda backend: Tagger(
        rnnkit.GRU(3, 4, reset_after=False, learn_initial_state=True, backend=backend), 4),
    "LSTM": lambda backend: Tagger(
        rnnkit.LSTM(3, 4, num_layers=2, proj_size=2, backend=backend), 2),
}


def _outputs_and_grads(model, x, lengths):
    model.zero_grad()
    x = x.detach().requires_grad_()
    out = model(x, lengths)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in model.parameters()]


def _check(model, x, lengths, compiler):
    want_out, want_grads = _outputs_and_grads(model, x, lengths)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    got_out, got_grads = _outputs_and_grads(compiled, x, lengths)
    torch.testing.assert_close(got_out, want_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", list(CASES))
@pytest.mark.parametrize("use_lengths", [False, True])
def test_fullgraph_compile_matches_eager(backend, kind, use_lengths):
    _require(backend)
    torch.manual_seed(0)
    model = CASES[kind](backend)
    batch_first = model.layer.batch_first
    x = torch.randn(2, 5, 3) if batch_first else torch.randn(5, 2, 3)
    lengths = torch.tensor([3, 5]) if use_lengths else None
    _check(model, x, lengths, "aot_eager")


@pytest.mark.parametrize("backend", BACKENDS)
def test_inductor_compiles_an_lstm(backend):
    _require(backend)
    torch.manual_seed(0)
    model = Tagger(rnnkit.LSTM(3, 4, backend=backend), 4)
    _check(model, torch.randn(3, 2, 3), torch.tensor([3, 2]), "inductor")


def test_graph_count_is_one_with_lengths():
    """Counted, not just asserted by fullgraph: one graph, no breaks, for a whole model."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    counter = CompileCounter()
    model = Tagger(rnnkit.GRU(3, 4, num_layers=2, bidirectional=True), 8)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(compiled(x, torch.tensor([4, 1])), model(x, torch.tensor([4, 1])))
    assert counter.frame_count == 1
