"""`rnnkit bench`: rnnkit's layers against torch.nn's, in one process.

For every cell (RNN, GRU, LSTM) and grid point `(B, H, T)` (input size `H`), the two
layers get the same weights and input. Each repeat times torch.nn forward (no grad),
rnnkit forward, torch.nn forward+backward and rnnkit forward+backward back to back, so
load changes on the machine hit both sides alike; each figure is the median over the repeats.
The table shows `torch.nn time / rnnkit time` (above 1: rnnkit is faster).

Training peak memory (forward+backward, parameters and input excluded) is measured with
`torch.profiler`'s `profile_memory`: every allocation and free the CPU allocator sees,
in time order, summed to a running total whose maximum is the peak. On CUDA it is
`torch.cuda.max_memory_allocated` above the memory in use before the step.

Results go to `DIR/bench-<device>.json` and `DIR/bench-<device>.png` with `--out DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import rnnkit  # light: its layers load on first use

if TYPE_CHECKING:
    from torch import Tensor

# torch is imported by _import_torch() once the arguments parse, so `rnnkit bench --help`
# answers without loading it; everything below runs after main() has called it.
torch: Any = None


def _import_torch() -> None:
    global torch
    import torch


CELLS = ("RNN", "GRU", "LSTM")
GRID = ((1, 128, 500), (16, 256, 200), (64, 512, 100), (32, 1024, 50))
QUICK_GRID = ((1, 16, 20), (4, 32, 10))
TARGETS = {  # issue 17's goals (on AVX-512 and AVX2), per grid point, (forward, forward+backward)
    "RNN": ((4.0, 4.0), (2.0, 2.0), (1.2, 1.2), (1.0, 1.0)),
    "GRU": ((4.0, 4.0), (2.0, 2.0), (1.2, 1.2), (1.0, 1.0)),
    "LSTM": ((1.5, 1.5), (1.0, 1.0), (1.0, 1.0), (1.0, 1.0)),
}
# On CUDA the peer is cuDNN; the grid holds the GPU issue's cases: FlashRNN's anchor size, small
# batches at H 256-1024, and a large batch.
GPU_GRID = ((16, 768, 1024), (4, 256, 1024), (8, 1024, 512), (256, 512, 256))
GPU_TARGETS = {
    "RNN": ((2.0, 2.0), (2.0, 2.0), (2.0, 2.0), (0.9, 0.9)),
    "GRU": ((2.0, 1.5), (2.0, 2.0), (2.0, 2.0), (0.9, 0.9)),
    "LSTM": ((1.0, 1.0), (2.0, 2.0), (2.0, 2.0), (0.9, 0.9)),
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rnnkit bench",
        description="Time rnnkit's RNN/GRU/LSTM against torch.nn (ratio torch.nn / rnnkit).",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--dtype", choices=("float32", "float64", "bfloat16", "float16"), default=None,
        help="default: float32 on cpu, bfloat16 on cuda (half precision needs cuda)",
    )
    parser.add_argument(
        "--repeats", type=int, default=7,
        help="interleaved runs per figure, at least 5 (7: steadier medians on a shared machine)",
    )
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for smoke tests")
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--out", type=Path, default=None, help="write JSON and PNG here")
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the training peak memory comparison"
    )
    parser.add_argument(
        "--contended", action="store_true",
        help="run one busy Python process beside the measurement (a competing job)",
    )
    parser.add_argument(
        "--resets", action="store_true",
        help="the recurrent-RL case instead of the grid: LSTM 512->128, T=128, B=8 and 64, "
        "1%% of steps resetting, forward+backward; rnnkit's one call with resets= against "
        "CleanRL's per-step loop over torch.nn.LSTM and against rnnkit without resets",
    )
    parser.add_argument(
        "--regularized", action="store_true",
        help="recurrent dropout (0.25) and LayerNorm LSTM at (B, H, T) = (16, 256, 200) and "
        "(64, 512, 100), forward+backward: rnnkit against the same model as torch.nn cells "
        "in a Python loop and against plain rnnkit",
    )
    args = parser.parse_args(argv)
    _import_torch()
    if args.repeats < 5:
        parser.error(f"--repeats must be at least 5, got {args.repeats}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA build of torch and a GPU; none found")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device == "cuda" else "float32"
    if args.device == "cpu" and args.dtype in ("bfloat16", "float16"):
        parser.error(f"--dtype {args.dtype} is for --device cuda; the cpu kernels are fp32/fp64")
    return args


def _busy_loop() -> None:
    """A competing job: plain Python arithmetic until killed (one core's worth of load)."""
    total = 0
    while True:
        for i in range(1_000_000):
            total += i * i


@contextlib.contextmanager
def contended(enabled: bool = True):
    """Run one busy background process (not pinned to a core) while the block runs.

    This is the load of a data-loader worker or another job on a workstation: with 2 cores,
    one of the two threads of a measurement loses its core from time to time.
    """
    if not enabled:
        yield
        return
    import multiprocessing

    worker = multiprocessing.get_context("spawn").Process(target=_busy_loop, daemon=True)
    worker.start()
    try:
        time.sleep(0.5)  # let it reach its loop
        yield
    finally:
        worker.kill()
        worker.join()


def capability_line() -> str:
    """What the figures ran on: the CPU's vector ISA as torch sees it, threads, torch's BLAS."""
    _import_torch()
    found = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    blas = found.group(1) if found else "unknown"
    return (
        f"CPU: {platform.machine()}, torch capability {torch.backends.cpu.get_cpu_capability()}, "
        f"{torch.get_num_threads()} threads, torch BLAS {blas}"
        f"{', oneDNN' if torch.backends.mkldnn.is_available() else ''}"
    )


def kernels_line() -> str:
    """The compiled CPU kernels rnnkit loaded (their ISA, prebuilt or built, and why)."""
    from rnnkit.ops.cpu import _build

    error = _build.status()
    kernels = _build.loaded()
    return kernels.describe() if error is None and kernels else f"unavailable ({error})"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_memory(fn: Callable[[], None], device: str) -> int:
    """Bytes allocated at the peak of `fn` above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's native start/stop lines, written straight to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _pair(cell: str, size: int, device: str, dtype: torch.dtype):
    reference = getattr(torch.nn, cell)(size, size, device=device, dtype=dtype)
    ours = getattr(rnnkit, cell)(size, size, device=device, dtype=dtype, backend="auto")
    ours.load_state_dict(reference.state_dict())
    return reference, ours


def _steps(module: torch.nn.Module, x: Tensor) -> tuple[Callable[[], None], Callable[[], None]]:
    def forward() -> None:
        with torch.no_grad():
            module(x)

    def train() -> None:
        module.zero_grad(set_to_none=True)
        output, _ = module(x.requires_grad_(True))
        output.sum().backward()

    return forward, train


def run(args: argparse.Namespace) -> dict:
    """Run the grid and return the results (times in seconds, memory in bytes)."""
    dtype = getattr(torch, args.dtype)
    full_grid, targets = (GPU_GRID, GPU_TARGETS) if args.device == "cuda" else (GRID, TARGETS)
    grid = QUICK_GRID if args.quick else full_grid
    rows = []
    for cell in args.cells:
        for index, (batch, size, seq_len) in enumerate(grid):
            torch.manual_seed(0)
            reference, ours = _pair(cell, size, args.device, dtype)
            x = torch.randn(seq_len, batch, size, device=args.device, dtype=dtype)
            ref_fwd, ref_train = _steps(reference, x)
            our_fwd, our_train = _steps(ours, x)
            for fn in (ref_fwd, our_fwd, ref_train, our_train):  # warm-up (and first build)
                fn()
            keys = ("ref_fwd", "ours_fwd", "ref_fb", "ours_fb")
            times: dict[str, list[float]] = {k: [] for k in keys}
            for _ in range(args.repeats):
                times["ref_fwd"].append(_timed(ref_fwd, args.device))
                times["ours_fwd"].append(_timed(our_fwd, args.device))
                times["ref_fb"].append(_timed(ref_train, args.device))
                times["ours_fb"].append(_timed(our_train, args.device))
            median = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "cell": cell,
                "batch": batch,
                "hidden": size,
                "input": size,
                "seq_len": seq_len,
                "median_s": median,
                "all_s": times,
                "ratio_fwd": median["ref_fwd"] / median["ours_fwd"],
                "ratio_fb": median["ref_fb"] / median["ours_fb"],
            }
            if not args.quick:
                row["target_fwd"], row["target_fb"] = targets[cell][index]
            if not args.no_memory:
                row["peak_bytes_torch"] = _peak_memory(ref_train, args.device)
                row["peak_bytes_rnnkit"] = _peak_memory(our_train, args.device)
            rows.append(row)
            _print_row(row)
    return {**_context(args), "results": rows}


# The recurrent-RL case (CleanRL's ppo_atari_lstm shape) and the goals.
RESETS_GRID = ((8, 512, 128, 128), (64, 512, 128, 128))  # (B, input, hidden, T)
RESETS_TARGETS = {8: 5.0, 64: 2.0}  # rnnkit with resets vs the per-step loop
RESETS_OVERHEAD = 1.15  # rnnkit with resets vs rnnkit without, at most


def _cleanrl_train(lstm: torch.nn.Module, x: Tensor, done: Tensor) -> Callable[[], None]:
    """CleanRL's get_states: one torch.nn.LSTM call per step, the state times (1 - done)."""
    keep = (1.0 - done.to(x.dtype)).unsqueeze(-1)  # (T, B, 1)

    def train() -> None:
        lstm.zero_grad(set_to_none=True)
        size = lstm.hidden_size
        state = (x.new_zeros(1, x.shape[1], size), x.new_zeros(1, x.shape[1], size))
        outputs = []
        for t in range(x.shape[0]):
            state = (keep[t] * state[0], keep[t] * state[1])
            output, state = lstm(x[t : t + 1], state)
            outputs.append(output)
        torch.cat(outputs).sum().backward()

    return train


def _rnnkit_train(lstm: torch.nn.Module, x: Tensor, resets: Tensor | None) -> Callable[[], None]:
    def train() -> None:
        lstm.zero_grad(set_to_none=True)
        output, _ = lstm(x, resets=resets)
        output.sum().backward()

    return train


def run_resets(args: argparse.Namespace) -> dict:
    """The recurrent-RL case, interleaved: the loop, rnnkit with and without resets, torch.nn."""
    dtype = getattr(torch, args.dtype)
    rows = []
    grid = ((2, 16, 8, 12),) if args.quick else RESETS_GRID
    for batch, features, hidden, seq_len in grid:
        torch.manual_seed(0)
        peer = torch.nn.LSTM(features, hidden, device=args.device, dtype=dtype)
        ours = rnnkit.LSTM(features, hidden, device=args.device, dtype=dtype)
        ours.load_state_dict(peer.state_dict())
        x = torch.randn(seq_len, batch, features, device=args.device, dtype=dtype)
        done = torch.rand(seq_len, batch, device=args.device) < 0.01
        done[seq_len // 2, 0] = True  # at least one reset, whatever the draw
        contenders = {
            "loop": _cleanrl_train(peer, x, done),
            "resets": _rnnkit_train(ours, x, done),
            "plain": _rnnkit_train(ours, x, None),
            "torch": _torch_whole(peer, x),
        }
        for fn in contenders.values():  # warm-up (and first build)
            fn()
        times: dict[str, list[float]] = {k: [] for k in contenders}
        for _ in range(args.repeats):
            for key, fn in contenders.items():
                times[key].append(_timed(fn, args.device))
        median = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "batch": batch, "input": features, "hidden": hidden, "seq_len": seq_len,
            "resets": int(done.sum()), "median_s": median, "all_s": times,
            "speedup_vs_loop": median["loop"] / median["resets"],
            "overhead_vs_plain": median["resets"] / median["plain"],
        }
        if not args.quick:
            row["target_vs_loop"] = RESETS_TARGETS[batch]
            row["target_overhead"] = RESETS_OVERHEAD
        rows.append(row)
        print(
            f"LSTM {batch:>3} {features:>4}->{hidden:<4} T={seq_len:<4} resets={row['resets']:<3}| "
            f"loop {median['loop'] * 1e3:8.1f}ms  rnnkit+resets {median['resets'] * 1e3:7.1f}ms "
            f"({row['speedup_vs_loop']:5.2f}x)  rnnkit {median['plain'] * 1e3:7.1f}ms "
            f"(resets cost {row['overhead_vs_plain']:4.2f}x)  "
            f"torch.nn whole {median['torch'] * 1e3:7.1f}ms",
            flush=True,
        )
    return {**_context(args), "suite": "resets", "results": rows}


def _torch_whole(lstm: torch.nn.Module, x: Tensor) -> Callable[[], None]:
    """torch.nn's one call over the whole sequence, without resets: for context."""
    def train() -> None:
        lstm.zero_grad(set_to_none=True)
        output, _ = lstm(x)
        output.sum().backward()

    return train


def _context(args: argparse.Namespace) -> dict:
    return {
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "torch": torch.__version__,
        "rnnkit": rnnkit.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpu_kernels": kernels_line() if args.device == "cpu" else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _header() -> str:
    return (
        f"{'cell':5} {'B':>4} {'H':>5} {'T':>4} | {'torch fwd':>10} {'rnnkit':>9} {'ratio':>6}"
        f" | {'torch f+b':>10} {'rnnkit':>9} {'ratio':>6} | {'peak MiB torch/rnnkit':>21}"
    )


def _print_row(row: dict) -> None:
    m = row["median_s"]
    memory = ""
    if "peak_bytes_torch" in row:
        memory = f"{row['peak_bytes_torch'] / 2**20:9.1f} /{row['peak_bytes_rnnkit'] / 2**20:8.1f}"
    print(
        f"{row['cell']:5} {row['batch']:>4} {row['hidden']:>5} {row['seq_len']:>4} | "
        f"{m['ref_fwd'] * 1e3:8.2f}ms {m['ours_fwd'] * 1e3:7.2f}ms {row['ratio_fwd']:5.2f}x | "
        f"{m['ref_fb'] * 1e3:8.2f}ms {m['ours_fb'] * 1e3:7.2f}ms {row['ratio_fb']:5.2f}x | "
        f"{memory}",
        flush=True,
    )


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["results"]
    labels = [f"{r['cell']}\n{r['batch']},{r['hidden']},{r['seq_len']}" for r in rows]
    positions = range(len(rows))
    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(rows)), 4.0))
    width = 0.4
    axis.bar([p - width / 2 for p in positions], [r["ratio_fwd"] for r in rows], width,
             label="forward (no grad)")
    axis.bar([p + width / 2 for p in positions], [r["ratio_fb"] for r in rows], width,
             label="forward+backward")
    for p, r in zip(positions, rows):
        for offset, key in ((-width / 2, "target_fwd"), (width / 2, "target_fb")):
            if key in r:
                axis.plot([p + offset - width / 2, p + offset + width / 2], [r[key]] * 2, "k-")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set_xticks(list(positions), labels, fontsize=7)
    axis.set_ylabel("torch.nn time / rnnkit time")
    axis.set_title(
        f"rnnkit vs torch.nn, {results['device']} {results['dtype']}, "
        f"{results['threads']} threads (black: targets)"
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


# Recurrent dropout and layer norm: the grid and goals.
REGULARIZED_GRID = ((16, 256, 200), (64, 512, 100))  # (B, H, T), input size H
REGULARIZED_TARGETS = {  # (speedup vs the cell loop at least, overhead vs plain at most)
    "dropout": (3.0, 1.3), "layer_norm": (3.0, 1.5),
}
RECURRENT_DROPOUT = 0.25


def _cell_loop(kind: str, size: int, device: str, dtype: torch.dtype, x: Tensor,
               mask: Tensor) -> Callable[[], None]:
    """What users write today: torch.nn.LSTMCell/GRUCell stepped in Python, `h` times one
    fixed per-sequence mask where it enters the cell (GRUCell then also mixes the dropped `h`
    into its update, a slightly different model at the same cost)."""
    cell = getattr(torch.nn, kind + "Cell")(size, size, device=device, dtype=dtype)

    def train() -> None:
        cell.zero_grad(set_to_none=True)
        h = x.new_zeros(x.shape[1], size)
        c = x.new_zeros(x.shape[1], size)
        outputs = []
        for t in range(x.shape[0]):
            if kind == "LSTM":
                h, c = cell(x[t], (h * mask, c))
            else:
                h = cell(x[t], h * mask)
            outputs.append(h)
        torch.stack(outputs).sum().backward()

    return train


def _layer_norm_loop(size: int, device: str, dtype: torch.dtype,
                     x: Tensor) -> Callable[[], None]:
    """A LayerNorm LSTM as users write it: torch.nn.Linear and torch.nn.LayerNorm modules,
    the input projection for all steps at once, the recurrence stepped in Python."""
    factory = {"device": device, "dtype": dtype}
    modules = torch.nn.ModuleDict({
        "ih": torch.nn.Linear(size, 4 * size, bias=True, **factory),
        "hh": torch.nn.Linear(size, 4 * size, bias=True, **factory),
        "ln_x": torch.nn.LayerNorm(4 * size, **factory),
        "ln_h": torch.nn.LayerNorm(4 * size, **factory),
        "ln_c": torch.nn.LayerNorm(size, **factory),
    })

    def train() -> None:
        modules.zero_grad(set_to_none=True)
        gates_x = modules["ln_x"](x @ modules["ih"].weight.T) + modules["ih"].bias
        h = x.new_zeros(x.shape[1], size)
        c = x.new_zeros(x.shape[1], size)
        outputs = []
        for t in range(x.shape[0]):
            gates = gates_x[t] + modules["ln_h"](h @ modules["hh"].weight.T) + modules["hh"].bias
            i, f, g, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(modules["ln_c"](c))
            outputs.append(h)
        torch.stack(outputs).sum().backward()

    return train


def _layer_train(layer: torch.nn.Module, x: Tensor) -> Callable[[], None]:
    def train() -> None:
        layer.zero_grad(set_to_none=True)
        output, _ = layer(x)
        output.sum().backward()

    return train


def run_regularized(args: argparse.Namespace) -> dict:
    """Recurrent dropout (LSTM, GRU) and LayerNorm LSTM, interleaved in one process: the
    Python cell loop, rnnkit with the option, and plain rnnkit; medians of the repeats."""
    dtype = getattr(torch, args.dtype)
    device = args.device
    grid = ((2, 16, 8),) if args.quick else REGULARIZED_GRID
    cases = [("LSTM", "dropout"), ("GRU", "dropout"), ("LSTM", "layer_norm")]
    rows = []
    for batch, size, seq_len in grid:
        for kind, option in cases:
            torch.manual_seed(0)
            x = torch.randn(seq_len, batch, size, device=device, dtype=dtype)
            layer_class = getattr(rnnkit, kind)
            plain = layer_class(size, size, device=device, dtype=dtype).train()
            if option == "dropout":
                ours = layer_class(size, size, device=device, dtype=dtype,
                                   recurrent_dropout=RECURRENT_DROPOUT).train()
                mask = ours.sequence_masks(batch)["hidden_l0"]
                loop = _cell_loop(kind, size, device, dtype, x, mask)
            else:
                ours = layer_class(size, size, device=device, dtype=dtype,
                                   layer_norm=True).train()
                loop = _layer_norm_loop(size, device, dtype, x)
            contenders = {"loop": loop, "ours": _layer_train(ours, x),
                          "plain": _layer_train(plain, x)}
            for fn in contenders.values():  # warm-up (and first build)
                fn()
            times: dict[str, list[float]] = {k: [] for k in contenders}
            for _ in range(args.repeats):
                for key, fn in contenders.items():
                    times[key].append(_timed(fn, device))
            median = {k: statistics.median(v) for k, v in times.items()}
            row = {
                "cell": kind, "option": option, "batch": batch, "hidden": size,
                "seq_len": seq_len, "median_s": median, "all_s": times,
                "speedup_vs_loop": median["loop"] / median["ours"],
                "overhead_vs_plain": median["ours"] / median["plain"],
            }
            if not args.quick:
                row["target_vs_loop"], row["target_overhead"] = REGULARIZED_TARGETS[option]
            rows.append(row)
            label = (f"recurrent_dropout={RECURRENT_DROPOUT}" if option == "dropout"
                     else "layer_norm=True")
            print(
                f"{kind:<4} {label:<24} B={batch:<3} H={size:<4} T={seq_len:<4}| "
                f"loop {median['loop'] * 1e3:8.1f}ms  rnnkit {median['ours'] * 1e3:7.1f}ms "
                f"({row['speedup_vs_loop']:5.2f}x faster)  plain rnnkit "
                f"{median['plain'] * 1e3:7.1f}ms (option costs {row['overhead_vs_plain']:4.2f}x)",
                flush=True,
            )
    return {**_context(args), "suite": "regularized", "results": rows}


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit status."""
    args = _parse(argv)
    print(capability_line() + ("; one busy process competing" if args.contended else ""))
    if args.device == "cpu":
        print(f"rnnkit CPU kernels: {kernels_line()}")
    with contended(args.contended):
        return _main(args)


def _side_suite(
    args: argparse.Namespace, suite: str, run_suite: Callable[[argparse.Namespace], dict]
) -> int:
    """Run `--resets` or `--regularized` (forward+backward) and write its JSON with `--out`."""
    print(
        f"rnnkit bench --{suite}: {args.device} {args.dtype}, {torch.get_num_threads()} "
        f"threads, median of {args.repeats}, forward+backward"
    )
    results = run_suite(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"bench-{suite}-{args.device}.json"
        path.write_text(json.dumps(results, indent=2))
        print(f"wrote {path}")
    return 0


def _main(args: argparse.Namespace) -> int:
    if args.regularized:
        return _side_suite(args, "regularized", run_regularized)
    if args.resets:
        return _side_suite(args, "resets", run_resets)
    print(
        f"rnnkit bench: {args.device} {args.dtype}, {torch.get_num_threads()} threads, "
        f"median of {args.repeats}; ratio = torch.nn time / rnnkit time (input size = H)"
    )
    print(_header())
    results = run(args)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        json_path = args.out / f"bench-{args.device}.json"
        json_path.write_text(json.dumps(results, indent=2))
        png_path = args.out / f"bench-{args.device}.png"
        _plot(results, png_path)
        print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
