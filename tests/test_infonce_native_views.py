"""SimCLR-PNR and NT-Xent of one process on CPU tensors in one native op with its own C++ autograd
node (csrc/infonce_views_cpu.cpp, the eager path of ops/infonce.py's simclr_pnr_loss and
nt_xent_loss): the same loss and gradients as the composition of the ops it replaces, bitwise,
for every dtype and every subset of inputs that require a gradient; one op call per step; the
first-order-only rule under create_graph; and the cases that keep the composition (tracing,
data parallelism). Their agreement with the fp64 reference is tests/test_infonce_native_cpu.py's."""
import pytest
import torch

import pnr_kernels
from pnr_kernels import distributed, native
from pnr_kernels.ops import backend_ops, infonce
from pnr_kernels.testing import op_calls

pytestmark = pytest.mark.skipif(
    native.unavailable_reason(torch.device("cpu"), torch.float32) is not None,
    reason=f"native backend unavailable: {native.unavailable_reason(torch.device('cpu'), torch.float32)}",
)

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
# per loss: the composed loss function and which inputs may require a gradient, as tried below
LOSSES = {"nt_xent": (infonce.nt_xent_loss, [(True, True), (True, False), (False, True)]),
          "simclr_pnr": (infonce.simclr_pnr_loss,
                         [(True, True, True, True, False, False), (True, False, False, True, False, False),
                          (False, False, True, True, False, False), (True, True, False, False, False, False),
                          (True, True, True, True, True, True), (False, False, False, False, True, False)])}


def _op():
    return backend_ops("native", "infonce", native.kernels)


def _run(loss, inputs, needs, incoming, fused):
    """(loss, gradients of the inputs that need one, grad_fn name) of the loss over the native op,
    fused (the views op) or composed (the op without it)."""
    function, _ = LOSSES[loss]
    op = _op()
    xs = [x.clone().requires_grad_(need) for x, need in zip(inputs, needs)]
    with pytest.MonkeyPatch.context() as patch:
        if not fused:
            patch.delattr(op, "views_loss")
        out = function(op, *xs, temperature=0.3)
    trainable = [x for x in xs if x.requires_grad]
    grads = torch.autograd.grad(out * incoming if incoming != 1 else out, trainable) if trainable else ()
    return out.detach(), grads, out.grad_fn.name() if out.grad_fn is not None else None


@pytest.mark.parametrize("incoming", [1.0, -2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("loss", sorted(LOSSES))
@pytest.mark.parametrize("batch,dim", [(1, 3), (13, 7), (300, 20)])  # 300: two row tiles of 2B rows
def test_views_op_gives_the_composition_bitwise(loss, dtype, batch, dim, incoming):
    gen = torch.Generator().manual_seed(batch)
    inputs = [torch.randn(batch, dim, generator=gen).to(dtype) for _ in range(2 if loss == "nt_xent" else 6)]
    for needs in LOSSES[loss][1]:
        got, got_grads, node = _run(loss, inputs, needs, incoming, fused=True)
        want, want_grads, composed = _run(loss, inputs, needs, incoming, fused=False)
        assert "ViewsLoss" in node and "ViewsLoss" not in composed
        assert got.dtype == dtype and torch.equal(got, want), (needs, got, want)
        assert len(got_grads) == len(want_grads) == sum(needs)
        for g, w in zip(got_grads, want_grads):
            assert g.dtype == dtype and torch.equal(g, w), (needs, (g - w).abs().max())


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_public_loss_is_one_op_call_per_step(loss):
    """Through the public API a CPU step (forward and backward) calls the views op once and no
    other op: the unit rows, the InfoNCE kernels and their backward run inside it and its node."""
    count = 2 if loss == "nt_xent" else 6
    inputs = [torch.randn(40, 16, requires_grad=i < 4) for i in range(count)]
    public = getattr(pnr_kernels, f"{loss}_loss")

    def step():
        public(*inputs, temperature=0.2, backend="native").backward()
    assert op_calls(step) == {"pnr_kernels::infonce_views_loss": 1}


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_create_graph_gives_first_order_and_refuses_second_order(loss):
    """Under create_graph the node's backward is the registered backward op: the same first-order
    gradient, and a second differentiation (also through a weight of the loss alone) raises the
    fused backends' error."""
    count = 2 if loss == "nt_xent" else 6
    inputs = [torch.randn(6, 5, dtype=torch.float64, requires_grad=i < 2) for i in range(count)]
    views = _op().views_loss
    weight = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(weight * views(0.4, *inputs), [inputs[0]], create_graph=True)
    (plain,) = torch.autograd.grad(2.0 * views(0.4, *inputs), [inputs[0]])
    assert torch.equal(grad, plain)
    for target in ((grad ** 2).sum(), grad.sum()):
        with pytest.raises(RuntimeError, match="first-order gradients only.*backend='reference'"):
            torch.autograd.grad(target, [weight], retain_graph=True)


def test_no_grad_records_nothing_and_gives_the_same_loss():
    z1, z2 = (torch.randn(9, 4, requires_grad=True) for _ in range(2))
    with torch.no_grad():
        quiet = pnr_kernels.nt_xent_loss(z1, z2, backend="native")
    loud = pnr_kernels.nt_xent_loss(z1, z2, backend="native")
    assert quiet.grad_fn is None and not quiet.requires_grad
    assert torch.equal(quiet, loud.detach())


def test_retained_graph_backwards_add_up():
    """The forward's logits stash serves the first backward; a second over the retained graph
    recomputes, and the accumulated gradient is twice the first."""
    z1, z2 = (torch.randn(50, 8, dtype=torch.float64, requires_grad=True) for _ in range(2))
    out = pnr_kernels.nt_xent_loss(z1, z2, backend="native")
    out.backward(retain_graph=True)
    first = z1.grad.clone()
    out.backward()
    torch.testing.assert_close(z1.grad, 2 * first, rtol=1e-13, atol=0)


def test_views_op_refuses_bad_arguments():
    views = torch.ops.pnr_kernels.infonce_views_loss
    x = torch.randn(4, 3)
    with pytest.raises(RuntimeError, match=r"pnr must be empty \(NT-Xent\) or \[p1, p2, f1, f2\]"):
        views(x, x, [x], 0.1, 1e4, 1e-12)
    with pytest.raises(RuntimeError, match="every input must have 4 rows"):
        views(x, torch.randn(5, 3), [], 0.1, 1e4, 1e-12)
    with pytest.raises(RuntimeError, match=r"inputs\[1\] has dtype"):
        views(x, x.double(), [], 0.1, 1e4, 1e-12)


def test_tracing_and_data_parallel_keep_the_composition(monkeypatch):
    """Under torch.compile the losses compose the custom ops (which trace); under data
    parallelism (``distributed.gathers``) they compose the op with the gathered keys."""
    z1, z2 = torch.randn(8, 4), torch.randn(8, 4)
    op = _op()
    assert infonce._fused_views(op, (z1, z2), False, None) is op.views_loss
    assert infonce._fused_views(op, (z1, z2), True, None) is op.views_loss  # not initialised: one process
    monkeypatch.setattr(distributed, "gathers", lambda *args: True)
    assert infonce._fused_views(op, (z1, z2), True, None) is None
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert infonce._fused_views(op, (z1, z2), False, None) is None


def test_gathers_needs_an_initialised_group_of_several_ranks():
    assert not distributed.gathers(False, None)
    assert not distributed.gathers(True, None)  # torch.distributed not initialised: one process
    assert distributed.gathers(True, object())  # data_parallel raises for a group without torch.distributed
