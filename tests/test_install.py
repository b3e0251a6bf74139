"""The compiled CPU kernels as installed and as built on demand.

- which variant loads (ATen's capability, `RNNKIT_CPU_ISA`), and when a prebuilt library is
  stale (edited `csrc/`, another torch);
- a wheel built with `pip wheel .` runs its prebuilt kernels where no compiler exists;
- the on-demand build survives a build killed half-way, and a failed build shows the
  compiler's own error.

The `slow` tests build wheels or compile the kernels (a minute or more each on 2 cores).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rnnkit.ops.cpu import _build, _jit, _variants

ROOT = Path(__file__).resolve().parents[1]


# Choosing the variant ---------------------------------------------------------------------

def test_the_variant_follows_atens_capability(monkeypatch):
    monkeypatch.delenv("RNNKIT_CPU_ISA", raising=False)
    variant, why = _build.choose()
    capability = torch.backends.cpu.get_cpu_capability()
    expected = {"AVX512": "avx512", "AVX2": "avx2"}.get(capability, "generic")
    assert variant.name == expected and capability in why


def test_rnnkit_cpu_isa_picks_a_weaker_variant(monkeypatch):
    monkeypatch.setenv("RNNKIT_CPU_ISA", "generic")
    variant, why = _build.choose()
    assert variant.name == "generic" and why == "RNNKIT_CPU_ISA=generic"


def test_rnnkit_cpu_isa_the_cpu_lacks_is_refused_with_a_warning(monkeypatch):
    generic = _variants.variants()[0]
    monkeypatch.setattr(_build, "cpu_variants", lambda: (generic,))
    monkeypatch.setenv("RNNKIT_CPU_ISA", "avx512")
    if "avx512" not in [v.name for v in _variants.variants()]:
        pytest.skip(f"no avx512 variant on {os.uname().machine}")
    with pytest.warns(RuntimeWarning, match="RNNKIT_CPU_ISA=avx512 asks for kernels this CPU"):
        variant, why = _build.choose()
    assert variant.name == "generic" and "refused" in why


def test_an_unknown_rnnkit_cpu_isa_is_refused_with_a_warning(monkeypatch):
    monkeypatch.setenv("RNNKIT_CPU_ISA", "sse9")
    with pytest.warns(RuntimeWarning, match="must be one of generic.*got 'sse9'"):
        variant, _ = _build.choose()
    assert variant in _build.cpu_variants()


# Fresh or stale prebuilt libraries --------------------------------------------------------

@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package folder with its own csrc/ and one prebuilt library of the first variant."""
    source = tmp_path / "csrc"
    source.mkdir()
    (source / "a.cpp").write_text("int a;\n")
    (source / "a.h").write_text("#pragma once\n")
    monkeypatch.setattr(_variants, "PACKAGE_DIR", tmp_path)
    monkeypatch.setattr(_variants, "SOURCE_DIR", source)
    variant = _variants.variants()[0]
    library = tmp_path / f"{variant.library}.so"
    library.write_bytes(b"")
    _variants.write_record(library, variant, torch.__version__, _variants.source_tag(source))
    return variant, library, source


def test_a_prebuilt_library_of_these_sources_is_fresh(package):
    variant, library, _ = package
    assert _build.prebuilt(variant) == (library, "prebuilt")


def test_editing_a_header_makes_the_prebuilt_library_stale(package):
    variant, _, source = package
    (source / "a.h").write_text("#pragma once\n// edited\n")
    library, reason = _build.prebuilt(variant)
    assert library is None and "stale: csrc/ has changed" in reason


def test_an_installed_library_without_csrc_is_fresh(package):
    variant, library, source = package
    shutil.rmtree(source)
    assert _build.prebuilt(variant)[0] == library


def test_a_library_built_for_another_torch_is_not_loaded(package):
    variant, library, source = package
    _variants.write_record(library, variant, "1.0.0", _variants.source_tag(source))
    found, reason = _build.prebuilt(variant)
    assert found is None and "built for torch 1.0.0" in reason


def test_a_stale_library_falls_back_to_the_on_demand_build(package, monkeypatch):
    variant, _, source = package
    (source / "a.cpp").write_text("int a = 1;\n")
    monkeypatch.setattr(_build, "choose", lambda: (variant, "chosen"))
    monkeypatch.setattr(_build, "_kernels", None)
    monkeypatch.delenv("RNNKIT_CPU_BUILD", raising=False)
    built = []
    monkeypatch.setattr(_jit, "build",
                        lambda v, because: built.append((v, because)) or ("no compiler", None))
    reason = _build._build()
    assert built == [(variant, f"{variant.library}.so is stale: csrc/ has changed since it "
                                "was built")]
    assert reason.startswith("no compiler;") and "stale" in reason


def test_compiler_errors_drop_ninjas_lines_and_the_command():
    message = (
        "Error building extension 'x': [1/2] c++ -MMD -MF a.o.d -O3 -c /s/a.cpp -o a.o\n"
        "FAILED: a.o\n"
        "c++ -MMD -MF a.o.d -O3 -c /s/a.cpp -o a.o\n"
        "/s/a.cpp:3:5: error: 'foo' was not declared in this scope\n"
        "    3 |     foo();\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    assert _jit.compiler_errors(message) == [
        "/s/a.cpp:3:5: error: 'foo' was not declared in this scope",
        "    3 |     foo();",
    ]


# What rnnkit info and rnnkit bench say ---------------------------------------------------

def test_info_and_the_bench_header_name_the_loaded_kernels(monkeypatch, capsys):
    from rnnkit import bench, cli

    assert _build.status() is None
    kernels = _build.loaded()
    line = next(text for text in cli.info_lines() if text.startswith("cpu: "))
    assert line.startswith(f"cpu: kernels {kernels.variant} ({kernels.how}; "), line
    assert f"; {torch.get_num_threads()} torch threads; BLAS " in line, line
    monkeypatch.setattr(bench, "run", lambda args: {})
    assert bench.main(["--quick"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert f"rnnkit CPU kernels: {kernels.describe()}" in printed, printed


# The installed wheel ----------------------------------------------------------------------

def _run(command, timeout, **kwargs):
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


PARITY = """
import sys, torch, rnnkit
from rnnkit.ops.cpu import _build
assert rnnkit.__file__.startswith(sys.prefix), rnnkit.__file__
assert _build.status() is None and _build.loaded().how == "prebuilt", _build.loaded()
torch.manual_seed(0)
for name in ("GRU", "LSTM"):
    ours = getattr(rnnkit, name)(8, 16, num_layers=2, backend="cpu")
    theirs = getattr(torch.nn, name)(8, 16, num_layers=2)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(7, 3, 8, requires_grad=True)
    (a, _), (b, _) = ours(x), theirs(x)
    (ga,) = torch.autograd.grad(a.sum(), x)
    (gb,) = torch.autograd.grad(b.sum(), x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-5)
print("parity ok", _build.loaded().variant)
"""


@pytest.mark.slow
def test_a_wheel_runs_its_prebuilt_kernels_without_a_compiler(tmp_path):
    variant, _ = _build.choose()
    project = tmp_path / "project"
    project.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns(
        "_kernels_*", "__pycache__", "*.egg-info"))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}

    # Build the wheel in one fresh venv (reusing this torch: no build isolation), with only
    # the variant this CPU picks, to keep the test to one compile.
    builder = tmp_path / "build-venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", builder], 60)
    _run([builder / "bin" / "python", "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
          "-w", tmp_path / "dist", project], 1200,
         env={**env, "RNNKIT_CPU_VARIANTS": variant.name, "MAX_JOBS": "2"})
    (wheel,) = (tmp_path / "dist").glob("rnnkit-*.whl")

    # Install it in a second venv whose PATH has no compiler and whose CXX points nowhere.
    runner = tmp_path / "run-venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", runner], 60)
    _run([runner / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], 300,
         env=env)
    bare = {**env, "PATH": str(runner / "bin"), "CXX": str(tmp_path / "no" / "c++"),
            "CC": str(tmp_path / "no" / "cc"), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    bare.pop("RNNKIT_CPU_ISA", None)
    assert shutil.which("c++", path=bare["PATH"]) is None
    info = _run([runner / "bin" / "rnnkit", "info"], 300, env=bare, cwd=tmp_path).stdout
    assert "  cpu (cpu): available" in info, info
    assert f"cpu: kernels {variant.name} (prebuilt;" in info, info
    parity = _run([runner / "bin" / "python", "-c", PARITY], 300, env=bare, cwd=tmp_path)
    assert f"parity ok {variant.name}" in parity.stdout

    # A variant the wheel lacks, with no compiler to build it: unavailable, and says why.
    if variant.name != "generic":
        info = _run([runner / "bin" / "rnnkit", "info"], 300, cwd=tmp_path,
                    env={**bare, "RNNKIT_CPU_ISA": "generic"}).stdout
        assert "cpu (cpu): unavailable: no C++ compiler found" in info, info
        assert "no prebuilt _kernels_generic.so" in info, info


# The on-demand build -----------------------------------------------------------------------

LOAD = ("from rnnkit.ops.cpu import _build; e = _build.status(); "
        "print('loaded', _build.loaded()) if e is None else print('failed:', e)")


def _jit_env(tmp_path: Path, **extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT / "src"), "RNNKIT_CPU_BUILD": "jit",
            "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "MAX_JOBS": "2", **extra}


@pytest.mark.slow
def test_a_killed_build_neither_hangs_nor_fails_silently_the_next_time(tmp_path):
    env = _jit_env(tmp_path)
    first = subprocess.Popen([sys.executable, "-c", LOAD], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    torch_lock = None
    deadline = time.monotonic() + 300
    while torch_lock is None and time.monotonic() < deadline and first.poll() is None:
        torch_lock = next((tmp_path / "ext").glob("*/lock"), None)
        time.sleep(0.2)
    assert torch_lock is not None, "the build never started"
    time.sleep(2)  # into the compiles
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert torch_lock.exists()  # what torch's own lock leaves behind: it waited forever on it

    second = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True,
                            text=True, timeout=900)
    assert second.returncode == 0, second.stderr
    assert "loaded Kernels(" in second.stdout and "how='jit'" in second.stdout, second.stdout
    assert "rnnkit: compiling the CPU kernels for" in second.stderr
    # Built now: a third process loads the cache and compiles nothing.
    third = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True,
                           text=True, timeout=300)
    assert "how='jit'" in third.stdout and "compiling" not in third.stderr, third.stderr


def test_a_failed_build_shows_the_compilers_error(tmp_path):
    compiler = tmp_path / "broken-c++"
    compiler.write_text(
        "#!/bin/sh\n"
        'for arg in "$@"; do\n'
        '  if [ "$arg" = "-c" ]; then\n'
        '    echo "kernel.cpp:1:1: error: this compiler is broken on purpose" >&2; exit 1\n'
        "  fi\n"
        "done\n"
        f'exec {shutil.which("c++") or "c++"} "$@"\n'
    )
    compiler.chmod(0o755)
    result = subprocess.run([sys.executable, "-c", LOAD],
                            env=_jit_env(tmp_path, CXX=str(compiler)), capture_output=True,
                            text=True, timeout=300)
    assert "failed: building the CPU kernels for" in result.stdout, result.stdout
    assert "this compiler is broken on purpose" in result.stdout
    assert "rnnkit: the compiler said:" in result.stderr
    assert "error: this compiler is broken on purpose" in result.stderr
    assert " -MMD " not in result.stderr  # not ninja's command line
