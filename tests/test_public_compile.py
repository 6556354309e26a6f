"""The public functions and their module twins under ``torch.compile(fullgraph=True)``, as a user
compiles a whole training step: backend resolution is a trace-time constant
(``backends.choose``), the fused ops have fake and autograd registrations, so nothing breaks the
graph. Every loss on every CPU backend with aot_eager; inductor (slow to compile on 2 cores) for
one loss per op family on every backend."""
import pytest
import torch

import pnr_kernels
from pnr_kernels import backends
from pnr_kernels.registry import LOSSES, make_inputs
from pnr_kernels.testing import TOLERANCES, assert_close_relative

CPU = torch.device("cpu")
CASES = [(backend, loss) for backend in backends.BACKENDS for loss in sorted(LOSSES)
         if backends.unavailable_reason(backend, loss, CPU, torch.float32) is None]
INDUCTOR_LOSSES = ("nt_xent", "vicreg_pnr")  # the cheapest of each op family to compile


def _compiled_matches_eager(fn, loss, compiler):
    spec = LOSSES[loss]
    args, kwargs = make_inputs(loss, 3, 8, torch.float32, requires_grad=True, queue_size=6)
    trainable = [a for a in args if a.requires_grad]
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=compiler, fullgraph=True)
    got = compiled(*args, **kwargs)
    want = fn(*args, **kwargs)
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    assert_close_relative(got, want, loss_tol, f"compiled {spec.public}")
    for g, w in zip(torch.autograd.grad(got, trainable), torch.autograd.grad(want, trainable)):
        assert_close_relative(g, w, grad_tol, f"compiled {spec.public} gradient")


@pytest.mark.parametrize("backend,loss", CASES)
def test_public_function_traces_in_one_graph(backend, loss):
    spec = LOSSES[loss]

    def fn(*args, **kwargs):
        return spec.function(*args, **kwargs, backend=backend)

    _compiled_matches_eager(fn, loss, "aot_eager")


@pytest.mark.parametrize("backend,loss", [c for c in CASES if c[1] in INDUCTOR_LOSSES])
def test_public_function_compiles_with_inductor(backend, loss):
    spec = LOSSES[loss]

    def fn(*args, **kwargs):
        return spec.function(*args, **kwargs, backend=backend)

    _compiled_matches_eager(fn, loss, "inductor")


@pytest.mark.parametrize("backend", sorted({b for b, _ in CASES}))
def test_module_twin_traces_in_one_graph(backend):
    spec = LOSSES["simclr_pnr"]
    module = getattr(pnr_kernels, spec.module)(temperature=0.3, backend=backend)

    def fn(*args, **kwargs):
        return module(*args)

    _compiled_matches_eager(fn, "simclr_pnr", "aot_eager")
