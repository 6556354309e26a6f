"""Test setup. TRITON_INTERPRET must be set before triton's decorators run, i.e. before
pnr_kernels (and its triton kernels) are imported anywhere in the session."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
