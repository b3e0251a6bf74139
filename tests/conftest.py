import os
import shutil

# Without a GPU, run the Triton kernels on the CPU interpreter; it must be set before triton is
# imported anywhere, so it is set here, before the tests import torch or rnnkit.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
