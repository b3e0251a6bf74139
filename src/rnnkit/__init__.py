"""rnnkit: recurrent layers for PyTorch.

torch.nn-compatible RNN, GRU and LSTM layers and cells, with any nonlinearity, `lengths=`
without sorting, learnable initial states, both GRU formulations and higher-order gradients.
"""

from rnnkit import interop  # its converters import MLX and Keras only when called
from rnnkit.activations import ACTIVATIONS
from rnnkit.cells import GRUCell, LSTMCell, RNNCell
from rnnkit.layers import GRU, LSTM, RNN
from rnnkit.stateful import Stateful

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "GRU", "GRUCell", "LSTM", "LSTMCell", "RNN", "RNNCell", "Stateful",
    "__version__", "interop",
]
