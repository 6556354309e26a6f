"""The reference losses and the public API: exactness, gradients, invariances, edge cases."""
import math

import pytest
import torch

import pnr_kernels
from pnr_kernels import reference
from pnr_kernels.registry import LOSSES, REGULARIZER, make_inputs

from . import loop_reference

ALL = sorted(LOSSES)
TEMPERATURE_LOSSES = sorted(name for name, spec in LOSSES.items() if spec.kind != REGULARIZER)


def _call(loss, args, kwargs, backend="reference"):
    return LOSSES[loss].function(*args, **kwargs, backend=backend)


def _trainable(loss):
    return LOSSES[loss].trainable_mask


@pytest.mark.parametrize("loss", ALL)
@pytest.mark.parametrize("batch,dim", [(1, 3), (3, 5), (4, 2)])
def test_matches_loop_formulation(loss, batch, dim):
    args, kwargs = make_inputs(loss, batch, dim, torch.float64)
    got = _call(loss, args, kwargs).item()
    want = getattr(loop_reference, loss)(*(a.numpy() for a in args), **kwargs)
    assert got == pytest.approx(want, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("loss", ALL)
def test_gradcheck_fp64(loss):
    args, kwargs = make_inputs(loss, 3, 4, torch.float64, requires_grad=True)
    trainable = [i for i, a in enumerate(args) if a.requires_grad]

    def fn(*train):
        full = list(args)
        for i, t in zip(trainable, train):
            full[i] = t
        return _call(loss, full, kwargs)

    assert torch.autograd.gradcheck(fn, [args[i] for i in trainable])


@pytest.mark.parametrize("loss", ALL)
def test_batch_permutation_invariance(loss):
    args, kwargs = make_inputs(loss, 6, 5, torch.float64)
    perm = torch.randperm(6)
    queues = LOSSES[loss].queues
    permuted = [a if name in queues else a[perm] for name, a in zip(LOSSES[loss].inputs, args)]
    torch.testing.assert_close(_call(loss, permuted, kwargs), _call(loss, args, kwargs), rtol=1e-12, atol=1e-12)


def test_simclr_pnr_view_swap_invariance():
    (z1, z2, p1, p2, f1, f2), kwargs = make_inputs("simclr_pnr", 5, 4, torch.float64)
    torch.testing.assert_close(
        pnr_kernels.simclr_pnr_loss(z2, z1, p2, p1, f2, f1, **kwargs),
        pnr_kernels.simclr_pnr_loss(z1, z2, p1, p2, f1, f2, **kwargs), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["reference"])
def test_simclr_pnr_exact_value_on_orthogonal_rows(backend):
    # Z = P = F = the 4 standard basis vectors, tau = 0.1. Every off-diagonal logit is 0.
    # main_i: its positive Z_i.Z_i' = 0 sits among the 6 zero logits, so main_i = log 6.
    # reg_i: its positive P_i.F_i / tau = 10 is NOT in its LSE (diagonals excluded), so
    # reg_i = log 6 - 10 < 0. Including it, or not excluding Z_i.F_i in main, changes the value.
    e = torch.eye(4, dtype=torch.float64)
    z1, z2 = e[:2], e[2:]
    loss = pnr_kernels.simclr_pnr_loss(z1, z2, z1, z2, z1, z2, temperature=0.1, backend=backend)
    assert loss.item() == pytest.approx(2 * math.log(6) - 10, rel=1e-12)


@pytest.mark.parametrize("loss", ALL)
def test_frozen_inputs_get_no_gradient(loss):
    args, kwargs = make_inputs(loss, 3, 4, torch.float64)
    for a in args:
        a.requires_grad_(True)
    _call(loss, args, kwargs).backward()
    for a, trainable in zip(args, _trainable(loss)):
        assert (a.grad is not None) == trainable


@pytest.mark.parametrize("loss", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_embeddings_give_non_finite_loss(loss, bad):
    args, kwargs = make_inputs(loss, 3, 4, torch.float32)
    args[0][1, 2] = bad
    assert not torch.isfinite(_call(loss, args, kwargs))


@pytest.mark.parametrize("loss", ALL)
def test_all_zero_rows_give_finite_loss_and_gradient(loss):
    # Normalisation maps an all-zero row to an all-zero unit vector (eps 1e-12), whose logits
    # are all 0; cosine uses eps 1e-8 on the norm product. Nothing is NaN.
    args, kwargs = make_inputs(loss, 3, 4, torch.float64, requires_grad=True)
    with torch.no_grad():
        for name, a in zip(LOSSES[loss].inputs, args):
            if name not in LOSSES[loss].queues:
                a[0].zero_()
    out = _call(loss, args, kwargs)
    out.backward()
    assert torch.isfinite(out)
    assert all(torch.isfinite(a.grad).all() for a in args if a.grad is not None)


def tiny_temperatures(loss):
    """Every temperature option of ``loss`` at 0.01 (the precision contract's smallest)."""
    return {name: 0.01 for name in LOSSES[loss].options if name.endswith("temperature")}


@pytest.mark.parametrize("loss", TEMPERATURE_LOSSES)
def test_tiny_temperature_stays_finite(loss):
    args, kwargs = make_inputs(loss, 4, 8, torch.float32, requires_grad=True, options=tiny_temperatures(loss))
    out = _call(loss, args, kwargs)
    out.backward()
    assert torch.isfinite(out)
    assert all(torch.isfinite(a.grad).all() for a in args if a.grad is not None)


@pytest.mark.parametrize("loss", ALL)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_follow_fp64(loss, dtype):
    args, kwargs = make_inputs(loss, 4, 6, dtype)
    got = _call(loss, args, kwargs)
    assert got.dtype == dtype
    want = _call(loss, [a.double() for a in args], kwargs)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.double().item() == pytest.approx(want.item(), rel=tol, abs=tol)


@pytest.mark.parametrize("loss", ALL)
def test_modules_match_functions(loss):
    spec = LOSSES[loss]
    module = getattr(pnr_kernels, spec.module)(**spec.example_options)
    args, kwargs = make_inputs(loss, 3, 4, torch.float64)
    assert module(*args).item() == spec.function(*args, **kwargs).item()
    assert module(**dict(zip(spec.inputs, args))).item() == module(*args).item()  # inputs by name too
    assert "=" in repr(module)


def test_base_losses():
    z1, z2, t1, t2 = (torch.randn(5, 4, dtype=torch.float64) for _ in range(4))
    assert pnr_kernels.BYOLLoss()(z1, z2, t1, t2).item() == pytest.approx(
        loop_reference.byol_pnr(z1.numpy(), z2.numpy(), t2.numpy(), t1.numpy(), 2.0, 0.0))
    assert pnr_kernels.BarlowTwinsLoss()(z1, z2).item() == pytest.approx(
        loop_reference._barlow(z1.numpy(), z2.numpy(), 5e-3, 0.1))
    # VICReg from its definition: 25 * MSE + 25 * variance hinge + covariance off-diagonal / D.
    n, d = z1.shape

    def var_cov(z):
        c = torch.cov(z.T)
        hinge = torch.relu(1 - torch.sqrt(torch.diagonal(c) + 1e-4)).mean()
        return hinge, (c.pow(2).sum() - torch.diagonal(c).pow(2).sum()) / d

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    want = 25 * ((z1 - z2) ** 2).mean() + 25 * (v1 + v2) + (c1 + c2)
    assert pnr_kernels.VICRegLoss()(z1, z2).item() == pytest.approx(want.item(), rel=1e-12)
    with pytest.raises(ValueError, match="at least 2"):
        pnr_kernels.vicreg_loss(z1[:1], z2[:1])


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------

def _simclr_args(**override):
    args = dict(zip(["z1", "z2", "p1", "p2", "f1", "f2"], (torch.randn(4, 3) for _ in range(6))))
    args.update(override)
    return args


@pytest.mark.parametrize("override,error,match", [
    (dict(z2=torch.randn(5, 3)), ValueError, "batch sizes differ"),
    (dict(p1=torch.randn(4, 2)), ValueError, "widths differ"),
    (dict(f2=torch.randn(4, 3, dtype=torch.float64)), TypeError, "dtypes differ"),
    (dict(z1=torch.ones(4, 3, dtype=torch.int64)), TypeError, "z1 must be a floating tensor"),
    (dict(z1=[[1.0]]), TypeError, "z1 must be a torch.Tensor"),
    (dict(p2=torch.randn(4)), ValueError, "p2 must be 2-D"),
    (dict(z1=torch.randn(0, 3), z2=torch.randn(0, 3)), ValueError, "z1 is an empty batch"),
    (dict(z1=torch.randn(4, 0)), ValueError, "z1 has zero width"),
    (dict(f1=torch.randn(4, 3, device="meta")), ValueError, "devices differ"),
])
def test_embedding_validation(override, error, match):
    with pytest.raises(error, match=match):
        pnr_kernels.simclr_pnr_loss(**_simclr_args(**override))


@pytest.mark.parametrize("temperature,error", [
    (0.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
    (1e-310, ValueError), (1e-39, ValueError), (1e-20, ValueError),  # below the floor 2**-64
    ("0.2", TypeError), (True, TypeError), (torch.tensor(0.2), TypeError),
])
def test_temperature_validation(temperature, error):
    with pytest.raises(error, match="temperature"):
        pnr_kernels.nt_xent_loss(torch.randn(3, 2), torch.randn(3, 2), temperature=temperature)
    with pytest.raises(error, match="distill_temperature"):
        args, _ = make_inputs("moco_pnr", 2, 3, torch.float32)
        pnr_kernels.moco_pnr_loss(*args, distill_temperature=temperature)


@pytest.mark.parametrize("queue,error,match", [
    (torch.randn(2, 5), ValueError, "key_queue must be 3-D"),
    (torch.randn(3, 5, 3), ValueError, "2 views"),
    (torch.randn(2, 0, 3), ValueError, "key_queue is empty"),
    (torch.randn(2, 5, 4), ValueError, "key_queue has width 4"),
    (torch.randn(2, 5, 3, dtype=torch.float64), TypeError, "dtypes differ"),
    (None, TypeError, "key_queue must be a torch.Tensor"),
])
def test_queue_validation(queue, error, match):
    args, _ = make_inputs("moco_pnr", 2, 3, torch.float32)
    args[8] = queue
    with pytest.raises(error, match=match):
        pnr_kernels.moco_pnr_loss(*args)


@pytest.mark.parametrize("name", ["distill_weight", "negative_weight"])
@pytest.mark.parametrize("value,error", [(float("nan"), ValueError), ("1", TypeError)])
def test_weight_validation(name, value, error):
    args, _ = make_inputs("byol_pnr", 2, 3, torch.float32)
    with pytest.raises(error, match=name):
        pnr_kernels.byol_pnr_regularizer(*args, **{name: value})


@pytest.mark.parametrize("loss", ALL)
def test_module_twins_refuse_bad_options_at_construction(loss):
    module_class = getattr(pnr_kernels, LOSSES[loss].module)
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        module_class(backend="cuda")
    name = next(iter(LOSSES[loss].options))
    with pytest.raises((TypeError, ValueError), match=name):
        module_class(**{name: float("nan")})


def test_backend_errors_say_why():
    z = torch.randn(3, 2, dtype=torch.float64)
    for bad in ("cuda", ["native"], None):  # before anything else (a list cannot key choose's memory)
        with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
            pnr_kernels.nt_xent_loss(z, z, backend=bad)
    with pytest.raises(pnr_kernels.BackendUnavailableError, match="float64"):
        pnr_kernels.nt_xent_loss(z, z, backend="triton")


def test_available_backends():
    assert pnr_kernels.available_backends("cpu")[-1] == "reference"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a torch without a usable CUDA device")
def test_available_backends_lists_nothing_for_cuda_without_a_gpu():
    assert pnr_kernels.available_backends(torch.device("cuda")) == []
    assert pnr_kernels.available_backends("cuda") == []


def test_public_names():
    for name in ["simclr_pnr_loss", "nt_xent_loss", "moco_pnr_loss", "byol_pnr_regularizer",
                 "vicreg_pnr_regularizer", "barlow_pnr_regularizer", "cassle_simclr_regularizer",
                 "available_backends"]:
        assert callable(getattr(pnr_kernels, name))
    for spec in LOSSES.values():
        assert getattr(pnr_kernels, spec.public) is spec.function
        assert spec.public in pnr_kernels.__all__ and spec.module in pnr_kernels.__all__
        assert spec.reference is getattr(reference, spec.public)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_auto_takes_the_first_available_backend_at_every_cpu_batch(loss, monkeypatch):
    """On the CPU the native kernels beat the reference from B = 8 up (docs/benchmarks.md, "Small
    batches"), so "auto" takes the first available backend whatever the batch."""
    from pnr_kernels import backends

    chosen = []
    real = backends.loss_function
    monkeypatch.setattr(backends, "loss_function", lambda backend, name: chosen.append(backend) or real(backend, name))
    for batch in (2, 8, 300):
        args, kwargs = make_inputs(loss, batch, 4, torch.float32, queue_size=6)
        LOSSES[loss].function(*args, **kwargs)
    assert chosen == [pnr_kernels.available_backends("cpu")[0]] * 3
