"""torch.export + AOTInductor: a package that runs with rnnkit's compiled library and no rnnkit
Python code (docs/deploy.md)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import rnnkit
from rnnkit.ops import cpu

pytestmark = pytest.mark.skipif(
    cpu.library_path() is None, reason="the compiled CPU kernels are unavailable on this machine"
)


class EveryLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gru = rnnkit.GRU(6, 8, num_layers=2, bidirectional=True)
        self.lstm = rnnkit.LSTM(16, 8, proj_size=4)
        self.rnn = rnnkit.RNN(4, 5, nonlinearity="relu")
        self.softsign = rnnkit.RNN(5, 3, nonlinearity="softsign")
        self.old_gru = rnnkit.GRU(3, 4, reset_after=False)

    def forward(self, x, h0):
        y, _ = self.gru(x)
        y, _ = self.lstm(y)
        y, _ = self.rnn(y, h0)
        y, _ = self.softsign(y)
        return self.old_gru(y)


# The package runs in a fresh interpreter in which importing rnnkit raises.
RUNNER = textwrap.dedent("""
    import sys

    class NoRnnkit:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "rnnkit":
                raise ImportError("rnnkit's Python code must not be needed")

    sys.meta_path.insert(0, NoRnnkit())
    import torch

    library, package, data, out = sys.argv[1:]
    torch.ops.load_library(library)
    runner = torch._inductor.aoti_load_package(package)
    inputs = torch.load(data)
    torch.save(runner(inputs["x"], inputs["h0"]), out)
    assert not [name for name in sys.modules if name.startswith("rnnkit")]
""")


def test_aoti_package_runs_with_the_library_alone(tmp_path):
    torch.manual_seed(0)
    model = EveryLayer().eval()
    x, h0 = torch.randn(7, 3, 6), torch.randn(1, 3, 5)
    time, batch = torch.export.Dim("time"), torch.export.Dim("batch")
    program = torch.export.export(
        model, (x, h0), dynamic_shapes=({0: time, 1: batch}, {1: batch})
    )
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert targets.count("rnnkit_export.recurrence.default") == 8  # GRU: 2 layers x 2
    assert not any("scan" in target for target in targets)
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "every_layer.pt2")
    )

    library = Path(cpu.library_path())
    if cpu.loaded_how() == "prebuilt":  # an installed package carries its libraries inside
        assert library.parent == Path(cpu.__file__).parent
    new = {"x": torch.randn(11, 5, 6), "h0": torch.randn(1, 5, 5)}
    torch.save(new, tmp_path / "inputs.pt")
    subprocess.run(
        [sys.executable, "-I", "-c", RUNNER, str(library), package, str(tmp_path / "inputs.pt"),
         str(tmp_path / "outputs.pt")],
        check=True, timeout=300,
    )
    output, h_n = torch.load(tmp_path / "outputs.pt")
    with torch.no_grad():
        expected, expected_h = model(new["x"], new["h0"])
    assert output.shape == (11, 5, 4)
    torch.testing.assert_close(output, expected)
    torch.testing.assert_close(h_n, expected_h)


def test_export_records_the_op_and_runs_it_eagerly():
    torch.manual_seed(0)
    model = EveryLayer().eval()
    x, h0 = torch.randn(4, 2, 6), torch.randn(1, 2, 5)
    program = torch.export.export(model, (x, h0))
    new_x, new_h0 = torch.randn(4, 2, 6), torch.randn(1, 2, 5)
    with torch.no_grad():
        expected = model(new_x, new_h0)
    torch.testing.assert_close(program.module()(new_x, new_h0), expected)
