"""Build cells and single-layer layers from given tensors, as Flux's hand-built cells.

Flux writes `RNNCell(tanh, Wi, Wh, b, state0)`; rnnkit writes
`RNNCell.from_weights(Wi, Wh, b, nonlinearity="tanh", initial_state=state0)`. The sizes come
from the tensors' shapes, which are checked here, and the tensors become the module's
parameters. Structure in a weight (tridiagonal, orthogonal, low-rank) is expressed with
`torch.nn.utils.parametrize` on the built module, not with special tensor types.

The classmethods `from_weights` on `rnnkit.cells._CellBase` and
`rnnkit.layers.RecurrentLayer` delegate to `build`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

_GATES = {
    "rnn": (1, "hidden_size"),
    "gru": (3, "3*hidden_size (gates r, z, n)"),
    "lstm": (4, "4*hidden_size (gates i, f, g, o)"),
}

# Sizes and flags that the tensors decide; passing them as options would contradict them.
_INFERRED = ("input_size", "hidden_size", "bias", "proj_size", "device", "dtype",
             "learn_initial_state")
# A layer built from one set of tensors has one layer and one direction.
_SINGLE_LAYER = ("num_layers", "bidirectional", "dropout")


def _mode(cls: type) -> str:
    # Each concrete layer and cell class names its cell kind; the modules call build().
    mode = getattr(cls, "cell_kind", None)
    if mode is not None:
        return mode
    raise TypeError(
        f"from_weights builds rnnkit's RNN, GRU, LSTM and their cells, got {cls.__name__}"
    )


def _tensor(name: str, value: object, ndim: int, reference: Tensor | None) -> Tensor:
    """Check that `value` is a floating-point `ndim`-D tensor like `reference`."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if value.dim() != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D, got {value.dim()}-D with shape {tuple(value.shape)}"
        )
    if reference is not None:
        if value.dtype != reference.dtype:
            raise TypeError(
                f"{name} has dtype {value.dtype} but weight_hh has dtype {reference.dtype}; "
                "give every tensor the same dtype"
            )
        if value.device != reference.device:
            raise ValueError(
                f"{name} is on {value.device} but weight_hh is on {reference.device}; "
                "give every tensor the same device"
            )
    return value


def _shape(name: str, value: Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{name} must have shape {meaning} = {expected}, got {tuple(value.shape)}"
        )


def _state_vector(
    name: str, value: object, size: int, reference: Tensor, is_layer: bool
) -> Tensor:
    """An initial state given as `(size,)` or `(1, size)`, returned in the module's shape."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(value).__name__}")
    if tuple(value.shape) not in ((size,), (1, size)):
        raise ValueError(
            f"{name} must have shape ({size},) or (1, {size}), got {tuple(value.shape)}"
        )
    value = _tensor(name, value, value.dim(), reference)
    return value.reshape(1, size) if is_layer else value.reshape(size)


def build(
    cls: type,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias_ih: Tensor | None = None,
    bias_hh: Tensor | None = None,
    weight_hr: Tensor | None = None,
    initial_state: Tensor | tuple[Tensor, Tensor] | None = None,
    requires_grad: bool = True,
    options: dict[str, Any] | None = None,
) -> nn.Module:
    """An instance of `cls` (a cell or layer class) whose parameters are the given tensors.

    Shapes (`G` gates: 1 for RNN, 3 for GRU, 4 for LSTM; `H` hidden size, `H_out` is `H`,
    or `P` with an LSTM projection):

    - `weight_ih`: `(G*H, H_in)`; `weight_hh`: `(G*H, H_out)`; gates stacked in torch's
      order (GRU `r, z, n`; LSTM `i, f, g, o`). `H` and `H_in` are read from these.
    - `bias_ih`, `bias_hh`: `(G*H,)` or `None`. Neither given: no biases (`bias=False`).
      One given (Flux's single `b`): the other becomes a zero parameter with
      `requires_grad=False`, so the model keeps one trainable bias and torch.nn's parameter
      names.
    - `weight_hr`: `(P, H)` with `0 < P < H`, LSTM layers only.
    - `initial_state`: `h0` of `(H_out,)` or `(1, H_out)`, for LSTM a pair `(h0, c0)`
      with `c0` of `(H,)` or `(1, H)`. It becomes the learnable `initial_h` (and
      `initial_c`), used when no state is passed to `forward`.

    The tensors become parameters without a copy (as `nn.Embedding.from_pretrained`): training
    updates them in place; pass `tensor.clone()` to keep yours. `requires_grad` applies to all
    of them. `options` go to the constructor (`nonlinearity`, `reset_after`,
    `batch_first`, `backend`).

    Raises:
        TypeError: a non-tensor, a non-floating or mismatched dtype, an option that the tensors
            decide (`hidden_size`, `bias`, ...) or that a single layer cannot take.
        ValueError: a wrong shape or rank, tensors on different devices.
    """
    mode = _mode(cls)
    is_layer = hasattr(cls, "num_directions")  # layers have directions, cells do not
    if not isinstance(requires_grad, bool):
        raise TypeError(f"requires_grad must be a bool, got {type(requires_grad).__name__}")
    options = dict(options or {})
    for name in options:
        if name in _INFERRED:
            raise TypeError(
                f"from_weights reads {name} from the given tensors; do not pass {name}="
            )
        if is_layer and name in _SINGLE_LAYER:
            raise TypeError(
                f"from_weights builds a single-layer, unidirectional layer and does not take "
                f"{name}=; stack such layers yourself, or build the layer with its constructor "
                "and load_state_dict"
            )

    gates, rows_meaning = _GATES[mode]
    weight_hh = _tensor("weight_hh", weight_hh, 2, None)
    rows = weight_hh.shape[0]
    if rows == 0 or rows % gates:
        raise ValueError(
            f"weight_hh must have {rows_meaning} rows, a positive multiple of {gates}, "
            f"got shape {tuple(weight_hh.shape)}"
        )
    hidden_size = rows // gates
    weight_ih = _tensor("weight_ih", weight_ih, 2, weight_hh)
    if weight_ih.shape[0] != rows or weight_ih.shape[1] == 0:
        raise ValueError(
            f"weight_ih must have shape ({rows_meaning}, input_size) = ({rows}, input_size) "
            f"with input_size > 0, got {tuple(weight_ih.shape)}"
        )
    input_size = weight_ih.shape[1]

    out_size = hidden_size
    if weight_hr is not None:
        if not (is_layer and mode == "lstm"):
            raise ValueError(
                f"weight_hr (the LSTM projection) is only accepted by LSTM layers, "
                f"not by {cls.__name__}"
            )
        weight_hr = _tensor("weight_hr", weight_hr, 2, weight_hh)
        proj_size = weight_hr.shape[0]
        if weight_hr.shape[1] != hidden_size or not 0 < proj_size < hidden_size:
            raise ValueError(
                f"weight_hr must have shape (proj_size, hidden_size) = (proj_size, "
                f"{hidden_size}) with 0 < proj_size < {hidden_size}, "
                f"got {tuple(weight_hr.shape)}"
            )
        out_size = proj_size
        options["proj_size"] = proj_size
    if weight_hh.shape[1] != out_size:
        meaning = "(4*hidden_size, proj_size)" if weight_hr is not None else (
            f"({rows_meaning}, hidden_size)"
        )
        hint = (
            "; for a projected LSTM pass weight_hr"
            if mode == "lstm" and is_layer and weight_hr is None
            else ""
        )
        raise ValueError(
            f"weight_hh must have shape {meaning} = {(rows, out_size)}, "
            f"got {tuple(weight_hh.shape)}{hint}"
        )

    biases = {}
    for name, value in (("bias_ih", bias_ih), ("bias_hh", bias_hh)):
        if value is not None:
            biases[name] = _tensor(name, value, 1, weight_hh)
            _shape(name, value, (rows,), f"({rows_meaning},)")

    states: dict[str, Tensor] = {}
    if initial_state is not None:
        if mode == "lstm":
            if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
                raise TypeError(
                    "an LSTM's initial_state must be a pair (h0, c0), "
                    f"got {type(initial_state).__name__}"
                )
            h0, c0 = initial_state
            states["initial_h"] = _state_vector("initial_state[0]", h0, out_size, weight_hh,
                                                is_layer)
            states["initial_c"] = _state_vector("initial_state[1]", c0, hidden_size, weight_hh,
                                                is_layer)
        else:
            states["initial_h"] = _state_vector("initial_state", initial_state, out_size,
                                                weight_hh, is_layer)

    # Built on the meta device: no memory and no random numbers drawn for an initialisation
    # that the given tensors replace. Every parameter is assigned below.
    module = cls(
        input_size,
        hidden_size,
        bias=bool(biases),
        device="meta",
        dtype=weight_hh.dtype,
        learn_initial_state=bool(states),
        **options,
    )
    # The missing one of a single given bias is a frozen zero: one trainable bias, as Flux's b.
    frozen = {name for name in ("bias_ih", "bias_hh") if biases and name not in biases}
    for name in frozen:
        biases[name] = weight_hh.new_zeros(rows)
    given = {"weight_ih": weight_ih, "weight_hh": weight_hh, **biases}
    if weight_hr is not None:
        given["weight_hr"] = weight_hr
    suffix = "_l0" if is_layer else ""
    for name, value in given.items():
        trainable = requires_grad and name not in frozen
        setattr(module, name + suffix, nn.Parameter(value.detach(), requires_grad=trainable))
    for name, value in states.items():
        setattr(module, name, nn.Parameter(value.detach(), requires_grad=requires_grad))
    unset = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if unset:
        raise RuntimeError(f"from_weights does not know how to fill {unset} of {cls.__name__}")
    return module
