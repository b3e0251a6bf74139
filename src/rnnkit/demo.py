r"""The `rnnkit demo` training run: a sequence classifier on scikit-learn's handwritten digits.

The data is `sklearn.datasets.load_digits`, which ships inside scikit-learn (1,797 images of
8x8 pixels, 16 grey levels, ten classes), so nothing is downloaded. Two readings are offered:

- `digits`: each image is a sequence of its 8 rows, top to bottom, each row a step of 8 pixels.
- `digits-columns`: each image is a sequence of its columns, left to right, with the blank
  columns at both edges dropped, so sequences are 2 to 8 steps long. They are padded to 8 and
  the true lengths go to the layer as `lengths=`. (No variable-length data set ships inside
  the packages rnnkit depends on, so this reading of the same images shows `lengths=` instead.)

The model reads the sequence with an rnnkit [`RNN`][rnnkit.RNN], [`GRU`][rnnkit.GRU] or
[`LSTM`][rnnkit.LSTM] layer and classifies the last hidden state with a linear layer:

$$
\hat y = \mathrm{softmax}(W h_{T} + b)
$$

where $h_T$ is the state after each sequence's own last step.

The run writes into its output directory `curves.png` (loss and accuracy per epoch),
`predictions.png` (some test images with their predicted labels), `model.pt` (the
state_dict) and `demo.json` (the settings, the history and the test accuracy), so that
`load_model` and `evaluate_saved` can rebuild the model and score it again.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import rnnkit
from rnnkit._demo_config import CELLS, DATASETS, DemoConfig, DemoError  # noqa: F401 (public here)

NUM_CLASSES = 10
TEST_FRACTION = 0.2
MODEL_FILE = "model.pt"
SUMMARY_FILE = "demo.json"
CURVES_FILE = "curves.png"
PREDICTIONS_FILE = "predictions.png"
RIGHT_COLOUR, WRONG_COLOUR = "tab:green", "tab:red"  # of the labels in predictions.png


@dataclass
class Split:
    """Sequences `(N, T, 8)` in [0, 1], labels `(N,)` and lengths `(N,)` (None: all T)."""

    inputs: Tensor
    labels: Tensor
    lengths: Tensor | None
    images: np.ndarray  # (N, 8, 8), for the prediction picture

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class DemoResult:
    test_accuracy: float
    test_correct: int
    test_size: int
    train_size: int
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


class DigitClassifier(nn.Module):
    """An rnnkit recurrent layer over the steps, then a linear layer on the last state.

    `forward(inputs (N, T, 8), lengths (N,) or None) -> logits (N, 10)`.
    """

    def __init__(self, cell: str, hidden_size: int, backend: str | None = None) -> None:
        super().__init__()
        layer = {"rnn": rnnkit.RNN, "gru": rnnkit.GRU, "lstm": rnnkit.LSTM}[cell]
        self.rnn = layer(8, hidden_size, batch_first=True, backend=backend)
        self.head = nn.Linear(hidden_size, NUM_CLASSES)

    def forward(self, inputs: Tensor, lengths: Tensor | None = None) -> Tensor:
        _, state = self.rnn(inputs, lengths=lengths)
        hidden = state[0] if isinstance(state, tuple) else state
        return self.head(hidden[-1])


def load_data(data: str, seed: int, limit: int | None = None) -> tuple[Split, Split]:
    """The train and test splits (80/20, stratified, shuffled by `seed`).

    `limit` keeps a stratified subset of that many images first (for quick runs).

    Raises:
        DemoError: when scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise DemoError(_missing_extra(error)) from error
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0
    labels = digits.target.astype(np.int64)
    indices = np.arange(len(labels))
    if limit is not None and limit < len(labels):
        indices, _ = train_test_split(
            indices, train_size=limit, stratify=labels, random_state=seed
        )
    train_idx, test_idx = train_test_split(
        indices, test_size=TEST_FRACTION, stratify=labels[indices], random_state=seed
    )
    return _as_split(data, images[train_idx], labels[train_idx]), _as_split(
        data, images[test_idx], labels[test_idx]
    )


def _as_split(data: str, images: np.ndarray, labels: np.ndarray) -> Split:
    if data == "digits":
        return Split(torch.from_numpy(images.copy()), torch.from_numpy(labels), None, images)
    # Columns left to right, blank edge columns dropped, the rest moved to the front.
    columns = images.transpose(0, 2, 1)  # (N, column, pixel)
    inked = columns.sum(axis=2) > 0
    first = inked.argmax(axis=1)
    last = columns.shape[1] - 1 - inked[:, ::-1].argmax(axis=1)
    lengths = last - first + 1
    sequences = np.zeros_like(columns)
    for n in range(len(columns)):
        sequences[n, : lengths[n]] = columns[n, first[n] : last[n] + 1]
    return Split(
        torch.from_numpy(sequences),
        torch.from_numpy(labels),
        torch.from_numpy(lengths.astype(np.int64)),
        images,
    )


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> tuple[float, int, float]:
    """`(accuracy, number correct, mean cross-entropy)` of `model` on `split`."""
    model.eval()
    logits = model(split.inputs, split.lengths)
    correct = int((logits.argmax(dim=1) == split.labels).sum())
    loss = float(F.cross_entropy(logits, split.labels))
    return correct / len(split), correct, loss


def prepare_out_dir(out: str | Path) -> Path:
    """Create `out` if needed and make sure files can be written there.

    Raises:
        DemoError: when `out` is a file, lies under a file, or is not writable.
    """
    path = Path(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".rnnkit-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise DemoError(f"cannot write to --out {str(out)!r}: {reason}") from error
    return path


def run(config: DemoConfig, out: str | Path, *, progress: bool = True,
        stream: TextIO | None = None) -> DemoResult:
    """Train, evaluate on the held-out split, and write the model, summary and pictures.

    Args:
        config: the settings.
        out: output directory; created if missing.
        progress: show a tqdm progress bar (on stderr) with the live loss.
        stream: where the summary lines go (`None`: standard output).

    Raises:
        DemoError: unwritable `out` or a missing `demo` extra (scikit-learn, matplotlib,
            tqdm).
    """
    out_dir = prepare_out_dir(out)
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        raise DemoError(_missing_extra(error)) from error
    _require_matplotlib()
    train, test = load_data(config.data, config.seed, config.limit)
    # The demo's matrices are tiny: one thread is as fast as two on an idle machine, and much
    # faster on a busy one, where extra threads wait on each other at every step.
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        return _train_and_save(config, out_dir, train, test, progress, stream, tqdm)
    finally:
        torch.set_num_threads(threads)


def _train_and_save(config, out_dir, train, test, progress, stream, tqdm) -> DemoResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    model = DigitClassifier(config.cell, config.hidden_size, config.backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    steps_per_epoch = math.ceil(len(train) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * steps_per_epoch
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    history: dict[str, list[float]] = {
        "train_loss": [], "train_accuracy": [], "test_loss": [], "test_accuracy": []
    }
    bar = tqdm(
        total=config.epochs * steps_per_epoch,
        desc=f"{config.cell} on {config.data}",
        unit="batch",
        disable=not progress,
        leave=False,
    )
    with bar:
        for epoch in range(config.epochs):
            model.train()
            order = torch.randperm(len(train), generator=shuffle)
            total_loss, total_correct = 0.0, 0
            for start in range(0, len(train), config.batch_size):
                batch = order[start : start + config.batch_size]
                lengths = None if train.lengths is None else train.lengths[batch]
                logits = model(train.inputs[batch], lengths)
                loss = F.cross_entropy(logits, train.labels[batch])
                optimizer.zero_grad()
                loss.backward()
                # Plain RNNs occasionally spike early; clipping keeps every cell on track.
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                total_loss += loss.item() * len(batch)
                total_correct += int((logits.argmax(dim=1) == train.labels[batch]).sum())
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}", refresh=False)
            test_accuracy, _, test_loss = evaluate(model, test)
            history["train_loss"].append(total_loss / len(train))
            history["train_accuracy"].append(total_correct / len(train))
            history["test_loss"].append(test_loss)
            history["test_accuracy"].append(test_accuracy)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}",
                            test_acc=f"{test_accuracy:.3f}")
    accuracy, correct, _ = evaluate(model, test)
    seconds = time.perf_counter() - started

    files = {
        "model": str(out_dir / MODEL_FILE),
        "summary": str(out_dir / SUMMARY_FILE),
        "curves": str(out_dir / CURVES_FILE),
        "predictions": str(out_dir / PREDICTIONS_FILE),
    }
    torch.save(model.state_dict(), files["model"])
    result = DemoResult(accuracy, correct, len(test), len(train), seconds, history, files)
    summary = {"config": asdict(config), "rnnkit": rnnkit.__version__, **asdict(result)}
    Path(files["summary"]).write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(history, config, files["curves"])
    with torch.no_grad():
        predicted = model(test.inputs, test.lengths).argmax(dim=1)
    plot_predictions(test, predicted, config, files["predictions"])

    write = (stream.write if stream is not None else _print)
    write(f"trained a {config.cell.upper()} ({config.hidden_size} hidden) on {len(train)} "
          f"{config.data} sequences for {config.epochs} epochs in {seconds:.1f} s\n")
    write(f"test accuracy: {accuracy:.4f} ({correct}/{len(test)} held-out images)\n")
    for name in ("curves", "predictions", "model", "summary"):
        write(f"wrote {files[name]}\n")
    return result


def load_model(out: str | Path) -> tuple[DigitClassifier, DemoConfig]:
    """Rebuild the model a run saved in `out` from `demo.json` and `model.pt`."""
    out_dir = Path(out)
    summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    config = DemoConfig(**summary["config"])
    model = DigitClassifier(config.cell, config.hidden_size, config.backend)
    state = torch.load(out_dir / MODEL_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model, config


def evaluate_saved(out: str | Path) -> float:
    """Test accuracy of the model saved in `out`, on the same held-out split it was scored on."""
    model, config = load_model(out)
    _, test = load_data(config.data, config.seed, config.limit)
    return evaluate(model, test)[0]


def plot_curves(history: dict[str, list[float]], config: DemoConfig, path: str):
    """Loss (left) and accuracy (right) per epoch, train and test, saved as a PNG.

    Returns:
        The matplotlib `Figure`.
    """
    figure, canvas = _figure(figsize=(9, 3.9))
    epochs = range(1, len(history["train_loss"]) + 1)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot(epochs, history["train_loss"], marker="o", label="train")
    loss_axes.plot(epochs, history["test_loss"], marker="o", label="test")
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    accuracy_axes.plot(epochs, history["train_accuracy"], marker="o", label="train")
    accuracy_axes.plot(epochs, history["test_accuracy"], marker="o", label="test")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    accuracy_axes.set_ylim(top=1.02)  # a little room, so points at 1.0 show whole
    from matplotlib.ticker import MaxNLocator

    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    # One legend for both panels, under them: inside, it would cover the accuracy curves as
    # they approach 1.0 (or the loss curves of a short run).
    handles, labels = accuracy_axes.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    figure.suptitle(f"rnnkit demo: {config.cell.upper()} on {config.data}")
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    canvas.print_png(path)
    return figure


def plot_predictions(
    test: Split, predicted: Tensor, config: DemoConfig, path: str, count: int = 24
):
    """`count` test images with predicted (and, when wrong, true) labels.

    Mistakes come first (up to half the grid), so the picture shows what the model gets wrong.
    A legend under the grid says what the colours mean: green, the prediction is right; red,
    it is wrong, with the true label in brackets.

    Returns:
        The matplotlib `Figure`.
    """
    count = min(count, len(test))
    wrong = (predicted != test.labels).nonzero().flatten().tolist()[: count // 2]
    skipped = set(wrong)
    shown = wrong + [i for i in range(len(test)) if i not in skipped][: count - len(wrong)]
    columns = 8
    rows = math.ceil(count / columns)
    figure, canvas = _figure(figsize=(columns * 1.1, rows * 1.35 + 0.8))
    axes_grid = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for index, axes in enumerate(axes_grid):
        axes.set_axis_off()
        if index >= count:
            continue
        item = shown[index]
        guess, truth = int(predicted[item]), int(test.labels[item])
        axes.imshow(test.images[item], cmap="gray_r", vmin=0, vmax=1)
        ok = guess == truth
        label = f"{guess}" if ok else f"{guess} (true {truth})"
        axes.set_title(label, color=RIGHT_COLOUR if ok else WRONG_COLOUR, fontsize=9)
    figure.suptitle(f"{config.cell.upper()} predictions on held-out digits "
                    "(above each image: the predicted label)", fontsize=10)
    from matplotlib.patches import Patch

    figure.legend(
        handles=[Patch(color=RIGHT_COLOUR, label="right"),
                 Patch(color=WRONG_COLOUR, label="wrong: predicted (true label)")],
        loc="lower center", ncol=2, frameon=False, fontsize=9,
    )
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    canvas.print_png(path)
    return figure


def _figure(figsize: tuple[float, float]):
    # An Agg canvas of our own: no display needed and pyplot's global state is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=figsize, dpi=100)
    return figure, FigureCanvasAgg(figure)


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise DemoError(_missing_extra(error)) from error


def _missing_extra(error: ImportError) -> str:
    return (
        f"rnnkit demo needs the 'demo' extra ({error.name or error} is missing); "
        "install it with: pip install 'rnnkit[demo]'"
    )


def _print(text: str) -> None:
    print(text, end="", flush=True)
