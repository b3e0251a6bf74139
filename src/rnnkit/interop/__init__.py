"""Exact weight conversion between rnnkit and torch.nn, MLX and Keras 3.

Every `from_*` returns a new rnnkit module whose output equals the source's for the same
input; every `to_*` builds the other library's module from an rnnkit one. A conversion that
cannot be exact raises ValueError (or TypeError for a module of the wrong kind) saying why.
MLX and Keras are imported only inside their functions, so this package imports without them
(install the `mlx` or `keras` extra to use those).
"""

from rnnkit.interop.keras import from_keras, to_keras
from rnnkit.interop.mlx import from_mlx, to_mlx
from rnnkit.interop.torch import from_torch, to_torch

__all__ = ["from_keras", "from_mlx", "from_torch", "to_keras", "to_mlx", "to_torch"]
