"""pnr_kernels.compat against the PNR authors' formulas (github.com/csm9493/PNR), float64.

The ``golden_*`` functions below state, in this file's own words, what each upstream function
computes, read from its mathematics: full similarity matrices, the masks the upstream code
applies, cross-entropy over the kept logits. They share nothing with pnr_kernels (no helper of
the library is used), so a compat function that passes the arguments in the wrong order, uses the
wrong temperature or the wrong mask fails here. The last part plays the authors' distillers
(their training-step lines, with the upstream argument order) with the compat functions and
compares with pnr_kernels.reference: the "change the import only" check of issue 19.
"""
import pytest
import torch
import torch.nn.functional as F

from pnr_kernels import available_backends, compat, reference
from pnr_kernels.testing import TOLERANCES, assert_close_relative

B, D, K = 5, 7, 9
LOSS_TOL, GRAD_TOL = TOLERANCES[torch.float64]
# "auto" picks the reference for some losses at this batch and the native kernels for others
BACKENDS = ["auto"] + [name for name in ("reference", "native") if name in available_backends("cpu")]


def leaves(n, rows=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, D, generator=g, dtype=torch.float64) * 1.3 + 0.2).requires_grad_(True)
            for _ in range(n)]


def unit_queue(seed=1):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, D, K, generator=g, dtype=torch.float64)
    return q / q.norm(dim=1, keepdim=True)


def grads(loss, xs):
    return torch.autograd.grad(loss, xs, allow_unused=True, retain_graph=True)


def assert_same(got, want, xs, what):
    assert_close_relative(got, want, LOSS_TOL, f"{what} loss")
    for i, (g, w) in enumerate(zip(grads(got, xs), grads(want, xs))):
        if w is None:
            assert g is None or g.abs().max() == 0, f"{what}: input {i} got a gradient it should not"
        else:
            assert_close_relative(g, w, GRAD_TOL, f"{what} grad of input {i}")


# ---------------------------------------------------------------------------------------------
# The upstream formulas, stated independently
# ---------------------------------------------------------------------------------------------

def unit(x):
    return x / x.norm(dim=1, keepdim=True)


def golden_simclr_moco(p1, p2, z1, z2, f1, f2, t=0.1):
    """(loss1, loss2) of simclr_moco_loss_func: for 2B rows, logits [Z.Z | Z.F] / t and
    [P.F | P.Z] / t; the self-similarity (i, i) is removed from the denominator in both blocks of
    both; loss1's positive is Z_i.Z_i' (kept in the denominator), loss2's is P_i.F_i (removed)."""
    n = 2 * z1.shape[0]
    z, p, f = unit(torch.cat([z1, z2])), unit(torch.cat([p1, p2])), unit(torch.cat([f1, f2.detach()]).detach())
    eye = torch.eye(n, dtype=torch.bool)
    keep = torch.cat([~eye, ~eye], dim=1)
    other_view = torch.arange(n).roll(n // 2)

    def term(a, b1, b2, positive):
        logits = torch.cat([a @ b1.T, a @ b2.T], dim=1) / t
        denominator = torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=1)
        return (denominator - positive / t).mean()

    loss1 = term(z, z, f, (z * z[other_view]).sum(1))
    loss2 = term(p, f, z, (p * f).sum(1))
    return loss1, loss2


def golden_moco_pnr(query1, key1, queue1, distill1, query2, t=0.1, td=0.1):
    """(loss1, loss2) of moco_pnr_loss_func: cross-entropy with label 0 over [pos | negatives]
    where the negatives are the columns of cat(queue1, queue2) (queue2 passed in ``queue1``'s
    place as a (D, 2K) block here). Inputs are used as given (the distiller normalises)."""
    labels = torch.zeros(query1.shape[0], dtype=torch.long)
    loss1 = F.cross_entropy(torch.cat([(query1 * key1).sum(1, keepdim=True), query1 @ queue1], 1) / t, labels)
    loss2 = F.cross_entropy(torch.cat([(distill1 * query2).sum(1, keepdim=True), distill1 @ queue1], 1) / td,
                            labels)
    return loss1, loss2


def golden_simclr_distill(p1, p2, z1, z2, t=0.1):
    """simclr_distill_loss_func: cross-entropy of [p1; p2] against [z1; z2] (cosines / t), the
    positive on the diagonal, no logit masked."""
    a, c = unit(torch.cat([p1, p2])), unit(torch.cat([z1, z2]))
    return F.cross_entropy(a @ c.T / t, torch.arange(a.shape[0]))


def golden_cos(p, z):
    return (p * z).sum(1) / (p.norm(dim=1) * z.norm(dim=1))


def golden_byol(p, z):
    return 2 - 2 * golden_cos(p, z.detach()).mean()


def golden_simsiam(p, z):
    return -golden_cos(p, z.detach()).mean()


def golden_mse(a, b):
    return ((a - b) ** 2).mean()


def golden_correlation(a, b):
    """BatchNorm1d(affine=False) in training mode: batch mean, biased variance, eps 1e-5."""
    def bn(x):
        return (x - x.mean(0)) / (x.var(0, unbiased=False) + 1e-5).sqrt()

    return bn(a).T @ bn(b) / a.shape[0]


def golden_barlow_of_c(c, lamb, scale):
    eye = torch.eye(c.shape[0], dtype=c.dtype)
    weight = torch.where(eye.bool(), torch.ones_like(c), torch.full_like(c, lamb))
    return scale * (weight * (c - eye) ** 2).sum()


def golden_barlow(a, b, lamb=5e-3, scale=0.025):
    return golden_barlow_of_c(golden_correlation(a, b), lamb, scale)


# ---------------------------------------------------------------------------------------------
# Each compat function against its upstream formula: loss, every gradient, per-term values
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_simclr_moco_loss_func(backend):
    p1, p2, z1, z2, f1, f2 = xs = leaves(6)
    want1, want2 = golden_simclr_moco(p1, p2, z1, z2, f1, f2, t=0.3)
    assert_same(compat.simclr_moco_loss_func(p1, p2, z1, z2, f1, f2, 0.3, backend=backend), want1 + want2, xs,
                "simclr_moco")
    total, terms = compat.simclr_moco_loss_func(p1, p2, z1, z2, f1, f2, 0.3, return_terms=True, backend=backend)
    assert set(terms) == {"loss1", "loss2"}
    assert_same(total, want1 + want2, xs, "simclr_moco total (terms)")
    assert_same(terms["loss1"], want1, xs, "simclr_moco loss1")
    assert_same(terms["loss2"], want2, xs, "simclr_moco loss2")


def test_simclr_moco_default_temperature_is_upstreams():
    xs = leaves(6)
    assert_close_relative(compat.simclr_moco_loss_func(*xs), sum(golden_simclr_moco(*xs)), LOSS_TOL, "t=0.1")


@pytest.mark.parametrize("backend", BACKENDS)
def test_moco_pnr_loss_func(backend):
    query1, key1, distill1, query2, key2, distill2 = raw = leaves(6)
    q, k, p, f = (unit(x) for x in (query1, key1, distill1, query2))  # as the distiller normalises
    queue = unit_queue()
    queue1, queue2 = queue[0], unit_queue(seed=2)[1]
    want1, want2 = golden_moco_pnr(q, k.detach(), torch.cat([queue1, queue2], 1), p, f.detach(), t=0.3, td=0.45)
    got = compat.moco_pnr_loss_func(q, k, queue1, p, f, key2, queue2, distill2, 0.3, 0.45, 0.5, backend=backend)
    assert_same(got, want1 + want2, raw, "moco_pnr")
    total, terms = compat.moco_pnr_loss_func(q, k, queue1, p, f, key2, queue2, distill2, temperature=0.3,
                                             distill_temperature=0.45, return_terms=True, backend=backend)
    assert_same(total, want1 + want2, raw, "moco_pnr total (terms)")
    assert_same(terms["loss1"], want1, raw, "moco_pnr loss1")
    assert_same(terms["loss2"], want2, raw, "moco_pnr loss2")
    # upstream does not use key2, distill2 or loss_alpha
    other = compat.moco_pnr_loss_func(q, k, queue1, p, f, key2 * 3, queue2, distill2 + 1, 0.3, 0.45, 0.9)
    assert_close_relative(other, want1 + want2, LOSS_TOL, "moco_pnr, unused arguments changed")


@pytest.mark.parametrize("backend", BACKENDS)
def test_simclr_distill_loss_func_both_directions(backend):
    p1, p2, f1, f2 = xs = leaves(4)
    assert_same(compat.simclr_distill_loss_func(p1, p2, f1, f2, 0.3, backend=backend),
                golden_simclr_distill(p1, p2, f1, f2, 0.3), xs, "cassle p->f")
    # the distiller's second call: frozen outputs as anchors, the trainable p as keys (gradient flows)
    assert_same(compat.simclr_distill_loss_func(f1, f2, p1, p2, 0.3, backend=backend),
                golden_simclr_distill(f1, f2, p1, p2, 0.3), xs, "cassle f->p")


def test_pair_terms():
    p, z = leaves(2)
    for simplified in (True, False):
        assert_same(compat.byol_loss_func(p, z, simplified), golden_byol(p, z), [p, z], "byol_loss_func")
        assert_same(compat.simsiam_loss_func(p, z, simplified), golden_simsiam(p, z), [p, z], "simsiam_loss_func")
    assert_same(compat.invariance_loss(p, z.detach()), golden_mse(p, z.detach()), [p, z], "invariance_loss")
    # barlow_loss_func differentiates both arguments (it is also the method's own loss)
    assert_same(compat.barlow_loss_func(p, z), golden_barlow(p, z), [p, z], "barlow_loss_func defaults")
    assert_same(compat.barlow_loss_func(p, z, 0.05, 0.2), golden_barlow(p, z, 0.05, 0.2), [p, z], "barlow_loss_func")
    assert_same(compat.barlow_loss_func(p, z, lamb=0.05, scale_loss=0.2, differentiable_all_reduce=False),
                golden_barlow(p, z, 0.05, 0.2), [p, z], "barlow_loss_func, one process: the option changes nothing")


@pytest.mark.parametrize("backend", BACKENDS)
def test_distill_losses_and_their_logging_names(backend):
    p1, p2, f1, f2 = xs = leaves(4)
    f1, f2 = f1.detach(), f2.detach()
    cases = [
        (compat.byol_pnr_distill_loss, dict(distill_lamb=1.5, negative_lamb=0.5), golden_byol, golden_byol,
         ("train_byol_pnr_positive_loss", "train_byol_pnr_negative_loss")),
        (compat.vicreg_pnr_distill_loss, dict(distill_lamb=25.0, negative_lamb=8.0), golden_mse, golden_mse,
         ("train_predictive_distill_loss", "train_predictive_negative_loss")),
        (compat.barlow_pnr_distill_loss, dict(distill_lamb=1.2, negative_lamb=0.7, distill_barlow_lamb=0.05,
                                              distill_scale_loss=0.2),
         lambda p, f: golden_barlow(p, f, 0.05, 0.2), golden_simsiam,
         ("train_decorrelative_distill_loss", "train_negative_loss")),
    ]
    for function, weights, pos, neg, names in cases:
        want_pos = (pos(p1, f1) + pos(p2, f2)) / 2
        want_neg = (neg(p1, f2) + neg(p2, f1)) / 2
        want = weights["distill_lamb"] * want_pos - weights["negative_lamb"] * want_neg
        what = function.__name__
        assert_same(function(p1, p2, f1, f2, **weights, backend=backend), want, xs, what)
        total, terms = function(p1, p2, f1, f2, **weights, return_terms=True, backend=backend)
        assert tuple(terms) == names, what
        assert_same(total, want, xs, f"{what} total (terms)")
        assert_same(terms[names[0]], want_pos, xs, f"{what} {names[0]}")
        assert_same(terms[names[1]], want_neg, xs, f"{what} {names[1]}")


def test_distill_defaults_are_the_distillers():
    p1, p2, f1, f2 = leaves(4)
    pairs = [(compat.byol_pnr_distill_loss, 1.0, 1.0, golden_byol, golden_byol),
             (compat.vicreg_pnr_distill_loss, 25.0, 23.0, golden_mse, golden_mse),
             (compat.barlow_pnr_distill_loss, 1.0, 1.0, lambda p, f: golden_barlow(p, f, 5e-3, 0.1), golden_simsiam)]
    for function, lamb, negative_lamb, pos, neg in pairs:
        want = lamb * (pos(p1, f1) + pos(p2, f2)) / 2 - negative_lamb * (neg(p1, f2) + neg(p2, f1)) / 2
        assert_close_relative(function(p1, p2, f1, f2), want, LOSS_TOL, function.__name__)


# ---------------------------------------------------------------------------------------------
# Errors that name the argument
# ---------------------------------------------------------------------------------------------

def test_errors_name_the_argument():
    p1, p2, z1, z2, f1, f2 = leaves(6)
    with pytest.raises(ValueError, match="labels"):
        compat.simclr_moco_loss_func(p1, p2, z1, z2, f1, f2, 0.1, torch.zeros(B))
    queue = unit_queue()
    with pytest.raises(ValueError, match="queue2 must be \\(dim, K\\)"):
        compat.moco_pnr_loss_func(z1, z2, queue[0], p1, f1, z2, queue.transpose(1, 2)[0], p2)
    with pytest.raises(ValueError, match="queue1 must be"):
        compat.moco_pnr_loss_func(z1, z2, queue, p1, f1, z2, queue[0], p2)
    with pytest.raises(TypeError, match="queue1"):
        compat.moco_pnr_loss_func(z1, z2, queue[0].float(), p1, f1, z2, queue[0], p2)
    with pytest.raises(ValueError, match="z2 requires a gradient"):
        compat.invariance_loss(p1, f1)
    with pytest.raises(TypeError, match="return_terms"):
        compat.byol_pnr_distill_loss(p1, p2, f1, f2, return_terms=1)
    with pytest.raises(TypeError, match="differentiable_all_reduce"):
        compat.barlow_loss_func(p1, f1, differentiable_all_reduce="authors")
    with pytest.raises(ValueError, match="temperature"):
        compat.moco_pnr_loss_func(z1, z2, queue[0], p1, f1, z2, queue[1], p2, temperature=0.0)


# ---------------------------------------------------------------------------------------------
# The previous-model queue in the authors' layout
# ---------------------------------------------------------------------------------------------

def authors_enqueue(queue, ptr, keys):
    """Upstream _dequeue_and_enqueue2: keys (2, n, D) written as columns at ptr (n divides K)."""
    n = keys.shape[1]
    queue = queue.clone()
    queue[:, :, ptr:ptr + n] = keys.permute(0, 2, 1)
    return queue, (ptr + n) % queue.shape[2]


def test_previous_model_queue_state_uses_the_authors_names_and_resumes():
    g = torch.Generator().manual_seed(5)
    k = 12
    authors = torch.randn(2, D, k, generator=g, dtype=torch.float64)
    authors = authors / authors.norm(dim=1, keepdim=True)
    checkpoint = {"queue": torch.zeros(2, D, k), "queue_ptr": torch.zeros(1, dtype=torch.long),
                  "queue2": authors, "queue2_ptr": torch.tensor([8])}
    queue = compat.PreviousModelQueue(k, D, dtype=torch.float64)
    assert set(queue.state_dict()) == {"queue2", "queue2_ptr"}
    assert queue.state_dict()["queue2"].shape == (2, D, k) and queue.state_dict()["queue2_ptr"].shape == (1,)
    queue.load_state_dict({name: checkpoint[name] for name in ("queue2", "queue2_ptr")})
    assert torch.equal(queue.queue2, authors) and int(queue.pointer) == 8
    assert torch.equal(queue.prev_queue, authors.transpose(1, 2))
    f1, f2 = (torch.randn(4, D, generator=g, dtype=torch.float64) for _ in range(2))
    want, want_ptr = authors_enqueue(authors, 8, torch.stack([unit(f1), unit(f2)]))
    queue.enqueue(f1, f2)
    assert_close_relative(queue.queue2, want, 1e-15, "queue after enqueue")
    saved = queue.state_dict()
    assert int(saved["queue2_ptr"][0]) == want_ptr == 0 and saved["queue2_ptr"].dtype == torch.int64
    # as a submodule: the authors' names under the attribute's prefix
    holder = torch.nn.Module()
    holder.prev = compat.PreviousModelQueue(k, D, dtype=torch.float64)
    assert set(holder.state_dict()) == {"prev.queue2", "prev.queue2_ptr"}
    holder.load_state_dict({"prev." + name: value for name, value in saved.items()})
    assert torch.equal(holder.prev.queue2, queue.queue2)


def test_previous_model_queue_refuses_bad_state():
    queue = compat.PreviousModelQueue(12, D)
    with pytest.raises(RuntimeError, match="queue2 has shape"):
        queue.load_state_dict({"queue2": torch.zeros(2, K, D), "queue2_ptr": torch.tensor([0])})
    with pytest.raises(RuntimeError, match="queue2_ptr must be one integer in \\[0, 12\\)"):
        queue.load_state_dict({"queue2": torch.zeros(2, D, 12), "queue2_ptr": torch.tensor([12])})
    with pytest.raises(RuntimeError, match="Missing key.*queue2_ptr"):
        queue.load_state_dict({"queue2": torch.zeros(2, D, 12)})
    with pytest.raises(RuntimeError, match="prev_queue"):
        queue.key_queue
    with pytest.raises(ValueError, match="f1 has dim"):
        queue.enqueue(torch.randn(3, D + 1), torch.randn(3, D + 1))


# ---------------------------------------------------------------------------------------------
# The authors' distillers with the import changed, against pnr_kernels.reference
# ---------------------------------------------------------------------------------------------

def test_simclr_pnr_distiller_switches_by_import():
    z1, z2, frozen_z1, frozen_z2, p1, p2 = xs = leaves(6)
    distill_temperature = 0.2
    # cassle/distillers/simclr_pnr.py, training_step, with compat's function
    simclr_moco_loss_func = compat.simclr_moco_loss_func
    loss = (simclr_moco_loss_func(p1, p2, z1, z2, frozen_z1, frozen_z2, distill_temperature)
            + simclr_moco_loss_func(p2, p1, z2, z1, frozen_z2, frozen_z1, distill_temperature)) / 2
    want = reference.simclr_pnr_loss(z1, z2, p1, p2, frozen_z1.detach(), frozen_z2.detach(), temperature=0.2)
    assert_same(loss, want, xs, "SimCLR-PNR distiller")


def test_moco_pnr_distiller_switches_by_import():
    z1, z2, k1, k2, frozen_z1, frozen_z2, p1, p2 = raw = leaves(8)
    temperature, distill_temperature, loss_alpha = 0.2, 0.3, 0.5
    method_queue = unit_queue(seed=3)  # the method's "queue" buffer, (2, D, K)
    prev = compat.PreviousModelQueue(K, D, dtype=torch.float64, seed=4)
    # cassle/methods/mocov2plus.py and cassle/distillers/mocov2plus_pnr.py normalise these
    z1n, z2n, k1n, k2n = (F.normalize(x, dim=-1) for x in (z1, z2, k1, k2))
    frozen_z1n, frozen_z2n = F.normalize(frozen_z1, dim=-1), F.normalize(frozen_z2, dim=-1)
    p1n, p2n = F.normalize(p1, dim=-1), F.normalize(p2, dim=-1)
    queue1, queue2 = method_queue, prev.queue2.clone().detach()
    prev.enqueue(frozen_z1n, frozen_z2n)  # upstream enqueues before the loss, which uses the clone
    moco_pnr_loss_func = compat.moco_pnr_loss_func
    loss = (moco_pnr_loss_func(z1n, k2n, queue1[1], p1n, frozen_z1n, k1n, queue2[1], p2n, temperature,
                               distill_temperature, loss_alpha)
            + moco_pnr_loss_func(z2n, k1n, queue2[0], p2n, frozen_z2n, k2n, queue1[0], p1n, temperature,
                                 distill_temperature, loss_alpha)) / 2
    want = reference.moco_pnr_loss(z1, z2, k1.detach(), k2.detach(), p1, p2, frozen_z1.detach(), frozen_z2.detach(),
                                   queue1.transpose(1, 2), queue2.transpose(1, 2), temperature=temperature,
                                   distill_temperature=distill_temperature)
    assert_same(loss, want, raw, "MoCo-PNR distiller")
    assert not torch.equal(prev.queue2, queue2)  # the enqueue happened, the loss saw the queue before it


def test_byol_pnr_distiller_switches_by_import():
    z1, z2, p1, p2, frozen_z1, frozen_z2 = xs = leaves(6)
    frozen_z1, frozen_z2 = frozen_z1.detach(), frozen_z2.detach()
    distill_lamb, negative_lamb = 1.0, 0.5
    byol_loss_func = compat.byol_loss_func
    # cassle/distillers/byol_pnr.py, training_step
    positive_loss = (byol_loss_func(p1, frozen_z1) + byol_loss_func(p2, frozen_z2)) / 2
    negative_loss = (byol_loss_func(p1, frozen_z2) + byol_loss_func(p2, frozen_z1)) / 2
    loss = distill_lamb * positive_loss - negative_lamb * negative_loss
    want = reference.byol_pnr_regularizer(p1, p2, frozen_z1, frozen_z2, distill_weight=1.0, negative_weight=0.5)
    assert_same(loss, want, xs, "BYOL-PNR distiller")
    total, terms = compat.byol_pnr_distill_loss(p1, p2, frozen_z1, frozen_z2, negative_lamb=0.5, return_terms=True)
    assert_same(total, want, xs, "byol_pnr_distill_loss")
    assert_close_relative(terms["train_byol_pnr_positive_loss"], positive_loss, LOSS_TOL, "positive")
    assert_close_relative(terms["train_byol_pnr_negative_loss"], negative_loss, LOSS_TOL, "negative")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_inputs_meet_the_float32_tolerances(backend):
    """The compositions cast as the library's own losses do: float32 in, float32 out, within the
    float32 contract of the float64 formula on the same values."""
    loss_tol, grad_tol = TOLERANCES[torch.float32]
    xs64 = leaves(6)
    xs32 = [x.detach().float().requires_grad_(True) for x in xs64]
    queue = unit_queue()

    def cases(xs, q):
        p1, p2, z1, z2, f1, f2 = xs
        return {
            "simclr_moco terms": lambda: compat.simclr_moco_loss_func(p1, p2, z1, z2, f1, f2, 0.3, return_terms=True,
                                                                      backend=backend)[0],
            "moco_pnr": lambda: compat.moco_pnr_loss_func(unit(z1), unit(z2), q[0], unit(p1), unit(f1), z2, q[1], p2,
                                                          0.3, 0.45, backend=backend),
            "simclr_distill": lambda: compat.simclr_distill_loss_func(p1, p2, f1, f2, 0.3, backend=backend),
        }

    want = {name: f() for name, f in cases(xs64, queue).items()}
    for name, f in cases(xs32, queue.float()).items():
        got = f()
        assert got.dtype == torch.float32, name
        assert_close_relative(got, want[name], loss_tol, f"{name} float32 loss")
        for g, w in zip(grads(got, xs32), grads(want[name], xs64)):
            if w is not None:
                assert_close_relative(g, w, grad_tol, f"{name} float32 grad")
