"""The public contract, checked on every backend usable on this machine's CPU (the reference,
Triton under TRITON_INTERPRET=1, the native CPU kernels once built): values and gradients against
the float64 reference, frozen inputs, non-finite and degenerate inputs, tiny temperatures,
strided queues. Backend-specific kernel tests live in test_<backend>_*.py."""
import math

import pytest
import torch

from pnr_kernels import backends
from pnr_kernels._validation import MIN_FLOAT16_TEMPERATURE, MIN_TEMPERATURE
from pnr_kernels.registry import LOSSES, QUEUE, REGULARIZER
from pnr_kernels.testing import (
    TOLERANCES,
    assert_close_relative,
    check_against_reference,
    make_inputs,
)
from pnr_kernels.triton import interpreting

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


def _temperature_floor(dtype):
    return MIN_FLOAT16_TEMPERATURE if dtype == torch.float16 else MIN_TEMPERATURE


@pytest.mark.parametrize("backend,loss", [c for c in CASES if LOSSES[c[1]].kind != REGULARIZER])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_smallest_accepted_temperature_gives_the_float64_loss(backend, loss, dtype):
    """At the smallest temperature the check accepts (2**-64; 2**-12 for float16, whose losses
    are float16) every loss is finite and matches the float64 reference on the same inputs:
    relatively on random inputs, and, where every view is the same batch (z2 = z1: the positive
    is the largest logit and the loss cancels to the logits' rounding), within the tolerance
    times the logits' scale 1/temperature. The next smaller temperature is refused by name."""
    spec = LOSSES[loss]
    if backends.unavailable_reason(backend, loss, CPU, dtype) is not None:
        pytest.skip(backends.unavailable_reason(backend, loss, CPU, dtype))
    floor = _temperature_floor(dtype)
    names = [name for name in spec.options if name.endswith("temperature")]
    tolerance = TOLERANCES[dtype][0]
    args, kwargs = make_inputs(loss, 4, 16, dtype, queue_size=6, options={name: floor for name in names})
    same = [a if name in spec.queues else args[0] for name, a in zip(spec.inputs, args)]
    for inputs, scale in ((args, None), (same, 1 / floor)):
        got = spec.function(*inputs, **kwargs, backend=backend)
        want = spec.function(*[a.double() for a in inputs], **kwargs, backend="reference")
        assert torch.isfinite(got), f"{loss} on {backend} ({dtype}) at temperature {floor}: {got}"
        if scale is None:
            assert_close_relative(got, want, tolerance, f"{loss} on {backend} ({dtype}) at temperature {floor}")
        else:
            error = abs(got.double() - want).item()
            assert error <= tolerance * scale, f"{loss} on {backend} ({dtype}), z2 = z1: |{got} - {want}| > " \
                                               f"{tolerance} / temperature"
    for name in names:
        with pytest.raises(ValueError, match=name):
            spec.function(*args, **{**kwargs, name: math.nextafter(floor, 0)}, backend=backend)


@pytest.mark.parametrize("backend,loss", [c for c in CASES if LOSSES[c[1]].kind == QUEUE])
def test_moco_queue_strides_do_not_matter(backend, loss):
    args, kwargs = make_inputs(loss, 3, 8, torch.float32, queue_size=6)
    queues = [i for i, name in enumerate(LOSSES[loss].inputs) if name in LOSSES[loss].queues]
    assert all(args[i].stride(-1) != 1 for i in queues)  # transposed (2, D, K) buffers
    contiguous = [a.contiguous() if i in queues else a for i, a in enumerate(args)]
    torch.testing.assert_close(LOSSES[loss].function(*args, **kwargs, backend=backend),
                               LOSSES[loss].function(*contiguous, **kwargs, backend=backend))


# ------------------------------------------------------------------------------------------
# Hardening: every input position, huge magnitudes, autocast, double backward, first use from
# several threads
# ------------------------------------------------------------------------------------------

def _dtypes(backend):
    """The dtypes to sweep on ``backend`` on the CPU (float64 where it computes in float64)."""
    low = [torch.float32, torch.bfloat16, torch.float16]
    return low if backend == "triton" else [torch.float64] + low


@pytest.mark.parametrize("backend,loss", CASES)
def test_nan_or_inf_in_any_input_gives_non_finite_loss(backend, loss):
    """A NaN or Inf anywhere (every row set, every key block, each queue, frozen inputs too)
    must reach the loss: max-num semantics or a clamp can silently drop it."""
    spec = LOSSES[loss]
    for dtype in _dtypes(backend):
        for position, name in enumerate(spec.inputs):
            for bad in (float("nan"), float("inf")):
                args, kwargs = make_inputs(loss, 3, 8, dtype, queue_size=6)
                poisoned = args[position].clone()
                poisoned[(1, 2, 5) if poisoned.dim() == 3 else (2, 5)] = bad
                args[position] = poisoned
                out = spec.function(*args, **kwargs, backend=backend)
                assert not torch.isfinite(out), f"{bad} in {name} ({dtype}) gave a finite {loss}: {out}"


@pytest.mark.parametrize("backend,loss", [c for c in CASES if c[1] != "vicreg_pnr"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_huge_finite_inputs_give_the_loss_of_the_same_values(backend, loss, magnitude):
    """float32 rows near 1e20 and beyond overflow a naive norm (and Barlow's variance); every
    loss but VICReg-PNR (whose value scales with the squared magnitude and overflows float32
    itself) must give the float64 reference's value and gradients on the same inputs."""
    spec = LOSSES[loss]
    args, kwargs = make_inputs(loss, 4, 16, torch.float32, queue_size=6)
    huge = [a if name in spec.queues else (a * magnitude).requires_grad_(name in spec.trainable)
            for name, a in zip(spec.inputs, args)]
    check_against_reference(loss, backend, huge, kwargs)


def _magnitudes(dtype):
    """The sweep's largest input magnitudes: near the smallest normal number, 1, 1e30 where the
    dtype holds it, a quarter of the largest finite value and the largest itself."""
    info = torch.finfo(dtype)
    return [info.tiny * 2 ** 10, 1.0] + ([1e30] if info.max > 1e30 else []) + [info.max / 4, info.max]


@pytest.mark.parametrize("backend,loss", CASES)
def test_magnitude_sweep_up_to_the_dtype_max(backend, loss):
    """Every input but the queues (which hold unit rows), most of its entries near +-1, scaled
    so that its largest entry is each of ``_magnitudes(dtype)``, in float32, bfloat16 and float16.
    At every magnitude the loss is finite and matches the float64 reference on the same values;
    above 1 (1e30, max/4, max) every loss but VICReg-PNR is also the unscaled loss (scale
    invariance; at 1 and below the eps of the norms and of Barlow's variance count, as in
    torch.nn.functional).
    VICReg-PNR's value scales with the squared magnitude: it is checked where that value fits
    the dtype (its normal range)."""
    spec = LOSSES[loss]
    failures = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        if backends.unavailable_reason(backend, loss, CPU, dtype) is not None:
            continue
        tolerance = TOLERANCES[dtype][0]
        base, kwargs = make_inputs(loss, 4, 8, torch.float64, queue_size=6)
        # most entries near +-1, so that at the largest magnitudes whole columns are near the
        # dtype's max (their sums, squares and differences overflow a naive formula)
        base = [a if name in spec.queues else torch.tanh(2 * a) for name, a in zip(spec.inputs, base)]
        unscaled = spec.function(*base, **kwargs, backend="reference")
        for magnitude in _magnitudes(dtype):
            scaled = [a.to(dtype) if name in spec.queues else (a * (magnitude / a.abs().max())).to(dtype)
                      for name, a in zip(spec.inputs, base)]
            got = spec.function(*scaled, **kwargs, backend=backend)
            want = spec.function(*[a.double() for a in scaled], **kwargs, backend="reference")
            what = f"{dtype} at {magnitude:.3g}"
            if loss == "vicreg_pnr" and not torch.finfo(dtype).tiny <= abs(want.item()) <= torch.finfo(dtype).max:
                continue
            try:
                assert_close_relative(got, want, tolerance, what)
                if loss != "vicreg_pnr" and magnitude > 1:
                    assert_close_relative(got, unscaled, tolerance, f"{what} against the unscaled loss")
            except AssertionError as exc:
                failures.append(str(exc))
    assert not failures, f"{loss} on {backend}:\n" + "\n".join(failures)


@pytest.mark.parametrize("backend,loss", CASES)
def test_autocast_does_not_lower_a_loss(backend, loss):
    """Losses follow their inputs' precision whatever the autocast state: the forward under
    autocast (and, on the fused backends, the backward too) gives exactly the float32 result.
    The reference's backward is PyTorch's autograd, which on the CPU runs under whatever autocast
    is active when .backward() is called: call it outside the autocast region (README)."""
    spec = LOSSES[loss]
    args, kwargs = make_inputs(loss, 5, 12, torch.float32, requires_grad=True, queue_size=7)
    trainable = [a for a in args if a.requires_grad]
    plain = spec.function(*args, **kwargs, backend=backend)
    plain_grads = torch.autograd.grad(plain, trainable)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = spec.function(*args, **kwargs, backend=backend)
        if backend != "reference":
            inside_grads = torch.autograd.grad(inside, trainable)
    if backend == "reference":
        inside_grads = torch.autograd.grad(inside, trainable)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)
    for g, want in zip(inside_grads, plain_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend,loss", [c for c in CASES if c[0] != "reference"])
def test_fused_backends_refuse_double_backward_clearly(backend, loss):
    spec = LOSSES[loss]
    args, kwargs = make_inputs(loss, 3, 8, torch.float32, requires_grad=True, queue_size=6)
    out = spec.function(*args, **kwargs, backend=backend)
    (grad,) = torch.autograd.grad(out, [args[0]], create_graph=True)
    with pytest.raises(RuntimeError, match="first-order gradients only.*backend='reference'"):
        torch.autograd.grad(grad.square().sum(), [args[0]])


def test_reference_supports_double_backward():
    args, kwargs = make_inputs("simclr_pnr", 3, 4, torch.float64, requires_grad=True)
    out = LOSSES["simclr_pnr"].function(*args, **kwargs, backend="reference")
    (grad,) = torch.autograd.grad(out, [args[0]], create_graph=True)
    (second,) = torch.autograd.grad(grad.square().sum(), [args[0]])
    assert torch.isfinite(second).all() and second.abs().sum() > 0


FIRST_USE = """
import sys, threading, torch
import pnr_kernels
from pnr_kernels.registry import LOSSES, make_inputs

backend, errors = sys.argv[1], []

def first_call(loss):
    try:
        args, kwargs = make_inputs(loss, 3, 8, torch.float32, requires_grad=True, queue_size=6)
        LOSSES[loss].function(*args, **kwargs, backend=backend).backward()
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        errors.append(f"{loss}: {exc!r}")

threads = [threading.Thread(target=first_call, args=(loss,)) for loss in sorted(LOSSES) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("\\n".join(errors) or "ok")
"""


# Triton's interpreter patches module-level state per launch and is not thread-safe, so Triton
# takes part only when its kernels are compiled (on a GPU).
THREADED = [b for b in backends.BACKENDS if b != "reference" and not (b == "triton" and interpreting())
            and backends.unavailable_reason(b, None, CPU, torch.float32) is None]


@pytest.mark.parametrize("backend", THREADED)
def test_first_use_from_several_threads(backend):
    """The first calls of a process racing from 16 threads: the extension load and the custom-op
    registration happen once, the others wait (this failed 2 runs in 3 with 4 threads)."""
    import os
    import subprocess
    import sys

    for _ in range(2):
        run = subprocess.run([sys.executable, "-c", FIRST_USE, backend], capture_output=True, text=True,
                             env=dict(os.environ), timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.strip().splitlines()[-1] == "ok", run.stdout[-3000:]
