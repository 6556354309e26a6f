"""Backend registry: which implementation of a loss runs for a given device and dtype.

Every backend is a module exposing

    unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]
        None when the backend can run there, else why not and how to get it;
    losses() -> dict
        loss key (as ``pnr_kernels.reference.LOSSES``) -> function taking the validated,
        frozen-detached inputs with the public keyword arguments.

"auto" takes the first usable backend implementing the loss, in the order of ``AUTO_ORDER``
(fastest first).
"""
from __future__ import annotations

import importlib
from typing import Callable, List, Optional, Union

import torch

BACKENDS = ("reference", "triton", "native")
AUTO_ORDER = {"cuda": ("triton", "native", "reference"), "cpu": ("native", "reference")}
_MODULES = {
    "reference": "pnr_kernels._reference_backend",
    "triton": "pnr_kernels.triton",
    "native": "pnr_kernels.native",
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this loss here; the message says why and what to do."""


def _module(name: str):
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str, loss: Optional[str], device: torch.device, dtype: torch.dtype) -> Optional[str]:
    module = _module(name)
    reason = module.unavailable_reason(device, dtype)
    if reason is None and loss is not None and loss not in module.losses():
        reason = f"it does not implement {loss}; use backend='reference' or 'auto'"
    return reason


def resolve(backend: str, loss: str, device: torch.device, dtype: torch.dtype) -> Callable:
    """The function computing ``loss`` with ``backend`` ("auto" or one of BACKENDS)."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(name, loss, device, dtype) is None:
                return _module(name).losses()[loss]
        raise BackendUnavailableError(f"no backend can run {loss} on {device.type} with {dtype}")
    reason = unavailable_reason(backend, loss, device, dtype)
    if reason is not None:
        raise BackendUnavailableError(
            f"backend {backend!r} cannot run {loss} on {device.type} with {dtype}: {reason}"
        )
    return _module(backend).losses()[loss]


def available_backends(device: Union[str, torch.device]) -> List[str]:
    """Backend names usable on ``device`` (for float32 inputs), fastest first."""
    device = torch.device(device)
    order = AUTO_ORDER.get(device.type, ("reference",))
    return [name for name in order if unavailable_reason(name, None, device, torch.float32) is None]
