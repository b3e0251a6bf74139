"""The documentation site builds with `mkdocs build --strict`, renders, and its examples run.

CI runs only `ruff check . && pytest`, so the docs build is a test. The API pages are read back
from the built HTML: no reST markup left as text, parameter tables that agree with the
signatures (no "required" for an argument with a default), and `forward` documented. The
examples of the pages below are executed in order, one namespace per page; the other pages
show code of other frameworks (Julia, Keras models) or slow steps (compilation, export) that
the tests of those features cover.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from html import unescape
from pathlib import Path

import pytest

import rnnkit

ROOT = Path(__file__).resolve().parents[1]
RUNNABLE_PAGES = ["index.md", "from-torch.md", "lengths.md", "from-flux.md", "from-mlx.md",
                  "rl-resets.md", "backends.md", "regularization.md"]
# Examples that use features from other modules run once those modules are present.
OPTIONAL_NAMES = {"rnnkit.Stateful": lambda: hasattr(rnnkit, "Stateful"),
                  "mlx.": lambda: importlib.util.find_spec("mlx") is not None}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built once with `mkdocs build --strict` (a warning fails the build)."""
    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec(
            "mkdocstrings") is None:
        pytest.skip("mkdocs and mkdocstrings are not installed (pip install rnnkit[docs])")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_mkdocs_build_strict(site):
    for page in ["index.html", "lengths/index.html", "distributed/index.html",
                 "api/layers/index.html", "api/stateful/index.html", "from-keras/index.html"]:
        assert (site / page).is_file(), page
    api = (site / "api/layers/index.html").read_text()
    assert "learn_initial_state" in api  # the reference is generated from the docstrings


def _text(html: str) -> str:
    return unescape(re.sub(r"<[^>]+>", "", html))


def _api_pages(site: Path) -> dict[str, str]:
    pages = {path.parent.name: path.read_text() for path in (site / "api").glob("*/index.html")}
    assert {"layers", "cells", "stateful", "dispatch"} <= set(pages), sorted(pages)
    return pages


# What reST markup looks like once Markdown has rendered it as text.
RAW_REST = re.compile(r":(func|class|math|data|meth|mod|attr|obj|exc):`?|\.\. (math|note)::|``")


def test_api_pages_have_no_raw_rest(site):
    for name, html in _api_pages(site).items():
        body = _text(html[html.index("<article"):html.index("</article>")])
        found = sorted({m.group(0) for m in RAW_REST.finditer(body)})
        assert not found, f"api/{name}: unrendered reST {found}"


HEADING = re.compile(r'<h\d id="(rnnkit[\w.]*)" class="doc doc-heading">(.*?)</h\d>', re.S)
PARAMETERS = re.compile(r'doc-section-title">Parameters:</span>(.*?)</table>', re.S)
ROW = re.compile(r'<tr class="doc-section-item">\s*<td>\s*<code>([^<]*)</code>(.*?)</tr>', re.S)


def _signatures_and_tables(html: str):
    """(object id, {parameter: has a default}, [(row name, row says required)])."""
    headings = list(HEADING.finditer(html))
    for heading, following in zip(headings, headings[1:] + [None]):
        end = following.start() if following else len(html)
        signature = _text(heading.group(2))
        arguments = signature[signature.find("(") + 1:signature.rfind(")")]
        params = {}
        for part in arguments.split(","):
            name = part.strip().lstrip("*").split("=")[0].strip()
            if name:  # *args and **options are never required
                params[name] = "=" in part or part.strip().startswith("*")
        table = PARAMETERS.search(html, heading.end(), end)
        rows = [] if table is None else [
            (row.group(1), "<em>required</em>" in row.group(2))
            for row in ROW.finditer(table.group(1))
        ]
        yield heading.group(1), params, rows


def test_api_parameter_tables_show_the_real_defaults(site):
    checked = 0
    for name, html in _api_pages(site).items():
        for obj, params, rows in _signatures_and_tables(html):
            for row, required in rows:
                assert row in params, f"api/{name}: {obj} documents {row!r}, not a parameter"
                assert required != params[row], (
                    f"api/{name}: {obj}'s table says {row!r} is "
                    f"{'required' if required else 'optional'}, the signature disagrees")
                checked += 1
    assert checked > 50  # the tables were found


RETURNS = re.compile(r'doc-section-title">Returns:</span>.*?<tbody>(.*?)</tbody>', re.S)
RETURN_ROW = re.compile(r'<tr class="doc-section-item">\s*<td>(.*?)</td>', re.S)


def test_api_returns_sections_are_not_split_into_lines(site):
    """A continuation line of a Returns description at the first line's indentation reads as a
    second, untyped return value; the table then shows one sentence cut across rows."""
    checked = 0
    for name, html in _api_pages(site).items():
        for section in RETURNS.finditer(html):
            types = [_text(cell).strip() for cell in RETURN_ROW.findall(section.group(1))]
            checked += 1
            assert len(types) == 1 or all(types), f"api/{name}: Returns split into {types}"
    assert checked > 5


def test_forward_is_documented_for_every_layer_and_cell(site):
    pages = _api_pages(site)
    tables = {obj: (params, rows) for html in pages.values()
              for obj, params, rows in _signatures_and_tables(html)}
    missing = [name for name in ["RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell",
                                 "Stateful"] if f"rnnkit.{name}.forward" not in tables]
    assert not missing, f"no forward on the API pages for {missing}"
    for layer in ["RNN", "GRU", "LSTM"]:
        params, rows = tables[f"rnnkit.{layer}.forward"]
        assert [row for row, _ in rows] == [
            "input", "hx", "lengths", "resets", "mask", "dropout_masks"], layer
    for cell in ["RNNCell", "GRUCell", "LSTMCell"]:
        params, rows = tables[f"rnnkit.{cell}.forward"]
        assert [row for row, _ in rows] == ["input", "hx", "dropout_masks"], cell
    params, rows = tables["rnnkit.Stateful.forward"]
    assert [row for row, _ in rows] == ["input", "lengths", "resets"]
    layers = _text(pages["layers"])
    assert "(L, N, H_in)" in layers and "(D*num_layers, N, H_out)" in layers  # shapes


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
