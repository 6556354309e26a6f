"""The Triton InfoNCE kernels (pnr_kernels/triton/infonce.py) against the fp64 reference.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); with
TRITON_INTERPRET=0 on a CUDA machine (benchmarks/gpu_check.sh) the same tests run the compiled
kernels on CUDA tensors. Shapes are small and odd (not multiples of any block size) but span
several row tiles, key tiles and D chunks where that matters. In the interpreter the keys are
split across 2 programs wherever there are 2 key tiles (see ``key_splits``), so both the split
and the unsplit paths run.
"""
import pytest
import torch
import torch.nn.functional as F

import pnr_kernels
import pnr_kernels.triton as triton_backend
from pnr_kernels import reference
from pnr_kernels.registry import LOSSES
from pnr_kernels.testing import TOLERANCES, assert_close_relative, check_against_reference, make_inputs
from pnr_kernels.triton import infonce as triton_infonce
from pnr_kernels.triton import interpreting

DEVICE = "cpu" if interpreting() else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():  # pragma: no cover - misconfigured run
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)

CONTRASTIVE = sorted(name for name, spec in LOSSES.items() if spec.family == "infonce")
# a tile is 32 rows or keys in the interpreter: these span 2 row tiles and 2 key tiles, and in
# fp32 (resident up to D=64, then chunks of 32) 3 D chunks
ROWS, KEYS, WIDTH = 37, 45, 70


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", CONTRASTIVE)
def test_public_loss_and_gradients_match_fp64_reference(loss, dtype):
    """Loss and every trainable gradient (the queues strided views) against the reference on the
    same rounded values in fp64, within docs/losses.md's tolerances."""
    args, options = make_inputs(loss, 19, 37, dtype, requires_grad=True, queue_size=23, device=DEVICE)
    comparison = check_against_reference(loss, "triton", args, options)
    assert len(comparison.gradients) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("loss", ["simclr_pnr", "moco_pnr"])
def test_public_loss_at_temperature_0_01(loss, dtype):
    """Logits up to 1 / 0.01 = 100 for unit rows: finite, and within the contract's tolerances."""
    options = {"temperature": 0.01, **({"distill_temperature": 0.015} if loss == "moco_pnr" else {})}
    args, options = make_inputs(loss, 19, 37, dtype, requires_grad=True, queue_size=23, device=DEVICE,
                                options=options)
    check_against_reference(loss, "triton", args, options)


def _op_inputs(row_count, key_sizes, dim, *, dtype=torch.float32, scale=1.0):
    """Unit rows (M, D) and key blocks; key block 0 is row set 0 (the SimCLR self-block)."""
    rows = [F.normalize(torch.randn(ROWS, dim, dtype=torch.float64, device=DEVICE), dim=1).to(dtype)
            for _ in range(row_count)]
    keys = [rows[0]] + [F.normalize(torch.randn(n, dim, dtype=torch.float64, device=DEVICE), dim=1).to(dtype)
                        for n in key_sizes]
    return rows, keys


def _reference_op(rows, keys, exclude, scales, grad_lse, rows_need_grad, keys_need_grad):
    """fp64 lse and the gradients of the rows/keys that need one (ops/infonce.py contract). Key
    blocks that alias a row set are differentiated as separate inputs, as the op sees them."""
    rows64 = [r.detach().double().requires_grad_() for r in rows]
    keys64 = [k.detach().double().requires_grad_() for k in keys]
    lse = reference.infonce_lse(rows64, keys64, exclude, scales)
    wanted = [t for t, need in zip(rows64 + keys64, list(rows_need_grad) + list(keys_need_grad)) if need]
    return lse, torch.autograd.grad(lse, wanted, grad_lse.double()) if wanted else []


def _check_op(rows, keys, exclude, scales, rows_need_grad, keys_need_grad, *, tol=TOLERANCES[torch.float32],
              **flags):
    lse = triton_infonce.infonce_forward(rows, keys, exclude, scales, **flags)
    grad_lse = torch.rand_like(lse)
    want_lse, want_grads = _reference_op(rows, keys, exclude, scales, grad_lse, rows_need_grad, keys_need_grad)
    assert lse.shape == (len(rows), rows[0].shape[0]) and lse.dtype == torch.float32
    assert_close_relative(lse, want_lse, tol[0], "lse")
    grads = triton_infonce.infonce_backward(grad_lse, lse, rows, keys, exclude, scales,
                                            rows_need_grad, keys_need_grad, **flags)
    assert len(grads) == len(want_grads)
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == rows[0].dtype
        assert_close_relative(g, w, tol[1], f"gradient {i}")


@pytest.mark.parametrize("dim", [WIDTH, 150], ids=["D=70", "D=150"])
def test_two_row_sets_two_key_blocks_span_tiles_and_d_chunks(dim):
    """SimCLR-PNR's shape (rows [Z, P], keys [Z, F]), different scales per row set. fp32 rows stay
    resident up to D=64; D=70 walks 3 logit chunks of 32 and writes 2 gradient slices of 64, D=150
    5 and 3."""
    rows, keys = _op_inputs(2, [KEYS], dim)
    _check_op(rows, keys, [True, True], [5.0, 3.0], [True, True], [True, False])


def test_more_row_sets_and_key_blocks_than_one_launch_serves():
    rows, keys = _op_inputs(3, [KEYS, 20], WIDTH)
    _check_op(rows, keys, [True, False, True], [5.0, 2.0, 3.0], [True, False, True], [True, True, False])


def test_row_gradients_two_row_sets_per_launch(monkeypatch):
    """DROW_ROW_SETS = 2, the alternative dRow grouping (see the module docstring)."""
    monkeypatch.setattr(triton_infonce, "DROW_ROW_SETS", 2)
    rows, keys = _op_inputs(2, [KEYS], WIDTH)
    _check_op(rows, keys, [True, True], [5.0, 3.0], [True, True], [True, False])


def test_empty_key_block():
    """A key block with no keys (e.g. an empty queue) adds nothing and gets an empty gradient."""
    rows, keys = _op_inputs(1, [0], 37)
    _check_op(rows, keys, [True, False], [5.0], [True], [False, True])


@pytest.mark.parametrize("dim", [WIDTH, 300], ids=["D=70", "D=300"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_op(dtype, dim):
    """16-bit rows stay resident up to D=256; D=300 walks 5 chunks of 64 and writes 2 slices."""
    rows, keys = _op_inputs(2, [KEYS], dim, dtype=dtype)
    _check_op(rows, keys, [True, False], [5.0, 5.0], [True, True], [True, True], tol=TOLERANCES[dtype])


@pytest.mark.parametrize("n", [4096, 8192])
def test_fp16_key_gradients_keep_their_precision_at_large_batches(n):
    """The key gradient sums weights ``w = g scale p`` that are about ``1 / (2 N^2 tau)`` in
    SimCLR-PNR at batch N (g = 1/N, p ~ 1/(2N)): fp16 subnormals at N >= 4096 unless the kernel
    rescales them. Simulated at interpreter size: 45 keys (p ~ 1/45), grad_lse chosen so that w
    has the size of batch N's, and rows of norm 256 with scale 1/(256 tau), so that the key
    gradient itself (a sum over only 37 rows) is a normal fp16 number as at batch N. The rounding
    of the inputs is shared with the reference, so what remains is fp16's 2**-11 on the weights
    and the output: well below the 5e-2 contract, and far below the 4e-2 (N = 4096) and 2e-1
    (N = 8192) that rounding w itself to fp16 gave."""
    tau, norm = 0.2, 256.0
    rows = [(F.normalize(torch.randn(ROWS, 16, dtype=torch.float64, device=DEVICE), dim=1) * norm).half()]
    keys = [F.normalize(torch.randn(KEYS, 16, dtype=torch.float64, device=DEVICE), dim=1).half()]
    scales = [1 / (tau * norm)]
    grad_lse = torch.rand(1, ROWS, device=DEVICE).add(0.5) * (KEYS * norm / (2 * n * n))
    lse = triton_infonce.infonce_forward(rows, keys, [False], scales)
    (d_keys,) = triton_infonce.infonce_backward(grad_lse, lse, rows, keys, [False], scales, [False], [True])
    _, (want,) = _reference_op(rows, keys, [False], scales, grad_lse, [False], [True])
    assert want.abs().max() > 2**-14  # the gradient is a normal fp16 number: only w is at risk
    assert_close_relative(d_keys, want, 1e-2, "fp16 key gradient")


SM_80, SM_86, SM_90 = 166912, 101376, 232448  # opt-in shared memory per block, bytes


def test_d_blocking_follows_the_shared_memory_of_the_device():
    """bf16/fp16 rows up to D = 256 stay resident where the widest configs fit (sm_80: 160 KiB of
    163; sm_90: 192 of 227; the interpreter); on sm_86/sm_89 (99 KiB) D in (128, 256] is walked
    in chunks and written in 128-wide slices instead; fp32 (64 wide, 81 KiB) stays resident."""
    resident = dict(SINGLE_CHUNK=True, BLOCK_D=256, BLOCK_DV=256)
    for limit, arch in ((SM_80, 80), (SM_90, 90), (None, None)):
        assert triton_infonce.d_blocking(200, 2, limit, arch) == resident
    assert triton_infonce.d_blocking(200, 2, SM_86, 86) == dict(SINGLE_CHUNK=False, BLOCK_D=64, BLOCK_DV=128)
    assert triton_infonce.d_blocking(128, 2, SM_86, 86) == dict(SINGLE_CHUNK=True, BLOCK_D=128, BLOCK_DV=128)
    assert triton_infonce.d_blocking(300, 2, SM_86, 86) == dict(SINGLE_CHUNK=False, BLOCK_D=64, BLOCK_DV=128)
    assert triton_infonce.d_blocking(60, 4, SM_86, 86) == dict(SINGLE_CHUNK=True, BLOCK_D=64, BLOCK_DV=64)
    # a Hopper-class GPU with a consumer's 99 KiB (sm_120): its pipelines need more, still halved
    assert triton_infonce.d_blocking(200, 2, SM_86, 120)["BLOCK_DV"] == 128


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_op_with_the_blocking_of_a_99_kib_device(monkeypatch, dtype):
    """D = 200 as an sm_86 launches it: 64-wide logit chunks, two 128-wide gradient slices."""
    monkeypatch.setattr(triton_infonce, "gpu_shared_memory", lambda device: (SM_86, 86))
    rows, keys = _op_inputs(2, [KEYS], 200, dtype=dtype)
    assert triton_infonce._common_flags(rows, keys, False)["BLOCK_DV"] == 128
    _check_op(rows, keys, [True, False], [5.0, 5.0], [True, True], [True, True], tol=TOLERANCES[dtype])


def test_strided_queue_keys_and_strided_rows():
    """Keys as a (K, D) view of a transposed (D, K) buffer (column stride K), rows as a column
    slice: no copies, same values."""
    buffer = F.normalize(torch.randn(2, WIDTH, KEYS, device=DEVICE), dim=1)
    queue = buffer.transpose(1, 2)[1]
    assert queue.stride() == (1, KEYS)
    wide = torch.randn(ROWS, 2 * WIDTH, device=DEVICE)
    rows = [wide[:, ::2], torch.randn(ROWS, WIDTH, device=DEVICE)]
    _check_op(rows, [queue, rows[1]], [False, True], [5.0, 4.0], [True, True], [True, True])


@pytest.mark.parametrize("dim", [37, WIDTH], ids=["resident", "chunked"])
def test_int64_offsets_give_the_same_results(dim):
    """The int64 offset path (taken for tensors past 2**31 elements) forced on small inputs."""
    rows, keys = _op_inputs(2, [KEYS], dim)
    _check_op(rows, keys, [True, False], [5.0, 2.0], [True, True], [True, True], force_int64=True)


def test_needs_int64_from_the_largest_offset():
    def meta(shape, stride):
        return torch.empty_strided(shape, stride, device="meta")

    assert not triton_infonce.needs_int64(meta((2**16, 2**15), (2**15, 1)))  # last offset 2**31 - 1
    assert triton_infonce.needs_int64(meta((2**16 + 1, 2**15), (2**15, 1)))
    assert triton_infonce.needs_int64(meta((2, 3), (1, 2**30)))  # a transposed queue's column stride
    assert not triton_infonce.needs_int64(meta((2**20, 2**20), (0, 0)))  # broadcast: one element


def test_key_splits_fill_the_device_only_when_rows_do_not(monkeypatch):
    monkeypatch.setattr(triton_infonce, "_programs_wanted", lambda device: 264)  # an H100: 2 x 132 SMs
    device = torch.device(DEVICE)
    assert triton_infonce.key_splits(256, [65536, 65536], device) == 66  # MoCo-PNR
    assert triton_infonce.key_splits(8192, [8192, 8192], device) == 2  # SimCLR-PNR
    assert triton_infonce.key_splits(16384, [16384], device) == 1
    assert triton_infonce.key_splits(10, [10, 0], device) == 1  # never more splits than key tiles


def test_tiny_temperature_stays_finite():
    rows, keys = _op_inputs(2, [KEYS], WIDTH)
    _check_op(rows, keys, [True, True], [100.0, 100.0], [True, True], [True, True])


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# numpy (the interpreter) warns about the NaNs these tests make on purpose
NON_FINITE = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                        "ignore:All-NaN slice encountered:RuntimeWarning")
NAN_PLACES = ["row set 0", "row set 1", "self key block", "queue key", "whole queue"]


def _with_nan(place, dtype):
    """Two row sets against [row set 0 (diagonal excluded), a queue], one value made NaN."""
    rows = [torch.randn(5, 8, device=DEVICE).to(dtype) for _ in range(2)]
    queue = torch.randn(8, 7, device=DEVICE).to(dtype).T  # a strided queue, as MoCo's
    keys = [rows[0], queue]
    nan = float("nan")
    if place == "row set 0":  # also a key of block 0: every other row of both sets sees it
        rows[0][2, 3] = nan
    elif place == "row set 1":
        rows[1][4, 0] = nan
    elif place == "self key block":  # key 1 of block 0 is row 1 of set 0
        keys[0][1, 7] = nan
    elif place == "queue key":
        queue[6, 2] = nan
    else:
        queue.fill_(nan)
    return rows, keys


@NON_FINITE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("place", NAN_PLACES)
def test_nan_anywhere_gives_nan_where_the_reference_does(place, dtype):
    """A NaN in any row set, key block or queue makes exactly the LSEs NaN that the reference
    makes NaN (Triton's max is max-num: it drops NaN operands, so the kernels must carry the NaN
    past it), and every gradient the reference poisons gets non-finite values too."""
    rows, keys = _with_nan(place, dtype)
    exclude, scales = [True, False], [5.0, 3.0]
    lse = triton_infonce.infonce_forward(rows, keys, exclude, scales)
    want, want_grads = _reference_op(rows, keys, exclude, scales, torch.ones(2, 5, dtype=torch.float64),
                                     [True, True], [True, True])
    assert torch.isnan(want).any()
    assert torch.equal(torch.isnan(lse).cpu(), torch.isnan(want).cpu()), (lse, want)
    grads = triton_infonce.infonce_backward(torch.ones_like(lse), lse, rows, keys, exclude, scales,
                                            [True, True], [True, True])
    for g, w in zip(grads, want_grads):
        assert torch.isfinite(g).all() == torch.isfinite(w).all()


@NON_FINITE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [float("inf"), float("-inf")])
def test_an_infinite_queue_value_gives_non_finite_lse(value, dtype):
    """Every row meets the infinite key with a logit of +-inf (or NaN): no row may come out finite.
    (The reference drops a -inf logit from its sum; docs/losses.md: non-finite embeddings give a
    non-finite loss, never a silent number.)"""
    rows = [torch.rand(5, 8, device=DEVICE).add(0.1).to(dtype)]  # positive: the logit is +-inf
    queue = torch.randn(7, 8, device=DEVICE).to(dtype)
    queue[3, 5] = value
    lse = triton_infonce.infonce_forward(rows, [queue], [False], [5.0])
    assert not torch.isfinite(lse).any(), lse


@NON_FINITE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_in_grad_lse_is_not_dropped(dtype):
    rows, keys = _op_inputs(2, [KEYS], 16, dtype=dtype)
    exclude, scales = [True, False], [5.0, 3.0]
    lse = triton_infonce.infonce_forward(rows, keys, exclude, scales)
    grad_lse = torch.rand_like(lse)
    grad_lse[1, 4] = float("nan")
    d_row0, d_row1, d_key0, d_key1 = triton_infonce.infonce_backward(grad_lse, lse, rows, keys, exclude, scales,
                                                                     [True, True], [True, True])
    assert torch.isfinite(d_row0).all() and torch.isnan(d_row1[4]).all()
    assert torch.isfinite(d_row1[torch.arange(ROWS) != 4]).all()
    assert torch.isnan(d_key0[torch.arange(ROWS) != 4]).all()  # row 4 excludes key 4 of block 0
    assert torch.isnan(d_key1).all()


@NON_FINITE
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["one queue value", "whole queue"])
def test_moco_pnr_with_nan_in_a_queue_is_nan(where, dtype):
    """The MoCo-PNR loss with a NaN in its previous-model queue: NaN, not a number (an all-NaN
    queue gave 0.0)."""
    args, options = make_inputs("moco_pnr", 3, 8, dtype, queue_size=5, device=DEVICE)
    prev_queue = args[-1]
    if where == "whole queue":
        prev_queue.fill_(float("nan"))
    else:
        prev_queue[1, 2, 4] = float("nan")
    loss = LOSSES["moco_pnr"].function(*args, **options, backend="triton")
    assert torch.isnan(loss)


def test_row_with_every_key_excluded():
    """One row against itself with the diagonal excluded: LSE -inf, as torch.logsumexp gives, and
    zero gradient (p = 0 for every key) rather than NaN."""
    x = torch.randn(1, 5, device=DEVICE)
    lse = triton_infonce.infonce_forward([x], [x], [True], [5.0])
    assert lse.tolist() == [[float("-inf")]]
    (dx_row, dx_key) = triton_infonce.infonce_backward(torch.ones_like(lse), lse, [x], [x], [True], [5.0],
                                                       [True], [True])
    assert torch.equal(dx_row, torch.zeros_like(x)) and torch.equal(dx_key, torch.zeros_like(x))


class _LaunchRecorder:
    """Stands in for an autotuned kernel and records its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


def test_frozen_inputs_get_no_gradient_launches(monkeypatch):
    drow = _LaunchRecorder(triton_infonce._infonce_drow_kernel)
    dkey = _LaunchRecorder(triton_infonce._infonce_dkey_kernel)
    monkeypatch.setattr(triton_infonce, "_infonce_drow_kernel", drow)
    monkeypatch.setattr(triton_infonce, "_infonce_dkey_kernel", dkey)
    rows, keys = _op_inputs(2, [KEYS], WIDTH)
    _check_op(rows, keys, [True, True], [5.0, 5.0], [False, False], [False, False])
    assert (drow.launches, dkey.launches) == (0, 0)
    _check_op(rows, keys, [True, True], [5.0, 5.0], [False, True], [True, False])
    assert (drow.launches, dkey.launches) == (1, 1)  # only row set 1 and key block 0


@pytest.fixture
def matmul_precision():
    """Restores torch's fp32 matmul precision (new API; the legacy setter also writes it) after
    the test."""
    saved = (torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    yield
    torch.backends.fp32_precision, torch.backends.cuda.matmul.fp32_precision = saved


def test_launch_flags_follow_dtype_and_matmul_precision(matmul_precision):
    rows, keys = _op_inputs(1, [], WIDTH)
    torch.set_float32_matmul_precision("highest")
    assert triton_infonce._common_flags(rows, keys, False)["PRECISION"] == "ieee"
    torch.set_float32_matmul_precision("high")
    assert triton_infonce._common_flags(rows, keys, False)["PRECISION"] == "tf32"
    bf16 = [r.to(torch.bfloat16) for r in rows]
    assert triton_infonce._common_flags(bf16, bf16, False)["UPCAST"] == interpreting()
    with pytest.raises(TypeError, match="one dtype"):
        triton_infonce._common_flags(rows, bf16, False)


@pytest.mark.parametrize("setting,expected", [
    (("cuda.matmul", "tf32"), "tf32"), (("cuda.matmul", "ieee"), "ieee"),
    (("global", "tf32"), "tf32"), (("global", "ieee"), "ieee"),
    (("legacy", "medium"), "tf32"), (("legacy", "highest"), "ieee"),
])
def test_fp32_precision_from_the_new_and_the_legacy_api(matmul_precision, setting, expected):
    """torch's recommended API (``torch.backends.cuda.matmul.fp32_precision``, or the global
    ``torch.backends.fp32_precision`` it inherits) makes ``torch.get_float32_matmul_precision()``
    raise; the flags must follow either API."""
    api, value = setting
    if api == "legacy":
        torch.set_float32_matmul_precision(value)
    elif api == "global":
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.fp32_precision = value
    else:
        torch.backends.cuda.matmul.fp32_precision = value
    rows, keys = _op_inputs(1, [], WIDTH)
    assert triton_infonce._common_flags(rows, keys, False)["PRECISION"] == expected


def test_float32_loss_runs_under_the_new_tf32_api(matmul_precision):
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    z1, z2 = (torch.randn(5, 8, device=DEVICE) for _ in range(2))
    assert torch.isfinite(pnr_kernels.nt_xent_loss(z1, z2, backend="triton"))


def test_cuda_needs_a_usable_gpu(monkeypatch):
    """CPU-only torch (or no GPU) cannot run the kernels on CUDA tensors, nor can the interpreter,
    which runs CPU tensors only."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "torch.cuda.is_available()" in triton_backend.unavailable_reason(cuda, torch.float32)
    assert "triton" not in pnr_kernels.available_backends("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason(cuda, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "TRITON_INTERPRET=1" in triton_backend.unavailable_reason(cuda, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert triton_backend.unavailable_reason(cuda, torch.float32) is None
    assert "triton" in pnr_kernels.available_backends("cuda")


def test_backend_refuses_float64():
    z = torch.randn(3, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises(pnr_kernels.BackendUnavailableError, match="float64"):
        pnr_kernels.nt_xent_loss(z, z, backend="triton")
