"""Helpers shared by the op families' glue."""
from __future__ import annotations


class HigherOrderGradientError(RuntimeError):
    """Raised when a fused backend's backward is differentiated (double backward)."""


def first_order_only(backward_op, backend: str) -> None:
    """Make differentiating ``backward_op`` (a custom op computing a fused backward) raise a
    clear error: the fused backends give first-order gradients only."""
    def refuse(ctx, *grads):
        raise HigherOrderGradientError(
            f"the fused {backend!r} backend computes first-order gradients only; differentiating its "
            "backward (double backward, e.g. a gradient penalty through the loss) needs "
            "backend='reference'")

    def setup_context(ctx, inputs, output):
        pass

    backward_op.register_autograd(refuse, setup_context=setup_context)
