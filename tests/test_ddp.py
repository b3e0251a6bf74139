"""DistributedDataParallel on CPU: gloo backend, 2 processes, each with half of the batch.

The parameters must end identical on both ranks and equal to training one process on the
whole batch (the loss is a mean over equal halves, and DDP averages gradients across ranks).
The model is float64 so that the only difference, the order of the gradient sum, stays below
1e-12.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import rnnkit

STEPS = 4
BATCH = 8


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = rnnkit.LSTM(3, 6, num_layers=2, bidirectional=True, learn_initial_state=True,
                                dtype=torch.float64)
        self.gru = rnnkit.GRU(12, 5, reset_after=False, dtype=torch.float64)
        self.head = nn.Linear(5, 2, dtype=torch.float64)

    def forward(self, x, lengths):
        features, _ = self.lstm(x, lengths=lengths)
        _, hidden = self.gru(features, lengths=lengths)
        return self.head(hidden[-1])


def _data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, BATCH, 3, dtype=torch.float64, generator=generator)
    lengths = torch.randint(1, 7, (BATCH,), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator)
    return x, lengths, labels


def _train(model, x, lengths, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(STEPS):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x, lengths), labels).backward()
        optimizer.step()


def _worker(rank: int, world_size: int, port: int, results: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        torch.manual_seed(0)
        model = DistributedDataParallel(Classifier())
        x, lengths, labels = _data()
        share = BATCH // world_size
        mine = slice(rank * share, (rank + 1) * share)
        _train(model, x[:, mine], lengths[mine], labels[mine])
        torch.save(model.module.state_dict(), f"{results}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_processes_match_single_process(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available in this build")
    # spawn, not fork: a fork after torch.compile or OpenMP work in this process can hang.
    context = mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + 120
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)

    torch.manual_seed(0)
    single = Classifier()
    initial = {name: value.clone() for name, value in single.state_dict().items()}
    _train(single, *_data())
    expected = single.state_dict()

    assert list(rank0) == list(expected)
    assert "lstm.initial_h" in rank0 and "lstm.initial_c" in rank0
    for name in expected:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs across ranks"
        torch.testing.assert_close(rank0[name], expected[name], atol=1e-12, rtol=0,
                                   msg=lambda m, name=name: f"{name}: {m}")
        # Training moved every parameter, so equality above is not a trivial one.
        assert not torch.equal(expected[name], initial[name]), f"{name} did not train"
