"""Export: the op that records a layer-direction (:mod:`.op`, plain torch) and its ONNX
lowering under ``torch.onnx.export`` (:mod:`.onnx_lowering`, plain torch), and the translation
table for programs made with ``torch.export`` (:mod:`.to_onnx`, which needs the ``onnx`` extra).

The public entry point is :mod:`rnnkit.export`.
"""
