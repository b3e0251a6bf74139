r"""One-step streaming on the CPU: a step of a layer or cell with as little Python as possible.

An actor or a live decoder calls a module once per time step with a batch of one or a few
rows. The work of such a step is two small matrix-vector products, so the time goes into the
general path's bookkeeping: building a [`Call`][rnnkit.ops.spec.Call], planning it, the
separate input projection, and (LSTM) packing the weights anew on every call. This module is
the short way round: [`serves`][rnnkit.ops.cpu.stream.serves] decides, in one place, whether a
step may skip all that, and the compiled `rnnkit::stream_step` (`csrc/stream.cpp`) runs the
whole stack of layers in one call from weights packed once per module.

The packed weights are kept per module and keyed by every parameter's identity, `_version`
and `data_ptr()` (and the dtype): an optimizer step, `load_state_dict`, `.to()`, an assignment
to `.data` or a new parameter packs them anew at the next step; a stale copy is never used.
The cache also holds the packed parameters and their storage, so no new parameter or tensor
can take over an identity or an address it has recorded.

A step's Python is kept to the checks above (each a cheap attribute read or a C call), one
comparison of the key, and the kernel call: no [`Call`][rnnkit.ops.spec.Call] or planning, no
views or copies around the kernel, which takes and gives the callers' own shapes.

What is served: torch.nn's plain cells (see [`CellSpec.plain`][rnnkit.ops.spec.CellSpec.plain];
RNN with a named activation, GRU in both formulations, LSTM with or without projection),
unidirectional and stacked, on float32/float64 CPU tensors, when no gradient is needed, with
`backend` `"auto"` or `"cpu"`, outside `torch.compile`, `torch.export`, `torch.jit.trace`
(so ONNX export too), autocast and `torch.func` transforms, without lengths, resets, masks
or a PackedSequence, without any dropout in training (between layers, on the input or the
recurrent state), layer norm or zoneout, and without weights
computed at each call (parametrizations, pruning). Anything else (and any input or state of
an unexpected shape, so that the general path raises its own error) returns `None` here and
runs as before.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch import Tensor, nn

from rnnkit.ops.activations import code
from rnnkit.ops.cpu import _build, _ops
from rnnkit.ops.spec import State

_DTYPES = (torch.float32, torch.float64)
_MODES = {"rnn": 0, "gru": 1, "lstm": 2}

# Steps run on the fast path since import: tests read it to see that the path was taken.
served = 0

_op = None  # torch.ops.rnnkit.stream_step.default, once the kernels are loaded
_pack_op = None  # torch.ops.rnnkit.stream_pack.default
_caches: weakref.WeakKeyDictionary[nn.Module, _Packed] = weakref.WeakKeyDictionary()


class _Packed:
    """A module's weights packed for `stream_step`, and what they were packed from."""

    __slots__ = ("anchors", "key", "mode", "activation", "reset_after", "names", "weights",
                 "layers", "num_states", "input_size", "hidden_size", "out_size", "spec",
                 "dtype", "gates")

    def __init__(self, module: nn.Module, spec, names: tuple[tuple[str, ...], ...]) -> None:
        self.spec = spec
        self.names = [name for layer in names for name in layer]
        self.mode = _MODES[spec.mode]
        self.gates = (1, 3, 4)[self.mode]
        self.num_states = spec.num_states
        self.activation = code(spec.nonlinearity) if spec.mode == "rnn" else 0
        self.reset_after = spec.reset_after
        self.layers = len(names)
        self.input_size = module.input_size
        self.hidden_size = module.hidden_size
        self.out_size = getattr(module, "proj_size", 0) or module.hidden_size
        self.key = None
        self.dtype = None
        self.anchors: list[Tensor] = []
        self.weights: list[Tensor] | None = None

    def pack(self, params: list[Tensor | None], key: list) -> None:
        """Pack `params` (five per layer: W_ih, W_hh, b_ih, b_hh, W_hr) as csrc/stream.cpp
        reads them: the weights transposed into panels (`stream_pack`), the biases summed
        (apart for GRU). A weight that is not a parameter (computed by a hook, as the old
        `weight_norm` and `prune` do) or a lone bias leaves `weights` `None`: such a module
        is not served."""
        self.key = key
        self.weights = None
        self.anchors = []
        self.dtype = params[0].dtype if params[0] is not None else None
        for layer in range(self.layers):
            w_ih, w_hh, b_ih, b_hh, w_hr = params[5 * layer: 5 * layer + 5]
            if w_ih is None or w_hh is None or (b_ih is None) != (b_hh is None) or (
                (w_hr is None) != (self.out_size == self.hidden_size)
            ):
                return
        if self.dtype not in _DTYPES or any(
            p is not None and (p.dtype != self.dtype or not p.is_cpu) for p in params
        ):
            return
        with torch.no_grad():
            weights = []
            for layer in range(self.layers):
                w_ih, w_hh, b_ih, b_hh, w_hr = params[5 * layer: 5 * layer + 5]
                empty = w_ih.new_empty(0)
                if b_ih is None:
                    bias = empty
                elif self.mode == _MODES["gru"]:
                    bias = torch.cat([b_ih, b_hh])
                else:
                    bias = b_ih + b_hh
                projection = empty if w_hr is None else _pack_op(w_hr, 1)
                weights += [_pack_op(w_ih, self.gates), _pack_op(w_hh, self.gates),
                            bias.contiguous(), projection]
        self.weights = weights
        # Holding the packed parameters and their storage keeps their identities and addresses
        # from being reused.
        self.anchors = [q for p in params if p is not None for q in (p, p.detach())]


def _layout(module: nn.Module) -> tuple[tuple[str, ...], ...] | None:
    """The parameter names per layer, or `None` when the module is not a plain stack."""
    spec = getattr(module, "spec", None)
    if spec is None or not spec.plain or spec.mode not in _MODES:
        return None
    if spec.mode == "rnn" and spec.nonlinearity not in _ops.ACTIVATIONS:
        return None
    if "parametrizations" in module._modules or module.input_size == 0 or (
        module.hidden_size == 0
    ):
        return None
    base = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    layers = getattr(module, "num_layers", None)
    if layers is None:  # a cell
        return (base,)
    if module.bidirectional:
        return None
    return tuple(tuple(f"{name}_l{layer}" for name in base) for layer in range(layers))


def serves(module: nn.Module, input: Tensor, state: State | None) -> _Packed | None:
    """The one decision of the fast path: the module's packed weights when this step of
    `module` may run on `stream_step`, else `None` (see the module docstring for what is
    served). Shapes are checked by the callers; this packs the weights anew when a parameter
    changed since they were packed."""
    dtype = input.dtype
    if (dtype not in _DTYPES or not input.is_cpu or torch.compiler.is_compiling()
            or torch.compiler.is_exporting() or torch.jit.is_tracing()
            or torch.is_autocast_enabled("cpu") or torch._C._are_functorch_transforms_active()):
        return None
    requested = module.backend or _environ_get("RNNKIT_BACKEND")
    if requested and requested != "auto" and requested != "cpu":
        return None  # another backend, or a bad name that the general path reports
    if module.training and (
        module.recurrent_dropout or module.input_dropout
        or getattr(module, "dropout", 0) and module.num_layers > 1
    ):
        return None  # dropout masks to draw and apply
    grad = torch.is_grad_enabled()
    if grad and input.requires_grad:
        return None
    if state is not None:
        for tensor in state:
            if tensor.dtype != dtype or not tensor.is_cpu or grad and tensor.requires_grad:
                return None
    packed = _caches.get(module)
    if packed is None or packed.spec is not module.spec:
        packed = _new_cache(module)
        if packed is None:
            return None
    get = module._parameters.get
    params = [get(name) for name in packed.names]
    if grad and (any(p is not None and p.requires_grad for p in params)
                 or state is None and module.learn_initial_state):
        return None  # a parameter wants its gradient
    if packed.key != [(id(p), p._version, p.data_ptr()) for p in params if p is not None]:
        if not _repack(packed, params):
            return None
    return packed if packed.weights is not None and packed.dtype is dtype else None


def _new_cache(module: nn.Module) -> _Packed | None:
    names = _layout(module)
    if names is None:
        return None
    packed = _caches[module] = _Packed(module, module.spec, names)
    return packed


def _repack(packed: _Packed, params: list[Tensor | None]) -> bool:
    """Pack `params` anew (loading the kernels on first use); `False` without kernels."""
    global _op, _pack_op
    if _op is None:
        if _build.status() is not None:
            return False
        _op = torch.ops.rnnkit.stream_step.default
        _pack_op = torch.ops.rnnkit.stream_pack.default
    # Packed from the same parameters, storage and versions, the dtype and device cannot
    # differ: the key is all a step compares.
    packed.pack(params, [(id(p), p._version, p.data_ptr()) for p in params if p is not None])
    return True


def _environ_get(name: str) -> str | None:
    """`os.environ.get(name)`, read from its underlying mapping where the platform allows:
    `os.environ.get` encodes the key anew at every call, a cost each step would pay."""
    data = getattr(os.environ, "_data", None)
    if data is None:  # pragma: no cover - every CPython has it
        return os.environ.get(name)
    value = data.get(_ENV_KEYS.get(name) or _ENV_KEYS.setdefault(name, os.environ.encodekey(name)))
    return None if value is None else os.environ.decodevalue(value)


_ENV_KEYS: dict[str, object] = {}


def _states(value: object) -> State | None | bool:
    """`value` (a module's `hx`: `None`, `h` or a tuple of tensors) as a state tuple, `None`
    for no state, or `False` for anything else (the general path then explains it)."""
    if value is None:
        return None
    if type(value) is tuple:
        for v in value:
            if not isinstance(v, Tensor):
                return False
        return value
    return (value,) if isinstance(value, Tensor) else False


def layer_step(
    module: nn.Module, input: object, state: object
) -> tuple[Tensor, State] | None:
    """One step of a unidirectional layer on the fast path: `(output, final states)` shaped
    as its `forward` returns them (the states as a tuple), or `None` when
    [`serves`][rnnkit.ops.cpu.stream.serves] declines or a shape is not one step's."""
    global served
    state = _states(state)
    if state is False or not isinstance(input, Tensor):
        return None
    shape = input.shape
    rank = len(shape)
    if rank == 3:
        step, batch = (shape[1], shape[0]) if module.batch_first else (shape[0], shape[1])
    elif rank == 2:
        step, batch = shape[0], None
    else:
        return None
    if step != 1:
        return None
    packed = serves(module, input, state)
    if packed is None or shape[-1] != packed.input_size:
        return None
    if state is None:
        state = module.initial_state(batch)
    lead = (packed.layers,) if batch is None else (packed.layers, batch)
    if len(state) != packed.num_states or state[0].shape != (*lead, packed.out_size):
        return None
    if packed.mode == 2:
        if state[1].shape != (*lead, packed.hidden_size):
            return None
        output, h_n, c_n = _op(input, state[0], state[1], packed.weights, 2, 0, False)
        served += 1
        return output, (h_n, c_n)
    output, h_n, _ = _op(input, state[0], None, packed.weights, packed.mode,
                         packed.activation, packed.reset_after)
    served += 1
    return output, (h_n,)


def cell_step(
    module: nn.Module, input: object, state: object
) -> tuple[Tensor, State] | None:
    """One step of a cell on the fast path: `(h', final states)` shaped as the cell returns
    them, or `None` when [`serves`][rnnkit.ops.cpu.stream.serves] declines or a shape is not
    the cell's."""
    global served
    state = _states(state)
    if state is False or not isinstance(input, Tensor):
        return None
    shape = input.shape
    if len(shape) not in (1, 2):
        return None
    packed = serves(module, input, state)
    if packed is None or shape[-1] != packed.input_size:
        return None
    batch = shape[0] if len(shape) == 2 else None
    if state is None:
        state = module.initial_state(batch)
    expected = (packed.hidden_size,) if batch is None else (batch, packed.hidden_size)
    if len(state) != packed.num_states or state[0].shape != expected:
        return None
    if packed.mode == 2:
        if state[1].shape != expected:
            return None
        _, h_n, c_n = _op(input, state[0], state[1], packed.weights, 2, 0, False)
        served += 1
        return h_n, (h_n, c_n)
    _, h_n, _ = _op(input, state[0], None, packed.weights, packed.mode, packed.activation,
                    packed.reset_after)
    served += 1
    return h_n, (h_n,)
