"""BarlowTwins-PNR under torch.distributed: two gloo processes on CPU. The spec averages the
cross-correlation C over ranks before the Barlow loss; the expected value is derived here by hand
in one process from every rank's inputs (mean over ranks of the per-rank C, then the loss), and so
is the expected gradient: the all-reduce's backward sums the ranks' identical dL/dC-bar, so rank r
receives ``world * d(hand loss)/d(its inputs)`` for the Barlow part, the local cosine part as is."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pnr_kernels import backends, losses, reference

from pnr_kernels.testing import TOLERANCES, assert_close_relative, free_port

WORLD, BATCH, DIM = 2, 6, 11
WEIGHTS = dict(distill_weight=1.3, negative_weight=0.7, off_diagonal_weight=0.05, scale=0.2)
# backend -> dtype it runs in (Triton has no float64); a backend unusable here is left out.
CASES = {"reference": torch.float64, "native": torch.float64, "triton": torch.float32}


def _all_inputs():
    """Every rank's (p1, p2, f1, f2), float64, (WORLD, BATCH, DIM) each, the same in every process."""
    g = torch.Generator().manual_seed(1234)
    p1, p2, f1, f2 = (torch.randn(WORLD, BATCH, DIM, generator=g, dtype=torch.float64) * 1.5 + 0.3 for _ in range(4))
    return p1, p2, 0.8 * p1 + 0.6 * f1, 0.8 * p2 + 0.6 * f2


def _barlow_from_correlation(c):
    diagonal = torch.diagonal(c)
    off = (c ** 2).sum() - (diagonal ** 2).sum()
    return WEIGHTS["scale"] * (((diagonal - 1) ** 2).sum() + WEIGHTS["off_diagonal_weight"] * off)


def _standardise(x):
    return (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + reference.BARLOW_VARIANCE_EPS)


def _expected(rank):
    """(loss on ``rank``, its gradients of p1 and p2), by hand, in one process."""
    p1, p2, f1, f2 = _all_inputs()
    p1.requires_grad_(True)
    p2.requires_grad_(True)
    mean_c = [sum(_standardise(p[r]).T @ _standardise(f[r]) / BATCH for r in range(WORLD)) / WORLD
              for p, f in ((p1, f1), (p2, f2))]
    positive = WEIGHTS["distill_weight"] * sum(_barlow_from_correlation(c) for c in mean_c) / 2
    negative = WEIGHTS["negative_weight"] * (reference.mean_cosine(p1[rank], f2[rank])
                                             + reference.mean_cosine(p2[rank], f1[rank])) / 2
    loss = positive + negative  # neg(p, f) = -mean cos, subtracted
    grads = torch.autograd.grad(WORLD * positive + negative, [p1, p2])
    return loss.detach(), [g[rank] for g in grads]


def _worker(rank, port, names):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        want_loss, want_grads = _expected(rank)
        for name in names:
            dtype = CASES[name]
            p1, p2, f1, f2 = (x[rank].to(dtype) for x in _all_inputs())
            p1.requires_grad_(True)
            p2.requires_grad_(True)
            got = losses.barlow_pnr_regularizer(p1, p2, f1, f2, backend=name, **WEIGHTS)
            loss_tol, grad_tol = TOLERANCES[dtype]
            assert_close_relative(got, want_loss, loss_tol, f"{name} rank {rank} loss")
            for label, g, w in zip(("p1", "p2"), torch.autograd.grad(got, [p1, p2]), want_grads):
                assert_close_relative(g, w, grad_tol, f"{name} rank {rank} grad {label}")
    finally:
        dist.destroy_process_group()



def test_correlation_is_averaged_over_ranks():
    names = [n for n in CASES if backends.unavailable_reason(n, "barlow_pnr", torch.device("cpu"), CASES[n]) is None]
    assert "reference" in names
    # Triton joins on CPU under TRITON_INTERPRET=1 (set by conftest; the children inherit it).
    mp.spawn(_worker, args=(free_port(), names), nprocs=WORLD, join=True)


def test_hand_derivation_is_not_the_concatenated_batch():
    """The per-rank average of C differs from C of the concatenated batch (so the test above
    checks the all-reduce semantics, not a single-process loss that happens to agree)."""
    p1, _, f1, _ = _all_inputs()
    averaged = sum(_standardise(p1[r]).T @ _standardise(f1[r]) / BATCH for r in range(WORLD)) / WORLD
    concatenated = _standardise(p1.reshape(-1, DIM)).T @ _standardise(f1.reshape(-1, DIM)) / (WORLD * BATCH)
    assert (_barlow_from_correlation(averaged) - _barlow_from_correlation(concatenated)).abs() > 1e-3
