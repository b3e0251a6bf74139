"""The documentation site builds with ``mkdocs build --strict``, and its Python examples run.

CI runs only ``ruff check . && pytest``, so the docs build is a test. The examples of the
pages below are executed in order, one namespace per page; the other pages show code of other
frameworks (Julia, Keras models) or slow steps (compilation, export) that the tests of those
features cover.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import rnnkit

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE_PAGES = ["index.md", "from-torch.md", "lengths.md", "from-flux.md", "from-mlx.md",
                  "rl-resets.md", "backends.md", "regularization.md"]
# Examples that use features from other modules run once those modules are present.
OPTIONAL_NAMES = {"rnnkit.Stateful": lambda: hasattr(rnnkit, "Stateful"),
                  "mlx.": lambda: importlib.util.find_spec("mlx") is not None}


def test_mkdocs_build_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec(
            "mkdocstrings") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed (pip install rnnkit[docs])")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for page in ["index.html", "lengths/index.html", "distributed/index.html",
                 "api/layers/index.html", "from-keras/index.html"]:
        assert (tmp_path / page).is_file(), page
    api = (tmp_path / "api/layers/index.html").read_text()
    assert "learn_initial_state" in api  # the reference is generated from the docstrings


def _python_blocks(page: str) -> list[str]:
    text = (ROOT / "docs" / page).read_text()
    return re.findall(r"```python[^\n]*\n(.*?)```", text, flags=re.S)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_python_examples_run(page):
    blocks = _python_blocks(page)
    assert blocks, f"{page} has no Python examples"
    namespace: dict = {}
    missing = []
    for block in blocks:
        absent = [name for name, present in OPTIONAL_NAMES.items()
                  if name in block and not present()]
        if absent:
            missing.extend(absent)
            continue
        exec(compile(block, f"docs/{page}", "exec"), namespace)
    if missing:
        pytest.skip(f"{page}: examples using {sorted(set(missing))} need modules not present")
