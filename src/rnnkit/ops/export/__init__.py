"""Export: the op that records a layer-direction (`op`, plain torch) and its ONNX
lowering under `torch.onnx.export` (`onnx_lowering`, plain torch), and the translation
table for programs made with `torch.export` (`to_onnx`, which needs the `onnx` extra).

The public entry point is [`rnnkit.export`][].
"""
