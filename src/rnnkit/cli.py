"""The `rnnkit` command (also `python -m rnnkit`): `demo`, `bench` and `info`.

`main(argv)` returns the exit status instead of exiting, so it can be called from tests:
0 on success, 1 when something needed is missing, 2 for bad options.
"""

from __future__ import annotations

import argparse
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields

USAGE_ERROR = 2
MISSING = 1

DEMO_HELP = """\
Train a sequence classifier built on an rnnkit layer on scikit-learn's handwritten digits
(shipped with scikit-learn, no download): each 8x8 image is a sequence of 8 rows of 8 pixels.
Prints the held-out test accuracy and writes curves.png, predictions.png, model.pt and
demo.json into --out."""


def _whole_number(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number of at least `minimum` (0 or 1)."""
    bound = "> 0" if minimum == 1 else f">= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a whole number {bound}, got {text!r}"
            ) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number {bound}, got {value}")
        return value

    return parse


_positive_int = _whole_number(1)
_non_negative_int = _whole_number(0)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text}")
    return value


def _limit(text: str) -> int:
    value = _positive_int(text)
    if value < 50:
        # The stratified 80/20 split needs every one of the 10 classes in the test part.
        raise argparse.ArgumentTypeError(f"expected at least 50 images, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # Nothing here imports torch or the layers: `rnnkit --help` answers at once. The demo's
    # settings come from the light rnnkit._demo_config, and the commands import the rest.
    from rnnkit import __version__
    from rnnkit._demo_config import CELLS, DATASETS, DemoConfig

    parser = argparse.ArgumentParser(
        prog="rnnkit", description="rnnkit: recurrent layers for PyTorch."
    )
    parser.add_argument("--version", action="version", version=f"rnnkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{demo,bench,info}")

    defaults = argparse.Namespace(**{f.name: f.default for f in fields(DemoConfig)})
    demo = commands.add_parser(
        "demo", help="train a digit classifier and plot it", description=DEMO_HELP
    )
    demo.add_argument("--cell", choices=CELLS, default=defaults.cell,
                      help=f"the recurrent layer (default: {defaults.cell})")
    demo.add_argument("--epochs", type=_positive_int, default=defaults.epochs,
                      help=f"passes over the training set (default: {defaults.epochs})")
    demo.add_argument("--out", default="rnnkit-demo",
                      help="directory for the model and pictures (default: ./rnnkit-demo)")
    demo.add_argument("--seed", type=_non_negative_int, default=defaults.seed,
                      help=f"seed for the split, the initial weights and shuffling "
                           f"(default: {defaults.seed})")
    demo.add_argument("--data", choices=DATASETS, default=defaults.data,
                      help="digits: rows as steps; digits-columns: columns as steps, blank edge "
                           "columns dropped, so lengths vary and go in as lengths= "
                           f"(default: {defaults.data})")
    demo.add_argument("--limit", type=_limit, default=None,
                      help="use only this many images (stratified), for quick runs")
    demo.add_argument("--hidden-size", type=_positive_int, default=defaults.hidden_size,
                      help=f"hidden units (default: {defaults.hidden_size})")
    demo.add_argument("--batch-size", type=_positive_int, default=defaults.batch_size,
                      help=f"sequences per step (default: {defaults.batch_size})")
    demo.add_argument("--lr", type=_positive_float, default=defaults.lr,
                      help=f"peak learning rate of the one-cycle schedule (default: {defaults.lr})")
    # Checked by DemoConfig against the registry (a bad name exits 2 naming the choices);
    # listing them here would load every backend.
    demo.add_argument("--backend", default=None,
                      help="rnnkit backend for the layer: auto, reference, or another "
                           "registered one, as `rnnkit info` lists (default: RNNKIT_BACKEND "
                           "or auto)")
    demo.add_argument("--threads", type=_positive_int, default=defaults.threads,
                      help="torch CPU threads while training (default: 1; the matrices are "
                           "small, and more threads only wait on each other on a busy machine)")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    # Listed for --help only: main() hands everything after "bench" to rnnkit.bench untouched.
    commands.add_parser("bench", help="time rnnkit's backends against torch.nn "
                                      "(see: rnnkit bench --help)", add_help=False)
    commands.add_parser("info", help="versions, available backends and what 'auto' picks",
                        description="Print versions, the backends available here and which one "
                                    "backend='auto' picks for CPU and CUDA tensors.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `rnnkit` command line with `argv` (default: `sys.argv[1:]`).

    Returns:
        The exit status: 0 on success, 1 when an optional part is missing, 2 for bad options.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed the usage and the error
        return exit_.code if isinstance(exit_.code, int) else USAGE_ERROR
    if args.command == "demo":
        return _demo(args)
    if args.command == "info":
        return _info()
    parser.print_help()
    return USAGE_ERROR


def _error(command: str, message: str, status: int) -> int:
    print(f"rnnkit {command}: error: {message}", file=sys.stderr)
    return status


def _demo(args: argparse.Namespace) -> int:
    from rnnkit import demo

    try:
        config = demo.DemoConfig(
            cell=args.cell, epochs=args.epochs, seed=args.seed, data=args.data, limit=args.limit,
            hidden_size=args.hidden_size, batch_size=args.batch_size, lr=args.lr,
            backend=args.backend, threads=args.threads,
        )
        demo.run(config, args.out, progress=not args.no_progress)
    except (ValueError, TypeError) as error:
        return _error("demo", str(error), USAGE_ERROR)
    except demo.DemoError as error:
        missing = "is missing" in str(error)
        return _error("demo", str(error), MISSING if missing else USAGE_ERROR)
    return 0


def _bench(argv: list[str]) -> int:
    try:
        from rnnkit import bench
    except ModuleNotFoundError as error:
        if error.name != "rnnkit.bench":
            raise
        return _error("bench", "this rnnkit install has no rnnkit.bench module", MISSING)
    status = bench.main(argv)
    return int(status or 0)


def info_lines() -> list[str]:
    """The lines `rnnkit info` prints: versions, backends, and what `auto` picks."""
    import os

    import torch

    import rnnkit
    from rnnkit.ops import dispatch

    lines = [
        f"rnnkit {rnnkit.__version__}",
        f"torch {torch.__version__}",
        f"python {platform.python_version()} ({platform.python_implementation()}, "
        f"{platform.system()} {platform.machine()})",
        "",
        "backends:",
    ]
    backends = dispatch.registered()
    for name, backend in backends.items():
        if name == "reference":
            lines.append("  reference: available (pure PyTorch, every device, every call)")
            continue
        reason = backend.unavailable_reason()
        devices = ", ".join(backend.device_types)
        status = "available" if reason is None else f"unavailable: {reason}"
        lines.append(f"  {name} ({devices}): {status}")
    lines.append(f"cpu: {_cpu_summary()}")
    library = _cpu_library()
    if library is not None:
        lines.append(f"cpu library (load it to run AOTInductor packages): {library}")

    cuda = torch.cuda.is_available()
    if cuda:
        lines.append(f"cuda: available ({torch.cuda.device_count()} device(s), "
                     f"{torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})")
    else:
        built = f"torch built with CUDA {torch.version.cuda}" if torch.version.cuda else (
            "torch built without CUDA")
        lines.append(f"cuda: not available ({built})")
    lines.append(f"triton: {_triton_status()}")

    lines.append("")
    lines.append("backend='auto' picks (float32 call with lengths=None):")
    lines.append(f"  cpu tensors: {_auto_pick(torch.device('cpu'))}")
    if cuda:
        lines.append(f"  cuda tensors: {_auto_pick(torch.device('cuda'))}")
    else:
        lines.append(f"  cuda tensors: {_auto_pick_without_device('cuda', backends)}")
    env = os.environ.get("RNNKIT_BACKEND")
    if env:
        lines.append(f"RNNKIT_BACKEND={env} overrides 'auto' as the default backend of layers")
    return lines


def _cpu_library() -> str | None:
    try:
        from rnnkit.ops import cpu
    except Exception:  # reported by _cpu_summary
        return None
    return cpu.library_path()


def _cpu_summary() -> str:
    """The compiled CPU kernels' ISA and why, torch's threads and BLAS (see _build.summary)."""
    try:
        from rnnkit.ops.cpu import _build
    except Exception as error:  # an install without the cpu backend still prints the rest
        return f"compiled kernels not importable ({type(error).__name__}: {error})"
    return _build.summary()


def _triton_status() -> str:
    try:
        import triton
    except Exception as error:  # a broken install can raise more than ImportError
        return f"not importable ({type(error).__name__}: {error})"
    return f"importable (version {getattr(triton, '__version__', 'unknown')})"


def _example_calls(device):
    """One tiny float32 call per cell kind, the way a layer would make it."""
    import torch

    from rnnkit.ops.spec import Call, CellSpec

    hidden, batch, steps = 4, 2, 3
    for mode in ("rnn", "gru", "lstm"):
        spec = CellSpec(mode)
        gates = spec.num_gates * hidden
        state = tuple(torch.zeros(batch, hidden, device=device) for _ in range(spec.num_states))
        yield mode, Call(
            spec=spec,
            state=state,
            weight_hh=torch.zeros(gates, hidden, device=device),
            bias_hh=torch.zeros(gates, device=device),
            gates_x=torch.zeros(steps, batch, gates, device=device),
        )


def _auto_pick(device) -> str:
    from rnnkit.ops import dispatch

    picks = []
    for mode, call in _example_calls(device):
        chosen = dispatch.plan(call, "auto")
        picks.append((mode, chosen.backend.name, chosen.passed_over))
    return _summarise(picks)


def _summarise(picks: list[tuple[str, str, str | None]]) -> str:
    names = {name for _, name, _ in picks}
    reasons = sorted({reason for _, _, reason in picks if reason})
    if len(names) == 1:
        text = f"{names.pop()} (rnn, gru, lstm)"
    else:
        text = ", ".join(f"{mode} -> {name}" for mode, name, _ in picks)
    if reasons:
        text += f"; passed over: {'; '.join(reasons)}"
    return text


def _auto_pick_without_device(device_type: str, backends: dict) -> str:
    # No such device here: name what auto would try there, and why it cannot be judged fully.
    candidates = [b for b in backends.values() if device_type in b.device_types]
    if not candidates:
        return (f"reference (no {device_type} device here, and no fused backend for "
                f"{device_type} is installed)")
    for backend in candidates:
        reason = backend.unavailable_reason()
        if reason is None:
            return (f"{backend.name} (no {device_type} device here; it is the first available "
                    f"{device_type} backend, for the calls it supports)")
    reasons = "; ".join(f"{b.name}: {b.unavailable_reason()}" for b in candidates)
    return f"reference (no {device_type} device here; {reasons})"


def _info() -> int:
    for line in info_lines():
        print(line)
    return 0
