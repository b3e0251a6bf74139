"""rnnkit: recurrent layers for PyTorch.

torch.nn-compatible RNN, GRU and LSTM layers and cells, with any nonlinearity, `lengths=`
without sorting, learnable initial states, both GRU formulations and higher-order gradients.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "Stateful",
    "__version__", "interop",
]

# The public names load on first use, all together (PEP 562), so `import rnnkit` alone, and
# with it the `rnnkit` command's argument parsing and --help, does not import torch.
_HOMES = {
    "ACTIVATIONS": "rnnkit.activations",
    "GRU": "rnnkit.layers", "LSTM": "rnnkit.layers", "RNN": "rnnkit.layers",
    "GRUCell": "rnnkit.cells", "LSTMCell": "rnnkit.cells", "RNNCell": "rnnkit.cells",
    "Stateful": "rnnkit.stateful",
}

if TYPE_CHECKING:  # for type checkers and the API docs, which read the names statically
    from rnnkit import interop
    from rnnkit.activations import ACTIVATIONS
    from rnnkit.cells import GRUCell, LSTMCell, RNNCell
    from rnnkit.layers import GRU, LSTM, RNN
    from rnnkit.stateful import Stateful


def _load_all() -> None:
    for name, home in _HOMES.items():
        globals()[name] = getattr(importlib.import_module(home), name)
    # Its converters import MLX and Keras only when called.
    globals()["interop"] = importlib.import_module("rnnkit.interop")


def __getattr__(name: str) -> Any:
    if name in _HOMES or name == "interop":
        _load_all()
        return globals()[name]
    if not name.startswith("__") and importlib.util.find_spec(f"rnnkit.{name}") is not None:
        # A submodule reached as an attribute, which worked when `import rnnkit` loaded
        # everything. `rnnkit.ops.dispatch` needs the modules under ops loaded, as the layers
        # load them. Any other name loads only that submodule: `from rnnkit import cli` passes
        # through here too, and must stay light.
        if name == "ops":
            _load_all()
        return importlib.import_module(f"rnnkit.{name}")
    raise AttributeError(f"module 'rnnkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
