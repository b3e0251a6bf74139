"""Masks with holes (``mask=``), as Keras's: exact to Keras 3 with random masks, the skipping
rule with lengths and gradients, the zero/carry output choice, backends, export and errors."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

import rnnkit
from rnnkit.interop import from_keras, to_keras
from rnnkit.ops import dispatch

os.environ.setdefault("KERAS_BACKEND", "torch")


def _keras():
    return pytest.importorskip("keras", reason="the keras package (rnnkit[keras]) is missing")


def _randomized(layer, seed, input_size):
    layer.build((None, None, input_size))
    rng = np.random.default_rng(seed)
    layer.set_weights([rng.normal(0, 0.5, w.shape).astype(w.dtype) for w in layer.get_weights()])
    return layer


def _holes(batch, steps, seed):
    mask = np.random.default_rng(seed).random((batch, steps)) < 0.7
    mask[0, 0] = False  # a masked first step
    mask[1, :] = False  # a fully masked row
    mask[2, :] = True
    return mask


@pytest.mark.parametrize("kind", ["SimpleRNN", "GRU", "LSTM"])
@pytest.mark.parametrize("zero_output", [False, True], ids=["repeat-output", "zero-output"])
def test_equals_keras_with_holes(kind, zero_output):
    keras = _keras()
    layer = getattr(keras.layers, kind)(5, return_sequences=True, return_state=True,
                                        zero_output_for_mask=zero_output)
    _randomized(layer, 0, 3)
    x = np.random.default_rng(1).normal(size=(4, 7, 3)).astype("float32")
    mask = _holes(4, 7, 2)
    expected = [keras.ops.convert_to_numpy(t) for t in layer(x, mask=mask)]
    ours = from_keras(layer)
    assert ours.zero_output_for_mask is zero_output  # Keras's setting carries over
    output, final = ours(torch.from_numpy(x), mask=torch.from_numpy(mask))
    finals = final if isinstance(final, tuple) else (final,)
    got = [output.detach().numpy()] + [f[0].detach().numpy() for f in finals]
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["GRU", "LSTM"])
def test_bidirectional_equals_keras_with_holes(kind):
    keras = _keras()
    inner = getattr(keras.layers, kind)(4, return_sequences=True)
    layer = keras.layers.Bidirectional(inner)
    _randomized(layer, 3, 3)
    x = np.random.default_rng(4).normal(size=(4, 6, 3)).astype("float32")
    mask = _holes(4, 6, 5)
    expected = keras.ops.convert_to_numpy(layer(x, mask=mask))
    ours = from_keras(layer)
    assert ours.zero_output_for_mask is layer.forward_layer.zero_output_for_mask
    output, _ = ours(torch.from_numpy(x), mask=torch.from_numpy(mask))
    np.testing.assert_allclose(output.detach().numpy(), expected, atol=1e-5, rtol=1e-5)


def _compressed_run(layer, x, mask, hx):
    """The rule: each sequence's unmasked steps run on their own, in order; masked steps
    output zero. ``x`` is ``(T, B, I)``."""
    steps, batch = mask.shape
    outputs, finals = [], []
    states = hx if isinstance(hx, tuple) else (hx,)
    for b in range(batch):
        kept = mask[:, b].nonzero().flatten()
        given = tuple(s[:, b : b + 1] for s in states)
        given = given if len(given) == 2 else given[0]
        out = x.new_zeros(steps, 1, layer.num_directions * (layer.proj_size or layer.hidden_size))
        if len(kept):
            part, final = layer(x[kept, b : b + 1], given)
            out = out.index_put((kept,), part)
        else:
            final = given
        outputs.append(out)
        finals.append(final if isinstance(final, tuple) else (final,))
    return [torch.cat(outputs, 1)] + [torch.cat([f[k] for f in finals], 1)
                                      for k in range(len(finals[0]))]


@pytest.mark.parametrize("kind, options", [
    ("LSTM", {"bidirectional": True, "proj_size": 2}),
    ("GRU", {"num_layers": 2, "reset_after": False}),
    ("RNN", {"nonlinearity": "relu", "bidirectional": True}),
])
def test_equals_running_the_unmasked_steps_alone(kind, options):
    torch.manual_seed(0)
    layer = getattr(rnnkit, kind)(3, 4, dtype=torch.float64, **options)
    x = torch.randn(6, 3, 3, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 3) < 0.6
    mask[:, 1] = False
    count = layer.num_layers * layer.num_directions
    h0 = torch.randn(count, 3, layer.proj_size or 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(count, 3, 4, dtype=torch.float64, requires_grad=True)
    hx = (h0, c0) if kind == "LSTM" else h0
    leaves = [x, h0, *([c0] if kind == "LSTM" else []), *layer.parameters()]
    output, final = layer(x, hx, mask=mask)
    got = [output, *(final if isinstance(final, tuple) else (final,))]
    want = _compressed_run(layer, x, mask, hx)
    weights = [torch.randn_like(t) for t in got]
    grads = [torch.autograd.grad(sum((t * w).sum() for t, w in zip(ts, weights)), leaves,
                                 allow_unused=True) for ts in (got, want)]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    for g, w in zip(*grads):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-10)


def test_mask_combines_with_lengths_and_batch_first():
    torch.manual_seed(0)
    layer = rnnkit.GRU(3, 4, batch_first=True)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, False, True, True, True], [True, True, False, True, True]])
    lengths = torch.tensor([5, 3])
    combined = mask & (torch.arange(5)[None, :] < lengths[:, None])
    got = layer(x, lengths=lengths, mask=mask)
    want = layer(x, mask=combined)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", [n for n in dispatch.registered() if n != "reference"])
def test_backends_serve_masks_or_name_why(name, monkeypatch):
    backend = dispatch.registered()[name]
    if backend.unavailable_reason() is not None:
        pytest.skip(f"backend {name!r} is unavailable here: {backend.unavailable_reason()}")
    monkeypatch.setattr(dispatch, "_warned", set())
    torch.manual_seed(0)
    layer = rnnkit.LSTM(3, 4, backend=name)
    twin = rnnkit.LSTM(3, 4, backend="reference")
    twin.load_state_dict(layer.state_dict())
    x, mask = torch.randn(5, 2, 3), torch.rand(5, 2) < 0.6
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = layer(x, mask=mask)
    reasons = [str(w.message) for w in caught if "cannot serve" in str(w.message)]
    assert not reasons or "mask" in reasons[0]
    torch.testing.assert_close(got[0], twin(x, mask=mask)[0], rtol=1e-5, atol=1e-5)


def test_onnx_export_with_a_mask():
    onnxruntime = pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = rnnkit.GRU(3, 4, bidirectional=True, zero_output_for_mask=False)

        def forward(self, x, mask):
            return self.gru(x, mask=mask)[0]

    torch.manual_seed(0)
    model = Model().eval()
    steps, batch = torch.export.Dim("steps", min=2), torch.export.Dim("batch", min=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (torch.randn(5, 2, 3), torch.rand(5, 2) < 0.5),
                                    dynamo=True, verbose=False,
                                    dynamic_shapes=({0: steps, 1: batch}, {0: steps, 1: batch}))
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    x, mask = torch.randn(8, 3, 3), torch.rand(8, 3) < 0.5
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, {names[0]: x.numpy(), names[1]: mask.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x, mask).numpy(), atol=1e-5, rtol=1e-5)


def test_bad_masks_are_clear_errors():
    layer = rnnkit.GRU(3, 4)
    x = torch.randn(5, 2, 3)
    with pytest.raises(TypeError, match="mask must be a boolean tensor, got dtype torch.int64"):
        layer(x, mask=torch.ones(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"mask must have shape \(5, 2\)"):
        layer(x, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="resets and mask cannot be combined"):
        layer(x, mask=torch.ones(5, 2, dtype=torch.bool), resets=torch.zeros(5, 2, dtype=bool))
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    with pytest.raises(ValueError, match="mask must not be given with a PackedSequence"):
        layer(packed, mask=torch.ones(5, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="zero_output_for_mask must be a bool"):
        rnnkit.GRU(3, 4, zero_output_for_mask="yes")


@pytest.mark.parametrize("zero_output", [False, True])
def test_to_keras_carries_zero_output_for_mask(zero_output):
    keras = _keras()
    torch.manual_seed(6)
    ours = rnnkit.GRU(3, 4, batch_first=True, zero_output_for_mask=zero_output)
    layer = to_keras(ours)
    assert layer.zero_output_for_mask is zero_output
    x = np.random.default_rng(7).normal(size=(4, 6, 3)).astype("float32")
    mask = _holes(4, 6, 8)
    expected = keras.ops.convert_to_numpy(layer(x, mask=mask))
    output, _ = ours(torch.from_numpy(x), mask=torch.from_numpy(mask))
    np.testing.assert_allclose(output.detach().numpy(), expected, atol=1e-5, rtol=1e-5)
