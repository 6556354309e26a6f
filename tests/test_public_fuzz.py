"""Fuzz: random shapes (B = 1, D = 1, the tails of every tile size), dtypes, memory layouts
(transposed, sliced, expanded) and magnitudes, on every backend usable on the CPU, loss and every
input gradient against the float64 reference at the precision contract's tolerances. Fixed seed;
the Triton interpreter gets fewer, smaller cases (it runs ~2 ms per tile iteration).

Two well-understood exclusions: Barlow-PNR is drawn with B = 1 or B >= 8 (at B = 2 or 3 the
batch standardisation divides by the spread of two or three samples, an ill-conditioned problem
whose float32 rounding alone exceeds the tolerance, on the reference too), and gradients that are
analytically zero (a normalised width-1 input) are compared against a floor of 1e-3 / magnitude
instead of against their own rounding noise."""
import random

import pytest
import torch

from pnr_kernels import backends
from pnr_kernels.registry import LOSSES, make_inputs
from pnr_kernels.testing import check_against_reference, restride

CPU = torch.device("cpu")
BATCHES = (1, 2, 3, 5, 8, 15, 16, 17, 31, 33, 64, 65, 127)
WIDTHS = (1, 2, 3, 7, 16, 31, 33, 64, 65, 100, 129, 257)
LAYOUTS = ("contiguous", "transposed", "sliced")
# per backend: (cases, largest batch, largest width)
BUDGET = {"reference": (40, 127, 257), "native": (60, 127, 257), "triton": (16, 9, 40)}
BACKENDS = [b for b in backends.BACKENDS if backends.unavailable_reason(b, None, CPU, torch.float32) is None]


def _dtypes(backend):
    low = [torch.float32, torch.bfloat16, torch.float16]
    return low if backend == "triton" else [torch.float64] + low


def _draw(rng, backend):
    """One random case: (loss, args, options, description)."""
    _, max_batch, max_width = BUDGET[backend]
    loss = rng.choice(sorted(LOSSES))
    spec = LOSSES[loss]
    batch = rng.choice([b for b in BATCHES if b <= max_batch and (loss != "barlow_pnr" or b == 1 or b >= 8)])
    dim = rng.choice([d for d in WIDTHS if d <= max_width])
    dtype = rng.choice(_dtypes(backend))
    # VICReg-PNR's value scales with the squared magnitude and leaves float16's normal range
    # both ways (1e3: overflow, 1e-3: subnormal): it is drawn at magnitude 1; the other losses
    # are scale-invariant
    magnitudes = [1.0] if loss == "vicreg_pnr" else [1.0, 1e-3, 1e3]
    if dtype in (torch.float32, torch.float64) and loss != "vicreg_pnr":
        magnitudes.append(1e20)
    magnitude = rng.choice(magnitudes)
    args, options = make_inputs(loss, batch, dim, torch.float64, queue_size=rng.choice([1, 3, 17, 40]))
    expanded = rng.choice([None] + [n for n in spec.embeddings if batch > 1]) if rng.random() < 0.2 else None
    layouts = {}
    out = []
    for name, a in zip(spec.inputs, args):
        if name in spec.queues:
            x = a.to(dtype)
        else:
            x = a * magnitude
            if name == expanded:
                x = x[:1].expand_as(x).clone()
            x = x.to(dtype)
        layout = "expanded" if name == expanded else rng.choice(LAYOUTS)
        layouts[name] = layout
        x = restride(x, layout)
        out.append(x.requires_grad_(name in spec.trainable) if name not in spec.queues else x)
    described = f"{loss} B={batch} D={dim} {dtype} x{magnitude:g} " + \
        " ".join(f"{n}:{layout}" for n, layout in layouts.items() if layout != "contiguous")
    return loss, out, options, described, magnitude


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_inputs_match_the_float64_reference(backend):
    rng = random.Random(20261129)
    cases, _, _ = BUDGET[backend]
    failures = []
    for _ in range(cases):
        loss, args, options, described, magnitude = _draw(rng, backend)
        try:
            check_against_reference(loss, backend, args, options, gradient_floor=1e-3 / magnitude)
        except AssertionError as exc:
            failures.append(f"{described}: {exc}")
    assert not failures, f"{len(failures)} of {cases} cases failed:\n" + "\n".join(failures)
