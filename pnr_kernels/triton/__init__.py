"""The Triton backend: fused kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1,
which is how the tests run them without a GPU)."""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Tuple

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its numpy interpreter (must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
        return f"it runs on CUDA tensors (CPU only under TRITON_INTERPRET=1), got a {device.type} tensor"
    if dtype == torch.float64:
        return "float64 is not supported by the Triton kernels; use backend='reference' or 'native' for float64"
    return None


@functools.lru_cache(maxsize=None)
def losses():
    """The losses this backend implements (imports the kernels on first use)."""
    from ..ops.infonce import contrastive_losses, define_infonce_op
    from .infonce import KERNELS
    from .regularizers import LOSSES as REGULARIZER_LOSSES

    return {**contrastive_losses(define_infonce_op("triton", KERNELS)), **REGULARIZER_LOSSES}


@dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation for tests/test_triton_compile.py to compile for real GPUs: a
    ``@triton.jit`` function, its ``triton.compile`` signature and constexpr values, and the
    launch options of one autotune config, and the CUDA compute capabilities to compile for.
    Each kernel module lists its cases in COMPILE_CASES (tests/test_triton_compile.py)."""
    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    options: Dict[str, int] = field(default_factory=dict)
    archs: Tuple[int, ...] = (80, 90)


def compile_case(name: str, kernel, config, constexprs: Mapping[str, object],
                 pointer_types: Mapping[str, str], scalar_types: Mapping[str, str] = None,
                 archs: Tuple[int, ...] = (80, 90)) -> CompileCase:
    """A CompileCase for ``kernel`` under the autotune ``config``. ``constexprs`` gives every
    constexpr parameter the config does not set; ``pointer_types`` the element type ("bf16",
    "fp32", ...) of each pointer parameter (those named ``*_ptr``; extra entries are ignored);
    ``scalar_types`` the scalars that are not "i32"; ``archs`` the CUDA compute capabilities."""
    values = {**constexprs, **config.kwargs}
    # kernel.fn is the Python function under both a JITFunction and the interpreter's wrapper
    params = inspect.signature(kernel.fn).parameters
    constexpr_names = {name for name, p in params.items() if "constexpr" in str(p.annotation)}
    signature = {}
    for arg in params:
        if arg in constexpr_names:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + pointer_types[arg]
        else:
            signature[arg] = (scalar_types or {}).get(arg, "i32")
    return CompileCase(name, kernel, signature, {k: values[k] for k in constexpr_names},
                       dict(num_warps=config.num_warps, num_stages=config.num_stages), tuple(archs))
