"""The one place where a call picks its backend, or falls back to the reference path.

A backend is an object with ``name``, ``unavailable_reason()`` (``None`` when it can run
here), ``unsupported_reason(call)`` (``None`` when it can serve this call) and
``recurrence(...)`` with the signature of :func:`rnnkit.ops.reference.recurrence`.
Backends register themselves with :func:`register`. ``backend="auto"`` takes the first
registered backend that claims the tensors' device type and can serve the call; a named
backend that cannot serve a call falls back with a warning that gives the reason.

Set ``RNNKIT_DEBUG=1`` (or enable the ``rnnkit`` logger at DEBUG) to see every fallback.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit import _checks
from rnnkit.cells import CellSpec
from rnnkit.ops import reference

logger = logging.getLogger("rnnkit")


@dataclass(frozen=True)
class Call:
    """Everything a backend may look at to decide whether it can serve a call."""

    spec: CellSpec
    gates_x: Tensor
    state: tuple[Tensor, ...]
    weight_hh: Tensor
    bias_hh: Tensor | None
    weight_hr: Tensor | None
    lengths: Tensor | None
    reverse: bool


class Backend(Protocol):
    name: str
    device_types: tuple[str, ...]

    def unavailable_reason(self) -> str | None: ...

    def unsupported_reason(self, call: Call) -> str | None: ...

    def recurrence(self, *args) -> tuple[Tensor, tuple[Tensor, ...]]: ...


_BACKENDS: dict[str, Backend] = {}
_warned: set[str] = set()
_builtins_loaded = False


def register(backend: Backend) -> None:
    """Make ``backend`` selectable by name and by ``"auto"``, in registration order."""
    _BACKENDS[backend.name] = backend


def registered() -> dict[str, Backend]:
    _load_builtin_backends()
    return dict(_BACKENDS)


def _load_builtin_backends() -> None:
    # Importing a backend module registers it; a missing optional dependency just leaves it out.
    global _builtins_loaded
    if _builtins_loaded or torch.compiler.is_compiling():
        # Importing cannot be traced; layers and cells load the backends when they are built.
        return
    _builtins_loaded = True
    for module in ("rnnkit.ops.cpu", "rnnkit.ops.triton"):
        try:
            __import__(module)
        except ImportError as error:
            logger.debug("backend module %s not loaded: %s", module, error)


def _note_fallback(requested: str, reason: str) -> None:
    message = f"rnnkit: backend {requested!r} cannot serve this call ({reason}); using 'reference'"
    if os.environ.get("RNNKIT_DEBUG"):
        print(message)
    logger.debug(message)
    if requested != "auto" and message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def _auto_declined(backend: Backend, call: Call) -> str | None:
    """Why ``"auto"`` passes ``backend`` over for ``call``, if it does.

    A backend may define ``auto_declines(call)``: calls it serves when asked by name, but that
    the reference path runs faster (a single small step, say, has no time loop to fuse).
    """
    declines = getattr(backend, "auto_declines", None)
    return None if declines is None else declines(call)


def choose(call: Call, requested: str | None) -> tuple[str, str | None]:
    """The backend name that will serve ``call``, and why others were passed over."""
    requested = requested or _checks.env_backend()
    if requested == "reference" or torch.compiler.is_exporting():
        # Exported graphs hold only standard ops (layers export through rnnkit.export).
        return "reference", None
    if torch._C._are_functorch_transforms_active():
        # vmap/jacrev/jvp need batching and forward-AD rules that only plain torch ops have.
        return "reference", "torch.func transforms run on the reference path"
    backends = registered()
    device_type = call.gates_x.device.type
    if requested == "auto":
        reasons = []
        for backend in backends.values():
            if device_type not in backend.device_types:
                continue
            reason = (
                backend.unavailable_reason()
                or backend.unsupported_reason(call)
                or _auto_declined(backend, call)
            )
            if reason is None:
                return backend.name, None
            reasons.append(f"{backend.name}: {reason}")
        return "reference", "; ".join(reasons) or f"no fused backend for {device_type} tensors"
    backend = backends.get(requested)
    if backend is None:
        return "reference", f"backend {requested!r} is not installed"
    reason = backend.unavailable_reason() or backend.unsupported_reason(call)
    return (requested, None) if reason is None else ("reference", reason)


def _plain_torch_only(device_type: str) -> bool:
    """Whether a layer's input projection (and a fused layer path) must be plain torch ops."""
    return (
        torch.compiler.is_exporting()  # exported graphs hold only standard ops
        or torch._C._are_functorch_transforms_active()  # vmap etc. need torch's own rules
        or torch.is_autocast_enabled(device_type)  # F.linear knows the autocast dtype
    )


def linear(
    input: Tensor, weight: Tensor, bias: Tensor | None, *, backend: str | None = None
) -> Tensor:
    """A layer's input projection ``input @ weight.T + bias``, by a backend that has a faster one.

    A backend may offer ``linear(input, weight, bias)`` with ``linear_unsupported_reason``;
    otherwise, and for ``backend="reference"``, this is :func:`torch.nn.functional.linear`.
    """
    requested = backend or _checks.env_backend()
    if requested != "reference" and not _plain_torch_only(input.device.type):
        names = list(registered()) if requested == "auto" else [requested]
        for name in names:
            chosen = _BACKENDS.get(name)
            offer = getattr(chosen, "linear", None)
            if offer is None or input.device.type not in chosen.device_types:
                continue
            if chosen.unavailable_reason() is None and (
                chosen.linear_unsupported_reason(input, weight, bias) is None
            ):
                return offer(input, weight, bias)
    return F.linear(input, weight, bias)


def layer_direction(
    spec: CellSpec,
    input: Tensor,
    weight_ih: Tensor,
    bias_ih: Tensor | None,
    state: tuple[Tensor, ...],
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    *,
    backend: str | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One layer-direction from its input (T, B, I): the projection, then the recurrence.

    A backend may offer ``layer_direction`` with these arguments, fusing the two (it returns
    ``None`` to decline a call); otherwise, and for ``backend="reference"``, under export,
    torch.func transforms or autocast, this is :func:`linear` then :func:`recurrence`.
    """
    requested = backend or _checks.env_backend()
    if requested != "reference" and not _plain_torch_only(input.device.type):
        backends = registered()
        names = list(backends) if requested == "auto" else [requested]
        for name in names:
            chosen = backends.get(name)
            if chosen is None or input.device.type not in chosen.device_types:
                continue
            offer = getattr(chosen, "layer_direction", None)
            if offer is not None:
                result = offer(
                    spec, input, weight_ih, bias_ih, state, weight_hh, bias_hh, weight_hr,
                    lengths, reverse,
                )
                if result is not None:
                    return result
            break  # "auto" would pick this backend first: keep to its regular path
    gates_x = linear(input, weight_ih, bias_ih, backend=backend)
    return recurrence(
        spec, gates_x, state, weight_hh, bias_hh, weight_hr, lengths, reverse, backend=backend
    )


def recurrence(
    spec: CellSpec,
    gates_x: Tensor,
    state: tuple[Tensor, ...],
    weight_hh: Tensor,
    bias_hh: Tensor | None,
    weight_hr: Tensor | None,
    lengths: Tensor | None,
    reverse: bool,
    *,
    backend: str | None = None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Run one layer-direction on the chosen backend; see :func:`reference.recurrence`.

    Under ``torch.autocast`` every tensor is cast to the autocast dtype and the time loop runs
    with autocast off, so the whole recurrence (state included) has one dtype, as
    torch.nn.LSTM's does on CPU; output and final state come back in that dtype.
    """
    device_type = gates_x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(tensor: Tensor | None) -> Tensor | None:
            return None if tensor is None else tensor.to(dtype)

        with torch.autocast(device_type, enabled=False):
            return recurrence(
                spec, cast(gates_x), tuple(cast(s) for s in state), cast(weight_hh),
                cast(bias_hh), cast(weight_hr), lengths, reverse, backend=backend,
            )
    args = (spec, gates_x, state, weight_hh, bias_hh, weight_hr, lengths, reverse)
    name, reason = choose(Call(*args), backend)
    if reason is not None and not torch.compiler.is_compiling():
        # Logging and warnings cannot be traced; eager runs report the same choice.
        _note_fallback(backend or _checks.env_backend(), reason)
    if name == "reference":
        return reference.recurrence(*args)
    return _BACKENDS[name].recurrence(*args)
