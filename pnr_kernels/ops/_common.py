"""Helpers shared by the op families' glue: one way to define a fused op (a pair of custom ops
with autograd and fake kernels, plus an eager fast path over the same functions) and the
first-order-only rule of the fused backends."""
from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple

import torch


class HigherOrderGradientError(RuntimeError):
    """Raised when a fused backend's backward is differentiated (double backward)."""


def _refusal(backend: str) -> HigherOrderGradientError:
    return HigherOrderGradientError(
        f"the fused {backend!r} backend computes first-order gradients only; differentiating its "
        "backward (double backward, e.g. a gradient penalty through the loss) needs "
        "backend='reference'")


def first_order_only(backward_op, backend: str) -> None:
    """Make differentiating ``backward_op`` (a custom op computing a fused backward: a
    ``torch.library.custom_op``, or the OpOverload of one defined in C++) raise a clear error:
    the fused backends give first-order gradients only."""
    def refuse(ctx, *grads):
        raise _refusal(backend)

    def setup_context(ctx, inputs, output):
        pass

    if isinstance(backward_op, torch._ops.OpOverload):
        torch.library.register_autograd(backward_op, refuse, setup_context=setup_context)
    else:
        backward_op.register_autograd(refuse, setup_context=setup_context)


class _FirstOrderOnly(torch.autograd.Function):
    """The eager twin of :func:`first_order_only`: copies of the gradients an eager backward
    computed under ``create_graph=True``, attached to the backward's inputs that require a
    gradient (so that a second differentiation reaches this node) and refusing it."""

    @staticmethod
    def forward(ctx, backend, count, *tensors):
        ctx.backend = backend
        return tuple(t.clone() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise _refusal(ctx.backend)


def _first_order(backward: Callable, backend: str) -> Callable:
    """``backward`` whose results, when autograd records (``create_graph=True``), refuse to be
    differentiated."""
    def call(*args):
        result = backward(*args)
        if not torch.is_grad_enabled():
            return result
        inputs = [t for t in _flatten(args)[1] if t.requires_grad]
        if not inputs:
            return result
        tensors = list(result) if isinstance(result, (list, tuple)) else [result]
        wrapped = list(_FirstOrderOnly.apply(backend, len(tensors), *tensors, *inputs))
        return wrapped if isinstance(result, (list, tuple)) else wrapped[0]
    return call


# ---------------------------------------------------------------------------------------------
# The eager path. Calling a torch.library custom op from Python costs about 0.2 ms per forward +
# backward on a CPU (argument flattening, redispatch through the autograd and autocast keys, the
# backward custom op): as much as the kernels themselves at small batches. Outside tracing, an
# autograd.Function runs the same forward, setup_context and gradient formula and calls the
# backward kernels directly. autograd tracks top-level tensors only: an op whose arguments are
# tensors and constants passes them as they are (its gradient formula's results, one per
# argument, are the backward's); an op with a list of tensors has its arguments flattened, a
# tensor one slot, a list of tensors one slot per tensor, anything else a constant. Each Python
# call on this path costs microseconds, more on a CPU whose caches the rest of a training step
# has evicted, so the plain case does nothing per call beyond the autograd.Function itself; and an
# op whose backend records its own (C++) autograd node, an ``autograd_op``, takes no Python
# autograd.Function at all on the device types it names.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Call:
    """How the eager path calls an op: its functions, and how its arguments were flattened
    (``layout`` None: not flattened)."""
    forward: Callable
    setup_context: Callable
    backward: Callable  # (ctx, *output grads) -> one gradient (or list of them) per argument
    layout: Optional[Tuple[Any, ...]]  # per argument: "tensor", a list length, or ("constant", value)

    def unflatten(self, flat):
        if self.layout is None:
            return flat
        args, i = [], 0
        for kind in self.layout:
            if kind == "tensor":
                args.append(flat[i])
                i += 1
            elif isinstance(kind, int):
                args.append(list(flat[i:i + kind]))
                i += kind
            else:
                args.append(kind[1])
        return args

    def flatten_grads(self, grads):
        if self.layout is None:
            return grads
        flat = []
        for kind, grad in zip(self.layout, grads):
            if kind == "tensor":
                flat.append(grad)
            elif isinstance(kind, int):
                flat.extend(grad if grad is not None else [None] * kind)
        return flat


def _flatten(args):
    layout, flat = [], []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            layout.append("tensor")
            flat.append(arg)
        elif isinstance(arg, (list, tuple)) and arg and all(isinstance(a, torch.Tensor) for a in arg):
            layout.append(len(arg))
            flat.extend(arg)
        else:
            layout.append(("constant", arg))
    return tuple(layout), flat


class _Eager(torch.autograd.Function):
    # forward takes ctx (no separate setup_context): Function.apply then skips binding its
    # arguments with inspect.signature, some 30 us a call.
    @staticmethod
    def forward(ctx, call: _Call, *flat):
        args = call.unflatten(flat)
        output = call.forward(*args)
        ctx.call = call
        call.setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, *grads):
        return (None, *ctx.call.flatten_grads(ctx.call.backward(ctx, *grads)))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _must_trace(tensors) -> bool:
    """Whether a call has to go through the custom op: under torch.compile / export, under a
    dispatch mode (fake tensors, ...) or with tensor subclasses, which only the registered op's
    fake kernel and dispatch handle."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or any(type(t) not in _PLAIN for t in tensors))


def _tensor_positions(forward: Callable) -> Optional[Tuple[int, ...]]:
    """The positions of ``forward``'s tensor arguments when every other argument is a constant
    (no list or optional of tensors), else None."""
    hints = typing.get_type_hints(forward)
    hints.pop("return", None)
    if any(hint is not torch.Tensor and "Tensor" in str(hint) for hint in hints.values()):
        return None
    return tuple(i for i, hint in enumerate(hints.values()) if hint is torch.Tensor)


def define_fused_op(name: str, backend: str, forward: Callable, forward_fake: Callable, backward: Callable,
                    backward_fake: Callable, setup_context: Callable, formula: Callable,
                    eager_backward: Optional[Callable] = None, autograd_op: Optional[Callable] = None,
                    autograd_device_types: Tuple[str, ...] = ()) -> Callable:
    """Register ``forward`` (type-annotated) as the custom op ``name`` and ``backward`` as
    ``name + "_backward"``, with their fake kernels, the autograd formula
    ``formula(ctx, backward, *output grads)`` (``backward`` being whichever backward to call) and
    the first-order-only rule. Return the op to call: the custom op under tracing, the eager
    autograd.Function over the same functions otherwise (results identical, bitwise).
    ``eager_backward`` (default ``backward``), the eager path's backward, may return one of its
    input tensors itself, which a custom op may not (it returns a copy). ``autograd_op``
    (optional; for an op whose arguments are tensors and constants) takes ``forward``'s arguments
    and returns its results, recording its own autograd node with this eager path's results
    (bitwise) and first-order-only rule; the eager path calls it instead of the autograd.Function
    when the first tensor is on one of ``autograd_device_types``."""
    positions = _tensor_positions(forward)
    if autograd_op is not None and positions is None:
        raise TypeError(f"{name}: an autograd_op needs an op whose arguments are tensors and constants")
    forward_op = torch.library.custom_op(name, forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(name + "_backward", backward, mutates_args=())
    backward_op.register_fake(backward_fake)
    forward_op.register_autograd(lambda ctx, *grads: formula(ctx, backward_op, *grads), setup_context=setup_context)
    first_order_only(backward_op, backend)
    eager_backward = _first_order(eager_backward or backward, backend)

    def eager_formula(ctx, *grads):
        return formula(ctx, eager_backward, *grads)

    if positions is not None:
        plain_call = _Call(forward, setup_context, eager_formula, None)
        own_autograd = autograd_device_types if autograd_op is not None else ()

        def op(*args):
            tensors = [args[i] for i in positions]
            if _must_trace(tensors):
                return forward_op(*args)
            if tensors[0].device.type in own_autograd:
                return autograd_op(*args)
            return _Eager.apply(plain_call, *args)
    else:
        def op(*args):
            layout, flat = _flatten(args)
            if _must_trace(flat):
                return forward_op(*args)
            return _Eager.apply(_Call(forward, setup_context, eager_formula, layout), *flat)

    op.custom_op = forward_op
    return op
