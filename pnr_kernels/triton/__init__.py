"""The Triton backend: fused kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1,
which is how the tests run them without a GPU)."""
from __future__ import annotations

import functools

import torch

from ._interpret import interpreting


@functools.lru_cache(maxsize=None)
def _import_error():
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a Linux dependency of the package
        return f"triton is not importable ({exc}); install it with `pip install triton` (Linux)"
    return None


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    error = _import_error()
    if error is not None:
        return error
    if device.type == "cuda":
        if interpreting():
            return "TRITON_INTERPRET=1 runs the kernels on CPU tensors only; unset it for CUDA tensors"
        if not torch.cuda.is_available():
            return ("torch cannot use CUDA here (torch.cuda.is_available() is False: a CPU-only torch build, "
                    "or no GPU or driver)")
    elif not (device.type == "cpu" and interpreting()):
        return f"it runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got a {device.type} tensor"
    if dtype == torch.float64:
        return "float64 is not supported by the Triton kernels; use backend='reference' or 'native' for float64"
    return None


@functools.lru_cache(maxsize=None)
def kernels():
    """This backend's one hookup: its kernel set per op family (see ``pnr_kernels.ops``). Imports
    the kernel modules on first use."""
    from .infonce import KERNELS as INFONCE
    from .regularizers import KERNELS as REGULARIZERS

    return {"infonce": INFONCE, "regularizers": REGULARIZERS}
