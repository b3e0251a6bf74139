"""Shared by layers and cells: the regularization options' checks, the layer-norm
parameters, and the masks (drawn on the CPU from torch's default generator, so
`torch.manual_seed` reproduces them and every backend and device sees the same ones)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnkit import _checks
from rnnkit.ops.activations import Activation, activation_name, check_activation
from rnnkit.ops.spec import CellSpec


def spec(
    mode: str,
    *,
    activation: Activation = "tanh",
    recurrent_activation: Activation = "sigmoid",
    reset_after: bool = True,
    zoneout: float = 0.0,
    layer_norm: bool = False,
) -> CellSpec:
    """The checked [`CellSpec`][rnnkit.ops.spec.CellSpec] of a GRU/LSTM layer or cell.

    Raises:
        ValueError, TypeError: an unknown activation, `zoneout` outside `[0, 1)`,
            `layer_norm` not a bool, or with `reset_after=False`.
    """
    activation = _named("activation", activation)
    recurrent_activation = _named("recurrent_activation", recurrent_activation)
    zoneout = _checks.probability("zoneout", zoneout)
    layer_norm = _checks.boolean("layer_norm", layer_norm)
    if layer_norm and not reset_after:
        raise ValueError(
            "layer_norm=True is defined for the reset-after GRU only (haste's LayerNormGRU "
            "normalizes W_hh h as a whole, which reset_after=False splits); got "
            "reset_after=False"
        )
    return CellSpec(mode, nonlinearity=activation, reset_after=reset_after,
                    recurrent_activation=recurrent_activation, zoneout=zoneout,
                    layer_norm=layer_norm)


def _named(name: str, value: object) -> Activation:
    try:
        return check_activation(value)
    except (ValueError, TypeError) as error:
        raise type(error)(str(error).replace("nonlinearity", name, 1)) from None


def refuse_layer_norm(layer_norm: object) -> None:
    """RNN and RNNCell have no layer-norm form.

    Raises:
        ValueError: `layer_norm` is true.
    """
    if _checks.boolean("layer_norm", layer_norm):
        raise ValueError("layer_norm=True is defined for GRU and LSTM only, not for RNN")


def spec_repr(spec: CellSpec) -> str:
    """The `extra_repr` piece of a GRU/LSTM's non-default cell options."""
    text = ""
    if spec.nonlinearity != "tanh":
        text += f", activation={activation_name(spec.nonlinearity)!r}"
    if spec.recurrent_activation != "sigmoid":
        text += f", recurrent_activation={activation_name(spec.recurrent_activation)!r}"
    if spec.zoneout:
        text += f", zoneout={spec.zoneout}"
    if spec.layer_norm:
        text += ", layer_norm=True"
    return text


def norm_shapes(spec: CellSpec, hidden_size: int) -> dict[str, int]:
    """The layer-norm parameters of one layer-direction (base names) and their sizes."""
    if not spec.layer_norm:
        return {}
    gates = spec.num_gates * hidden_size
    shapes = {
        "layer_norm_ih_weight": gates, "layer_norm_ih_bias": gates,
        "layer_norm_hh_weight": gates, "layer_norm_hh_bias": gates,
    }
    if spec.mode == "lstm":
        shapes.update(layer_norm_cell_weight=hidden_size, layer_norm_cell_bias=hidden_size)
    return shapes


def init_parameter(name: str, param: Tensor, bound: float) -> None:
    """torch.nn's U(-bound, bound) for weights and biases; a layer norm's gain 1, bias 0."""
    if name.startswith("layer_norm_"):
        nn.init.ones_(param) if "_weight" in name else nn.init.zeros_(param)
    else:
        nn.init.uniform_(param, -bound, bound)


def add_forget_bias(bias_ih: Tensor | None, hidden_size: int, forget_bias: float) -> None:
    """Add `forget_bias` to the forget-gate rows of an LSTM's `bias_ih` (rows H..2H)."""
    if forget_bias and bias_ih is not None:
        with torch.no_grad():
            bias_ih[hidden_size:2 * hidden_size] += forget_bias


def norms(module: nn.Module, suffix: str, spec: CellSpec):
    """`(norm_ih, norm_hh, norm_cell)` as `(gain, bias)` pairs of the parameters ending in
    `suffix`, or `None`s without layer norm."""
    if not spec.layer_norm:
        return None, None, None

    def pair(part):
        return (getattr(module, f"layer_norm_{part}_weight{suffix}"),
                getattr(module, f"layer_norm_{part}_bias{suffix}"))

    return pair("ih"), pair("hh"), pair("cell") if spec.mode == "lstm" else None


def dropout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Dropout multipliers of `shape`: 0 with probability `p`, else `1/(1-p)`."""
    keep = torch.empty(shape).bernoulli_(1 - p)  # the same draws whatever the dtype
    return keep.to(like.device, like.dtype) / (1 - p)


def zoneout_mask(shape: tuple[int, ...], p: float, like: Tensor) -> Tensor:
    """Zoneout masks of `shape`: 1 (keep the previous value) with probability `p`, else 0."""
    return torch.empty(shape).bernoulli_(p).to(like.device, like.dtype)


def refuse_export(masks: dict[str, Tensor]) -> dict[str, Tensor]:
    """`masks`, unless a graph is being exported: masks drawn while tracing would be frozen
    into the graph as constants.

    Raises:
        ValueError: exporting with training masks.
    """
    if masks and torch.compiler.is_exporting():
        raise ValueError(
            "cannot export a layer in training mode with recurrent dropout, input dropout or "
            "zoneout: their masks are drawn per call; export the model in eval() (dropout is "
            "then the identity and zoneout its expectation)"
        )
    return masks


def check_plain(module, library: str) -> None:
    """Refuse the options `library`'s layers lack: zoneout, layer norm, recurrent or input
    dropout, and GRU/LSTM activations other than tanh and sigmoid (`forget_bias` is an
    initial value only and converts).

    Raises:
        ValueError: naming the option.
    """
    spec = module.spec
    found = []
    if spec.mode != "rnn" and spec.nonlinearity != "tanh":
        found.append("activation")
    if spec.mode != "rnn" and spec.recurrent_activation != "sigmoid":
        found.append("recurrent_activation")
    for name in ("zoneout", "layer_norm"):
        if getattr(spec, name):
            found.append(name)
    for name in ("recurrent_dropout", "input_dropout"):
        if getattr(module, name, 0.0):
            found.append(name)
    if found:
        raise ValueError(
            f"{library} has no {', '.join(found)} for its {type(module).__name__}, so this "
            "layer cannot be converted exactly; convert one built without them"
        )
