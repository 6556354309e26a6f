"""The autograd glue between the losses and the kernels, shared by every fused backend.

Nothing in this package is a kernel (unlike Liger-Kernel, where ``ops/`` holds the kernels): the
kernels live in ``pnr_kernels/triton/`` (Triton) and ``csrc/`` (native C++/CUDA). Each module here
is one op family:

* ``infonce``: the fused multi-key InfoNCE log-sum-exp (``InfoNCEKernels`` -> one custom op), and
  the contrastive losses composed from it;
* ``regularizers``: the non-contrastive PNR regularisers (``RegularizerKernels`` -> three custom
  ops), and the regularisers composed from them.

A fused backend supplies, through its one hookup ``kernels()``, a kernel set per family;
:func:`backend_ops` turns it into ``torch.library`` custom ops with registered autograd and fake
kernels (so the losses trace under ``torch.compile``), once per process and backend, and the
compositions in ``pnr_kernels.registry`` call them. Each op is defined by
``_common.define_fused_op``: in eager mode it runs as an autograd.Function over the same
functions, skipping the custom op's Python dispatch.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict, Tuple

from . import infonce, regularizers

# family -> function(backend name, kernel set) registering that family's custom ops
FAMILIES: Dict[str, Callable] = {
    "infonce": infonce.define_infonce_op,
    "regularizers": regularizers.define_regularizer_ops,
}

_defined: Dict[Tuple[str, str], object] = {}
_lock = threading.Lock()


def backend_ops(backend: str, family: str, kernels: Callable[[], Dict[str, object]]):
    """The custom ops of ``family`` over ``backend``'s kernels (``kernels()`` is the backend's
    hookup), registered on first use. Thread-safe: registering a torch.library op twice, or from
    two threads at once, fails, so concurrent first calls wait for one registration."""
    key = (backend, family)
    ops = _defined.get(key)
    if ops is None:
        with _lock:
            ops = _defined.get(key)
            if ops is None:
                ops = _defined[key] = FAMILIES[family](backend, kernels()[family])
    return ops
