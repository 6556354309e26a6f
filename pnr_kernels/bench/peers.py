"""Third-party peers ``pnr-bench`` measures beside the library's backends, as extra ``backend``
values: ``torch_compile`` (the loss's reference under ``torch.compile``, default inductor),
``pml`` (pytorch-metric-learning's ``NTXentLoss``, for nt_xent) and ``infcl`` (Inf-CL's
``cal_inf_loss`` in its CLIP form, for nt_xent, on CUDA). Which can run where
(:func:`unavailable_reason`) and the forward closure of each (:func:`forward_fn`); the runner
times them like a backend."""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from ..registry import LOSSES

# The losses each peer computes (None: every registered loss).
PEERS: Dict[str, Optional[Tuple[str, ...]]] = {"torch_compile": None, "pml": ("nt_xent",), "infcl": ("nt_xent",)}
PEER_MAX_BATCH = 256  # pml outside --sweep: its O(N^3) memory allows only small batches


def unavailable_reason(name: str, loss: str, device: str) -> Optional[str]:
    """None when peer ``name`` can run ``loss`` on ``device``, else why not."""
    losses = PEERS[name]
    if losses is not None and loss not in losses:
        return f"it does not compute {loss}"
    if name == "torch_compile":
        if not torch._dynamo.is_dynamo_supported():
            return "torch.compile is not supported on this Python/platform"
        return None
    if name == "pml":
        try:
            import pytorch_metric_learning  # noqa: F401
        except ImportError:
            return "pytorch-metric-learning is not installed (pip install pytorch-metric-learning)"
        return None
    if name == "infcl":
        if device != "cuda":
            return "Inf-CL's cal_inf_loss runs on CUDA only"
        try:
            import inf_cl  # noqa: F401
        except ImportError:
            return "inf-cl is not installed (optional: pip install inf-cl)"
        return None
    raise ValueError(f"unknown peer {name!r}")


def available(name: str, loss: str = "nt_xent", device: str = "cpu") -> bool:
    return unavailable_reason(name, loss, device) is None


def forward_fn(name: str, loss: str, args: Sequence[torch.Tensor], kwargs: dict,
               device: str) -> Callable[[], torch.Tensor]:
    """A closure computing ``loss`` with peer ``name`` on the inputs ``make_inputs`` gave (a scalar
    that requires a gradient)."""
    if name == "pml":
        from pytorch_metric_learning.losses import NTXentLoss

        criterion = NTXentLoss(temperature=kwargs["temperature"])
        labels = torch.arange(args[0].shape[0], device=device).repeat(2)
        return lambda: criterion(torch.cat(args), labels)
    if name == "infcl":
        # Inf-CL computes the CLIP form (each view against the other view only), the nearest
        # of its losses to NT-Xent: half of NT-Xent's logits.
        from inf_cl import cal_inf_loss

        scale = torch.tensor(1.0 / kwargs["temperature"], device=device)
        dim = args[0].shape[1]

        def forward():
            z1, z2 = (torch.nn.functional.normalize(z, dim=1) for z in args)
            return 0.5 * (cal_inf_loss(z1, z2, scale=scale, head_dim=dim)
                          + cal_inf_loss(z2, z1, scale=scale, head_dim=dim))
        return forward
    if name == "torch_compile":
        compiled = torch.compile(LOSSES[loss].reference)
        return lambda: compiled(*args, **kwargs)
    raise ValueError(f"unknown peer {name!r}")
