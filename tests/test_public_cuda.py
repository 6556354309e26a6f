"""The public layer on CUDA tensors (run by benchmarks/gpu_check.sh; skipped without a GPU): what
the CPU-side public tests (test_backend_contract, test_public_compile, the data-parallel tests)
check with CPU tensors, here with the GPU's backends. For every registered loss: ``backend="auto"``
picks a fused backend and matches the float64 reference (float32 and bfloat16, the tolerances of
``pnr_kernels.testing``); the module twin is bit-identical to the function on each fused backend;
``gather_distributed=True`` in an NCCL group of one rank is bit-identical to the local loss; and
one loss per op family compiles with inductor under ``fullgraph=True`` on each fused backend."""
import pytest
import torch
import torch.distributed as dist

import pnr_kernels
from pnr_kernels import backends
from pnr_kernels.registry import LOSSES, make_inputs
from pnr_kernels.testing import TOLERANCES, assert_close_relative, check_against_reference, free_port

CUDA = torch.device("cuda")
FUSED = ("triton", "native")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BATCH, DIM, QUEUE = 33, 40, 70  # no multiple of any tile
DTYPES = [torch.float32, torch.bfloat16]
INDUCTOR_LOSSES = ("nt_xent", "vicreg_pnr")  # one per op family, as test_public_compile.py
GATHERED = sorted(name for name, spec in LOSSES.items() if spec.gathers)


def _usable(backend, loss, dtype=torch.float32):
    reason = backends.unavailable_reason(backend, loss, CUDA, dtype)
    if reason is not None:
        pytest.fail(f"{backend} cannot run {loss} on this GPU: {reason}")


def _inputs(loss, dtype):
    return make_inputs(loss, BATCH, DIM, dtype, device=CUDA, requires_grad=True, queue_size=QUEUE)


def _value_and_grads(fn, args):
    trainable = [a for a in args if a.requires_grad]
    out = fn()
    return out, torch.autograd.grad(out, trainable)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[1])
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_auto_runs_a_fused_backend_and_matches_the_fp64_reference(loss, dtype):
    assert backends.choose("auto", loss, "cuda", dtype) in FUSED
    args, options = _inputs(loss, dtype)
    check_against_reference(loss, "auto", args, options)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_module_twin_is_the_function(loss, backend):
    _usable(backend, loss)
    spec = LOSSES[loss]
    args, options = _inputs(loss, torch.float32)
    module = getattr(pnr_kernels, spec.module)(**options, backend=backend)
    got, got_grads = _value_and_grads(lambda: module(*args), args)
    want, want_grads = _value_and_grads(lambda: spec.function(*args, **options, backend=backend), args)
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads))


@pytest.fixture
def nccl_world_of_one():
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    try:
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
        dist.barrier()
    except (RuntimeError, dist.DistBackendError) as error:  # the sandbox's NCCL, not the library
        if dist.is_initialized():
            dist.destroy_process_group()
        pytest.skip(f"NCCL could not start a group of one here: {error}")
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", GATHERED)
def test_gather_in_an_nccl_world_of_one_is_the_local_loss(loss, backend, nccl_world_of_one):
    _usable(backend, loss)
    spec = LOSSES[loss]
    args, options = _inputs(loss, torch.float32)
    local, local_grads = _value_and_grads(lambda: spec.function(*args, **options, backend=backend), args)
    for extra in ({}, {"process_group": dist.group.WORLD}):
        got, got_grads = _value_and_grads(
            lambda: spec.function(*args, **options, backend=backend, gather_distributed=True, **extra), args)
        assert torch.equal(got, local), extra
        assert all(torch.equal(g, w) for g, w in zip(got_grads, local_grads)), extra


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", INDUCTOR_LOSSES)
def test_public_function_compiles_with_inductor(loss, backend):
    _usable(backend, loss)
    spec = LOSSES[loss]
    args, options = _inputs(loss, torch.float32)

    def fn(*inputs):
        return spec.function(*inputs, **options, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    got, got_grads = _value_and_grads(lambda: compiled(*args), args)
    want, want_grads = _value_and_grads(lambda: fn(*args), args)
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    assert_close_relative(got, want, loss_tol, f"compiled {spec.public} on {backend}")
    for g, w in zip(got_grads, want_grads):
        assert_close_relative(g, w, grad_tol, f"compiled {spec.public} gradient on {backend}")
