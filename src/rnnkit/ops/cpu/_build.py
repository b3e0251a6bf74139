"""Load the compiled CPU kernels: the prebuilt library for this CPU, or an on-demand build.

`pip install` compiles the kernels once per instruction set (see `setup.py` and
`rnnkit.ops.cpu._variants`) into shared libraries beside this module. The first
`status` call picks a variant as ATen does:
`torch.backends.cpu.get_cpu_capability()`, which honours `ATEN_CPU_CAPABILITY`, or
`RNNKIT_CPU_ISA=generic|avx2|avx512` (refused with a warning when the CPU lacks it). It loads
that variant's prebuilt library when it is fresh: built against this torch, and from the
sources in `csrc/` beside it when they are there (a source checkout whose kernels were edited
since has stale libraries). Otherwise, or with `RNNKIT_CPU_BUILD=jit`, the developer build of
`rnnkit.ops.cpu._jit` compiles that variant into torch's extension cache. Only one library
is ever loaded in a process: they all register the same `rnnkit::cpu_*` kernels.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from rnnkit.ops.cpu import _jit, _variants
from rnnkit.ops.cpu._variants import Variant


@dataclass(frozen=True)
class Kernels:
    """What `status` loaded: the variant, from where, and why.

    `how` is `"prebuilt"` (installed with the package) or `"jit"` (built on demand).
    """

    variant: str
    how: str
    path: str
    why: str

    def describe(self) -> str:
        return f"{self.variant} ({self.how}; {self.why})"


_lock = threading.Lock()
_loaded = False
_error: str | None = None
_kernels: Kernels | None = None


def status() -> str | None:
    """`None` when the kernels are loaded (loading or building them if needed), else why not."""
    global _loaded, _error
    if _loaded or _error is not None:
        return _error
    with _lock:
        if _loaded or _error is not None:
            return _error
        _error = _build()
        _loaded = _error is None
    if _error is not None:
        warnings.warn(
            f"rnnkit: the compiled CPU kernels are unavailable ({_error}); "
            "CPU calls use the reference path",
            RuntimeWarning,
            stacklevel=3,
        )
    return _error


def cached_status() -> str | None:
    """The outcome so far, without loading: `None` when loaded or not yet tried."""
    return _error


def loaded() -> Kernels | None:
    """The kernels loaded in this process, or `None` before the first successful
    `status`."""
    return _kernels


def cpu_variants() -> tuple[Variant, ...]:
    """The variants this CPU can run, weakest first."""
    import torch.cpu

    def supports(variant: Variant) -> bool:
        check = {"AVX2": "_is_avx2_supported", "AVX512": "_is_avx512_supported"}.get(
            variant.capability)
        return check is None or bool(getattr(torch.cpu, check, lambda: False)())

    return tuple(variant for variant in _variants.variants() if supports(variant))


def choose() -> tuple[Variant, str]:
    """The variant to load and why: ATen's CPU capability, or `RNNKIT_CPU_ISA`."""
    runnable = cpu_variants()
    capability = torch.backends.cpu.get_cpu_capability()
    best = next((v for v in reversed(runnable) if v.capability in capability), runnable[0])
    why = f"torch's CPU capability is {capability}"
    wanted = os.environ.get("RNNKIT_CPU_ISA", "").strip().lower()
    if not wanted:
        return best, why
    known = [variant.name for variant in _variants.variants()]
    if wanted not in known:
        warnings.warn(f"rnnkit: RNNKIT_CPU_ISA must be one of {', '.join(known)}, got "
                      f"{wanted!r}; using {best.name}", RuntimeWarning, stacklevel=4)
        return best, why
    match = next((v for v in runnable if v.name == wanted), None)
    if match is None:
        warnings.warn(f"rnnkit: RNNKIT_CPU_ISA={wanted} asks for kernels this CPU cannot run; "
                      f"using {best.name}", RuntimeWarning, stacklevel=4)
        return best, f"{why} (RNNKIT_CPU_ISA={wanted} refused: the CPU lacks it)"
    return match, f"RNNKIT_CPU_ISA={wanted}"


def prebuilt(variant: Variant) -> tuple[Path | None, str]:
    """The installed library of `variant` when it is fresh, else `None` and why not."""
    library = _variants.PACKAGE_DIR / f"{variant.library}.so"
    if not library.exists():
        return None, f"no prebuilt {library.name} in {library.parent}"
    record = _variants.read_record(library)
    if record is None:
        sidecar = _variants.record_path(library).name
        return None, f"{library.name} has no readable build record ({sidecar})"
    if record.get("torch") != torch.__version__:
        return None, (f"{library.name} was built for torch {record.get('torch')}, "
                      f"this is {torch.__version__}")
    if _variants.SOURCE_DIR.is_dir() and record.get("source_tag") != _variants.source_tag():
        return None, f"{library.name} is stale: csrc/ has changed since it was built"
    return library, "prebuilt"


def _build() -> str | None:
    """Load the chosen variant, prebuilt or built on demand; `None` on success, else why not."""
    global _kernels
    variant, why = choose()
    mode = os.environ.get("RNNKIT_CPU_BUILD", "auto").strip().lower() or "auto"
    if mode not in ("auto", "jit"):
        warnings.warn(f"rnnkit: RNNKIT_CPU_BUILD must be 'auto' or 'jit', got {mode!r}; "
                      "using 'auto'", RuntimeWarning, stacklevel=4)
        mode = "auto"
    if mode == "auto":
        library, because = prebuilt(variant)
        found, found_why = variant, why
        if library is None and because.startswith("no prebuilt"):
            # An install built with fewer variants: a weaker prebuilt one beats compiling.
            weaker = cpu_variants()[: cpu_variants().index(variant)]
            fallback = next((v for v in reversed(weaker) if prebuilt(v)[0] is not None), None)
            if fallback is not None:
                library, found = prebuilt(fallback)[0], fallback
                found_why = f"{why}, but only {fallback.name} is installed"
        if library is not None:
            try:
                torch.ops.load_library(str(library))
            except (OSError, RuntimeError) as error:
                because = f"loading {library.name} failed: {error}"
            else:
                _kernels = Kernels(found.name, "prebuilt", str(library), found_why)
                return None
    else:
        because = "RNNKIT_CPU_BUILD=jit"
    why = f"{why}; {because}"
    error, library = _jit.build(variant, because)
    if error is not None:
        return error if mode == "jit" else f"{error}; {because}"
    _kernels = Kernels(variant.name, "jit", str(library), why)
    return None


def summary() -> str:
    """One line on the CPU side: the kernels loaded (their ISA, and why), torch's thread count,
    and the BLAS and oneDNN torch itself uses for its matrix products. Loads the kernels."""
    error = status()
    kernels = loaded()
    if error is None and kernels is not None:
        what = f"kernels {kernels.describe()}"
    else:
        what = f"kernels unavailable ({error})"
    config = torch.__config__.show()
    blas = next((item.split("=", 1)[1] for item in config.replace(",", " ").split()
                 if item.startswith("BLAS_INFO=")), "unknown")
    onednn = "oneDNN" if torch.backends.mkldnn.is_available() else "no oneDNN"
    return f"{what}; {torch.get_num_threads()} torch threads; BLAS {blas}, {onednn}"
