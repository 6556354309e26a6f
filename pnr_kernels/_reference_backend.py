"""The reference backend: pnr_kernels.reference, usable everywhere PyTorch runs."""
from __future__ import annotations

from . import reference


def unavailable_reason(device, dtype):
    return None


def losses():
    return reference.LOSSES
