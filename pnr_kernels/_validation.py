"""Input checks shared by every loss and every backend.

Each check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong shape,
size or value) with a message that names the offending argument and the expected form, so a user
sees what to change without reading the code.
"""
from __future__ import annotations

import math
import numbers
from typing import Mapping, Optional

import torch

FLOATING_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = ("reference", "triton", "native")  # see pnr_kernels.backends


def check_embeddings(tensors: Mapping[str, torch.Tensor], *, batch_size: Optional[int] = None) -> tuple:
    """Check that every named tensor is a floating (B, D) matrix with one shared shape, dtype and
    device. Returns ``(B, D)``.

    ``batch_size`` forces B when the caller already knows it (e.g. from another group of inputs).
    """
    first_name, first = None, None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (batch, dim), got {type(t).__name__}")
        if t.dtype not in FLOATING_DTYPES:
            raise TypeError(
                f"{name} must be a floating tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
            )
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); at least one row is needed")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has zero width (shape {tuple(t.shape)}); dim must be at least 1")
        if first is None:
            first_name, first = name, t
            if batch_size is not None and t.shape[0] != batch_size:
                raise ValueError(f"{name} has batch size {t.shape[0]}, expected {batch_size}")
            continue
        if t.shape[0] != first.shape[0]:
            raise ValueError(
                f"batch sizes differ: {first_name} has {first.shape[0]} rows, {name} has {t.shape[0]}"
            )
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"widths differ: {first_name} has dim {first.shape[1]}, {name} has {t.shape[1]}")
        check_same_dtype_device(first_name, first, name, t)
    return tuple(first.shape)


def check_same_dtype_device(ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"dtypes differ: {ref_name} is {ref.dtype}, {name} is {t.dtype}; cast them to one dtype")
    if t.device != ref.device:
        raise ValueError(f"devices differ: {ref_name} is on {ref.device}, {name} is on {t.device}")


def check_queue(name: str, queue: torch.Tensor, *, dim: int, like_name: str, like: torch.Tensor) -> int:
    """Check a (2, K, D) queue of past keys (any strides). Returns K."""
    if not isinstance(queue, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (2, K, dim), got {type(queue).__name__}")
    if queue.dim() != 3:
        raise ValueError(f"{name} must be 3-D (2 views, K entries, dim), got shape {tuple(queue.shape)}")
    if queue.shape[0] != 2:
        raise ValueError(f"{name} must hold 2 views in its first dimension, got shape {tuple(queue.shape)}")
    if queue.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(queue.shape)}); K must be at least 1")
    if queue.shape[2] != dim:
        raise ValueError(f"{name} has width {queue.shape[2]}, but the embeddings have dim {dim}")
    check_same_dtype_device(like_name, like, name, queue)
    return queue.shape[1]


# The smallest temperature (docs/losses.md, "Precision and the numerical contract"). The logits
# of unit rows are at most 1/temperature <= 2**64 in magnitude, so every kernel's base-2 scale
# (1/temperature * log2 e), every loss (a few logit differences per row) and its sums over any
# batch below 2**60 rows stay far inside float32's (and bfloat16's) 2**128. A floor just above
# 1/float32_max left no such room: the logits, log2 e times them, or the batch means overflowed.
MIN_TEMPERATURE = 2.0 ** -64


def check_positive_number(name: str, value) -> float:
    """A finite real number of at least ``MIN_TEMPERATURE`` (temperatures: the logits are scaled
    by ``1 / temperature``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    if value < MIN_TEMPERATURE:
        raise ValueError(f"{name} must be at least 2**-64 (about {MIN_TEMPERATURE:.3g}), so that the logits "
                         f"{name} divides stay finite in float32, got {value}")
    return value


# float16 losses are returned in float16 (at most 65504, about 2**16) and a loss is at most about
# 4/temperature plus logarithms of the batch: at 2**-12 and above it fits.
MIN_FLOAT16_TEMPERATURE = 2.0 ** -12


def check_temperatures_for_dtype(options: Mapping[str, float], dtype: torch.dtype) -> None:
    """The temperatures among a loss's checked ``options`` (the names ending in "temperature")
    against the floor of the inputs' ``dtype``: ``MIN_FLOAT16_TEMPERATURE`` for float16."""
    if dtype != torch.float16:
        return
    for name, value in options.items():
        if name.endswith("temperature") and value < MIN_FLOAT16_TEMPERATURE:
            raise ValueError(f"{name} must be at least 2**-12 (about {MIN_FLOAT16_TEMPERATURE:.3g}) for float16 "
                             f"inputs, whose loss is returned in float16 (at most 65504), got {value}")


def check_backend(backend) -> str:
    """'auto' or one of the backend names."""
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


def check_weight(name: str, value) -> float:
    """A finite real number (loss weights; zero and negative are allowed)."""
    if type(value) is float and math.isfinite(value):  # the common case, without the ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """A plain bool (``gather_distributed``): 0/1 or None are refused, not guessed."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_process_group(name: str, value):
    """None (the default group) or a torch.distributed ProcessGroup."""
    if value is None:
        return value
    import torch.distributed as dist

    group_type = getattr(dist, "ProcessGroup", None)
    if group_type is None or not isinstance(value, group_type):
        raise TypeError(f"{name} must be None (the default group) or a torch.distributed.ProcessGroup, "
                        f"got {type(value).__name__}")
    return value


def _flags(name: str, value, n: int, check, what: str) -> list:
    """One value per block: a single value for all, or a sequence of ``n`` values."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per {what} ({n}), got {len(value)}")
        return [check(f"{name}[{i}]", v) for i, v in enumerate(value)]
    return [check(name, value)] * n


# Every diagonal offset at or beyond this names a key that does not exist in any block (no tensor
# holds 2**62 rows, gathered over ranks or not), so it is clamped here, the one place every
# backend's offsets pass: "a key that does not exist leaves nothing out" then holds for offsets of
# any size (2**64, 10**30), and ``rank * M_k + offset + i`` still fits the int64 index arithmetic.
NO_KEY_OFFSET = 2 ** 62


def _check_offset(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 (row i drops key offset + i), got {value}")
    return min(int(value), NO_KEY_OFFSET)


def check_infonce_inputs(rows, keys, exclude_diagonal, temperature, diagonal_offsets):
    """The public multi-key InfoNCE op's inputs: ``rows`` a non-empty sequence of (M, D) tensors of
    one shape, ``keys`` a non-empty sequence of (M_k, D) tensors (M_k >= 1), all of one floating
    dtype and device; ``exclude_diagonal`` a bool or one per key block; ``temperature`` a positive
    number or one per row set; ``diagonal_offsets`` None or an int >= 0 per key block (or one for
    all), clamped to ``NO_KEY_OFFSET`` (an offset past every key drops nothing). Returns (rows, keys, exclude_diagonal, scales, diagonal_offsets) as lists."""
    for name, value in (("rows", rows), ("keys", keys)):
        if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)):
            raise TypeError(f"{name} must be a list of 2-D tensors, got {type(value).__name__}"
                            + (" (wrap a single tensor in a list)" if isinstance(value, torch.Tensor) else ""))
        if len(value) == 0:
            raise ValueError(f"{name} must hold at least one tensor, got an empty list")
    rows, keys = list(rows), list(keys)
    _, dim = check_embeddings({f"rows[{i}]": r for i, r in enumerate(rows)})
    for k, key in enumerate(keys):
        name = f"keys[{k}]"
        check_embeddings({name: key})
        if key.shape[1] != dim:
            raise ValueError(f"widths differ: rows[0] has dim {dim}, {name} has {key.shape[1]}")
        check_same_dtype_device("rows[0]", rows[0], name, key)
    exclude = _flags("exclude_diagonal", exclude_diagonal, len(keys), check_bool, "key block")
    temperatures = _flags("temperature", temperature, len(rows), check_positive_number, "row set")
    offsets = _flags("diagonal_offsets", 0 if diagonal_offsets is None else diagonal_offsets, len(keys),
                     _check_offset, "key block")
    return rows, keys, exclude, [1.0 / t for t in temperatures], offsets


# The data-parallel options (``gather_distributed``, ``process_group``) of the losses that take them
# and of the public op.
DATA_PARALLEL_CHECKS = {"gather_distributed": check_bool, "process_group": check_process_group}
