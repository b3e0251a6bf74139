"""The on-demand developer build: compile `csrc/` for one variant with
`torch.utils.cpp_extension.load`, into torch's extension cache, then load it.

Used when no fresh prebuilt library is installed (a source checkout whose `csrc/` changed,
an install without compiled kernels) or when `RNNKIT_CPU_BUILD=jit` asks for it. It says
in one line on stderr what it compiles and for how long, shows the compiler's own error
lines when the build fails, and never waits on a lock left by a killed build: it holds an
`fcntl.flock` lock of its own, which dies with its process, and clears torch's lock file
while holding it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from rnnkit.ops.cpu import _variants
from rnnkit.ops.cpu._variants import Variant

# Compiler time for all sources of one variant, measured on this project's 2-core CI machine
# (one AMD EPYC core): about 80 s of CPU, spread over the cores ninja uses.
_CPU_SECONDS = 80
_DONE = "rnnkit.built"  # written after a build loads; without it the folder is rebuilt whole


def extension_name(variant: Variant) -> str:
    """The cache entry: the variant, the sources' hash, and a hash of torch and the flags."""
    setting = f"{torch.__version__} {' '.join(variant.cflags)} {' '.join(_variants.LDFLAGS)}"
    flags = hashlib.sha1(setting.encode()).hexdigest()[:8]
    return f"rnnkit_cpu_{variant.name}_{_variants.source_tag()}_{flags}"


def build_directory(variant: Variant) -> Path:
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / extension_name(variant)


def build(variant: Variant, because: str | None = None) -> tuple[str | None, Path | None]:
    """Build (or reuse the cached build of) `variant` and load it.

    `because` says why no prebuilt library is used; the notice on stderr repeats it. Returns
    `(None, library)` when loaded, else `(reason, None)`.
    """
    from torch.utils import cpp_extension

    sources = _variants.sources()
    if not sources:
        return f"the kernel sources in {_variants.SOURCE_DIR} are missing", None
    name = extension_name(variant)
    folder = build_directory(variant)
    library = folder / f"{name}.so"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "rnnkit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
        done = folder / _DONE
        if done.exists() and library.exists():  # built before: no compiler needed
            try:
                torch.ops.load_library(str(library))
            except (OSError, RuntimeError) as error:
                return f"loading the cached build {library} failed: {error}", None
            return None, library
        compiler = cpp_extension.get_cxx_compiler()
        if shutil.which(compiler) is None:
            return (f"no C++ compiler found (looked for {compiler!r}; set CXX to choose one)",
                    None)
        _clear(folder, keep={"rnnkit.lock"})  # whatever a killed or failed build left
        if not cpp_extension.is_ninja_available():
            return ("building the kernels on demand needs ninja "
                    "(pip install 'rnnkit[jit]' or pip install ninja)"), None
        why = f"{because}; " if because else ""
        print(f"rnnkit: compiling the CPU kernels for {variant.name} ({why}{_estimate()}, "
              f"once; cached in {folder})", file=sys.stderr, flush=True)
        try:
            cpp_extension.load(
                name=name,
                sources=[str(path) for path in sources],
                extra_cflags=variant.cflags,
                extra_ldflags=list(_variants.LDFLAGS),
                extra_include_paths=[str(_variants.SOURCE_DIR)],
                build_directory=str(folder),
                is_python_module=False,
                verbose=False,
            )
        except Exception as error:  # any build or load failure means: use the reference path
            lines = compiler_errors(str(error))
            if lines:
                print("rnnkit: the compiler said:\n" + "\n".join(lines), file=sys.stderr,
                      flush=True)
            first = next((line for line in lines if "error" in line), lines[0] if lines else "")
            return (f"building the CPU kernels for {variant.name} failed: "
                    f"{first or type(error).__name__}"), None
        done.write_text(name + "\n")
        return None, library


def _estimate() -> str:
    workers = os.cpu_count() or 1
    if os.environ.get("MAX_JOBS", "").isdigit():  # torch's own cap on ninja's workers
        workers = min(workers, max(1, int(os.environ["MAX_JOBS"])))
    seconds = _CPU_SECONDS / min(workers, len(_variants.sources()) or 1)
    return f"about {max(5, round(seconds / 5) * 5)} s"


def _clear(folder: Path, keep: set[str]) -> None:
    for path in folder.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


# Lines of ninja's own output, or its echo of a command line, in torch's build error.
_NOISE = re.compile(r"^\s*(\[\d+/\d+\]|FAILED:|ninja: |Error building extension)")


def compiler_errors(message: str, limit: int = 20) -> list[str]:
    """The compiler's own lines from torch's build error: not ninja's progress, not the
    command lines it echoes. Errors first when there are more than `limit` lines."""
    lines = []
    for line in message.splitlines():
        line = line.rstrip()
        if not line.strip() or _NOISE.match(line):
            continue
        if " -MMD " in line or (" -shared " in line and " -o " in line):
            continue  # a compile or link command line
        lines.append(line)
    if len(lines) > limit:
        errors = [line for line in lines if re.search(r"\berror\b|undefined reference", line)]
        lines = (errors or lines)[:limit]
    return lines
