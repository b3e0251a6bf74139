"""The command line: demo end to end on a tiny setting, info, bench forwarding, bad options."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rnnkit import cli, demo

TINY = ["--epochs", "1", "--limit", "100", "--hidden-size", "16", "--no-progress"]


def test_demo_end_to_end_writes_files_and_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["demo", "--cell", "lstm", "--out", str(out), "--seed", "3", *TINY]) == 0
    printed = capsys.readouterr().out
    line = next(text for text in printed.splitlines() if text.startswith("test accuracy: "))
    accuracy = float(line.split()[2])
    for name in ("curves.png", "predictions.png", "model.pt", "demo.json"):
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, name
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "demo.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(accuracy, abs=5e-5)
    # Reloading the saved state_dict reproduces the accuracy exactly.
    assert demo.evaluate_saved(out) == summary["test_accuracy"]


def test_demo_is_reproducible_with_a_seed(tmp_path):
    config = demo.DemoConfig(cell="rnn", epochs=1, limit=100, hidden_size=8, seed=5)
    first = demo.run(config, tmp_path / "a", progress=False, stream=open(os.devnull, "w"))
    second = demo.run(config, tmp_path / "b", progress=False, stream=open(os.devnull, "w"))
    assert first.history == second.history
    assert first.test_accuracy == second.test_accuracy


def test_demo_variable_length_columns_use_lengths(tmp_path):
    train, _ = demo.load_data("digits-columns", seed=0, limit=100)
    assert train.lengths is not None
    assert int(train.lengths.min()) < int(train.lengths.max()) <= 8
    status = cli.main(["demo", "--data", "digits-columns", "--out", str(tmp_path), *TINY])
    assert status == 0


@pytest.mark.parametrize(
    "options,message",
    [
        (["--cell", "transformer"], "invalid choice: 'transformer'"),
        (["--epochs", "0"], "expected a whole number > 0, got 0"),
        (["--epochs", "-3"], "expected a whole number > 0, got -3"),
    ],
)
def test_bad_options_exit_non_zero_with_a_message(options, message, capsys):
    assert cli.main(["demo", *options]) != 0
    assert message in capsys.readouterr().err


def test_unwritable_out_exits_non_zero(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["demo", "--out", str(blocker / "sub"), *TINY]) != 0
    assert "cannot write to --out" in capsys.readouterr().err


def test_info_prints_versions_and_backends(capsys):
    import torch

    import rnnkit

    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert f"rnnkit {rnnkit.__version__}" in printed
    assert f"torch {torch.__version__}" in printed
    assert "python " in printed
    assert "reference: available" in printed
    assert "cpu tensors: " in printed and "cuda tensors: " in printed
    from rnnkit.ops import cpu

    if cpu.library_path() is not None:
        assert f"cpu library (load it to run AOTInductor packages): {cpu.library_path()}" in printed


def test_python_dash_m_matches_console_script_entry(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run(
        [sys.executable, "-m", "rnnkit", "info"], capture_output=True, text=True, env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "backend='auto' picks" in result.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rnnkit", "demo", "--cell", "nope"], capture_output=True,
        text=True, env=env, timeout=120,
    )
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


def test_bench_subcommand_forwards_to_the_benchmark(tmp_path, capsys):
    status = cli.main(["bench", "--quick", "--repeats", "5", "--no-memory", "--out", str(tmp_path)])
    assert status == 0
    assert list(tmp_path.glob("*.json")) and list(tmp_path.glob("*.png"))


HEAVY = ("torch", "rnnkit.layers", "rnnkit.ops.dispatch", "keras", "matplotlib", "sklearn",
         "mlx", "triton")


@pytest.mark.parametrize("command", [[], ["demo"], ["bench"]])
def test_help_imports_nothing_heavy(command):
    """`--help` answers before torch, the layers or the plotting libraries are imported."""
    script = (
        "import contextlib, io, sys\n"
        "from rnnkit import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        f"        status = cli.main({command + ['--help']!r})\n"
        "    except SystemExit as exit_:\n"
        "        status = exit_.code\n"
        "assert status in (0, None), status\n"
        "assert 'usage: rnnkit' in out.getvalue(), out.getvalue()\n"
        f"print(sorted(name for name in {HEAVY!r} if name in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"--help imported {result.stdout.strip()}"


@pytest.mark.parametrize("command", ["demo", "bench", "info"])
def test_every_subcommand_names_itself_as_the_rnnkit_command(command, capsys):
    try:
        status = cli.main([command, "--help"])
    except SystemExit as exit_:  # bench parses its own options and exits after --help
        status = exit_.code
    assert status in (0, None)
    usage = capsys.readouterr().out
    assert usage.startswith(f"usage: rnnkit {command} "), usage
    assert "python -m" not in usage


def test_a_bad_backend_exits_2_naming_the_choices(capsys):
    assert cli.main(["demo", "--backend", "nope", *TINY]) == 2
    error = capsys.readouterr().err
    assert "backend must be one of" in error and "'reference'" in error and "'nope'" in error


def test_curves_legend_covers_no_curve(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need the demo extra (matplotlib)")
    epochs = 20  # accuracies near 1.0 and losses near 0, where an inside legend sits
    history = {"train_loss": [2.3 * 0.7**e for e in range(epochs)],
               "test_loss": [2.3 * 0.72**e for e in range(epochs)],
               "train_accuracy": [1 - 0.9 * 0.6**e for e in range(epochs)],
               "test_accuracy": [1 - 0.9 * 0.62**e for e in range(epochs)]}
    figure = demo.plot_curves(history, demo.DemoConfig(), str(tmp_path / "curves.png"))
    renderer = figure.canvas.get_renderer()
    legends = [*figure.legends, *(a.get_legend() for a in figure.axes if a.get_legend())]
    assert len(legends) == 1
    box = legends[0].get_window_extent(renderer)
    for axes in figure.axes:
        assert not box.overlaps(axes.get_window_extent(renderer)), axes.get_title()
    assert [t.get_text() for t in legends[0].get_texts()] == ["train", "test"]


def test_predictions_explain_their_colours(tmp_path):
    pytest.importorskip("matplotlib", reason="the plots need the demo extra (matplotlib)")
    from matplotlib.colors import to_rgba

    _, test = demo.load_data("digits", seed=0, limit=100)
    predicted = test.labels.clone()
    predicted[0] = (predicted[0] + 1) % 10  # one mistake
    figure = demo.plot_predictions(test, predicted, demo.DemoConfig(), str(tmp_path / "p.png"))
    (legend,) = figure.legends
    meaning = {t.get_text(): to_rgba(h.get_facecolor())
               for t, h in zip(legend.get_texts(), legend.legend_handles)}
    titles = [a.title for a in figure.axes if a.get_title()]
    right = next(t for t in titles if "true" not in t.get_text())
    wrong = next(t for t in titles if "true" in t.get_text())
    assert to_rgba(right.get_color()) == meaning["right"]
    assert to_rgba(wrong.get_color()) == meaning["wrong: predicted (true label)"]
    assert any("predicted label" in text.get_text() for text in figure.texts)  # the suptitle
