"""The autocast policy: every loss is computed at its inputs' own precision, whatever the autocast
state (as ``torch.nn.functional.cross_entropy`` is kept in float32 by autocast), in the forward
and in the fused backends' backward. Autocast would otherwise lower the reference's matrix
products to bfloat16/float16 and hand the native kernels tensors of a dtype they were not given.
"""
from __future__ import annotations

import contextlib

import torch

# device types with an autocast mode torch knows how to switch off
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


_any_autocast_enabled = getattr(torch._C, "_is_any_autocast_enabled", None)


def autocast_disabled(device_type: str):
    """A context in which autocast is off for ``device_type`` (a no-op for other devices). In eager
    mode with no autocast active it is a no-op too: entering torch.autocast costs ~10 us, which
    the fused ops' per-call budget notices at small batches."""
    if device_type not in _AUTOCAST_DEVICES:
        return contextlib.nullcontext()
    if _any_autocast_enabled is not None and not torch.compiler.is_compiling() and not _any_autocast_enabled():
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)
