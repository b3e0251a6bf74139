"""The README's Python examples run as written; an example that shows an error raises it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    block = BLOCKS[index]
    shown_error = re.search(r"^# (\w+Error): (.*)$", block, re.M)
    namespace: dict = {}
    if shown_error is None:
        exec(compile(block, f"README block {index}", "exec"), namespace)
        return
    with pytest.raises(Exception) as raised:
        exec(compile(block, f"README block {index}", "exec"), namespace)
    assert type(raised.value).__name__ == shown_error.group(1)
    assert str(raised.value) == shown_error.group(2)
