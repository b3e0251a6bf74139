"""The backend protocol (documented in [`rnnkit.ops.dispatch`][]) and its defaults."""

from __future__ import annotations

from typing import Protocol

import torch.nn.functional as F
from torch import Tensor

from rnnkit.ops.spec import Call, State


class Backend(Protocol):
    """What [`rnnkit.ops.dispatch.register`][] takes; see [`rnnkit.ops.dispatch`][]."""

    name: str
    device_types: tuple[str, ...]

    def unavailable_reason(self) -> str | None: ...

    def unsupported_reason(self, call: Call) -> str | None: ...

    def auto_declines(self, call: Call) -> str | None: ...

    def fuses_projection(self, call: Call) -> bool: ...

    def project(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor: ...

    def run(self, call: Call) -> tuple[Tensor, State]: ...


class BackendBase:
    """Defaults for a backend's optional methods: always available, declines nothing, projects
    with `F.linear` outside its time loop. Subclasses set `name` and `device_types` and
    implement `unsupported_reason` and `run`."""

    name: str
    device_types: tuple[str, ...]

    def unavailable_reason(self) -> str | None:
        return None

    def unsupported_reason(self, call: Call) -> str | None:
        raise NotImplementedError

    def auto_declines(self, call: Call) -> str | None:
        return None

    def fuses_projection(self, call: Call) -> bool:
        return False

    def project(self, input: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(input, weight, bias)

    def run(self, call: Call) -> tuple[Tensor, State]:
        raise NotImplementedError
