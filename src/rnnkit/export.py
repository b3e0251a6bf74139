"""ONNX export of models holding rnnkit layers; see `rnnkit.ops.export.to_onnx`.

Needs the `onnx` extra (`pip install 'rnnkit[onnx]'`).
"""

from rnnkit.ops.export.to_onnx import export_onnx, onnx_translation_table

__all__ = ["export_onnx", "onnx_translation_table"]
