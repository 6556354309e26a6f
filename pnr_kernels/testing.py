"""One toolbox for checking a backend against the float64 reference, shared by the tests, the
benchmark runner and the trainer's ``--verify-backend``.

- :data:`TOLERANCES`: the precision contract of docs/losses.md ("Precision"), by input dtype:
  (loss, gradients), relative.
- :func:`relative_error` / :func:`assert_close_relative`: the one error metric,
  ``||got - want|| / ||want||`` in float64, and an assertion whose message shows where the
  mismatch is (the element with the largest difference, both values there).
- :func:`check_against_reference`: a loss and every input gradient on one backend against the
  reference on the same values in float64.
- :func:`make_inputs`: random inputs of any registered loss (``pnr_kernels.registry``).
- :func:`restride`: the same values in another memory layout (transposed, sliced, expanded).
- :func:`free_port`: a free TCP port on the loopback (multi-process gloo tests and benchmarks).
- :func:`fused_losses`: the registered losses of one op family composed over given ops (to test
  the glue with stand-in kernels).
- :func:`op_calls`: which ``pnr_kernels`` ops a function calls, and how often.
"""
from __future__ import annotations

import functools
import socket
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .registry import LOSSES, make_inputs

__all__ = ["TOLERANCES", "Comparison", "assert_close_relative", "check_against_reference", "free_port", "fused_losses",
           "make_inputs", "op_calls", "relative_error", "restride", "where_it_differs"]

# docs/losses.md "Precision": (loss, gradients) relative tolerances against the float64 reference.
# float64 is computed in float64 by every backend that accepts it, so it is held to near machine
# precision (the sums' order differs between backends).
TOLERANCES: Dict[torch.dtype, Tuple[float, float]] = {
    torch.float64: (1e-12, 1e-10),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (2e-2, 5e-2),
    torch.float16: (2e-2, 5e-2),
}


def relative_error(got: torch.Tensor, want: torch.Tensor, floor: float = 0.0) -> float:
    """``||got - want|| / max(||want||, floor)`` in float64; ``||got - want||`` where both are
    zero. ``floor`` is the size below which ``want`` counts as zero: an analytically zero
    gradient (say of a normalised width-1 input) is then compared absolutely against it instead
    of relatively against its rounding noise."""
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    difference = (got - want).norm().item()
    scale = max(want.norm().item(), floor)
    return difference / scale if scale > 0 else difference


def where_it_differs(got: torch.Tensor, want: torch.Tensor) -> str:
    """Where got and want differ most: the index, both values, and how many elements differ."""
    got = got.detach().to("cpu", torch.float64)
    want = want.detach().to("cpu", torch.float64)
    if got.shape != want.shape:
        return f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    if got.dim() == 0:
        return f"got {got.item():.9g}, want {want.item():.9g}"
    difference = (got - want).abs().nan_to_num(nan=float("inf"))
    index = tuple(int(i) for i in torch.unravel_index(difference.argmax(), difference.shape))
    far = int((difference > 1e-3 * want.abs().max()).sum())
    return (f"largest difference at {index}: got {got[index].item():.9g}, want {want[index].item():.9g} "
            f"({far} of {difference.numel()} elements differ by more than 1e-3 of the largest |want|)")


def assert_close_relative(got: torch.Tensor, want: torch.Tensor, tolerance: float, what: str,
                          floor: float = 0.0) -> None:
    """``relative_error(got, want, floor) <= tolerance`` and got finite, with a message saying
    where not."""
    if not torch.isfinite(got.detach()).all():
        bad = (~torch.isfinite(got.detach())).nonzero()[:3].tolist()
        raise AssertionError(f"{what}: non-finite values (first at {bad}); {where_it_differs(got, want)}")
    error = relative_error(got, want, floor)
    if not error <= tolerance:
        raise AssertionError(f"{what}: relative error {error:.3g} > {tolerance:g}; {where_it_differs(got, want)}")


@dataclass
class Comparison:
    """The relative errors of one backend's loss and input gradients against the reference."""
    loss: float
    gradients: Dict[str, float]
    tolerances: Tuple[float, float]

    @property
    def passed(self) -> bool:
        loss_tol, grad_tol = self.tolerances
        return self.loss <= loss_tol and all(e <= grad_tol for e in self.gradients.values())


def check_against_reference(loss: str, backend: str, args: Sequence[torch.Tensor], options: dict, *,
                            tolerances: Optional[Tuple[float, float]] = None, gradient_floor: float = 0.0,
                            assert_close: bool = True) -> Comparison:
    """Compute ``loss`` with ``backend`` on ``args`` (the trainable ones requiring a gradient),
    and the reference on float64 copies (on the CPU); compare the loss and the gradient of every
    input that requires one. Raises AssertionError past the tolerances (``TOLERANCES`` of the
    inputs' dtype unless given) when ``assert_close``; returns the errors either way.
    ``gradient_floor``: see :func:`relative_error`."""
    spec = LOSSES[loss]
    dtype = args[0].dtype
    tolerances = tolerances or TOLERANCES[dtype]
    names = [name for name, a in zip(spec.inputs, args) if a.requires_grad]
    got = spec.function(*args, **options, backend=backend)
    assert got.dtype == dtype and got.shape == (), f"{loss} on {backend}: got a {got.dtype} {tuple(got.shape)}"
    exact = [a.detach().to("cpu", torch.float64).requires_grad_(a.requires_grad) for a in args]
    want = spec.function(*exact, **options, backend="reference")
    trainable = [a for a in args if a.requires_grad]
    got_grads: List[torch.Tensor] = list(torch.autograd.grad(got, trainable)) if trainable else []
    want_grads = list(torch.autograd.grad(want, [a for a in exact if a.requires_grad])) if trainable else []
    comparison = Comparison(relative_error(got, want),
                            {n: relative_error(g, w, gradient_floor) for n, g, w in zip(names, got_grads, want_grads)},
                            tolerances)
    if assert_close:
        what = f"{loss} on {backend} ({dtype})"
        assert_close_relative(got, want, tolerances[0], f"{what} loss")
        for name, g, w, a in zip(names, got_grads, want_grads, trainable):
            assert g.dtype == a.dtype and g.shape == a.shape, f"{what} grad {name}: {g.dtype} {tuple(g.shape)}"
            assert_close_relative(g, w, tolerances[1], f"{what} grad {name}", gradient_floor)
    return comparison


def restride(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``x`` (a matrix or a stack of matrices) in another memory layout:
    "contiguous", "transposed" (column-major), "sliced" (every other element of a wider
    buffer), or "expanded" (a stride-0 view: only for a tensor whose last-but-one dimension has
    size 1 or whose rows are all equal; other tensors raise ValueError)."""
    if layout == "contiguous":
        return x.contiguous()
    if layout == "transposed":
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]
    if layout == "expanded":
        first = x[..., :1, :]
        if not torch.equal(first.expand_as(x), x):
            raise ValueError("only a tensor whose rows are all equal can be expanded from one row")
        return first.expand_as(x)
    raise ValueError(f"layout must be contiguous, transposed, sliced or expanded, got {layout!r}")


def fused_losses(family: str, ops) -> Dict[str, functools.partial]:
    """Every registered loss of op ``family`` composed over ``ops`` (as a backend runs them)."""
    return {name: functools.partial(spec.fused, ops) for name, spec in LOSSES.items() if spec.family == family}


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def op_calls(fn) -> Dict[str, int]:
    """{``pnr_kernels::`` op name: calls} while ``fn()`` runs (forward and backward), from the
    profiler's view of the dispatcher: kernels called inside an op's own C++ code do not count."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    calls: Dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("pnr_kernels::"):
            calls[event.name] = calls.get(event.name, 0) + 1
    return calls
