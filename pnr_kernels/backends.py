"""Backend registry: which implementation of a loss runs for a given device and dtype.

A fused backend is a module with one hookup (the same for every loss it runs):

    unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]
        None when the backend can run there, else why not and how to get it;
    kernels() -> dict
        op family ("infonce", "regularizers"; see ``pnr_kernels.ops``) -> that family's kernel set.

A loss (``pnr_kernels.registry.LOSSES``) runs on a backend as its entry's ``fused`` composition
over the backend's custom ops of the entry's family; on ``"reference"`` it is the entry's
``reference`` function. ``"auto"`` takes the first usable backend in ``AUTO_ORDER`` (fastest
first).
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch

from . import native, ops, reference, registry
from . import triton as triton_backend
from ._validation import BACKENDS, check_backend  # noqa: F401  (BACKENDS: re-exported)

AUTO_ORDER = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
_FUSED = {"triton": triton_backend, "native": native}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this loss here; the message says why and what to do."""


def family_of(what: str) -> str:
    """The op family a loss (a ``registry.LOSSES`` name) runs on, or ``what`` itself when it
    names an op family (``"infonce"``: the public :func:`pnr_kernels.multi_key_infonce`)."""
    spec = registry.LOSSES.get(what)
    return spec.family if spec is not None else what


def unavailable_reason(name: str, loss: Optional[str], device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when backend ``name`` can run ``loss`` (a loss or an op family; anything when None)
    on ``device`` with ``dtype``; else why not."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return "this torch build sees no CUDA device (torch.cuda.is_available() is False)"
    if name == "reference":
        return None
    module = _FUSED[name]
    reason = module.unavailable_reason(device, dtype)
    if reason is None and loss is not None and family_of(loss) not in module.kernels():
        reason = f"it does not implement {loss}; use backend='reference' or 'auto'"
    return reason


# choose's answers on the CPU for the reference and native backends, which cannot change within a
# process once given (the extension's load is cached; only the Triton interpreter's switch is read
# per call), so that a call does not pay for the checks again (a few microseconds of the per-call
# budget of the small losses)
_CHOSEN: Dict[Tuple[str, str, str, torch.dtype], str] = {}


@torch.compiler.assume_constant_result
def choose(backend: str, loss: str, device_type: str, dtype: torch.dtype) -> str:
    """The backend that runs ``loss`` for ``backend`` ("auto" or one of BACKENDS), with its
    custom ops registered; raises when none can. Under ``torch.compile`` it runs once at trace
    time and its answer is a constant of the graph (it may build the native extension). "auto"
    takes the first available of AUTO_ORDER at every batch size (on the CPU the native kernels
    beat the reference from B = 8 up: docs/benchmarks.md, "Small batches")."""
    check_backend(backend)
    key = (backend, loss, device_type, dtype)
    chosen = _CHOSEN.get(key)
    if chosen is not None:
        return chosen
    device = torch.device(device_type)
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            if unavailable_reason(name, loss, device, dtype) is None:
                backend = name
                break
        else:
            raise BackendUnavailableError(f"no backend can run {loss} on {device_type} with {dtype}")
    else:
        reason = unavailable_reason(backend, loss, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"backend {backend!r} cannot run {loss} on {device_type} with {dtype}: {reason}")
    if backend != "reference":
        ops.backend_ops(backend, family_of(loss), _FUSED[backend].kernels)
    if device_type == "cpu" and backend != "triton":
        _CHOSEN[key] = backend
    return backend


def loss_function(backend: str, loss: str) -> Callable:
    """The function computing ``loss`` on the concrete ``backend`` returned by :func:`choose`."""
    spec = registry.LOSSES[loss]
    if backend == "reference":
        return spec.reference
    return functools.partial(spec.fused, ops.backend_ops(backend, spec.family, _FUSED[backend].kernels))


def infonce_function(backend: str) -> Callable:
    """The multi-key InfoNCE LSE with diagonal offsets and the data-parallel gather on the
    concrete ``backend`` returned by :func:`choose` (``what="infonce"``), called as
    ``fn(rows, keys, exclude_diagonal, scales, diagonal_offsets, gather_distributed=...,
    process_group=...)``: the materialised ``reference.infonce_lse`` or the fused op's composition."""
    if backend == "reference":
        return reference.infonce_lse
    return functools.partial(ops.infonce.multi_key_lse, ops.backend_ops(backend, "infonce", _FUSED[backend].kernels))


def resolve(backend: str, loss: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The function computing ``loss`` with ``backend`` ("auto" or one of BACKENDS)."""
    return loss_function(choose(backend, loss, device.type, dtype), loss)


def available_backends(device: Union[str, torch.device]) -> List[str]:
    """Backend names usable on ``device`` (for float32 inputs), fastest first."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    return [name for name in order if unavailable_reason(name, None, device, torch.float32) is None]
