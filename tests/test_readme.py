"""The README's Python examples run as written, in order, in one namespace.

An example that shows an error (a ``# SomeError: message`` line) must raise exactly that.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert len(BLOCKS) >= 5
    namespace: dict = {}
    for index, block in enumerate(BLOCKS):
        code = compile(block, f"README python block {index}", "exec")
        shown_error = re.search(r"^# (\w+Error): (.*)$", block, re.M)
        if shown_error is None:
            exec(code, namespace)
            continue
        with pytest.raises(Exception) as raised:
            exec(code, namespace)
        assert type(raised.value).__name__ == shown_error.group(1)
        assert str(raised.value) == shown_error.group(2)
