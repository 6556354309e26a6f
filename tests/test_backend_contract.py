"""The public contract, checked on every backend usable on this machine's CPU (the reference,
Triton under TRITON_INTERPRET=1, the native CPU kernels once built): values and gradients against
the float64 reference, frozen inputs, non-finite and degenerate inputs, tiny temperatures,
strided queues. Backend-specific kernel tests live in test_<backend>_*.py."""
import pytest
import torch

from pnr_kernels import backends
from pnr_kernels.registry import LOSSES, QUEUE, REGULARIZER
from pnr_kernels.testing import TOLERANCES, assert_close_relative, check_against_reference, make_inputs

CPU = torch.device("cpu")
CASES = [(backend, loss) for backend in backends.BACKENDS for loss in sorted(LOSSES)
         if backends.unavailable_reason(backend, loss, CPU, torch.float32) is None]


def _run(loss, args, kwargs, backend):
    out = LOSSES[loss].function(*args, **kwargs, backend=backend)
    grads = torch.autograd.grad(out, [a for a in args if a.requires_grad], allow_unused=False) \
        if out.requires_grad else ()
    return out, grads


@pytest.mark.parametrize("backend,loss", CASES)
def test_float32_matches_float64_reference(backend, loss):
    args, kwargs = make_inputs(loss, 5, 19, torch.float32, requires_grad=True, queue_size=7)
    check_against_reference(loss, backend, args, kwargs)


@pytest.mark.parametrize("backend,loss", CASES)
def test_frozen_inputs_never_get_a_gradient(backend, loss):
    args, kwargs = make_inputs(loss, 3, 8, torch.float32)
    for a in args:
        a.requires_grad_(True)
    LOSSES[loss].function(*args, **kwargs, backend=backend).backward()
    for a, trainable in zip(args, LOSSES[loss].trainable_mask):
        assert (a.grad is not None) == trainable


@pytest.mark.parametrize("backend,loss", CASES)
def test_non_finite_input_gives_non_finite_loss(backend, loss):
    for bad in (float("nan"), float("inf")):
        args, kwargs = make_inputs(loss, 3, 8, torch.float32)
        args[0][2, 5] = bad
        assert not torch.isfinite(LOSSES[loss].function(*args, **kwargs, backend=backend))


@pytest.mark.parametrize("backend,loss", CASES)
def test_all_zero_rows_stay_finite(backend, loss):
    args, kwargs = make_inputs(loss, 3, 8, torch.float32, requires_grad=True)
    with torch.no_grad():
        for name, a in zip(LOSSES[loss].inputs, args):
            if name not in LOSSES[loss].queues:
                a[1].zero_()
    out, grads = _run(loss, args, kwargs, backend)
    ref, _ = _run(loss, [a.detach().double().requires_grad_(a.requires_grad) for a in args], kwargs, "reference")
    assert_close_relative(out, ref, TOLERANCES[torch.float32][0], f"{loss} on {backend}")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend,loss", [c for c in CASES if LOSSES[c[1]].kind != REGULARIZER])
def test_temperature_0_01_stays_finite_and_exact(backend, loss):
    tiny = {name: 0.01 for name in LOSSES[loss].options if name.endswith("temperature")}
    args, kwargs = make_inputs(loss, 4, 16, torch.float32, requires_grad=True, options=tiny)
    check_against_reference(loss, backend, args, kwargs)


@pytest.mark.parametrize("backend,loss", [c for c in CASES if LOSSES[c[1]].kind == QUEUE])
def test_moco_queue_strides_do_not_matter(backend, loss):
    args, kwargs = make_inputs(loss, 3, 8, torch.float32, queue_size=6)
    queues = [i for i, name in enumerate(LOSSES[loss].inputs) if name in LOSSES[loss].queues]
    assert all(args[i].stride(-1) != 1 for i in queues)  # transposed (2, D, K) buffers
    contiguous = [a.contiguous() if i in queues else a for i, a in enumerate(args)]
    torch.testing.assert_close(LOSSES[loss].function(*args, **kwargs, backend=backend),
                               LOSSES[loss].function(*contiguous, **kwargs, backend=backend))
