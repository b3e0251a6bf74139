"""Export: the op that records a layer-direction (:mod:`.op`, plain torch) and its ONNX
translation (:mod:`.to_onnx` and :mod:`.onnx_scan`, which need the ``onnx`` extra).

The public entry point is :mod:`rnnkit.export`.
"""
