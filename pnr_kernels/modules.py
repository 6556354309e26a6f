"""``nn.Module`` twins of the functional losses, holding their keyword arguments.

    criterion = SimCLRPNRLoss(temperature=0.2)
    loss = criterion(z1, z2, p1, p2, f1, f2)

Under data parallelism, ``SimCLRPNRLoss(gather_distributed=True)`` (also NTXentLoss,
CaSSLeSimCLRRegularizer) makes every rank's rows meet the whole global batch's keys.
"""
from __future__ import annotations

from torch import nn

from . import losses, registry
from ._validation import check_backend, check_weight


class _LossModule(nn.Module):
    """Calls ``function(*inputs, **options)``; subclasses name the function and the options.

    The options are validated at construction (a bad temperature, weight or backend fails here,
    not at the first call); inputs may be passed by position or by name."""

    function = None

    def __init__(self, **options):
        super().__init__()
        spec = next((s for s in registry.LOSSES.values() if s.module == type(self).__name__), None)
        checks = spec.options if spec is not None else {}
        self.options = {
            name: check_backend(value) if name == "backend" else checks.get(name, check_weight)(name, value)
            for name, value in options.items()
        }

    def forward(self, *inputs, **named_inputs):
        return type(self).function(*inputs, **named_inputs, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items() if k != "process_group" or v is not None)


class SimCLRPNRLoss(_LossModule):
    """:func:`pnr_kernels.simclr_pnr_loss`; forward(z1, z2, p1, p2, f1, f2)."""
    function = staticmethod(losses.simclr_pnr_loss)

    def __init__(self, temperature=0.2, backend="auto", gather_distributed=False, process_group=None):
        super().__init__(temperature=temperature, backend=backend, gather_distributed=gather_distributed,
                         process_group=process_group)


class NTXentLoss(_LossModule):
    """:func:`pnr_kernels.nt_xent_loss`; forward(z1, z2)."""
    function = staticmethod(losses.nt_xent_loss)

    def __init__(self, temperature=0.2, backend="auto", gather_distributed=False, process_group=None):
        super().__init__(temperature=temperature, backend=backend, gather_distributed=gather_distributed,
                         process_group=process_group)


class MoCoPNRLoss(_LossModule):
    """:func:`pnr_kernels.moco_pnr_loss`; forward(q1, q2, k1, k2, p1, p2, f1, f2, key_queue, prev_queue)."""
    function = staticmethod(losses.moco_pnr_loss)

    def __init__(self, temperature=0.2, distill_temperature=0.2, backend="auto"):
        super().__init__(temperature=temperature, distill_temperature=distill_temperature, backend=backend)


class MoCoLoss(_LossModule):
    """:func:`pnr_kernels.moco_loss`; forward(q1, q2, k1, k2, key_queue)."""
    function = staticmethod(losses.moco_loss)

    def __init__(self, temperature=0.2, backend="auto"):
        super().__init__(temperature=temperature, backend=backend)


class CaSSLeSimCLRRegularizer(_LossModule):
    """:func:`pnr_kernels.cassle_simclr_regularizer`; forward(p1, p2, f1, f2)."""
    function = staticmethod(losses.cassle_simclr_regularizer)

    def __init__(self, temperature=0.2, backend="auto", gather_distributed=False, process_group=None):
        super().__init__(temperature=temperature, backend=backend, gather_distributed=gather_distributed,
                         process_group=process_group)


class BYOLPNRRegularizer(_LossModule):
    """:func:`pnr_kernels.byol_pnr_regularizer`; forward(p1, p2, f1, f2)."""
    function = staticmethod(losses.byol_pnr_regularizer)

    def __init__(self, distill_weight=1.0, negative_weight=0.5, backend="auto"):
        super().__init__(distill_weight=distill_weight, negative_weight=negative_weight, backend=backend)


class VICRegPNRRegularizer(_LossModule):
    """:func:`pnr_kernels.vicreg_pnr_regularizer`; forward(p1, p2, f1, f2)."""
    function = staticmethod(losses.vicreg_pnr_regularizer)

    def __init__(self, distill_weight=25.0, negative_weight=23.0, backend="auto"):
        super().__init__(distill_weight=distill_weight, negative_weight=negative_weight, backend=backend)


class BarlowPNRRegularizer(_LossModule):
    """:func:`pnr_kernels.barlow_pnr_regularizer`; forward(p1, p2, f1, f2)."""
    function = staticmethod(losses.barlow_pnr_regularizer)

    def __init__(self, distill_weight=1.0, negative_weight=1.0, off_diagonal_weight=5e-3, scale=0.1,
                 backend="auto"):
        super().__init__(distill_weight=distill_weight, negative_weight=negative_weight,
                         off_diagonal_weight=off_diagonal_weight, scale=scale, backend=backend)


class BYOLLoss(_LossModule):
    """:func:`pnr_kernels.byol_loss`; forward(p1, p2, t1, t2)."""
    function = staticmethod(losses.byol_loss)

    def __init__(self):
        super().__init__()


class VICRegLoss(_LossModule):
    """:func:`pnr_kernels.vicreg_loss`; forward(z1, z2)."""
    function = staticmethod(losses.vicreg_loss)

    def __init__(self, sim_weight=25.0, var_weight=25.0, cov_weight=1.0):
        super().__init__(sim_weight=sim_weight, var_weight=var_weight, cov_weight=cov_weight)


class BarlowTwinsLoss(_LossModule):
    """:func:`pnr_kernels.barlow_twins_loss`; forward(z1, z2)."""
    function = staticmethod(losses.barlow_twins_loss)

    def __init__(self, off_diagonal_weight=5e-3, scale=0.1):
        super().__init__(off_diagonal_weight=off_diagonal_weight, scale=scale)
