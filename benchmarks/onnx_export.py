"""Latency of an exported rnnkit LSTM in onnxruntime (it lowers to ONNX's native LSTM op),
against rnnkit eager and torch.nn eager, one thread each, in one process.

Run: PYTHONPATH=src python benchmarks/onnx_export.py
"""

import time
import warnings

import onnxruntime
import torch

import rnnkit
from rnnkit.export import export_onnx

STEPS, BATCH, INPUT, HIDDEN = 100, 8, 64, 128


class Outputs(torch.nn.Module):
    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)[0]


def milliseconds(fn, repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    ours = rnnkit.LSTM(INPUT, HIDDEN).eval()
    theirs = torch.nn.LSTM(INPUT, HIDDEN).eval()
    theirs.load_state_dict(ours.state_dict())
    dims = {0: torch.export.Dim("steps"), 1: torch.export.Dim("batch")}
    program = export_onnx(Outputs(ours), (torch.randn(5, 2, INPUT),), dynamic_shapes=(dims,),
                          verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(program.model_proto.SerializeToString(), options)
    x = torch.randn(STEPS, BATCH, INPUT)
    feeds = {session.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        ort_ms = milliseconds(lambda: session.run(None, feeds))
        ours_ms = milliseconds(lambda: ours(x))
        theirs_ms = milliseconds(lambda: theirs(x))
    print(f"LSTM T={STEPS} N={BATCH} H_in={INPUT} H={HIDDEN}, 1 thread: "
          f"onnxruntime {ort_ms:.2f} ms, rnnkit eager {ours_ms:.2f} ms, "
          f"torch.nn {theirs_ms:.2f} ms; torch.nn / onnxruntime = {theirs_ms / ort_ms:.2f}")


if __name__ == "__main__":
    main()
