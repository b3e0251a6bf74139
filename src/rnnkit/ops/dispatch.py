"""The one place where a call is planned: which backend serves it, and why others did not.

Backends are plug-ins. A backend is an object with

- `name` (the name it is selected by) and `device_types` (the tensors' device types it
  may serve, e.g. `("cpu",)`);
- `unavailable_reason()`: `None` when it can run on this machine, else why not;
- `unsupported_reason(call)`: `None` when it can serve this [`Call`][rnnkit.ops.spec.Call],
  else why not (a dtype, a callable nonlinearity, an option it lacks);
- `auto_declines(call)`: `None`, or why `"auto"` should pass over a call it could serve
  (because the reference path runs it faster);
- `fuses_projection(call)`: whether it computes `W_ih x + b_ih` inside its own time loop,
  in which case `run` receives `call.input` instead of `call.gates_x`;
- `project(input, weight, bias)`: its input projection (`F.linear` by default);
- `run(call)`: `(output (T, B, H_out), final state tuple)`, with the semantics of
  [`rnnkit.ops.reference.recurrence`][].

[`rnnkit.ops.backend.BackendBase`][] gives the optional methods their defaults.
[`register`][rnnkit.ops.dispatch.register] makes a backend selectable by its name (`backend="name"`
on any layer or cell, `RNNKIT_BACKEND`) and by `"auto"`, in registration order; the registry is the
only list of backends.

[`plan`][rnnkit.ops.dispatch.plan] decides for a call: `"reference"` and exports run the reference
math; `"auto"` takes the first registered backend that claims the device, is available, supports
the call and does not decline it; a named backend that cannot serve a call falls back to the
reference path with a warning giving the reason. Set `RNNKIT_DEBUG=1` (or enable the
`rnnkit` logger at DEBUG) to see every fallback.

One-step streaming bypasses this module. A single step of a small batch (an actor, a live
decoder) spends more time building a `Call`, planning it and projecting its input than in its
two small products, so layers, cells and `rnnkit.Stateful` first ask
[`rnnkit.ops.cpu.stream.serves`][rnnkit.ops.cpu.stream.serves], the one place that decides
it: a step of torch.nn's plain cells on float32/float64 CPU tensors that needs no gradient,
with no lengths, resets or masks, outside compile/export, runs the compiled `stream_step`
from weights packed once per module (repacked when a parameter's version or storage
changes). Every other call comes here.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnkit.ops import cpu, reference, triton
from rnnkit.ops.backend import Backend
from rnnkit.ops.export import op as export_op
from rnnkit.ops.spec import Call, State

logger = logging.getLogger("rnnkit")


# The registry, the only list of backends: the bundled ones, then any registered later.
_BACKENDS: dict[str, Backend] = {
    backend.name: backend for backend in (reference.BACKEND, cpu.BACKEND, triton.BACKEND)
}
_warned: set[str] = set()


def register(backend: Backend) -> None:
    """Make `backend` selectable by its name and by `"auto"`, in registration order.

    Raises:
        ValueError: the name is `"auto"` or `"reference"`, or taken by another backend.
    """
    if backend.name in ("auto", reference.BACKEND.name):
        raise ValueError(f"a backend cannot be registered as {backend.name!r}")
    present = _BACKENDS.get(backend.name)
    if present is not None and present is not backend:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _BACKENDS[backend.name] = backend


def unregister(name: str) -> None:
    """Remove a backend registered with [`register`][rnnkit.ops.dispatch.register] (the reference
path stays)."""
    if name == reference.BACKEND.name:
        raise ValueError("the reference backend cannot be unregistered")
    _BACKENDS.pop(name, None)


def registered() -> dict[str, Backend]:
    """Every backend, by name: `"reference"` first, then in registration order."""
    return dict(_BACKENDS)


def names() -> tuple[str, ...]:
    """What `backend=` accepts: `"auto"` and every registered name."""
    return ("auto", *_BACKENDS)


def check_name(value: object, what: str = "backend") -> str | None:
    """`value` if it is `None` or a name from [`names`][rnnkit.ops.dispatch.names].

    Raises:
        ValueError: any other value, listing the names.
    """
    if value is None:
        return None
    if not isinstance(value, str) or value not in _BACKENDS and value != "auto":
        raise ValueError(f"{what} must be one of {names()} or None, got {value!r}")
    return value


def env_backend() -> str:
    """`RNNKIT_BACKEND`, or `"auto"` when it is unset or empty."""
    value = os.environ.get("RNNKIT_BACKEND", "auto") or "auto"
    return check_name(value, "RNNKIT_BACKEND")


@dataclass(frozen=True)
class Plan:
    """How a call runs.

    Attributes:
        backend: the backend that serves it.
        fuse_projection: whether that backend computes the input projection in its loop.
        passed_over: why the requested backend (or, for `"auto"`, each fused one) was
            passed over; `None` when the request is served as asked.
    """

    backend: Backend
    fuse_projection: bool
    passed_over: str | None = None


def _served(backend: Backend, call: Call) -> Plan:
    return Plan(backend, call.input is not None and backend.fuses_projection(call))


def plan(call: Call, requested: str) -> Plan:
    """Decide which backend serves `call` for the `requested` name (never `None`)."""
    if torch.compiler.is_exporting():
        # Exported graphs hold only standard ops, and one opaque op per layer-direction keeps
        # the time axis dynamic (see rnnkit.export).
        if call.time_axis and call.input is not None:
            return _served(export_op.BACKEND, call)
        return _served(reference.BACKEND, call)
    if requested == reference.BACKEND.name:
        return _served(reference.BACKEND, call)
    if torch._C._are_functorch_transforms_active():
        # vmap/jacrev/jvp need batching and forward-AD rules that only plain torch ops have.
        return Plan(reference.BACKEND, False, "torch.func transforms run on the reference path")
    device_type = call.leading.device.type
    if requested == "auto":
        reasons = []
        for backend in _BACKENDS.values():
            if device_type not in backend.device_types:
                continue
            reason = (
                backend.unavailable_reason()
                or backend.unsupported_reason(call)
                or backend.auto_declines(call)
            )
            if reason is None:
                return _served(backend, call)
            reasons.append(f"{backend.name}: {reason}")
        passed = "; ".join(reasons) or f"no fused backend for {device_type} tensors"
        return Plan(reference.BACKEND, False, passed)
    backend = _BACKENDS.get(requested)
    if backend is None:
        return Plan(reference.BACKEND, False, f"backend {requested!r} is not registered")
    reason = backend.unavailable_reason() or backend.unsupported_reason(call)
    if reason is not None:
        return Plan(reference.BACKEND, False, reason)
    return _served(backend, call)


def _note_fallback(requested: str, reason: str) -> None:
    message = f"rnnkit: backend {requested!r} cannot serve this call ({reason}); using 'reference'"
    if os.environ.get("RNNKIT_DEBUG"):
        print(message)
    logger.debug(message)
    if requested != "auto" and message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)


def run(call: Call) -> tuple[Tensor, State]:
    """Plan `call` and run it: `(output (T, B, H_out), final state tuple)`.

    Under `torch.autocast` the input projection runs under autocast (as `F.linear`), then
    every tensor is cast to the autocast dtype and the time loop runs with autocast off, so
    the whole recurrence (state included) has one dtype, as torch.nn.LSTM's does on CPU;
    output and final state come back in that dtype.
    """
    requested = call.backend or env_backend()
    device_type = call.leading.device.type
    if torch.is_autocast_enabled(device_type) and not torch.compiler.is_exporting():
        if call.input is not None:
            call = _projected(call, F.linear)
        call = call.cast(torch.get_autocast_dtype(device_type))
        with torch.autocast(device_type, enabled=False):
            return _run_planned(call, requested)
    return _run_planned(call, requested)


def _run_planned(call: Call, requested: str) -> tuple[Tensor, State]:
    chosen = plan(call, requested)
    if chosen.passed_over is not None and not torch.compiler.is_compiling():
        # Logging and warnings cannot be traced; eager runs report the same choice.
        _note_fallback(requested, chosen.passed_over)
    if call.input is not None and not chosen.fuse_projection:
        call = _projected(call, chosen.backend.project)
    return chosen.backend.run(call)


def _projected(call: Call, project) -> Call:
    """`call` with its input replaced by `W_ih x + b_ih`, or, with `norm_ih`, by
    `LN(W_ih x) * gain + bias + b_ih` (see [`rnnkit.ops.spec.Call`][])."""
    if call.norm_ih is None:
        return call.projected(project(call.input, call.weight_ih, call.bias_ih))
    gain, bias = call.norm_ih
    gates_x = F.layer_norm(project(call.input, call.weight_ih, None), gain.shape, gain, bias)
    return call.projected(gates_x if call.bias_ih is None else gates_x + call.bias_ih)

