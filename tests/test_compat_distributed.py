"""compat's Barlow reduction option under torch.distributed: two gloo processes on CPU, float64.

The authors' barlow_loss_func (cassle/losses/barlow.py) averages the cross-correlation over ranks
with an in-place ``dist.all_reduce`` that autograd does not differentiate; it is restated here
literally, as the expected value and gradient of ``differentiable_all_reduce=False``. The exact
default differentiates the average, so its gradient on every rank is W times theirs."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pnr_kernels import compat
from pnr_kernels.testing import TOLERANCES, assert_close_relative, free_port

WORLD, BATCH, DIM = 2, 6, 5
LAMB, SCALE = 0.05, 0.2
LOSS_TOL, GRAD_TOL = TOLERANCES[torch.float64]


def _inputs(rank):
    g = torch.Generator().manual_seed(77)
    everything = [torch.randn(WORLD, BATCH, DIM, generator=g, dtype=torch.float64) * 1.4 + 0.1 for _ in range(4)]
    return [x[rank].clone().requires_grad_(True) for x in everything]


def _authors_barlow(z1, z2):
    """Their barlow_loss_func: BatchNorm1d(affine=False) statistics, C = z1^T z2 / N, an
    in-place all_reduce (no autograd through it) divided by W, then the weighted squares."""
    def bn(x):
        return (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()

    corr = bn(z1).T @ bn(z2) / z1.shape[0]
    reduced = corr.detach().clone()
    dist.all_reduce(reduced)
    corr = corr + (reduced - corr.detach())  # the in-place all_reduce: new value, identity for autograd
    corr = corr / dist.get_world_size()
    eye = torch.eye(DIM, dtype=corr.dtype)
    weight = torch.where(eye.bool(), torch.ones_like(corr), torch.full_like(corr, LAMB))
    return SCALE * (weight * (corr - eye) ** 2).sum()


def _worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        z1, z2, p2, f2 = _inputs(rank)
        theirs = _authors_barlow(z1, z2)
        their_grads = torch.autograd.grad(theirs, [z1, z2])
        exact = compat.barlow_loss_func(z1, z2, LAMB, SCALE)
        scaled = compat.barlow_loss_func(z1, z2, LAMB, SCALE, differentiable_all_reduce=False)
        for what, got in (("exact", exact), ("authors' scale", scaled)):
            assert_close_relative(got, theirs, LOSS_TOL, f"rank {rank} {what}: value")
        for name, g_scaled, g_exact, g_theirs in zip(("z1", "z2"), torch.autograd.grad(scaled, [z1, z2]),
                                                      torch.autograd.grad(exact, [z1, z2]), their_grads):
            assert_close_relative(g_scaled, g_theirs, GRAD_TOL, f"rank {rank} grad {name}, authors' scale")
            assert_close_relative(g_exact / WORLD, g_theirs, GRAD_TOL, f"rank {rank} grad {name}: exact = W x theirs")

        # the distiller: only the Barlow term is rescaled, the negative cosine term is local
        f1 = z2.detach()
        weights = dict(distill_lamb=1.3, negative_lamb=0.6, distill_barlow_lamb=LAMB, distill_scale_loss=SCALE)
        p1 = z1
        total, terms = compat.barlow_pnr_distill_loss(p1, p2, f1, f2.detach(), differentiable_all_reduce=False,
                                                      return_terms=True, **weights)
        distill = (_authors_barlow(p1, f1) + _authors_barlow(p2, f2.detach())) / 2
        negative = (compat.simsiam_loss_func(p1, f2.detach()) + compat.simsiam_loss_func(p2, f1)) / 2
        want = weights["distill_lamb"] * distill - weights["negative_lamb"] * negative
        assert_close_relative(total, want, LOSS_TOL, f"rank {rank} barlow_pnr_distill_loss value")
        assert_close_relative(terms["train_decorrelative_distill_loss"], distill, LOSS_TOL, f"rank {rank} distill")
        for name, g, w in zip(("p1", "p2"), torch.autograd.grad(total, [p1, p2]), torch.autograd.grad(want, [p1, p2])):
            assert_close_relative(g, w, GRAD_TOL, f"rank {rank} barlow_pnr_distill_loss grad {name}")
        plain = compat.barlow_pnr_distill_loss(p1, p2, f1, f2.detach(), **weights)
        assert_close_relative(plain, want, LOSS_TOL, f"rank {rank} barlow_pnr_distill_loss exact value")
    finally:
        dist.destroy_process_group()


def test_barlow_all_reduce_gradient_option():
    mp.spawn(_worker, args=(free_port(),), nprocs=WORLD, join=True)
