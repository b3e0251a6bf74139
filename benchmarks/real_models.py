"""rnnkit against torch.nn on the shapes of real models, interleaved in one process.

Cases (issue 17):

- ``wlm``: PyTorch's word-language-model example (embedding 200, 2-layer LSTM or GRU with 200
  units, dropout 0.2, bptt 35, batch 20, its decoder over the vocabulary). Training steps on
  the WikiText-2 validation split's token stream (its vocabulary, about 13k words), then
  evaluation. The hidden state is carried across batches and detached, as the example does.
- ``tagger``: a bidirectional GRU (embedding 128, hidden 256) tagging 64 real sentences per
  batch, whose lengths come from the WikiText-2 text (sentences split at `` . ``). torch.nn
  runs a PackedSequence; rnnkit runs ``lengths=`` on the padded batch and the same
  PackedSequence.
- ``rollouts``: recurrent-RL rollouts (B=64, T=128, LSTM 512->128) cut into segments at
  episode ends and packed (torch.nn's way to not carry state across episodes); rnnkit runs
  the same PackedSequence.
- ``stream``: one-step streaming inference (B=1, input 64, hidden 256): rnnkit's ``Stateful``
  fed one step per call against torch.nn's ``GRUCell``/``LSTMCell`` called per step.

Each repeat runs torch.nn then rnnkit on the same weights and data; a figure is the median
ratio ``torch.nn time / rnnkit time`` over the repeats (above 1: rnnkit is faster).
``--contended`` runs one busy Python process beside the measurement, as a data loader or
another job would.

Run: ``python benchmarks/real_models.py [--cases wlm tagger rollouts stream] [--contended]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pack_sequence

import rnnkit
from rnnkit.bench import capability_line, contended

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
TARGETS = {  # the goals
    "wlm LSTM train": 1.5, "wlm GRU train": 2.0, "wlm LSTM eval": 2.0, "wlm GRU eval": 2.0,
    "tagger lengths": 2.0, "tagger packed": 2.0, "rollouts packed": 1.5,
    "stream GRU": 2.0, "stream LSTM": 2.0,
}


def _tokens(path: Path) -> list[str]:
    words: list[str] = []
    with open(path, encoding="utf-8") as text:
        for line in text:
            if line.strip():
                words.extend(line.split() + ["<eos>"])
    return words


def _sentence_lengths(path: Path) -> list[int]:
    """Token counts of the text's sentences (split at " . "), between 2 and 120 tokens."""
    lengths = []
    with open(path, encoding="utf-8") as text:
        for line in text:
            if line.strip() and not line.lstrip().startswith("="):
                for sentence in line.split(" . "):
                    count = len(sentence.split())
                    if 2 <= count <= 120:
                        lengths.append(count)
    return lengths


def _measure(pairs: dict[str, tuple[Callable, Callable]], repeats: int) -> dict[str, list]:
    """Run each (torch.nn, rnnkit) pair once to warm up, then ``repeats`` times interleaved."""
    for reference, ours in pairs.values():
        reference(), ours()
    ratios: dict[str, list] = {name: [] for name in pairs}
    for _ in range(repeats):
        for name, (reference, ours) in pairs.items():
            start = time.perf_counter()
            reference()
            middle = time.perf_counter()
            ours()
            end = time.perf_counter()
            ratios[name].append(((middle - start), (end - middle)))
    return ratios


class WordModel(nn.Module):
    """The word-language-model example's RNNModel, with the recurrent layer passed in."""

    def __init__(self, recurrent: nn.Module, vocab: int, size: int = 200) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(vocab, size)
        self.rnn = recurrent
        self.decoder = nn.Linear(size, vocab)

    def forward(self, tokens, hidden):
        output, hidden = self.rnn(self.drop(self.encoder(tokens)), hidden)
        return self.decoder(self.drop(output)), hidden


def _detach(hidden):
    return tuple(h.detach() for h in hidden) if isinstance(hidden, tuple) else hidden.detach()


def wlm_pairs(cell: str, batches: int = 5) -> dict[str, tuple[Callable, Callable]]:
    words = _tokens(DATA / "valid.txt")
    vocab = {word: index for index, word in enumerate(dict.fromkeys(words))}
    stream = torch.tensor([vocab[w] for w in words])
    bptt, batch = 35, 20
    columns = stream[: (len(stream) // batch) * batch].view(batch, -1).t().contiguous()
    torch.manual_seed(0)
    reference = WordModel(getattr(nn, cell)(200, 200, 2, dropout=0.2), len(vocab))
    ours = WordModel(getattr(rnnkit, cell)(200, 200, 2, dropout=0.2), len(vocab))
    ours.load_state_dict(reference.state_dict())
    criterion = nn.CrossEntropyLoss()

    def zeros():
        h = torch.zeros(2, batch, 200)
        return (h, h.clone()) if cell == "LSTM" else h

    def train(model: WordModel) -> Callable[[], None]:
        optimizer = torch.optim.SGD(model.parameters(), lr=20)

        def run() -> None:
            model.train()
            hidden = zeros()
            for index in range(batches):
                start = index * bptt
                data, target = columns[start:start + bptt], columns[start + 1:start + 1 + bptt]
                hidden = _detach(hidden)
                optimizer.zero_grad()
                output, hidden = model(data, hidden)
                criterion(output.view(-1, len(vocab)), target.reshape(-1)).backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
                optimizer.step()

        return run

    def evaluate(model: WordModel) -> Callable[[], None]:
        def run() -> None:
            model.eval()
            hidden = zeros()
            with torch.no_grad():
                for index in range(batches * 2):
                    start = index * bptt
                    output, hidden = model(columns[start:start + bptt], hidden)

        return run

    return {
        f"wlm {cell} train": (train(reference), train(ours)),
        f"wlm {cell} eval": (evaluate(reference), evaluate(ours)),
    }


def tagger_pairs() -> dict[str, tuple[Callable, Callable]]:
    lengths = torch.tensor(_sentence_lengths(DATA / "valid.txt")[:64])
    vocab, tags, batch = 10_000, 20, len(lengths)
    torch.manual_seed(0)
    tokens = torch.randint(vocab, (int(lengths.max()), batch))
    embed, head = nn.Embedding(vocab, 128), nn.Linear(512, tags)
    reference = nn.GRU(128, 256, bidirectional=True)
    ours = rnnkit.GRU(128, 256, bidirectional=True)
    ours.load_state_dict(reference.state_dict())
    targets = torch.randint(tags, tokens.shape)
    valid = (torch.arange(tokens.shape[0])[:, None] < lengths[None, :])

    def packed(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            packed_in = pack_padded_sequence(embed(tokens), lengths, enforce_sorted=False)
            output, _ = layer(packed_in)
            padded, _ = torch.nn.utils.rnn.pad_packed_sequence(output, total_length=len(tokens))
            loss = nn.functional.cross_entropy(head(padded)[valid], targets[valid])
            loss.backward()

        return run

    def with_lengths() -> None:
        ours.zero_grad(set_to_none=True)
        output, _ = ours(embed(tokens), lengths=lengths)
        nn.functional.cross_entropy(head(output)[valid], targets[valid]).backward()

    return {
        "tagger lengths": (packed(reference), with_lengths),
        "tagger packed": (packed(reference), packed(ours)),
    }


def rollout_pairs() -> dict[str, tuple[Callable, Callable]]:
    steps, batch = 128, 64
    torch.manual_seed(0)
    x = torch.randn(steps, batch, 512)
    done = torch.rand(steps, batch) < 0.01  # an episode ends at 1% of steps
    segments = []
    for b in range(batch):
        ends = [0, *(done[:, b].nonzero().flatten() + 1).tolist(), steps]
        segments += [x[s:e, b] for s, e in zip(ends, ends[1:]) if e > s]
    segments.sort(key=len, reverse=True)
    reference, ours = nn.LSTM(512, 128), rnnkit.LSTM(512, 128)
    ours.load_state_dict(reference.state_dict())

    def train(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer.zero_grad(set_to_none=True)
            output, _ = layer(pack_sequence(segments))
            output.data.sum().backward()

        return run

    return {"rollouts packed": (train(reference), train(ours))}


def stream_pairs(steps: int = 200) -> dict[str, tuple[Callable, Callable]]:
    pairs = {}
    torch.manual_seed(0)
    inputs = torch.randn(steps, 1, 64)
    # Each step's input made before the clock starts: (1, 64) for a cell, (1, 1, 64) for a
    # layer's one step.
    cell_inputs, layer_inputs = list(inputs), list(inputs[:, None])
    for cell in ("GRU", "LSTM"):
        reference = getattr(nn, f"{cell}Cell")(64, 256)
        layer = getattr(rnnkit, cell)(64, 256)
        with torch.no_grad():
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(layer, f"{name}_l0").copy_(getattr(reference, name))
        stateful = rnnkit.Stateful(layer)

        def torch_steps(cell_module=reference) -> None:
            with torch.no_grad():
                state = None
                for x in cell_inputs:
                    state = cell_module(x, state)

        def rnnkit_steps(module=stateful) -> None:
            with torch.no_grad():
                module.reset()
                for x in layer_inputs:
                    module(x)

        pairs[f"stream {cell}"] = (torch_steps, rnnkit_steps)
    return pairs


CASES = {
    "wlm": lambda: {**wlm_pairs("LSTM"), **wlm_pairs("GRU")},
    "tagger": tagger_pairs,
    "rollouts": rollout_pairs,
    "stream": stream_pairs,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--contended", action="store_true",
                        help="run one busy Python process beside the measurement")
    args = parser.parse_args(argv)
    if not DATA.is_dir():
        parser.error(f"the WikiText-2 text is not at {DATA}")
    print(capability_line())
    load = os.getloadavg()[0]
    print(f"load average {load:.2f} at start; median of {args.repeats} interleaved repeats"
          + ("; one busy process competing" if args.contended else ""))
    print(f"{'case':18} {'torch.nn':>10} {'rnnkit':>10} {'ratio':>7} {'target':>7}")
    with contended(args.contended):
        for case in args.cases:
            for name, runs in _measure(CASES[case](), args.repeats).items():
                reference = statistics.median(r for r, _ in runs)
                ours = statistics.median(o for _, o in runs)
                ratio = statistics.median(r / o for r, o in runs)
                print(f"{name:18} {reference * 1e3:8.1f}ms {ours * 1e3:8.1f}ms {ratio:6.2f}x "
                      f"{TARGETS[name]:6.1f}x", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
