"""The Triton backend: fused kernels for CUDA tensors (and CPU tensors under TRITON_INTERPRET=1,
which is how the tests run them without a GPU)."""
from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field
from typing import Dict, Mapping, Sequence, Tuple

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
def kernels():
    """This backend's one hookup: its kernel set per op family (see ``pnr_kernels.ops``). Imports
    the kernel modules on first use."""
    from .infonce import KERNELS as INFONCE
    from .regularizers import KERNELS as REGULARIZERS

    return {"infonce": INFONCE, "regularizers": REGULARIZERS}


@dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation for tests/test_triton_compile.py to compile for real GPUs: a
    ``@triton.jit`` function, its ``triton.compile`` signature, constexpr values and attributes
    (divisibility hints), the launch options of one autotune config, and the CUDA compute
    capabilities to compile for. Each kernel module lists its cases in COMPILE_CASES."""
    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[tuple, list] = field(default_factory=dict)
    options: Dict[str, int] = field(default_factory=dict)
    archs: Tuple[int, ...] = (80, 90)


def compile_case(name: str, kernel, config, constexprs: Mapping[str, object],
                 pointer_types: Mapping[str, str], scalar_types: Mapping[str, str] = None,
                 archs: Tuple[int, ...] = (80, 90), unit: Sequence[str] = (),
                 divisible_by_16: Sequence[str] = ()) -> CompileCase:
    """A CompileCase for ``kernel`` under the autotune ``config``. ``constexprs`` gives every
    constexpr parameter the config does not set; ``pointer_types`` the element type ("bf16",
    "fp32", ...) of each pointer parameter (those named ``*_ptr``; extra entries are ignored);
    ``scalar_types`` the scalars that are not "i32"; ``archs`` the CUDA compute capabilities.

    ``unit`` and ``divisible_by_16`` name the integer and pointer arguments to specialise as a
    launch does when they are 1 (a constexpr) or multiples of 16 (an alignment hint): a launch on
    contiguous, aligned tensors gets these specialisations, which change vectorisation and
    shared-memory use, so the compile test must see them too."""
    values = {**constexprs, **config.kwargs}
    # kernel.fn is the Python function under both a JITFunction and the interpreter's wrapper
    params = list(inspect.signature(kernel.fn).parameters.items())
    constexpr_names = {name for name, p in params if "constexpr" in str(p.annotation)} | set(unit)
    values.update({arg: 1 for arg in unit})
    signature, attrs = {}, {}
    for index, (arg, _) in enumerate(params):
        if arg in constexpr_names:
            signature[arg] = "constexpr"
        elif arg.endswith("_ptr"):
            signature[arg] = "*" + pointer_types[arg]
        else:
            signature[arg] = (scalar_types or {}).get(arg, "i32")
        if arg in divisible_by_16 and arg not in constexpr_names:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return CompileCase(name, kernel, signature, {k: values[k] for k in constexpr_names}, attrs,
                       dict(num_warps=config.num_warps, num_stages=config.num_stages), tuple(archs))
