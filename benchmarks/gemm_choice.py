"""rnnkit's matrix-product kernel against torch's library product, at the grid's shapes.

For each (B, H, T) of the `rnnkit bench` grid (input size H) and each cell's gate count G
(GRU 3, LSTM 4), the products a layer makes, through rnnkit's own ops:

- ``proj``: the input projection, M = B*T rows, K = H, N = G*H (``cpu_linear``);
- ``dx``: its input gradient, M = B*T, K = G*H, N = H;
- ``dW``: a weight gradient, M = G*H, K = B*T, N = H (the same product as dW_hh);
- ``step``: one step's size, M = B, K = H, N = G*H (the fused loops keep their own kernel
  here; shown for the record).

Each is timed with ``RNNKIT_GEMM=rnnkit`` and ``RNNKIT_GEMM=library`` (gemm_choice.h)
interleaved in one process; the figure is the median ratio rnnkit time / library time (above
1: the library is faster), and ``auto`` says which path `use_library_gemm` picks now. The
decision table in csrc/gemm_choice.h cites this script's output.

Run: ``PYTHONPATH=src python benchmarks/gemm_choice.py [--repeats 9] [--threads 2]``; for
the AVX2 case prefix ``RNNKIT_CPU_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
MKL_ENABLE_INSTRUCTIONS=AVX2``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import torch

from rnnkit.bench import GRID, capability_line, kernels_line
from rnnkit.ops.cpu import _ops

GATES = {"GRU": 3, "LSTM": 4}


def _timed(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _products(batch: int, size: int, seq_len: int, gates: int) -> dict[str, Callable[[], object]]:
    rows, wide = batch * seq_len, gates * size
    x = torch.randn(rows, size)
    weight, bias = torch.randn(wide, size) * 0.05, torch.randn(wide)
    grad = torch.randn(rows, wide)
    step_x = torch.randn(batch, size)
    backward = torch.ops.rnnkit.cpu_linear_backward
    return {
        "proj": lambda: torch.ops.rnnkit.cpu_linear(x, weight, bias),
        "dx": lambda: backward(grad, x, weight, True, False, False),
        "dW": lambda: backward(grad, x, weight, False, True, False),
        "step": lambda: torch.ops.rnnkit.cpu_linear(step_x, weight, bias),
    }


def _path(name: str | None) -> None:
    if name is None:
        os.environ.pop("RNNKIT_GEMM", None)
    else:
        os.environ["RNNKIT_GEMM"] = name


def _picked(fn: Callable[[], object]) -> str:
    """Which path auto takes: compare the result's bits with each forced path's."""
    _path(None)
    auto = fn()
    _path("library")
    library = fn()
    _path("rnnkit")
    ours = fn()
    _path(None)
    same_library, same_ours = (torch.equal(_first(auto), _first(r)) for r in (library, ours))
    return "both" if same_library and same_ours else "library" if same_library else "rnnkit"


def _first(result: object) -> torch.Tensor:
    """The product itself: a backward call's first non-empty gradient."""
    if isinstance(result, torch.Tensor):
        return result
    return next(t for t in result if t.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cells", nargs="+", default=list(GATES), choices=list(GATES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _ops.linear(torch.randn(2, 4), torch.randn(4, 4), None)  # load (or build) the kernels
    print(capability_line())
    print(f"rnnkit CPU kernels: {kernels_line()}")
    print(f"float32, {args.threads} threads, median of {args.repeats}; "
          "ratio = rnnkit kernel time / library time (>1: library faster)")
    print(f"{'cell':5} {'B,H,T':>14} {'product':7} {'M':>6} {'N':>5} {'K':>6} "
          f"{'rnnkit ms':>9} {'library ms':>10} {'ratio':>6}  auto")
    for cell in args.cells:
        for batch, size, seq_len in GRID:
            torch.manual_seed(0)
            rows, wide = batch * seq_len, GATES[cell] * size
            shapes = {"proj": (rows, wide, size), "dx": (rows, size, wide),
                      "dW": (wide, size, rows), "step": (batch, wide, size)}
            for name, fn in _products(batch, size, seq_len, GATES[cell]).items():
                m, n, k = shapes[name]
                calls = max(1, int(2e8 / (m * n * k)))  # about 0.1 s at 2 GFLOP/s per batch
                times: dict[str, list[float]] = {"rnnkit": [], "library": []}
                for path in times:  # warm-up
                    _path(path)
                    fn()
                for _ in range(args.repeats):
                    for path in times:
                        _path(path)
                        times[path].append(_timed(fn, calls))
                _path(None)
                ours, library = (statistics.median(times[p]) for p in ("rnnkit", "library"))
                print(f"{cell:5} {f'{batch},{size},{seq_len}':>14} {name:7} {m:6d} {n:5d} "
                      f"{k:6d} {ours * 1e3:9.3f} {library * 1e3:10.3f} "
                      f"{ours / library:6.2f}  {_picked(fn)}", flush=True)


if __name__ == "__main__":
    main()
