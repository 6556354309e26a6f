"""The SSL methods and the continual strategies, every loss taken from pnr_kernels' public API.

Methods (the loss between the two current views): SimCLR (NT-Xent), MoCo v2+ (InfoNCE against a
momentum encoder's keys and a key queue), BYOL (predictor against a momentum target), VICReg,
Barlow Twins. Strategies, from the second task on, with ``f = frozen previous model's projection``
and ``p = g(z)`` the distillation predictor's output (docs/losses.md sections 1-5; for MoCo
``p = g(n(z))``, g takes the L2-normalised query as in the authors' code):

    finetune  the method's loss alone
    cassle    + CaSSLe: SimCLR and MoCo add ``cassle_weight * cassle_simclr_regularizer(p, f)``
              (temperature ``distill_temperature``); BYOL, VICReg, Barlow add their PNR
              regulariser with ``negative_weight = 0``, i.e. the ``pos`` term alone with w_d
    pnr       SimCLR: simclr_pnr_loss (one temperature, ``temperature``) replaces NT-Xent; MoCo:
              moco_pnr_loss with the previous-model queue replaces InfoNCE; BYOL, VICReg, Barlow
              add their PNR regulariser

g and MoCo's previous-model queue are built once and carried over from one task to the next (the
authors reload them with the rest of the checkpoint); only the frozen model is replaced per task.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from .. import losses as api
from .. import registry
from ..testing import check_against_reference
from .config import Config
from .models import Encoder, mlp

def _unit(x: torch.Tensor) -> torch.Tensor:
    """Unit rows along the last dimension (queue entries)."""
    return F.normalize(x, dim=-1)


class VerificationError(RuntimeError):
    """A backend's loss or gradient differs from the reference by more than docs/losses.md
    ("Precision") allows."""


class LossRunner:
    """Calls a public loss of ``pnr_kernels`` with the run's backend.

    With ``verify_backend`` set, every call is also evaluated on detached copies of its inputs
    with ``verify_backend`` and with ``"reference"``; the relative differences of the loss and of
    every input gradient are kept (the largest per loss name, until :meth:`take_records`), and a
    difference past the docs/losses.md ("Precision") tolerance of the inputs' dtype raises
    :class:`VerificationError` at once. ``where`` names the current step in that message.
    """

    def __init__(self, backend: str, verify_backend: Optional[str] = None):
        self.backend = backend
        self.verify_backend = verify_backend
        self.where = ""
        self._records: Dict[str, List[float]] = {}

    def __call__(self, name: str, *tensors: torch.Tensor, **kwargs) -> torch.Tensor:
        function = getattr(api, name)
        if self.verify_backend is not None:
            self._verify(name, function, tensors, kwargs)
        return function(*tensors, backend=self.backend, **kwargs)

    def _verify(self, name, function, tensors: Sequence[torch.Tensor], kwargs) -> None:
        """Both backends on detached copies, against the float64 reference, with the one
        toolbox and tolerance table of ``pnr_kernels.testing``."""
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
        # The backend is checked on this rank's own rows (the gather is the same for every backend).
        kwargs = {k: v for k, v in kwargs.items() if k not in ("gather_distributed", "process_group")}
        comparison = check_against_reference(registry.spec_of(name).name, self.verify_backend, leaves, kwargs,
                                             assert_close=False)
        loss_diff, grad_diff = comparison.loss, max(comparison.gradients.values(), default=0.0)
        record = self._records.setdefault(name, [0.0, 0.0])
        record[0], record[1] = max(record[0], loss_diff), max(record[1], grad_diff)
        if not comparison.passed:
            loss_tol, grad_tol = comparison.tolerances
            raise VerificationError(
                f"{name} with backend {self.verify_backend!r} differs from the reference at {self.where}: "
                f"loss relative difference {loss_diff:.3g} (tolerance {loss_tol:g}), largest input-gradient "
                f"relative difference {grad_diff:.3g} (tolerance {grad_tol:g}) for {tensors[0].dtype} inputs "
                f"(docs/losses.md, \"Precision\")")

    def take_records(self) -> Dict[str, Dict[str, float]]:
        """The largest differences per loss since the last call, and reset them."""
        out = {name: {"loss_rel_diff": v[0], "grad_rel_diff": v[1]} for name, v in sorted(self._records.items())}
        self._records = {}
        return out


class Learner(nn.Module):
    """Everything the optimiser or the method updates: the online encoder, BYOL's predictor, the
    momentum encoder (BYOL, MoCo), the distillation predictor g (CaSSLe, PNR) and MoCo's queues.

    The frozen previous model is not part of it: the trainer holds it.
    """

    def __init__(self, cfg: Config, in_channels: int):
        super().__init__()
        self.cfg = cfg
        dim = cfg.proj_dim
        self.online = Encoder(cfg.dataset, in_channels, cfg.proj_hidden, dim, recipe=cfg.recipe, method=cfg.method,
                              precision=cfg.precision)
        self.predictor = mlp(dim, cfg.pred_hidden, dim) if cfg.method == "byol" else None
        self.momentum = None
        if cfg.method in ("byol", "mocov2plus"):
            self.momentum = copy.deepcopy(self.online).requires_grad_(False)
        # Built for every strategy (fine-tuning never uses it) so that all strategies of one seed
        # start from the same weights and train task 0 identically: their results then differ by
        # the strategy alone.
        self.distill_predictor = mlp(dim, cfg.distill_hidden, dim)
        if cfg.method == "mocov2plus":
            # Both queues start as random unit rows (as the authors' do); the previous-model queue
            # is first used, and filled, from the second task on, and then carried over.
            self.register_buffer("key_queue", _unit(torch.randn(2, cfg.queue_size, dim)))
            self.register_buffer("prev_queue", _unit(torch.randn(2, cfg.queue_size, dim)))
            self.register_buffer("queue_pointers", torch.zeros(2, dtype=torch.long))

    def trainable_parameters(self) -> List[nn.Parameter]:
        modules = [self.online, self.predictor, None if self.cfg.strategy == "finetune" else self.distill_predictor]
        return [p for m in modules if m is not None for p in m.parameters()]

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, frozen: Optional[Encoder],
                runner: LossRunner) -> Tuple[torch.Tensor, dict]:
        """:meth:`loss`: what DistributedDataParallel calls under torchrun."""
        return self.loss(x1, x2, frozen, runner)

    def loss(self, x1: torch.Tensor, x2: torch.Tensor, frozen: Optional[Encoder],
             runner: LossRunner) -> Tuple[torch.Tensor, dict]:
        """The training loss of one batch of two views; returns it and what :meth:`after_step`
        needs (the keys to enqueue).

        Under torch.distributed (torchrun, 2+ ranks) SimCLR's NT-Xent, SimCLR-PNR and CaSSLe's
        SimCLR regulariser gather every rank's keys (``gather_distributed=True``: the loss of the
        global batch, docs/losses.md "Data-parallel"); MoCo's negatives are its queues, which
        :meth:`after_step` fills with every rank's keys; BYOL, VICReg and Barlow Twins and their
        regularisers are computed on the local batch."""
        cfg = self.cfg
        gather = dict(gather_distributed=True) if distributed.world_size() > 1 else {}
        _, z1 = self.online(x1)
        _, z2 = self.online(x2)
        distill = frozen is not None and cfg.strategy != "finetune"
        pnr = distill and cfg.strategy == "pnr"
        if distill:
            with torch.no_grad():
                f1, f2 = frozen(x1)[1], frozen(x2)[1]
            if cfg.method == "mocov2plus":  # g takes the L2-normalised query
                p1, p2 = self.distill_predictor(_unit(z1)), self.distill_predictor(_unit(z2))
            else:
                p1, p2 = self.distill_predictor(z1), self.distill_predictor(z2)
        # What a divergence message names (explain_nonfinite): the loss's terms and their inputs.
        terms, inputs = {}, {"the online encoder's projections z1, z2": (z1, z2)}
        if distill:
            inputs.update({"the frozen model's projections f1, f2": (f1, f2),
                           "the distillation predictor's outputs p1, p2": (p1, p2)})
        pending = {"terms": terms, "inputs": inputs}
        if cfg.method in ("simclr", "mocov2plus"):
            if cfg.method == "simclr" and pnr:
                loss = runner("simclr_pnr_loss", z1, z2, p1, p2, f1, f2, temperature=cfg.temperature, **gather)
                terms[f"simclr_pnr_loss (--temperature {cfg.temperature:g})"] = loss
            elif cfg.method == "simclr":
                loss = runner("nt_xent_loss", z1, z2, temperature=cfg.temperature, **gather)
                terms[f"nt_xent_loss (--temperature {cfg.temperature:g})"] = loss
            else:
                with torch.no_grad():
                    k1, k2 = self.momentum(x1)[1], self.momentum(x2)[1]
                pending["key_queue"] = (k1, k2)
                inputs["the momentum encoder's keys k1, k2"] = (k1, k2)
                if pnr:
                    loss = runner("moco_pnr_loss", z1, z2, k1, k2, p1, p2, f1, f2, self.key_queue,
                                  self.prev_queue, temperature=cfg.temperature,
                                  distill_temperature=cfg.distill_temperature)
                    pending["prev_queue"] = (f1, f2)
                    terms[f"moco_pnr_loss (--temperature {cfg.temperature:g}, --distill-temperature "
                          f"{cfg.distill_temperature:g})"] = loss
                else:
                    loss = runner("moco_loss", z1, z2, k1, k2, self.key_queue, temperature=cfg.temperature)
                    terms[f"moco_loss (--temperature {cfg.temperature:g})"] = loss
            if distill and not pnr:
                term = cfg.cassle_weight * runner(
                    "cassle_simclr_regularizer", p1, p2, f1, f2, temperature=cfg.distill_temperature, **gather)
                terms[f"cassle_simclr_regularizer x --cassle-weight {cfg.cassle_weight:g} "
                      f"(--distill-temperature {cfg.distill_temperature:g})"] = term
                loss = loss + term
            return loss, pending
        if cfg.method == "byol":
            with torch.no_grad():
                t1, t2 = self.momentum(x1)[1], self.momentum(x2)[1]
            inputs["the momentum encoder's targets"] = (t1, t2)
            loss = api.byol_loss(self.predictor(z1), self.predictor(z2), t1, t2)
            terms["byol_loss"] = loss
        elif cfg.method == "vicreg":
            loss = terms["vicreg_loss"] = api.vicreg_loss(z1, z2)
        else:
            loss = terms["barlow_twins_loss"] = api.barlow_twins_loss(z1, z2)
        if distill:
            negative = cfg.negative_weight if pnr else 0.0
            term = runner(f"{cfg.method}_pnr_regularizer", p1, p2, f1, f2,
                          distill_weight=cfg.distill_weight, negative_weight=negative)
            terms[f"{cfg.method}_pnr_regularizer (--distill-weight {cfg.distill_weight:g}, "
                  f"--negative-weight {negative:g})"] = term
            loss = loss + term
        return loss, pending

    @torch.no_grad()
    def explain_nonfinite(self, pending: dict) -> str:
        """What made this rank's loss non-finite and what to change, for the divergence message:
        the loss's inputs that are not finite (the weights diverged: the learning rate), else the
        terms that are not on finite inputs (the term's own options, named with it), else their
        sum (the weights)."""
        lower_lr = f"try a lower --lr (now {self.cfg.lr:g})"
        bad = [name for name, tensors in pending["inputs"].items()
               if not all(bool(torch.isfinite(t).all()) for t in tensors)]
        if bad:
            return f"{'; '.join(bad)} are not finite (the weights diverged); {lower_lr}"
        terms = pending["terms"]
        bad = [f"{name} is {float(value):g}" for name, value in terms.items() if not torch.isfinite(value)]
        if bad:
            return "; ".join(bad) + " on finite inputs; change the options named with it"
        if terms and not torch.isfinite(sum(terms.values())):
            return ("every term is finite, their sum is not (" + ", ".join(
                f"{name} = {float(value):g}" for name, value in terms.items()) + "); lower the weights")
        return f"its terms and their inputs are finite; {lower_lr}"

    @torch.no_grad()
    def after_step(self, pending: dict, tau: float) -> None:
        """Momentum update ``m <- tau m + (1 - tau) online`` and FIFO enqueue of the new keys (of
        every rank, all-gathered in rank order, as pnr_kernels.PNRQueue.enqueue does, so that all
        ranks keep the same queues)."""
        if self.momentum is not None:
            for m, p in zip(self.momentum.parameters(), self.online.parameters()):
                m.mul_(tau).add_(p.detach(), alpha=1 - tau)
        for slot, name in enumerate(("key_queue", "prev_queue")):
            if name in pending:
                self._enqueue(getattr(self, name), slot, pending[name])

    def _enqueue(self, queue: torch.Tensor, slot: int, views: Tuple[torch.Tensor, torch.Tensor]) -> None:
        size = queue.shape[1]
        if distributed.world_size() > 1:
            views = [distributed.gather_rows(v.detach(), differentiable=False) for v in views]
        rows = [_unit(v.detach().to(queue.dtype))[-size:] for v in views]
        index = (self.queue_pointers[slot] + torch.arange(rows[0].shape[0], device=queue.device)) % size
        for view, r in enumerate(rows):
            queue[view, index] = r
        self.queue_pointers[slot] = (self.queue_pointers[slot] + rows[0].shape[0]) % size
