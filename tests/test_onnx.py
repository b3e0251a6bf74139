"""ONNX export (torch.onnx.export, dynamo=True) with dynamic batch and time axes.

Each model is exported once with an example of T=5, B=2 and run in onnxruntime on T=7, B=3
(and the lengths case on lengths the example never had); results must match PyTorch to 1e-5.
The graph is checked for the ONNX operator each layer-direction lowers to (see rnnkit.export).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import rnnkit

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
export = pytest.importorskip("rnnkit.export", reason="onnxscript is not installed")


class Wrapper(torch.nn.Module):
    """Flattens the layer's (output, state) into a list of tensors for ONNX."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, lengths=None):
        result = self.layer(x) if lengths is None else self.layer(x, lengths=lengths)
        return torch.utils._pytree.tree_leaves(result)


# kind, layer arguments, uses lengths, the ONNX op its layer-directions must lower to
CASES = [
    ("LSTM", {"num_layers": 2, "bidirectional": True}, True, "LSTM"),
    ("LSTM", {"bias": False, "batch_first": True}, False, "LSTM"),
    ("LSTM", {"proj_size": 2, "bidirectional": True}, True, "Scan"),
    ("LSTM", {"proj_size": 2, "num_layers": 2}, False, "Scan"),
    ("GRU", {"num_layers": 2, "bidirectional": True}, True, "GRU"),
    ("GRU", {"reset_after": False, "bidirectional": True}, True, "GRU"),
    ("RNN", {"num_layers": 2, "bidirectional": True}, True, "RNN"),
    ("RNN", {"nonlinearity": "relu", "batch_first": True}, False, "RNN"),
    ("RNN", {"nonlinearity": "gelu", "bidirectional": True}, True, "Scan"),
    ("RNN", {"nonlinearity": "hardtanh", "bias": False}, True, "Scan"),
    ("RNN", {"nonlinearity": "silu"}, False, "Scan"),
    ("RNN", {"nonlinearity": "identity"}, True, "Scan"),
    ("RNN", {"nonlinearity": "softsign"}, True, "Scan"),
    ("RNN", {"nonlinearity": "softplus", "bidirectional": True}, True, "RNN"),
]


def _example(batch_first: bool, steps: int, batch: int) -> torch.Tensor:
    return torch.randn(batch, steps, 3) if batch_first else torch.randn(steps, batch, 3)


def _export(model, x, lengths, batch_first, route="export_onnx"):
    """Export through ``rnnkit.export.export_onnx``, plain ``torch.onnx.export`` ("plain"), or
    ``torch.export`` then ``torch.onnx.export`` of the program with rnnkit's translation table
    ("program")."""
    steps = torch.export.Dim("steps", min=2, max=256)
    batch = torch.export.Dim("batch", min=2, max=256)
    x_dims = {0: batch, 1: steps} if batch_first else {0: steps, 1: batch}
    args = (x,) if lengths is None else (x, lengths)
    dynamic = (x_dims,) if lengths is None else (x_dims, {0: batch})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if route == "plain":
            return torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic,
                                     verbose=False)
        if route == "program":
            program = torch.export.export(model, args, dynamic_shapes=dynamic)
            return torch.onnx.export(
                program, dynamo=True, verbose=False,
                custom_translation_table=export.onnx_translation_table(),
            )
        return export.export_onnx(model, args, dynamic_shapes=dynamic, verbose=False)


def _run_onnx(program, *inputs):
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), inputs)}
    return [torch.from_numpy(out) for out in session.run(None, feeds)]


@pytest.mark.parametrize(("kind", "kwargs", "use_lengths", "onnx_op"), CASES,
                         ids=[f"{i}-{c[0]}-to-{c[3]}" for i, c in enumerate(CASES)])
def test_dynamic_axes_match_pytorch_in_onnxruntime(kind, kwargs, use_lengths, onnx_op):
    torch.manual_seed(0)
    model = Wrapper(getattr(rnnkit, kind)(3, 4, **kwargs)).eval()
    batch_first = kwargs.get("batch_first", False)
    example_lengths = torch.tensor([5, 3]) if use_lengths else None
    # Every third case each way: rnnkit.export, plain torch.onnx.export, and an ExportedProgram.
    route = ("export_onnx", "plain", "program")[CASES.index(
        (kind, kwargs, use_lengths, onnx_op)) % 3]
    program = _export(model, _example(batch_first, 5, 2), example_lengths, batch_first, route)

    # Exactly one recurrent ONNX op per layer and direction: nothing unrolled over time.
    layer = model.layer
    nodes = [node.op_type for node in program.model_proto.graph.node]
    assert nodes.count(onnx_op) == layer.num_layers * layer.num_directions, nodes
    assert not ({"Loop", "RNN", "GRU", "LSTM", "Scan"} - {onnx_op}) & set(nodes)

    x = _example(batch_first, 7, 3)
    lengths = torch.tensor([2, 7, 6]) if use_lengths else None
    got = _run_onnx(program, x, *([] if lengths is None else [lengths]))
    with torch.no_grad():
        want = model(x, lengths)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_export_keeps_the_time_loop_out_of_the_graph():
    """The exported program holds one op per layer-direction, whatever T the example had."""
    torch.manual_seed(0)
    model = Wrapper(rnnkit.GRU(3, 4, num_layers=2, bidirectional=True))
    steps = torch.export.Dim("steps", min=2)
    program = torch.export.export(model, (torch.randn(9, 2, 3),),
                                  dynamic_shapes=({0: steps},))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("rnnkit_export.recurrence.default") == 4
    x = torch.randn(4, 2, 3)
    for g, w in zip(program.module()(x), model(x)):
        torch.testing.assert_close(g, w)


def test_callable_nonlinearity_cannot_be_exported():
    model = Wrapper(rnnkit.RNN(3, 4, nonlinearity=torch.sin))
    with pytest.raises(TypeError, match="callable"):
        torch.export.export(model, (torch.randn(5, 2, 3),))


class WithState(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, h0, c0):
        return torch.utils._pytree.tree_leaves(self.layer(x, (h0, c0)))


def test_given_and_learned_initial_states_export():
    torch.manual_seed(0)
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    given = WithState(rnnkit.LSTM(3, 4, num_layers=2)).eval()
    program = export.export_onnx(
        given, (torch.randn(5, 2, 3), torch.randn(2, 2, 4), torch.randn(2, 2, 4)),
        dynamic_shapes=({0: steps, 1: batch}, {1: batch}, {1: batch}), verbose=False,
    )
    inputs = (torch.randn(7, 3, 3), torch.randn(2, 3, 4), torch.randn(2, 3, 4))
    for g, w in zip(_run_onnx(program, *inputs), given(*inputs)):
        torch.testing.assert_close(g, w.detach(), atol=1e-5, rtol=1e-5)

    learned = Wrapper(rnnkit.GRU(3, 4, bidirectional=True, learn_initial_state=True)).eval()
    with torch.no_grad():
        learned.layer.initial_h.normal_()
    program = _export(learned, _example(False, 5, 2), None, False)
    x = _example(False, 7, 3)
    for g, w in zip(_run_onnx(program, x), learned(x)):
        torch.testing.assert_close(g, w.detach(), atol=1e-5, rtol=1e-5)


class Tagger(torch.nn.Module):
    """A model as users write it: embedding, a recurrent layer, a linear head."""

    def __init__(self, recurrent: torch.nn.Module) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(20, 3)
        self.recurrent = recurrent
        self.head = torch.nn.Linear(8, 5)

    def forward(self, tokens):
        output, _ = self.recurrent(self.embed(tokens))
        return self.head(output)


@pytest.mark.parametrize("kind, kwargs", [
    ("LSTM", {"num_layers": 2, "bidirectional": True}),
    ("GRU", {"bidirectional": True}),
    ("RNN", {"num_layers": 2, "bidirectional": True}),
])
def test_plain_onnx_export_of_a_model_with_rnnkit_swapped_in(kind, kwargs):
    """torch.onnx.export with no extra argument: the torch.nn model and the same model with
    rnnkit's layer swapped in both export and agree in onnxruntime; rnnkit's also runs at new
    sizes, equal to the torch.nn model there (torch 2.13's own export of torch.nn.LSTM/GRU
    fixes the time axis in a Reshape, so its ONNX model only runs at the example's sizes)."""
    torch.manual_seed(0)
    peer = Tagger(getattr(torch.nn, kind)(3, 4, **kwargs)).eval()
    ours = Tagger(getattr(rnnkit, kind)(3, 4, **kwargs)).eval()
    ours.load_state_dict(peer.state_dict())
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    tokens = torch.randint(0, 20, (5, 2))
    programs = []
    for model in (peer, ours):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            programs.append(torch.onnx.export(model, (tokens,), dynamo=True, verbose=False,
                                              dynamic_shapes=({0: steps, 1: batch},)))
    same_tokens = torch.randint(0, 20, (5, 2))
    theirs, mine = (_run_onnx(p, same_tokens)[0] for p in programs)
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    new_tokens = torch.randint(0, 20, (9, 4))
    mine = _run_onnx(programs[1], new_tokens)[0]
    with torch.no_grad():
        torch.testing.assert_close(mine, peer(new_tokens), atol=1e-5, rtol=1e-5)


class WithResets(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, resets, lengths):
        return torch.utils._pytree.tree_leaves(self.layer(x, lengths=lengths, resets=resets))


@pytest.mark.parametrize("layer", [
    lambda: rnnkit.LSTM(3, 4, bidirectional=True, learn_initial_state=True),
    lambda: rnnkit.GRU(3, 4, num_layers=2),
], ids=["lstm-bidirectional-learned", "gru-2-layers"])
def test_resets_export_through_scan(layer):
    torch.manual_seed(0)
    model = WithResets(layer()).eval()
    if model.layer.learn_initial_state:
        with torch.no_grad():
            model.layer.initial_h.normal_()
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    resets = torch.tensor([[False, True], [False, False], [True, False], [False, True],
                           [False, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model, (torch.randn(5, 2, 3), resets, torch.tensor([5, 4])), dynamo=True,
            verbose=False, dynamic_shapes=({0: steps, 1: batch}, {0: steps, 1: batch},
                                           {0: batch}))
    nodes = [node.op_type for node in program.model_proto.graph.node]
    assert "Scan" in nodes and not {"LSTM", "GRU"} & set(nodes)
    x = torch.randn(8, 3, 3)
    new_resets = torch.rand(8, 3) < 0.3
    lengths = torch.tensor([8, 3, 6])
    got = _run_onnx(program, x, new_resets, lengths)
    with torch.no_grad():
        want = model(x, new_resets, lengths)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
