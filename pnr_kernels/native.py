"""The native backend (csrc/): not built in this version yet."""
from __future__ import annotations


def unavailable_reason(device, dtype):
    return "the native extension is not part of this version of pnr_kernels"


def losses():
    return {}
