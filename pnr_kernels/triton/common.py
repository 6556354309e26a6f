"""What both Triton kernel modules (infonce.py, regularizers.py) share: the launch helper with its
device guard, the fp32 matmul precision and shared-memory limit of the device, a power-of-two
helper for exact rescaling, and the description of a kernel specialisation for the compile test
(tests/test_compile_triton.py)."""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Device side
# ---------------------------------------------------------------------------------------------

# Exponent range of the power-of-two scales below: 2**-100 .. 2**100, so that a scale and its
# reciprocal are normal float32 numbers (exact, never flushed to zero) whatever the data.
# (constexpr: kernels may read them)
POW2_MIN = tl.constexpr(2.0 ** -100)
POW2_MAX = tl.constexpr(2.0 ** 100)


@triton.jit
def pow2_scale(x):
    """The power of two 2**floor(log2(x)) for positive float32 ``x``, clamped to [2**-100, 2**100]
    (so 0 and subnormals give 2**-100; +inf and NaN give 2**100). Multiplying by it or by its
    reciprocal is exact for normal results: rescaling by it keeps every rounding of a computation
    (docs/losses.md, "Precision") and only moves its range."""
    bits = x.to(tl.int32, bitcast=True) & 0x7F800000  # the exponent field: 2**e, or 0 / +inf
    return tl.minimum(tl.maximum(bits.to(tl.float32, bitcast=True), POW2_MIN), POW2_MAX)


# ---------------------------------------------------------------------------------------------
# Host side
# ---------------------------------------------------------------------------------------------

def strides(**tensors: torch.Tensor) -> Dict[str, int]:
    """The stride arguments of the kernels: ``{name}_s0`` (between rows) and ``{name}_s1`` (along
    a row) for each named 2-D tensor."""
    return {f"{name}_s{axis}": stride for name, t in tensors.items() for axis, stride in enumerate(t.stride())}


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device for a launch (Triton launches on the current one,
    which need not be the tensors'); nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launch(kernel, grid, **arguments):
    """``kernel[grid](**arguments)`` on the device of the tensors among ``arguments``. Every
    Triton launch of this package goes through here."""
    device = next(v.device for v in arguments.values() if isinstance(v, torch.Tensor))
    with device_guard(device):
        kernel[grid](**arguments)


def fp32_matmul_precision() -> str:
    """"ieee" or "tf32": how fp32 matrix products may run, as torch's own matmuls are told.

    Reads the new API (``torch.backends.cuda.matmul.fp32_precision``, falling back to
    ``torch.backends.fp32_precision`` when it is "none") where torch has it, and the legacy
    ``torch.get_float32_matmul_precision()`` otherwise: after the new API has set "tf32", the
    legacy getter raises (torch 2.13, 2.14)."""
    precision = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision in ("ieee", "tf32"):
        return precision
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


# Opt-in shared memory per block (bytes) by CUDA compute capability: A100 (sm_80) 163 KiB; consumer
# Ampere and Ada, L4, L40 (sm_86, sm_89) 99 KiB; H100/H200 (sm_90) 227 KiB. The compile test checks
# every kernel against these; gpu_shared_memory reads a device's own value.
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


@functools.lru_cache(maxsize=None)
def gpu_shared_memory(device: torch.device) -> Tuple[Optional[int], Optional[int]]:
    """(opt-in shared memory per block in bytes, compute capability as 80 for sm_80) of
    ``device``; (None, None) for CPU tensors (the interpreter has no limit)."""
    if device.type != "cuda":
        return None, None
    properties = torch.cuda.get_device_properties(device)
    limit = getattr(properties, "shared_memory_per_block_optin", None)
    if limit is None:  # older torch: ask Triton's driver
        from triton.runtime import driver

        limit = driver.active.utils.get_device_properties(device.index)["max_shared_mem"]
    return int(limit), 10 * properties.major + properties.minor


# ---------------------------------------------------------------------------------------------
# Compile cases (tests/test_compile_triton.py compiles them for real GPUs)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CompileCase:
    """One kernel specialisation for tests/test_compile_triton.py to compile for real GPUs: a
    ``@triton.jit`` function, its ``triton.compile`` signature, constexpr values and attributes
    (divisibility hints), the launch options of one autotune config, and the CUDA compute
    capabilities to compile for. Each kernel module builds its cases in ``compile_cases()``."""
    name: str
    kernel: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    attrs: Dict[tuple, list] = field(default_factory=dict)
    options: Dict[str, int] = field(default_factory=dict)
    archs: Tuple[int, ...] = (80, 90)


def jit_function(kernel):
    """The ``@triton.jit`` function under an autotuned kernel (or the kernel itself)."""
    while isinstance(kernel, triton.runtime.Autotuner):
        kernel = kernel.fn
    return kernel


def compile_case(name: str, kernel, config, constexprs: Mapping[str, object],
                 pointer_types: Mapping[str, str], scalar_types: Mapping[str, str] = None,
                 archs: Tuple[int, ...] = (80, 90), unit: Sequence[str] = (),
                 divisible_by_16: Sequence[str] = ()) -> CompileCase:
    """A CompileCase for ``kernel`` (a jit function or an autotuned one) under the autotune
    ``config``. ``constexprs`` gives every constexpr parameter the config does not set;
    ``pointer_types`` the element type ("bf16", "fp32", ...) of each pointer parameter (those
    named ``*_ptr``; extra entries are ignored); ``scalar_types`` the scalars that are not "i32";
    ``archs`` the CUDA compute capabilities.

    ``unit`` and ``divisible_by_16`` name the integer and pointer arguments to specialise as a
    launch does when they are 1 (a constexpr) or multiples of 16 (an alignment hint): a launch on
    contiguous, aligned tensors gets these specialisations, which change vectorisation and
    shared-memory use, so the compile test must see them too."""
    kernel = jit_function(kernel)
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
