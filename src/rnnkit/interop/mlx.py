r"""Conversion between MLX's `mlx.nn.RNN`/`GRU`/`LSTM` and rnnkit layers.

MLX's layers are single-layer and unidirectional, take `NLD` or `LD` input and keep their
weights as (rnnkit name on the right):

- `RNN`: `Wxh` (H, D) = `weight_ih_l0`, `Whh` (H, H) = `weight_hh_l0`, one `bias` (H)
  = `bias_ih_l0 + bias_hh_l0`; any callable `nonlinearity`.
- `GRU`: `Wx` (3H, D), `Wh` (3H, H) in torch's gate order (r, z, n); `b` (3H) is added to
  the input projection and `bhn` (H) sits inside the reset product, so `b` = `bias_ih_l0`
  + (`b_hr`, `b_hz`, 0) and `bhn` = `b_hn`. This is the `reset_after=True` form.
- `LSTM`: `Wx` (4H, D), `Wh` (4H, H) in torch's gate order (i, f, g, o), one `bias` (4H)
  = `bias_ih_l0 + bias_hh_l0`.

With no hidden state given MLX starts from zeros, as rnnkit does.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import Tensor

from rnnkit import _regularize
from rnnkit.interop._common import (
    as_rnnkit_layer,
    check_single_layer,
    load_weights,
    to_numpy,
    torch_dtype,
)
from rnnkit.layers import GRU, LSTM, RNN, RecurrentLayer
from rnnkit.ops.activations import TABLE


def _import_mlx():
    try:
        import mlx.core as mx
        import mlx.nn as mnn
    except ImportError as error:
        raise ImportError(
            "MLX conversion needs the mlx package: pip install 'rnnkit[mlx]'"
        ) from error
    return mx, mnn


def _from_mx(array) -> np.ndarray:
    mx, _ = _import_mlx()
    if array.dtype == mx.bfloat16:
        array = array.astype(mx.float32)
    return np.array(array, copy=True)


def _mx_dtype(dtype: torch.dtype):
    """MLX's dtype of the same name (`mx.array` alone would turn float64 into float32)."""
    mx, _ = _import_mlx()
    found = getattr(mx, str(dtype).removeprefix("torch."), None)
    if not isinstance(found, mx.Dtype):
        raise TypeError(f"MLX has no dtype for {dtype}")
    return found


def _to_mx(tensor: Tensor, dtype: torch.dtype | None = None):
    """`tensor` as an MLX array of `dtype` (default: the tensor's own)."""
    mx, _ = _import_mlx()
    return mx.array(to_numpy(tensor), dtype=_mx_dtype(dtype or tensor.dtype))


class _MLXFunction(torch.autograd.Function):
    """Apply an MLX callable to a torch tensor; the backward pass uses MLX's own vjp."""

    @staticmethod
    def forward(ctx, input: Tensor, fn) -> Tensor:
        ctx.fn = fn
        ctx.save_for_backward(input)
        result = _from_mx(fn(_to_mx(input)))
        return torch.as_tensor(result).to(device=input.device, dtype=input.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        mx, _ = _import_mlx()
        (input,) = ctx.saved_tensors
        _, (grad_input,) = mx.vjp(ctx.fn, [_to_mx(input)], [_to_mx(grad, input.dtype)])
        result = torch.as_tensor(_from_mx(grad_input))
        return result.to(device=grad.device, dtype=grad.dtype), None


class MLXActivation:
    """An MLX elementwise callable made usable as a torch nonlinearity.

    Each call copies the tensor to MLX and back (and the backward pass uses `mlx.core.vjp`),
    so it is exact but slow, and always runs on rnnkit's reference path. `to_mlx` turns
    it back into the original callable.
    """

    def __init__(self, fn) -> None:
        self.fn = fn
        self.__name__ = "mlx:" + getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, input: Tensor) -> Tensor:
        return _MLXFunction.apply(input, self.fn)

    def __repr__(self) -> str:
        return f"MLXActivation({self.fn!r})"


def _identity(x):
    return x


def _named_activations():
    """`(mlx function, rnnkit name)` pairs and `(mlx module class, name)` pairs, from the
    activation table; `mlx.core`'s own tanh and sigmoid are recognised too."""
    mx, mnn = _import_mlx()
    functions = [(getattr(mnn, row.mlx), row.name) for row in TABLE if row.mlx is not None]
    functions += [(mx.tanh, "tanh"), (mx.sigmoid, "sigmoid"), (_identity, "identity")]
    classes = [
        (getattr(mnn, row.mlx_class), row.name) for row in TABLE if row.mlx_class is not None
    ]
    return functions, classes


def _activation_from_mlx(fn):
    _, mnn = _import_mlx()
    functions, classes = _named_activations()
    for known, name in functions:
        if fn is known:
            return name
    for cls, name in classes:
        if type(fn) is cls:
            return name
    if type(fn) is mnn.GELU and fn._approx == "none":
        return "gelu"
    return MLXActivation(fn)


def _activation_to_mlx(nonlinearity):
    if isinstance(nonlinearity, MLXActivation):
        return nonlinearity.fn
    if isinstance(nonlinearity, str):
        functions, _ = _named_activations()
        for fn, name in functions:
            # The first match is the mlx.nn function, the one MLX itself defaults to.
            if name == nonlinearity:
                return fn
    raise ValueError(
        f"the nonlinearity {nonlinearity!r} has no MLX equivalent; use a named activation "
        f"({', '.join(row.name for row in TABLE)}) or a layer made by from_mlx"
    )


def from_mlx(layer, *, backend: str | None = None) -> RecurrentLayer:
    """An rnnkit layer equal to an `mlx.nn.RNN`, `GRU` or `LSTM`.

    The result has `batch_first=True` (MLX's `NLD`; `LD` input is unbatched for both)
    and the MLX weights' dtype. For the same input and initial state, its output equals the
    MLX layer's: `out, h_n = from_mlx(layer)(x, h0[None])` gives MLX's `layer(x, h0)`;
    for LSTM, MLX returns `(all h, all c)` where rnnkit returns `(all h, (h_n, c_n))`.

    An RNN nonlinearity that is a known MLX activation (`mlx.nn.tanh`, `mx.tanh`,
    `mlx.nn.relu`, `nn.ReLU()`, sigmoid, silu, exact gelu, softsign, hard_tanh) becomes the
    rnnkit name; any other callable is wrapped in `MLXActivation` (exact, but slow).

    Raises:
        TypeError: `layer` is not one of those MLX layers.
    """
    mx, mnn = _import_mlx()
    if isinstance(layer, mnn.LSTM):
        cls, weights, biases = LSTM, (layer.Wx, layer.Wh), (layer.bias,)
    elif isinstance(layer, mnn.GRU):
        cls, weights, biases = GRU, (layer.Wx, layer.Wh), (layer.b, layer.bhn)
    elif isinstance(layer, mnn.RNN):
        cls, weights, biases = RNN, (layer.Wxh, layer.Whh), (layer.bias,)
    else:
        raise TypeError(f"from_mlx takes an mlx.nn RNN, GRU or LSTM, got {type(layer).__name__}")
    weight_ih, weight_hh = (_from_mx(w) for w in weights)
    dtype = torch.bfloat16 if weights[0].dtype == mx.bfloat16 else torch_dtype(weight_ih.dtype)
    hidden_size = layer.hidden_size
    has_bias = any(b is not None for b in biases)
    kwargs = dict(bias=has_bias, batch_first=True, dtype=dtype, backend=backend)
    if cls is RNN:
        kwargs["nonlinearity"] = _activation_from_mlx(layer.nonlinearity)
    module = cls(weight_ih.shape[1], hidden_size, **kwargs)

    values = {"weight_ih_l0": weight_ih, "weight_hh_l0": weight_hh}
    if has_bias:
        values["bias_ih_l0"] = None if biases[0] is None else _from_mx(biases[0])
        values["bias_hh_l0"] = None
        if cls is GRU and biases[1] is not None:
            bias_hh = np.zeros(3 * hidden_size, dtype=weight_ih.dtype)
            bias_hh[2 * hidden_size:] = _from_mx(biases[1])
            values["bias_hh_l0"] = bias_hh
    load_weights(module, values)
    return module


def to_mlx(module: RecurrentLayer):
    """An `mlx.nn.RNN`, `GRU` or `LSTM` equal to a one-layer, one-direction rnnkit layer
    (a torch.nn layer is accepted too). MLX takes `NLD`/`LD` input whatever
    `batch_first` says.

    The MLX weights have the module's dtype, so float64 round-trips exactly. MLX computes in
    float64 on its CPU device only: when the default device is another one, a float64 layer
    comes with a warning to run it under `mx.stream(mx.cpu)` (or to convert it to float32).

    Raises:
        TypeError: `module` is not an RNN, GRU or LSTM layer.
        ValueError: MLX cannot express it exactly: stacked, bidirectional, `proj_size`,
            `learn_initial_state`, GRU `reset_after=False`, or an RNN nonlinearity with
            no MLX equivalent (a torch callable).
    """
    mx, mnn = _import_mlx()
    module = as_rnnkit_layer(module, "mlx")
    check_single_layer(module, "MLX")
    _regularize.check_plain(module, "MLX")
    if isinstance(module, GRU) and not module.reset_after:
        raise ValueError(
            "mlx.nn.GRU computes the reset_after=True formulation only, so a GRU with "
            "reset_after=False cannot be converted exactly"
        )
    dtype = module.weight_ih_l0.dtype
    if dtype == torch.float64 and mx.default_device().type != mx.cpu:
        warnings.warn(
            f"the MLX layer holds float64 weights, which MLX computes on its CPU device only "
            f"(the default device is {mx.default_device()}); call it under "
            "`with mx.stream(mx.cpu):`, or convert a float32 module",
            stacklevel=2,
        )
    weight_ih = _to_mx(module.weight_ih_l0)
    weight_hh = _to_mx(module.weight_hh_l0)
    bias_ih = module.bias_ih_l0.detach() if module.bias else None
    bias_hh = module.bias_hh_l0.detach() if module.bias else None
    size = module.hidden_size
    if isinstance(module, RNN):
        nonlinearity = _activation_to_mlx(module.nonlinearity)
        layer = mnn.RNN(module.input_size, size, bias=module.bias, nonlinearity=nonlinearity)
        layer.Wxh, layer.Whh = weight_ih, weight_hh
        if module.bias:
            layer.bias = _to_mx(bias_ih + bias_hh, dtype)
    elif isinstance(module, GRU):
        layer = mnn.GRU(module.input_size, size, bias=module.bias)
        layer.Wx, layer.Wh = weight_ih, weight_hh
        if module.bias:
            folded = bias_ih.clone()
            folded[: 2 * size] += bias_hh[: 2 * size]
            layer.b = _to_mx(folded, dtype)
            layer.bhn = _to_mx(bias_hh[2 * size:], dtype)
    else:
        layer = mnn.LSTM(module.input_size, size, bias=module.bias)
        layer.Wx, layer.Wh = weight_ih, weight_hh
        if module.bias:
            layer.bias = _to_mx(bias_ih + bias_hh, dtype)
    return layer
