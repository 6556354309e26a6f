"""The contrastive losses and the public multi-key InfoNCE op under data parallelism
(docs/losses.md, "Data-parallel"), and the same op's diagonal offsets on one process.

End to end: W = 2 and W = 3 gloo processes on the CPU, each holding its slice of one float64 batch
and a tiny encoder (+ predictor) wrapped in DistributedDataParallel, call every loss that takes
``gather_distributed`` (the registry says which) through its module twin on every backend usable
here (Triton under TRITON_INTERPRET=1, in float32: the interpreter has no float64). The mean of
the ranks' losses must equal the float64 reference loss of one process on the whole batch, and
the DDP-averaged parameter gradients its gradients (1e-9 in float64; the float32 tolerances of
``pnr_kernels.testing`` for Triton). One spawn per world size runs every case (processes cost
seconds to start); each case's figures come back as JSON and are checked by a test of their own.
"""
import copy
import datetime
import json
import math
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import pnr_kernels
from pnr_kernels import backends, distributed, reference
from pnr_kernels.registry import LOSSES
from pnr_kernels.testing import TOLERANCES, assert_close_relative, free_port, relative_error

CPU = torch.device("cpu")
GATHERED = sorted(name for name, spec in LOSSES.items() if spec.gathers)
# backend -> the dtype it runs in here (Triton has no float64)
DTYPES = {"reference": torch.float64, "native": torch.float64, "triton": torch.float32}
BACKENDS = [b for b, dtype in DTYPES.items() if backends.unavailable_reason(b, "infonce", CPU, dtype) is None]
BATCH, IN_DIM, DIM, TEMPERATURE = 2, 5, 8, 0.3  # per rank and view; tiny for the Triton interpreter
DDP_TOLERANCE = {torch.float64: (1e-9, 1e-9), torch.float32: TOLERANCES[torch.float32]}


# ---------------------------------------------------------------------------------------------
# Single process: the public op's diagonal offsets against a materialised statement
# ---------------------------------------------------------------------------------------------

def _materialised_lse(rows, keys, exclude, temperatures, offsets):
    """Written out independently of reference.infonce_lse: one logit matrix per row set, -inf at
    (i, offset + i) of each excluded block."""
    out = []
    for row, t in zip(rows, temperatures):
        blocks = []
        for key, ex, o in zip(keys, exclude, offsets):
            logits = row.double() @ key.double().T / t
            if ex:
                for i in range(row.shape[0]):
                    if o + i < key.shape[0]:
                        logits[i, o + i] = float("-inf")
            blocks.append(logits)
        out.append(torch.cat(blocks, 1).logsumexp(1))
    return torch.stack(out)


OFFSET_CASES = {  # key block sizes, exclusion, offsets (M = 4 rows)
    "square_offset_0": ([4, 6], [True, False], [0, 0]),
    "inside": ([9, 6], [True, True], [3, 2]),
    "runs_past_the_end": ([6, 3], [True, False], [4, 0]),
    "beyond_the_block": ([5, 7], [True, True], [5, 20]),
    "fewer_keys_than_rows": ([2, 7], [True, True], [1, 0]),
    # valid offsets past any int64 arithmetic: still "a key that does not exist leaves nothing out"
    "near_2_63": ([5, 7], [True, True], [2 ** 63 - 1, 2 ** 63]),
    "near_2_64": ([5, 7], [True, True], [2 ** 64 - 1, 2 ** 64 - 3]),  # int64 wrap-around: -1, -3
    "2_64_and_1e30": ([5, 7], [True, True], [2 ** 64, 10 ** 30]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(OFFSET_CASES))
def test_public_op_diagonal_offsets(backend, case):
    sizes, exclude, offsets = OFFSET_CASES[case]
    dtype = DTYPES[backend]
    g = torch.Generator().manual_seed(7)
    rows = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    keys = [torch.randn(n, 6, generator=g, dtype=torch.float64) for n in sizes]
    keys[1].requires_grad_(True)  # block 0 frozen, block 1 trainable
    for r in rows:
        r.requires_grad_(True)
    temperatures = [0.5, 0.8]
    weights = torch.randn(2, 4, generator=g, dtype=torch.float64)
    want = _materialised_lse(rows, keys, exclude, temperatures, offsets)
    want_grads = torch.autograd.grad((want * weights).sum(), rows + [keys[1]])
    cast = [x.detach().to(dtype).requires_grad_(x.requires_grad) for x in rows + keys]
    got = pnr_kernels.multi_key_infonce(cast[:2], cast[2:], temperature=temperatures, exclude_diagonal=exclude,
                                        diagonal_offsets=offsets, backend=backend)
    assert got.shape == (2, 4) and got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert_close_relative(got, want, loss_tol, f"{case} on {backend}")
    got_grads = torch.autograd.grad((got * weights.to(got.dtype)).sum(), cast[:2] + [cast[3]])
    for name, g_, w in zip(("rows[0]", "rows[1]", "keys[1]"), got_grads, want_grads):
        assert_close_relative(g_, w, grad_tol, f"{case} on {backend}: grad {name}")
    assert cast[2].grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_at_the_smallest_temperature(backend):
    """Unit rows at the temperature floor (2**-64): the LSEs, about 1/temperature, are finite and
    those of the materialised statement; the next smaller temperature is refused by name."""
    from pnr_kernels._validation import MIN_TEMPERATURE

    dtype = DTYPES[backend]
    g = torch.Generator().manual_seed(3)
    rows = [torch.nn.functional.normalize(torch.randn(4, 6, generator=g, dtype=torch.float64), dim=1)]
    keys = [rows[0], torch.nn.functional.normalize(torch.randn(5, 6, generator=g, dtype=torch.float64), dim=1)]
    want = _materialised_lse(rows, keys, [True, False], [MIN_TEMPERATURE], [0, 0])
    got = pnr_kernels.multi_key_infonce([r.to(dtype) for r in rows], [k.to(dtype) for k in keys],
                                        temperature=MIN_TEMPERATURE, exclude_diagonal=[True, False], backend=backend)
    assert_close_relative(got, want, TOLERANCES[dtype][0], f"op on {backend} at temperature 2**-64")
    with pytest.raises(ValueError, match="temperature must be at least"):
        pnr_kernels.multi_key_infonce(rows, keys, temperature=math.nextafter(MIN_TEMPERATURE, 0), backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offset_zero_is_the_op_without_offsets(backend):
    dtype = DTYPES[backend]
    x, k = torch.randn(5, 4, dtype=dtype), torch.randn(7, 4, dtype=dtype)
    plain = pnr_kernels.multi_key_infonce([x], [x, k], exclude_diagonal=[True, False], backend=backend)
    zero = pnr_kernels.multi_key_infonce([x], [x, k], exclude_diagonal=[True, False], diagonal_offsets=[0, 0],
                                         backend=backend)
    assert torch.equal(plain, zero)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rows=torch.ones(2, 3)), TypeError, r"rows must be a list .*wrap a single tensor"),
    (dict(rows=[]), ValueError, "rows must hold at least one tensor"),
    (dict(keys=[torch.ones(2, 4)]), ValueError, r"widths differ: rows\[0\] has dim 3, keys\[0\] has 4"),
    (dict(keys=[torch.ones(2, 3, dtype=torch.float64)]), TypeError, r"dtypes differ: rows\[0\].*keys\[0\]"),
    (dict(keys=[torch.ones(0, 3)]), ValueError, r"keys\[0\] is an empty batch"),
    (dict(exclude_diagonal=[True, False]), ValueError, "exclude_diagonal must have one entry per key block"),
    (dict(exclude_diagonal=1), TypeError, "exclude_diagonal must be True or False"),
    (dict(diagonal_offsets=[-1]), ValueError, r"diagonal_offsets\[0\] must be >= 0"),
    (dict(diagonal_offsets=[1.5]), TypeError, r"diagonal_offsets\[0\] must be an int"),
    (dict(temperature=[0.1, 0.2]), ValueError, "temperature must have one entry per row set"),
    (dict(temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (dict(gather_distributed="yes"), TypeError, "gather_distributed must be True or False"),
    (dict(process_group=3), TypeError, "process_group must be None .* or a torch.distributed.ProcessGroup"),
    (dict(backend="cuda"), ValueError, "backend must be 'auto' or one of"),
])
def test_public_op_validation(kwargs, error, match):
    args = dict(rows=[torch.ones(2, 3)], keys=[torch.ones(2, 3)])
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pnr_kernels.multi_key_infonce(args.pop("rows"), args.pop("keys"), **args)


@pytest.mark.parametrize("loss", GATHERED)
def test_loss_validates_data_parallel_options(loss):
    spec = LOSSES[loss]
    args = [torch.randn(3, 4) for _ in spec.inputs]
    with pytest.raises(TypeError, match="gather_distributed must be True or False"):
        spec.function(*args, gather_distributed=None)
    with pytest.raises(TypeError, match="process_group must be None"):
        spec.function(*args, process_group="world")
    with pytest.raises(TypeError, match="gather_distributed must be True or False"):
        getattr(pnr_kernels, spec.module)(gather_distributed=0)


def test_losses_without_keys_of_the_batch_do_not_take_gather_distributed():
    assert set(GATHERED) == {"simclr_pnr", "nt_xent", "cassle_simclr"}
    with pytest.raises(TypeError):
        pnr_kernels.moco_pnr_loss(*[torch.randn(2, 3)] * 8, torch.randn(2, 4, 3), torch.randn(2, 4, 3),
                                  gather_distributed=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", GATHERED)
def test_world_of_one_is_exactly_the_local_loss(loss, backend):
    """gather_distributed=True without torch.distributed, and in an initialised group of one
    rank: bit-identical to the local loss, value and gradients."""
    spec = LOSSES[loss]
    args = [torch.randn(3, 6, dtype=DTYPES[backend], requires_grad=name in spec.trainable) for name in spec.inputs]
    trainable = [a for a in args if a.requires_grad]

    def run(**options):
        out = spec.function(*args, temperature=TEMPERATURE, backend=backend, **options)
        return out, torch.autograd.grad(out, trainable)

    base, base_grads = run()
    results = [run(gather_distributed=True)]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        results.append(run(gather_distributed=True))
        results.append(run(gather_distributed=True, process_group=dist.group.WORLD))
    finally:
        dist.destroy_process_group()
    for out, grads in results:
        assert torch.equal(out, base)
        assert all(torch.equal(g, w) for g, w in zip(grads, base_grads))


def _docs_example():
    """The decoupled SimCLR-PNR example of docs/losses.md, executed from the docs' code block."""
    path = os.path.join(os.path.dirname(__file__), "..", "docs", "losses.md")
    with open(path) as f:
        text = f.read()
    start = text.index("```python\nimport torch.nn.functional as F\nimport pnr_kernels\n\ndef decoupled_simclr_pnr")
    code = text[start + len("```python\n"):text.index("```", start + 3)]
    namespace = {}
    exec(compile(code, path, "exec"), namespace)
    return namespace["decoupled_simclr_pnr"]


def _decoupled_simclr_pnr_materialised(z1, z2, f1, f2, t):
    """docs/losses.md's formula, written out: row i of either view drops key i of every block."""
    unit = [x / x.norm(dim=1, keepdim=True) for x in (z1, z2, f1.detach(), f2.detach())]
    losses = []
    for v in (0, 1):
        logits = torch.cat([(unit[v] @ k.T / t).fill_diagonal_(float("-inf")) for k in unit], 1)
        losses.append(logits.logsumexp(1) - (unit[0] * unit[1]).sum(1) / t)
    return torch.cat(losses).mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_docs_example_decoupled_simclr_pnr(backend):
    dtype = DTYPES[backend]
    x = [torch.randn(4, 6, dtype=torch.float64) for _ in range(4)]
    exact = [a.clone().requires_grad_(i < 2) for i, a in enumerate(x)]
    want = _decoupled_simclr_pnr_materialised(*exact, 0.3)
    want_grads = torch.autograd.grad(want, exact[:2])
    cast = [a.to(dtype).requires_grad_(i < 2) for i, a in enumerate(x)]
    got = _docs_example()(*cast, temperature=0.3, backend=backend)
    loss_tol, grad_tol = TOLERANCES[dtype]
    assert_close_relative(got, want, loss_tol, f"docs example on {backend}")
    for g, w in zip(torch.autograd.grad(got, cast[:2]), want_grads):
        assert_close_relative(g, w, grad_tol, f"docs example gradient on {backend}")


# ---------------------------------------------------------------------------------------------
# Single process: the queue helper
# ---------------------------------------------------------------------------------------------

def test_queue_layout_fifo_wraparound_and_state_dict():
    queue = pnr_kernels.PNRQueue(5, 3, dtype=torch.float64)
    assert queue.key_queue.shape == queue.prev_queue.shape == (2, 5, 3)
    assert queue.key_queue.stride() == (15, 1, 5)  # a transposed view of (2, D, K)
    torch.testing.assert_close(queue.key_queue.norm(dim=2), torch.ones(2, 5, dtype=torch.float64))
    assert torch.equal(pnr_kernels.PNRQueue(5, 3, dtype=torch.float64).key_storage, queue.key_storage)  # seeded
    batches = [[torch.randn(2, 3, dtype=torch.float64) * (i + 1) for _ in range(4)] for i in range(3)]
    for batch in batches:
        queue.enqueue(*batch)
    unit = [[reference.normalize(x) for x in batch] for batch in batches]
    # 6 rows per view into 5 slots: the third batch wrapped, its second row is at slot 0
    order = [(2, 1), (0, 1), (1, 0), (1, 1), (2, 0)]
    for which, queue_view in ((0, queue.key_queue[0]), (1, queue.key_queue[1]),
                              (2, queue.prev_queue[0]), (3, queue.prev_queue[1])):
        torch.testing.assert_close(queue_view, torch.stack([unit[b][which][i] for b, i in order]))
    assert int(queue.pointer) == 1
    restored = pnr_kernels.PNRQueue(5, 3, dtype=torch.float64, seed=1)
    restored.load_state_dict(queue.state_dict())
    assert torch.equal(restored.key_queue, queue.key_queue) and int(restored.pointer) == 1
    keys_only = pnr_kernels.PNRQueue(4, 3, previous=False)
    keys_only.enqueue(torch.randn(2, 3), torch.randn(2, 3))
    assert keys_only.prev_queue is None and int(keys_only.pointer) == 2


def test_queue_feeds_moco_pnr_and_refuses_bad_input():
    queue = pnr_kernels.PNRQueue(6, 4)
    x = [torch.randn(3, 4, requires_grad=True) for _ in range(8)]
    loss = pnr_kernels.moco_pnr_loss(*x, queue.key_queue, queue.prev_queue, backend="reference")
    loss.backward()
    queue.enqueue(x[2], x[3], x[6], x[7])  # inputs that require grad: detached
    assert not queue.key_storage.requires_grad
    with pytest.raises(ValueError, match="more than the queue size 6"):
        queue.enqueue(*[torch.randn(7, 4)] * 4)
    with pytest.raises(ValueError, match="pass f1 and f2 too"):
        queue.enqueue(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="dim 5, the queue holds dim 4"):
        queue.enqueue(*[torch.randn(2, 5)] * 4)
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        pnr_kernels.PNRQueue(0, 4)


# ---------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------

class _Net(nn.Module):
    """A tiny encoder, and a predictor when the loss takes p1, p2."""

    def __init__(self, predictor: bool):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(IN_DIM, 6), nn.Tanh(), nn.Linear(6, DIM))
        self.predictor = nn.Linear(DIM, DIM) if predictor else None

    def forward(self, x1, x2):
        z1, z2 = self.encoder(x1), self.encoder(x2)
        out = {"z1": z1, "z2": z2}
        if self.predictor is not None:
            out.update(p1=self.predictor(z1), p2=self.predictor(z2))
        return out


def _global_batch(world):
    g = torch.Generator().manual_seed(100 + world)
    return {name: torch.randn(world * BATCH, IN_DIM if name.startswith("x") else DIM, generator=g,
                              dtype=torch.float64) for name in ("x1", "x2", "f1", "f2")}


def _loss_inputs(spec, model, batch):
    values = {**model(batch["x1"], batch["x2"]), "f1": batch["f1"], "f2": batch["f2"]}
    return [values[name] for name in spec.inputs]


def _ddp_case(loss, backend, rank, world):
    """Figures of one loss x backend: the mean of the ranks' losses and the DDP-averaged gradients
    against the float64 reference of one process on the whole batch."""
    spec, dtype = LOSSES[loss], DTYPES[backend]
    batch = _global_batch(world)
    torch.manual_seed(0)
    single = _Net(predictor=any(n.startswith("p") for n in spec.trainable)).double()
    want = spec.function(*_loss_inputs(spec, single, batch), temperature=TEMPERATURE, backend="reference")
    want_grads = torch.autograd.grad(want, list(single.parameters()))

    model = DistributedDataParallel(copy.deepcopy(single).to(dtype))
    local = {name: x[rank * BATCH:(rank + 1) * BATCH].to(dtype) for name, x in batch.items()}
    criterion = getattr(pnr_kernels, spec.module)(temperature=TEMPERATURE, backend=backend, gather_distributed=True)
    got = criterion(*_loss_inputs(spec, model, local))
    got.backward()
    every = torch.empty(world, dtype=torch.float64)
    distributed._all_gather_single(every, got.detach().double().reshape(1))
    got_grads = [p.grad for p in model.module.parameters()]
    return {
        "loss": want.item(), "loss_abs": (every.mean() - want).abs().item(),
        "loss_rel": relative_error(every.mean(), want),
        "grad_abs": max((g.double() - w).abs().max().item() for g, w in zip(got_grads, want_grads)),
        "grad_rel": max(relative_error(g, w) for g, w in zip(got_grads, want_grads)),
        "local_grad_rel": None,
    }


def _buggy_gather_case(rank, world):
    """The gather whose backward keeps only the local slice of the gradient (lightly's old
    GatherLayer): the same DDP check must see it."""
    original = distributed._GatherRows.backward

    @staticmethod
    def local_only(ctx, grad):
        m = grad.shape[0] // ctx.world
        return grad[dist.get_rank(ctx.group) * m:(dist.get_rank(ctx.group) + 1) * m].contiguous(), None

    distributed._GatherRows.backward = local_only
    try:
        return _ddp_case("simclr_pnr", "reference", rank, world)
    finally:
        distributed._GatherRows.backward = original


def _op_case(backend, rank, world):
    """The public op with gathered keys: rank r's LSE and its row and key gradients against the
    materialised op of one process on every rank's rows (row r*M + i drops global key r*M + i)."""
    dtype, m = DTYPES[backend], 3
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(world * m, 6, generator=g, dtype=torch.float64)
    own = torch.randn(world * m, 6, generator=g, dtype=torch.float64)     # gathered, trainable, excluded
    frozen = torch.randn(world * 4, 6, generator=g, dtype=torch.float64)  # gathered, frozen
    weights = torch.randn(world * m, generator=g, dtype=torch.float64)
    exact = [x.clone().requires_grad_(True) for x in (rows, own)]
    want = _materialised_lse([exact[0]], [exact[1], frozen], [True, False], [0.5], [0, 0])[0]
    want_grads = torch.autograd.grad((want * weights).sum(), exact)
    mine = slice(rank * m, (rank + 1) * m)
    local = [x[mine].to(dtype).requires_grad_(True) for x in (rows, own)]
    got = pnr_kernels.multi_key_infonce([local[0]], [local[1], frozen[rank * 4:(rank + 1) * 4].to(dtype)],
                                        temperature=0.5, exclude_diagonal=[True, False], backend=backend,
                                        gather_distributed=True)[0]
    got_grads = torch.autograd.grad((got * weights[mine].to(got.dtype)).sum(), local)
    return {"lse_rel": relative_error(got, want[mine]),
            "rows_grad_rel": relative_error(got_grads[0], want_grads[0][mine]),
            "keys_grad_rel": relative_error(got_grads[1], want_grads[1][mine])}


def _subgroup_case(rank, world):
    """process_group = ranks 1 and 2 of 3: their rows meet the group's keys only, the offset is the
    rank in the group, and each embedding's gradient is the sum over the group's losses, i.e. the
    group size times the gradient of the single-process loss on the group's batch."""
    group = dist.new_group([1, 2])  # every rank calls new_group
    if rank == 0:
        return {}
    spec, b = LOSSES["simclr_pnr"], 2
    g = torch.Generator().manual_seed(11)
    every = [torch.randn(2 * b, 5, generator=g, dtype=torch.float64) for _ in spec.inputs]
    exact = [x.clone().requires_grad_(name in spec.trainable) for name, x in zip(spec.inputs, every)]
    want = spec.function(*exact, backend="reference")
    want_grads = torch.autograd.grad(want, [x for x in exact if x.requires_grad])
    mine = slice((rank - 1) * b, rank * b)
    figures = {}
    for backend in [n for n in BACKENDS if DTYPES[n] == torch.float64]:
        local = [x[mine].clone().requires_grad_(name in spec.trainable) for name, x in zip(spec.inputs, every)]
        got = spec.function(*local, backend=backend, gather_distributed=True, process_group=group)
        both = torch.empty(2, dtype=torch.float64)
        distributed._all_gather_single(both, got.detach().reshape(1), group=group)
        got_grads = torch.autograd.grad(got, [x for x in local if x.requires_grad])
        figures[backend] = {"loss_rel": relative_error(both.mean(), want),
                            "grad_rel": max(relative_error(g_, 2 * w[mine]) for g_, w in zip(got_grads, want_grads))}
    return figures


def _bench_case(rank, world):
    """The gather-cost benchmark's timing loop runs inside a process group (tiny sizes)."""
    from pnr_kernels.bench import distributed as bench_distributed

    config = dict(loss="nt_xent", backend="reference", device="cpu", dtype="float64", batch=2, dim=4,
                  repeats=2, warmup=0)
    return bench_distributed.time_steps(config, rank, world)


def _docs_example_case(rank, world):
    """The docs example with gather_distributed=True: the mean of the ranks' losses and each
    rank's embedding gradients (W times the single-process gradient of its slice) against the
    materialised formula on the whole batch."""
    b = 3
    g = torch.Generator().manual_seed(13)
    every = [torch.randn(world * b, 6, generator=g, dtype=torch.float64) for _ in range(4)]
    exact = [x.clone().requires_grad_(i < 2) for i, x in enumerate(every)]
    want = _decoupled_simclr_pnr_materialised(*exact, 0.3)
    want_grads = torch.autograd.grad(want, exact[:2])
    mine = slice(rank * b, (rank + 1) * b)
    local = [x[mine].clone().requires_grad_(i < 2) for i, x in enumerate(every)]
    got = _docs_example()(*local, temperature=0.3, backend="reference", gather_distributed=True)
    all_losses = torch.empty(world, dtype=torch.float64)
    distributed._all_gather_single(all_losses, got.detach().reshape(1))
    got_grads = torch.autograd.grad(got, local[:2])
    return {"loss_rel": relative_error(all_losses.mean(), want),
            "grad_rel": max(relative_error(g_, world * w[mine]) for g_, w in zip(got_grads, want_grads))}


def _unequal_batches_case(rank, world):
    x = [torch.randn(2 + rank, 4) for _ in range(6)]
    try:
        pnr_kernels.simclr_pnr_loss(*x, gather_distributed=True, backend="reference")
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def _queue_case(rank, world):
    queue = pnr_kernels.PNRQueue(8, 3, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    every = [torch.randn(world * 2, 3, generator=g, dtype=torch.float64) for _ in range(4)]
    queue.enqueue(*[x[rank * 2:(rank + 1) * 2] for x in every])
    gathered = torch.empty(world, *queue.key_storage.shape, dtype=torch.float64)
    distributed._all_gather_single(gathered, queue.key_storage[None].contiguous())
    expected = [reference.normalize(x) for x in every]
    return {"same_on_every_rank": all(torch.equal(gathered[0], q) for q in gathered),
            "rank_order": all(torch.allclose(view[:world * 2], x, rtol=0, atol=1e-15)
                              for view, x in zip((queue.key_queue[0], queue.key_queue[1], queue.prev_queue[0],
                                                  queue.prev_queue[1]), expected)),
            "pointer": int(queue.pointer)}


def _worker(rank, world, port, out_dir, cases):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    results = {}
    try:
        for case in cases:
            kind, *params = case
            try:
                results["/".join(case)] = globals()[f"_{kind}_case"](*params, rank, world)
            except Exception:
                results["/".join(case)] = {"exception": traceback.format_exc()}
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()



def _cases(world):
    cases = [("ddp", loss, backend) for loss in GATHERED for backend in BACKENDS]
    if world == 2:
        cases += [("buggy_gather",), ("unequal_batches",), ("queue",), ("bench",), ("docs_example",)]
        cases += [("op", b) for b in BACKENDS]
    if world == 3:
        cases += [("subgroup",)]
    return cases


_SPAWNED = {}


def spawned(world):
    """Every case of ``world`` processes, run once per test session: {case: [per-rank figures]}."""
    if world not in _SPAWNED:
        with tempfile.TemporaryDirectory() as out_dir:
            # Triton joins on CPU under TRITON_INTERPRET=1 (set by conftest; the children inherit it).
            mp.spawn(_worker, args=(world, free_port(), out_dir, _cases(world)), nprocs=world, join=True)
            per_rank = []
            for rank in range(world):
                with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
                    per_rank.append(json.load(f))
        _SPAWNED[world] = {case: [r[case] for r in per_rank] for case in per_rank[0]}
    return _SPAWNED[world]


def _figures(world, *case):
    figures = spawned(world)["/".join(case)]
    for rank, f in enumerate(figures):
        assert "exception" not in f, f"rank {rank}:\n{f['exception']}"
    return figures


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", GATHERED)
def test_ddp_matches_single_process_on_the_global_batch(loss, backend, world):
    figures = _figures(world, "ddp", loss, backend)
    loss_tol, grad_tol = DDP_TOLERANCE[DTYPES[backend]]
    for rank, f in enumerate(figures):
        what = f"{loss} on {backend}, W={world}, rank {rank}"
        assert f["loss_rel"] <= loss_tol, f"{what}: mean of the ranks' losses off by {f['loss_rel']:.3g} relative"
        assert f["grad_rel"] <= grad_tol, f"{what}: DDP gradients off by {f['grad_rel']:.3g} relative"
        if DTYPES[backend] == torch.float64:
            assert f["loss_abs"] <= 1e-9 and f["grad_abs"] <= 1e-9, f"{what}: {f}"


def test_a_gather_keeping_only_local_gradients_is_caught():
    """The end-to-end check is sensitive to the classic bug: with the gather's backward keeping
    only the local slice, the DDP gradients are far off while the loss is still right."""
    for f in _figures(2, "buggy_gather"):
        assert f["loss_rel"] <= 1e-12
        assert f["grad_rel"] > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_op_gathers_keys_at_global_offsets(backend):
    loss_tol, grad_tol = TOLERANCES[DTYPES[backend]]
    for rank, f in enumerate(_figures(2, "op", backend)):
        assert f["lse_rel"] <= loss_tol, f"rank {rank}: {f}"
        assert f["rows_grad_rel"] <= grad_tol and f["keys_grad_rel"] <= grad_tol, f"rank {rank}: {f}"


def test_process_group_restricts_the_gather_to_the_group():
    figures = _figures(3, "subgroup")
    assert figures[0] == {}
    for rank in (1, 2):
        assert figures[rank], "no float64 backend ran"
        for backend, f in figures[rank].items():
            assert f["loss_rel"] <= 1e-12 and f["grad_rel"] <= 1e-10, f"{backend} rank {rank}: {f}"


def test_docs_example_is_data_parallel_as_it_stands():
    for rank, f in enumerate(_figures(2, "docs_example")):
        assert f["loss_rel"] <= 1e-12 and f["grad_rel"] <= 1e-10, f"rank {rank}: {f}"


def test_gather_cost_benchmark_times_every_setting():
    for f in _figures(2, "bench"):
        assert set(f) == {"local", "gather", "collectives"}
        assert all(len(times) == 2 and min(times) > 0 for times in f.values())


def test_unequal_local_batches_raise_on_every_rank_naming_the_sizes():
    for f in _figures(2, "unequal_batches"):
        assert f["error"] is not None and "rank 0: 4, rank 1: 6" in f["error"], f


def test_queue_enqueues_every_ranks_keys_in_rank_order():
    for f in _figures(2, "queue"):
        assert f == {"same_on_every_rank": True, "rank_order": True, "pointer": 4}


def test_pnr_bench_routes_world_size_to_the_gather_benchmark(capsys):
    from pnr_kernels import bench

    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--world-size", "1"])
    assert exit_info.value.code == 2
    assert "argument --world-size: must be an integer >= 2" in capsys.readouterr().err
