"""Build the C++ kernels on first use, with `torch.utils.cpp_extension.load`, and cache them.

The sources are every `.cpp` file in `csrc/` beside this module, with the headers there
on the include path. The build lands in torch's extension cache (`TORCH_EXTENSIONS_DIR`, by
default `~/.cache/torch_extensions`) and is reused by later processes; the extension's name
carries a hash of every source and header, so a change to any of them builds anew. Loading
the library adds CPU kernels to the `rnnkit::cpu_*` ops declared in
`rnnkit.ops.cpu._ops`.
"""

from __future__ import annotations

import hashlib
import platform
import shutil
import threading
import warnings
from pathlib import Path

SOURCE_DIR = Path(__file__).with_name("csrc")


def _sources() -> list[Path]:
    """The files compiled, in a fixed order: every `.cpp` in `SOURCE_DIR`."""
    return sorted(SOURCE_DIR.glob("*.cpp"))


def _cpu_tag() -> str:
    """A short fingerprint of this CPU's instruction sets: a -march=native build cached in a
    shared home directory must not be loaded on a CPU that lacks them."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            text += next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _source_tag() -> str:
    """A fingerprint of the kernel sources and headers, names and contents: two checkouts with
    different kernels sharing one extension cache must not load each other's build, and torch
    itself rebuilds only when a compiled file changes, not a header."""
    digest = hashlib.sha1()
    try:
        files = sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cpp", ".h"))
        for path in files:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError:
        return "nosource"
    return digest.hexdigest()[:10] if files else "nosource"


EXTENSION_NAME = f"rnnkit_cpu_recurrence_{_cpu_tag()}_{_source_tag()}"
# -march=native: the build is made on, and cached for, the machine that runs it. -fopenmp:
# at::parallel_for is a header template, serial unless these files are built with OpenMP too.
CFLAGS = ["-O3", "-march=native", "-std=c++17", "-fopenmp"]
LDFLAGS = ["-fopenmp"]

_lock = threading.Lock()
_loaded = False
_error: str | None = None


def status() -> str | None:
    """`None` when the kernels are loaded (building them if needed), else why not."""
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
    """The outcome so far, without building: `None` when loaded or not yet tried."""
    return _error


def _build() -> str | None:
    import torch.utils.cpp_extension as cpp_extension

    compiler = cpp_extension.get_cxx_compiler()
    if shutil.which(compiler) is None:
        return f"no C++ compiler found (looked for {compiler!r}; set CXX to choose one)"
    sources = _sources()
    if not sources:
        return f"the kernel sources in {SOURCE_DIR} are missing from the installation"
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(path) for path in sources],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            extra_include_paths=[str(SOURCE_DIR)],
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # any build or load failure means: use the reference path
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"building {SOURCE_DIR.name}/ failed: {type(error).__name__}: {first_line}"
    return None
