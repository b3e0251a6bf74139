"""What the CPU kernels are compiled from, and how: one build per instruction set.

ATen's vector types (`at::vec::Vectorized`) take their width from the `CPU_CAPABILITY_*`
macro the file is compiled with, so each variant below is the same sources compiled with its
own macro and the matching `-m` flags, never `-march=native`: a library built on one machine
must run on every CPU that has its instruction set. `setup.py` builds every variant into the
package at install time and the on-demand developer build (`rnnkit.ops.cpu._jit`) uses the
same flags, so both give identical kernels.

This module imports nothing from rnnkit or torch: `setup.py` loads it by path, before the
package is installed.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path

SOURCE_DIR = Path(__file__).with_name("csrc")
PACKAGE_DIR = Path(__file__).parent

# -fopenmp: at::parallel_for is a header template, serial unless these files use OpenMP too.
COMMON_CFLAGS = ("-O3", "-std=c++17", "-fopenmp")
LDFLAGS = ("-fopenmp",)


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its name, the ATen capability it matches, its flags."""

    name: str
    capability: str
    flags: tuple[str, ...]

    @property
    def library(self) -> str:
        """The module name of its shared library inside `rnnkit.ops.cpu`."""
        return f"_kernels_{self.name}"

    @property
    def cflags(self) -> list[str]:
        return [*COMMON_CFLAGS, *self.flags]


def _defines(capability: str) -> tuple[str, ...]:
    # Empty values, as csrc/vec_math.h defines them: an identical redefinition is no warning.
    return (f"-DCPU_CAPABILITY={capability}", f"-DCPU_CAPABILITY_{capability}=")


_X86 = (
    Variant("generic", "DEFAULT", (*_defines("DEFAULT"), "-march=x86-64")),
    Variant("avx2", "AVX2", (*_defines("AVX2"), "-march=x86-64", "-mavx2", "-mfma", "-mf16c")),
    Variant(
        "avx512",
        "AVX512",
        (*_defines("AVX512"), "-march=x86-64", "-mavx512f", "-mavx512bw", "-mavx512vl",
         "-mavx512dq", "-mavx2", "-mfma", "-mf16c"),
    ),
)
# Elsewhere (aarch64: NEON is part of the base instruction set) one build for the base ISA.
_OTHER = (Variant("generic", "DEFAULT", _defines("DEFAULT")),)


def variants(machine: str | None = None) -> tuple[Variant, ...]:
    """The variants for a machine architecture (this one by default), weakest first."""
    machine = (machine or platform.machine()).lower()
    return _X86 if machine in ("x86_64", "amd64") else _OTHER


def sources(source_dir: Path | None = None) -> list[Path]:
    """The files compiled, in a fixed order: every `.cpp` in `csrc/`."""
    return sorted((source_dir or SOURCE_DIR).glob("*.cpp"))


def source_tag(source_dir: Path | None = None) -> str:
    """A fingerprint of the kernel sources and headers, names and contents.

    Two checkouts with different kernels sharing one extension cache must not load each
    other's build, and a prebuilt library is stale once any of them changes.
    """
    digest = hashlib.sha1()
    source_dir = source_dir or SOURCE_DIR
    try:
        files = sorted(p for p in source_dir.iterdir() if p.suffix in (".cpp", ".h"))
        for path in files:
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    except OSError:
        return "nosource"
    return digest.hexdigest()[:10] if files else "nosource"


def record_path(library: Path) -> Path:
    """The sidecar beside a prebuilt library that says what it was built from."""
    return library.with_suffix(".json")


def write_record(library: Path, variant: Variant, torch_version: str, tag: str) -> None:
    """Write the sidecar of a freshly built library."""
    record = {"variant": variant.name, "source_tag": tag, "torch": torch_version,
              "cflags": variant.cflags}
    record_path(library).write_text(json.dumps(record, indent=1) + "\n")


def read_record(library: Path) -> dict | None:
    try:
        return json.loads(record_path(library).read_text())
    except (OSError, ValueError):
        return None
