"""Compile rnnkit's CPU kernels at install time, once per instruction set.

The package metadata lives in `pyproject.toml`; this file only adds the compiled part: one
shared library per variant of `src/rnnkit/ops/cpu/_variants.py` (generic x86-64, AVX2,
AVX-512; one generic build elsewhere), each with a JSON sidecar recording the hash of the
sources and the torch it was built against. At run time `rnnkit.ops.cpu` loads the best one
the CPU supports. `RNNKIT_CPU_VARIANTS=generic,avx2` builds only the variants named.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

CPU_PACKAGE = "rnnkit.ops.cpu"
CPU_DIR = Path("src", *CPU_PACKAGE.split("."))


def _load_variants():
    spec = importlib.util.spec_from_file_location("_rnnkit_variants", CPU_DIR / "_variants.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


variants = _load_variants()


def _chosen():
    available = {variant.name: variant for variant in variants.variants()}
    wanted = os.environ.get("RNNKIT_CPU_VARIANTS", "").replace(",", " ").split()
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise SystemExit(f"RNNKIT_CPU_VARIANTS names {', '.join(unknown)}; "
                         f"this machine builds {', '.join(available)}")
    return [available[name] for name in wanted] if wanted else list(available.values())


def _extension(variant) -> CppExtension:
    source_dir = CPU_DIR / "csrc"
    return CppExtension(
        name=f"{CPU_PACKAGE}.{variant.library}",
        sources=[str(path) for path in variants.sources(source_dir)],
        include_dirs=[str(source_dir)],
        extra_compile_args={"cxx": variant.cflags},
        # -S: no debug sections (Python's own -g would make each library 13 MB, not 0.6 MB).
        extra_link_args=[*variants.LDFLAGS, "-Wl,-S"],
    )


class BuildKernels(BuildExtension):
    """BuildExtension with one object folder per variant (they share their sources), and a
    sidecar written beside each library and copied with it into the source tree."""

    def build_extensions(self) -> None:
        # A library left in the build folder by an earlier build of other variants would
        # otherwise ship in the wheel beside this build's.
        for stale in Path(self.build_lib, *CPU_PACKAGE.split(".")).glob("_kernels_*"):
            stale.unlink()
        super().build_extensions()

    def build_extension(self, ext) -> None:
        shared = self.build_temp
        self.build_temp = os.path.join(shared, ext.name.rpartition(".")[2])
        try:
            super().build_extension(ext)
        finally:
            self.build_temp = shared
        name = ext.name.rpartition(".")[2].removeprefix("_kernels_")
        variant = next(v for v in variants.variants() if v.name == name)
        tag = variants.source_tag(CPU_DIR / "csrc")
        variants.write_record(Path(self.get_ext_fullpath(ext.name)), variant,
                              torch.__version__, tag)

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        package_dir = Path(self.get_finalized_command("build_py").get_package_dir(CPU_PACKAGE))
        inplace, self.inplace = self.inplace, False  # the build folder's path, as run() did
        try:
            built = [Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions]
        finally:
            self.inplace = inplace
        for library in built:
            record = variants.record_path(library)
            self.copy_file(str(record), str(package_dir / record.name), level=self.verbose)


setup(
    ext_modules=[_extension(variant) for variant in _chosen()],
    cmdclass={"build_ext": BuildKernels.with_options(no_python_abi_suffix=True)},
)
