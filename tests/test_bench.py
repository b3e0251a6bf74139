"""Smoke test of ``python -m rnnkit bench --quick``: it runs, and writes its JSON and PNG."""

from __future__ import annotations

import json

import pytest
import torch

from rnnkit import bench


def test_quick_bench_writes_json_and_png(tmp_path, capsys):
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "GRU" in printed

    results = json.loads((tmp_path / "bench-cpu.json").read_text())
    assert results["device"] == "cpu" and results["dtype"] == "float32"
    assert results["repeats"] == 7 and results["threads"] >= 1
    rows = results["results"]
    assert {r["cell"] for r in rows} == {"RNN", "GRU", "LSTM"}
    assert len(rows) == 3 * len(bench.QUICK_GRID)
    for row in rows:
        assert len(row["all_s"]["ours_fb"]) == 7
        assert row["ratio_fwd"] > 0 and row["ratio_fb"] > 0
        assert row["peak_bytes_torch"] > 0 and row["peak_bytes_rnnkit"] > 0

    png = (tmp_path / "bench-cpu.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000


def test_bench_rejects_fewer_than_five_repeats():
    with pytest.raises(SystemExit) as error:
        bench.main(["--quick", "--repeats", "3"])
    assert error.value.code == 2


def test_quick_resets_bench_writes_json(tmp_path, capsys):
    assert bench.main(["--resets", "--quick", "--repeats", "5", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "loop" in printed and "rnnkit+resets" in printed
    results = json.loads((tmp_path / "bench-resets-cpu.json").read_text())
    assert results["suite"] == "resets" and results["repeats"] == 5
    (row,) = results["results"]
    assert row["resets"] >= 1
    assert set(row["all_s"]) == {"loop", "resets", "plain", "torch"}
    assert all(len(v) == 5 for v in row["all_s"].values())
    assert row["speedup_vs_loop"] > 0 and row["overhead_vs_plain"] > 0


def test_contended_runs_one_busy_process_and_stops_it():
    import multiprocessing

    with bench.contended():
        (worker,) = multiprocessing.active_children()
        assert worker.is_alive()
    assert not worker.is_alive()
    with bench.contended(False):
        assert multiprocessing.active_children() == []


def test_capability_line_names_isa_threads_and_blas():
    line = bench.capability_line()
    assert torch.backends.cpu.get_cpu_capability() in line
    assert f"{torch.get_num_threads()} threads" in line and "BLAS" in line


def test_quick_regularized_bench_writes_json(tmp_path, capsys):
    assert bench.main(["--regularized", "--quick", "--repeats", "5", "--out",
                       str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "recurrent_dropout=0.25" in printed and "layer_norm=True" in printed
    results = json.loads((tmp_path / "bench-regularized-cpu.json").read_text())
    assert results["suite"] == "regularized" and results["repeats"] == 5
    rows = results["results"]
    assert [(r["cell"], r["option"]) for r in rows] == [
        ("LSTM", "dropout"), ("GRU", "dropout"), ("LSTM", "layer_norm")]
    for row in rows:
        assert set(row["all_s"]) == {"loop", "ours", "plain"}
        assert all(len(v) == 5 for v in row["all_s"].values())
        assert row["speedup_vs_loop"] > 0 and row["overhead_vs_plain"] > 0
