"""The README's Python examples run as written, each on its own, in a fresh namespace.

A reader copies one block, not the whole page, so every block carries its own imports.
An example that shows an error (a `# SomeError: message` line) must raise exactly that.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs_on_its_own(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = BLOCKS[index]
    code = compile(block, f"README python block {index}", "exec")
    namespace: dict = {"__name__": f"readme_block_{index}"}  # nothing from other blocks
    shown_error = re.search(r"^# (\w+Error): (.*)$", block, re.M)
    if shown_error is None:
        exec(code, namespace)
        return
    with pytest.raises(Exception) as raised:
        exec(code, namespace)
    assert type(raised.value).__name__ == shown_error.group(1)
    assert str(raised.value) == shown_error.group(2)
