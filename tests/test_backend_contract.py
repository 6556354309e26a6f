"""The public contract, checked on every backend usable on this machine's CPU (the reference,
Triton under TRITON_INTERPRET=1, the native CPU kernels once built): values and gradients against
the float64 reference, frozen inputs, non-finite and degenerate inputs, tiny temperatures,
strided queues. Backend-specific kernel tests live in test_<backend>_*.py."""
import pytest
import torch

from pnr_kernels import backends
from pnr_kernels.losses import LOSS_FUNCTIONS

from .helpers import TRAINABLE, make_inputs

CPU = torch.device("cpu")
CASES = [(backend, loss) for backend in backends.BACKENDS for loss in sorted(LOSS_FUNCTIONS)
         if backends.unavailable_reason(backend, loss, CPU, torch.float32) is None]
CONTRASTIVE = ("simclr_pnr", "nt_xent", "moco_pnr", "moco", "cassle_simclr")


def _run(loss, args, kwargs, backend):
    out = LOSS_FUNCTIONS[loss](*args, **kwargs, backend=backend)
    grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], allow_unused=False) \
        if out.requires_grad else ()
    return out, grads


@pytest.mark.parametrize("backend,loss", CASES)
def test_float32_matches_float64_reference(backend, loss):
    args, kwargs = make_inputs(loss, 5, 19, torch.float32, requires_grad=True, queue_size=7)
    out, grads = _run(loss, args, kwargs, backend)
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) for a in args]
    ref_out, ref_grads = _run(loss, ref_args, kwargs, "reference")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend,loss", CASES)
def test_frozen_inputs_never_get_a_gradient(backend, loss):
    args, kwargs = make_inputs(loss, 3, 8, torch.float32)
    for a in args:
        a.requires_grad_(True)
    LOSS_FUNCTIONS[loss](*args, **kwargs, backend=backend).backward()
    for a, trainable in zip(args, TRAINABLE[loss] + [False, False]):
        assert (a.grad is not None) == trainable


@pytest.mark.parametrize("backend,loss", CASES)
def test_non_finite_input_gives_non_finite_loss(backend, loss):
    for bad in (float("nan"), float("inf")):
        args, kwargs = make_inputs(loss, 3, 8, torch.float32)
        args[0][2, 5] = bad
        assert not torch.isfinite(LOSS_FUNCTIONS[loss](*args, **kwargs, backend=backend))


@pytest.mark.parametrize("backend,loss", CASES)
def test_all_zero_rows_stay_finite(backend, loss):
    args, kwargs = make_inputs(loss, 3, 8, torch.float32, requires_grad=True)
    with torch.no_grad():
        for a in args[: len(TRAINABLE[loss])]:
            a[1].zero_()
    out, grads = _run(loss, args, kwargs, backend)
    ref, _ = _run(loss, [a.detach().double().requires_grad_(a.requires_grad) for a in args], kwargs, "reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend,loss", [c for c in CASES if c[1] in CONTRASTIVE])
def test_temperature_0_01_stays_finite_and_exact(backend, loss):
    args, kwargs = make_inputs(loss, 4, 16, torch.float32, requires_grad=True, temperature=0.01)
    out, grads = _run(loss, args, kwargs, backend)
    ref, ref_grads = _run(loss, [a.detach().double().requires_grad_(a.requires_grad) for a in args], kwargs,
                          "reference")
    assert torch.isfinite(out) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,loss", [c for c in CASES if c[1] in ("moco", "moco_pnr")])
def test_moco_queue_strides_do_not_matter(backend, loss):
    args, kwargs = make_inputs(loss, 3, 8, torch.float32, queue_size=6)
    n = len(TRAINABLE[loss])
    assert args[n].stride(-1) != 1  # transposed (2, D, K) buffers
    contiguous = args[:n] + [q.contiguous() for q in args[n:]]
    torch.testing.assert_close(LOSS_FUNCTIONS[loss](*args, **kwargs, backend=backend),
                               LOSS_FUNCTIONS[loss](*contiguous, **kwargs, backend=backend))
