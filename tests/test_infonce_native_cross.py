"""The native CPU cross-pair op (csrc/infonce_cpu.cpp, "The cross pair"; ops.infonce._define_cross_op):
both directions' log-sum-exps of S = scale a b^T from one pass, and their gradients, against the
float64 statement ``cat(logsumexp(S, 1), logsumexp(S, 0))`` differentiated by autograd; the logits
stash (kept, exact, skipped over its budget or when the thread count changed); non-finite and empty
inputs; and the CaSSLe regulariser taking it on one rank."""
import pytest
import torch

from pnr_kernels import losses, native, reference
from pnr_kernels.ops import backend_ops, infonce
from pnr_kernels.testing import TOLERANCES, assert_close_relative, restride

pytestmark = pytest.mark.skipif(
    native.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"native backend unavailable: {native.unavailable_reason(torch.device('cpu'), torch.float32)}",
)


def _cross():
    return infonce.cross_lse_function(backend_ops("native", "infonce", native.kernels), torch.device("cpu"))


def _want(a, b, scale, g):
    """lse and the gradients of (g * lse).sum() in float64, from the materialised logits."""
    a64, b64 = (x.detach().double().requires_grad_() for x in (a, b))
    s = scale * a64 @ b64.T
    lse = torch.cat([torch.logsumexp(s, 1), torch.logsumexp(s, 0)])
    grads = torch.autograd.grad((g * lse).sum(), [a64, b64]) if lse.numel() else (torch.zeros_like(a64),
                                                                                  torch.zeros_like(b64))
    return lse.detach(), grads


def _inputs(m, n, d, dtype, seed=0):
    torch.manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(m, d, dtype=torch.float64), dim=1).to(dtype)
    b = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1).to(dtype)
    return a, b, torch.randn(m + n, dtype=torch.float64)


def _step(a, b, scale, g, needs=(True, True)):
    a, b = a.detach().requires_grad_(needs[0]), b.detach().requires_grad_(needs[1])
    lse = _cross()(a, b, scale)
    targets = [x for x, need in zip((a, b), needs) if need]
    grads = iter(torch.autograd.grad((g.to(lse.dtype) * lse).sum(), targets))
    return lse.detach(), [next(grads) if need else None for need in needs]


def test_native_cpu_has_the_cross_pair_and_cuda_does_not():
    op = backend_ops("native", "infonce", native.kernels)
    assert infonce.cross_lse_function(op, torch.device("cpu")) is not None
    assert infonce.cross_lse_function(op, torch.device("cuda")) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,d", [(1, 1, 1), (7, 5, 3), (37, 600, 19), (601, 45, 8), (130, 130, 64)])
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "a", "b"])
def test_cross_pair_against_float64(dtype, m, n, d, needs):
    a, b, g = _inputs(m, n, d, dtype)
    scale = 1 / 0.15
    lse, grads = _step(a, b, scale, g, needs)
    want, want_grads = _want(a, b, scale, g)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_relative(lse, want, loss_tol, what="lse")
    for name, got, wanted, need in zip("ab", grads, want_grads, needs):
        if need:
            assert got.dtype == dtype and got.shape == wanted.shape
            assert_close_relative(got, wanted, grad_tol, what=f"d {name}")


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_cross_pair_reads_any_layout(layout):
    a, b, g = _inputs(33, 29, 12, torch.float32)
    want, want_grads = _step(a, b, 3.0, g)
    got, grads = _step(restride(a, layout), restride(b, layout), 3.0, g)
    torch.testing.assert_close(got, want)
    for x, y in zip(grads, want_grads):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("budget_mb", ["0", "16"])
def test_stash_and_recomputation_agree(monkeypatch, budget_mb):
    """Over the budget (0: none kept) backward recomputes the logits; both are the float64 result."""
    monkeypatch.setenv("PNR_KERNELS_CPU_LOGITS_BUDGET_MB", budget_mb)
    a, b, g = _inputs(300, 700, 16, torch.float64)
    lse, grads = _step(a, b, 5.0, g)
    want, want_grads = _want(a, b, 5.0, g)
    torch.testing.assert_close(lse, want, rtol=1e-12, atol=0)
    for x, y in zip(grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


def test_backward_after_a_thread_count_change_recomputes():
    """The stash layout follows the row tile, which follows the thread count: a backward under
    another count must not read the forward's layout."""
    a, b, g = _inputs(70, 90, 8, torch.float64)
    a, b = a.requires_grad_(), b.requires_grad_()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(threads, 2))
    try:
        lse = _cross()(a, b, 4.0)
        torch.set_num_threads(1)
        grads = torch.autograd.grad((g * lse).sum(), [a, b])
    finally:
        torch.set_num_threads(threads)
    want, want_grads = _want(a, b, 4.0, g)
    for x, y in zip(grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-13)


def test_retained_graph_backward_twice():
    """The first backward takes the stash; a second one (retain_graph) recomputes, the same values."""
    a, b, g = _inputs(40, 50, 8, torch.float64)
    a = a.requires_grad_()
    lse = _cross()(a, b, 2.0)
    first = torch.autograd.grad((g * lse).sum(), a, retain_graph=True)[0]
    second = torch.autograd.grad((g * lse).sum(), a)[0]
    torch.testing.assert_close(first, second, rtol=1e-12, atol=0)
    torch.testing.assert_close(first, _want(a, b, 2.0, g)[1][0], rtol=1e-10, atol=1e-13)


def test_a_nan_row_reaches_its_row_and_every_column():
    """NaN where the float64 statement has NaN (row 3, every column, and through the columns'
    weights every gradient), the float64 values elsewhere."""
    a, b, g = _inputs(20, 30, 8, torch.float32)
    a[3, 2] = float("nan")
    lse, grads = _step(a, b, 2.0, g)
    want, want_grads = _want(a, b, 2.0, g)
    assert torch.isnan(lse[3]) and torch.isnan(lse[20:]).all() and torch.isfinite(lse[:3]).all()
    torch.testing.assert_close(lse.double(), want, equal_nan=True, rtol=1e-5, atol=1e-6)
    for x, y in zip(grads, want_grads):
        assert torch.equal(torch.isnan(x), torch.isnan(y))


@pytest.mark.parametrize("m,n", [(0, 5), (5, 0), (0, 0)])
def test_empty_sides(m, n):
    """No keys: -inf for every row (the log-sum-exp of nothing), zero gradients."""
    a, b, g = _inputs(m, n, 4, torch.float32)
    lse, grads = _step(a, b, 2.0, g)
    want, _ = _want(a, b, 2.0, g)
    torch.testing.assert_close(lse, want.float())
    for x, shape in zip(grads, (a.shape, b.shape)):
        assert x.shape == shape and not x.any()


def test_cassle_takes_the_cross_pair_on_one_rank(monkeypatch):
    """The CaSSLe regulariser on native CPU makes one cross call per step (not two op calls) and
    gives the float64 reference's loss and gradients."""
    op = backend_ops("native", "infonce", native.kernels)
    calls = []
    real = op.cross

    def counting(*args):
        calls.append(args[2])
        return real(*args)

    counting.device_types = real.device_types
    monkeypatch.setattr(op, "cross", counting)
    torch.manual_seed(1)
    p1, p2, f1, f2 = (torch.randn(45, 24, dtype=torch.float64) for _ in range(4))
    p1.requires_grad_(), p2.requires_grad_()
    got = losses.cassle_simclr_regularizer(p1, p2, f1, f2, temperature=0.3, backend="native")
    grads = torch.autograd.grad(got, [p1, p2])
    assert calls == [1 / 0.3]
    want = reference.cassle_simclr_regularizer(p1, p2, f1, f2, temperature=0.3)
    want_grads = torch.autograd.grad(want, [p1, p2])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for x, y in zip(grads, want_grads):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
