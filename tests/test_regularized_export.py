"""ONNX and torch.export of layers with layer norm, zoneout, dropout options and other gate
activations: in evaluation they export (dropout is the identity, zoneout its expectation,
layer norm standard ops inside the Scan over time) and agree with PyTorch in onnxruntime at
new batch and time sizes; in training they are refused with a reason."""

from __future__ import annotations

import warnings

import pytest
import torch

import rnnkit

onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
export = pytest.importorskip("rnnkit.export", reason="onnxscript is not installed")


class Wrapper(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x, lengths):
        return torch.utils._pytree.tree_leaves(self.layer(x, lengths=lengths))


CASES = [
    ("LSTM", {"layer_norm": True, "bidirectional": True}),
    ("GRU", {"layer_norm": True, "zoneout": 0.3, "recurrent_dropout": 0.2, "num_layers": 2}),
    ("LSTM", {"recurrent_activation": "hard_sigmoid", "zoneout": 0.2, "input_dropout": 0.3}),
    ("GRU", {"activation": "softsign", "reset_after": False, "bidirectional": True}),
    ("RNN", {"zoneout": 0.4, "recurrent_dropout": 0.1}),
]
DIMS = {"steps": torch.export.Dim("steps", min=2, max=64),
        "batch": torch.export.Dim("batch", min=2, max=64)}


def _model(kind, options):
    torch.manual_seed(0)
    layer = getattr(rnnkit, kind)(3, 4, **options)
    with torch.no_grad():  # gains and biases away from their initial 1 and 0
        for name, param in layer.named_parameters():
            if name.startswith("layer_norm_"):
                param.add_(torch.randn_like(param) * 0.3)
    return Wrapper(layer).eval()


def _inputs(steps, batch):
    return torch.randn(steps, batch, 3), torch.randint(1, steps + 1, (batch,))


# Each case through rnnkit.export.export_onnx; the first two through plain torch.onnx.export
# too (the same lowering, so not every case twice: an export takes seconds).
ROUTES = [(route, kind, options) for kind, options in CASES for route in ("export_onnx",)]
ROUTES += [("plain", kind, options) for kind, options in CASES[:2]]


@pytest.mark.parametrize("route,kind,options", ROUTES,
                         ids=[f"{r}-{k}-{'-'.join(o)}" for r, k, o in ROUTES])
def test_eval_exports_to_onnx_and_matches(route, kind, options):
    model = _model(kind, options)
    x, lengths = _inputs(5, 2)
    dynamic = ({0: DIMS["steps"], 1: DIMS["batch"]}, {0: DIMS["batch"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if route == "plain":
            program = torch.onnx.export(model, (x, lengths), dynamo=True,
                                        dynamic_shapes=dynamic, verbose=False)
        else:
            program = export.export_onnx(model, (x, lengths), dynamic_shapes=dynamic,
                                         verbose=False)
    nodes = [node.op_type for node in program.model_proto.graph.node]
    layer = model.layer
    assert nodes.count("Scan") == layer.num_layers * layer.num_directions, nodes
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    x, lengths = _inputs(7, 3)
    feeds = {arg.name: value.numpy() for arg, value in zip(session.get_inputs(), (x, lengths))}
    got = session.run(None, feeds)
    with torch.no_grad():
        want = model(x, lengths)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(torch.from_numpy(g), w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,options", CASES[:2], ids=["lstm-ln", "gru-ln-zoneout"])
def test_torch_export_program_matches(kind, options):
    model = _model(kind, options)
    x, lengths = _inputs(5, 2)
    program = torch.export.export(
        model, (x, lengths),
        dynamic_shapes=({0: DIMS["steps"], 1: DIMS["batch"]}, {0: DIMS["batch"]}))
    x, lengths = _inputs(9, 4)
    with torch.no_grad():
        for got, want in zip(program.module()(x, lengths), model(x, lengths), strict=True):
            torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("options", [{"zoneout": 0.2}, {"recurrent_dropout": 0.2},
                                     {"input_dropout": 0.2}])
def test_training_mode_export_is_refused(options):
    model = _model("GRU", options).train()
    x, lengths = _inputs(5, 2)
    with pytest.raises(ValueError, match=r"export the model in eval\(\)"):
        torch.export.export(model, (x, lengths))
