"""Conversion between torch.nn recurrent modules and rnnkit's.

rnnkit uses torch.nn's parameter names, shapes and gate orders, so both directions copy the
state_dict unchanged; what is checked is that the target can express the source exactly.
"""

from __future__ import annotations

from torch import nn

from rnnkit import _regularize
from rnnkit.activations import activation_name
from rnnkit.cells import GRUCell, LSTMCell, RNNCell, _CellBase
from rnnkit.layers import GRU, LSTM, RNN, RecurrentLayer

_LAYER_MODES = {"RNN_TANH": RNN, "RNN_RELU": RNN, "GRU": GRU, "LSTM": LSTM}
_TORCH_LAYERS = {RNN: nn.RNN, GRU: nn.GRU, LSTM: nn.LSTM}
_TORCH_CELLS = {RNNCell: nn.RNNCell, GRUCell: nn.GRUCell, LSTMCell: nn.LSTMCell}


def _factory(module: nn.Module) -> dict:
    weight = next(module.parameters())
    return {"device": weight.device, "dtype": weight.dtype}


def _layer_options(module: nn.Module) -> dict:
    """The constructor options a torch.nn and an rnnkit layer share, read off `module`."""
    return dict(
        num_layers=module.num_layers,
        bias=module.bias,
        batch_first=module.batch_first,
        dropout=module.dropout,
        bidirectional=module.bidirectional,
        **_factory(module),
    )


def from_torch(
    module: nn.RNNBase | nn.RNNCellBase, *, backend: str | None = None
) -> RecurrentLayer | _CellBase:
    """An rnnkit copy of a torch.nn `RNN`, `GRU`, `LSTM`, `RNNCell`, `GRUCell` or
    `LSTMCell`, with the same arguments (layers, directions, `proj_size`, `batch_first`,
    dropout, bias), device, dtype, weights and training mode.

    Args:
        module: the torch.nn module.
        backend: the rnnkit backend of the copy (see [`rnnkit.RNN`][]).

    Raises:
        TypeError: `module` is not one of those six kinds.
    """
    if isinstance(module, nn.RNNBase):
        cls = _LAYER_MODES.get(module.mode)
        if cls is None:
            raise TypeError(f"unknown torch.nn recurrent mode {module.mode!r}")
        kwargs = dict(_layer_options(module), backend=backend)
        if cls is RNN:
            kwargs["nonlinearity"] = "relu" if module.mode == "RNN_RELU" else "tanh"
        if cls is LSTM:
            kwargs["proj_size"] = module.proj_size
        copy = cls(module.input_size, module.hidden_size, **kwargs)
    elif isinstance(module, (nn.RNNCell, nn.GRUCell, nn.LSTMCell)):
        kwargs = dict(bias=module.bias, backend=backend, **_factory(module))
        if isinstance(module, nn.RNNCell):
            copy = RNNCell(
                module.input_size, module.hidden_size, nonlinearity=module.nonlinearity, **kwargs
            )
        elif isinstance(module, nn.GRUCell):
            copy = GRUCell(module.input_size, module.hidden_size, **kwargs)
        else:
            copy = LSTMCell(module.input_size, module.hidden_size, **kwargs)
    else:
        raise TypeError(
            "from_torch takes a torch.nn RNN, GRU, LSTM, RNNCell, GRUCell or LSTMCell, "
            f"got {type(module).__name__}"
        )
    copy.load_state_dict(module.state_dict())
    return copy.train(module.training)


def to_torch(module: RecurrentLayer | _CellBase) -> nn.RNNBase | nn.RNNCellBase:
    """A torch.nn copy of an rnnkit layer or cell (same arguments, device, dtype, weights,
    training mode).

    Raises:
        TypeError: `module` is not an rnnkit layer or cell.
        ValueError: torch.nn cannot express it exactly: a nonlinearity other than
            `'tanh'`/`'relu'`, `reset_after=False`, or `learn_initial_state=True`.
    """
    layer_cls = _TORCH_LAYERS.get(type(module))
    cell_cls = _TORCH_CELLS.get(type(module))
    if layer_cls is None and cell_cls is None:
        raise TypeError(
            "to_torch takes an rnnkit RNN, GRU, LSTM, RNNCell, GRUCell or LSTMCell, "
            f"got {type(module).__name__}"
        )
    kind = type(module).__name__
    _regularize.check_plain(module, "torch.nn")
    nonlinearity = getattr(module, "nonlinearity", "tanh")
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(
            f"torch.nn.{kind} supports only nonlinearity 'tanh' or 'relu', "
            f"got {activation_name(nonlinearity)!r}"
        )
    if not getattr(module, "reset_after", True):
        raise ValueError(
            f"torch.nn.{kind} computes the reset_after=True formulation only, so a "
            f"{kind} with reset_after=False cannot be converted exactly"
        )
    if module.learn_initial_state:
        raise ValueError(
            f"torch.nn.{kind} has no learnable initial state; pass module.initial_h "
            "(and initial_c) as hx yourself and convert a module built with "
            "learn_initial_state=False"
        )
    if layer_cls is not None:
        kwargs = _layer_options(module)
        if layer_cls is nn.RNN:
            kwargs["nonlinearity"] = nonlinearity
        if layer_cls is nn.LSTM:
            kwargs["proj_size"] = module.proj_size
        copy = layer_cls(module.input_size, module.hidden_size, **kwargs)
    else:
        kwargs = dict(bias=module.bias, **_factory(module))
        if cell_cls is nn.RNNCell:
            kwargs["nonlinearity"] = nonlinearity
        copy = cell_cls(module.input_size, module.hidden_size, **kwargs)
    copy.load_state_dict(module.state_dict())
    return copy.train(module.training)
