"""Triton kernels of the non-contrastive PNR regularisers; the math and the op contract are in
pnr_kernels/ops/regularizers.py (its module docstring).

- ``_paired_forward_kernel`` / ``_paired_backward_kernel``: one program per tile of rows, one pass
  over D reading p1, p2, f1, f2 once; forward writes the four per-row terms (and the row norms for
  the cosine), backward writes the gradients of p1 and p2.
- Barlow (one process, Gram form): ``_barlow_stats_kernel`` (column mean, 1/std and the diagonal
  of C, one program per column block), ``_barlow_gram_kernel`` (one (i, j) tile of both B x B Gram
  matrices per program, standardising a and b as they are loaded; only the tile's sum of
  ``G_a * G_b`` and the tile of G_b are written), ``_barlow_grad_kernel`` (``g^ = ... + G_b a^``
  per column block, with the column sums the standardisation backward needs) and
  ``_barlow_finish_kernel`` (elementwise standardisation backward).
- Barlow over a given C (DDP, B > D): ``_correlation_loss_kernel`` (per-tile partial sums of the
  loss) and ``_correlation_grad_kernel`` (d C), one read of C each.

Inputs may have any strides. Accumulation is float32 for every input dtype; half-precision
operands of ``tl.dot`` are the standardised values rounded to the input dtype, float32 inputs use
IEEE float32 products. Under TRITON_INTERPRET=1 bf16 ``tl.dot`` is wrong (triton issue 11584), so
the interpreter runs those products in float32.
"""
from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from ..ops import regularizers
from ..reference import BARLOW_VARIANCE_EPS, COSINE_EPS
from ._interpret import interpreting
from .common import POW2_MIN, SHARED_MEMORY_LIMIT, compile_case, jit_function, launch, pow2_scale, strides

# One launch configuration per kernel, on the kernel (GPU and interpreter alike; not tuned yet):
# single-config autotune decorators, so that a launch takes its block sizes from the kernel.
# Blocks are not tied to the shapes: every kernel masks its edges.
PAIRED_CONFIG = triton.Config({"BLOCK_B": 4, "BLOCK_D": 512}, num_warps=4, num_stages=1)


@triton.jit
def _rescaled(x, scale, acc_square):
    """Rows of ``x`` (a tile, float32) divided by their power-of-two scale grown to cover this
    tile's magnitudes (``common.pow2_scale``: exact), the new scale, and the factor (a power of
    two <= 1) that moves sums accumulated at the old scale to the new one; ``acc_square`` (the
    running sum of squares) moved already. Rows up to float32's largest values keep their sums of
    squares finite this way; at unit scale the scale is 1 and nothing changes."""
    grown = tl.maximum(scale, pow2_scale(tl.max(tl.abs(x), 1)))
    factor = scale / grown
    x = x * (1.0 / grown)[:, None]
    return x, grown, factor, acc_square * (factor * factor) + tl.sum(x * x, 1)


@triton.jit
def _clamped(norm, eps):
    """max(norm, eps), keeping a NaN norm NaN (a max might drop it)."""
    return tl.where(norm < eps, eps, norm)


@triton.autotune([PAIRED_CONFIG], key=[])
@triton.jit
def _paired_forward_kernel(p1_ptr, p2_ptr, f1_ptr, f2_ptr, terms_ptr, norms_ptr, B, D,
                           p1_s0, p1_s1, p2_s0, p2_s1, f1_s0, f1_s1, f2_s0, f2_s1,
                           COSINE: tl.constexpr, EPS: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """terms (B, 4) and, for the cosine, norms (B, 4) of the op (ops/regularizers.py). The cosine
    works on each row divided by a running power-of-two scale (``_rescaled``), so that rows whose
    sums of squares overflow float32 (entries past ~1e19) still give their cosines; the norms it
    writes are the true ones, ``scale * |row / scale|``."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    t11 = tl.zeros((BLOCK_B,), tl.float32)  # (p1, f1)
    t22 = tl.zeros((BLOCK_B,), tl.float32)  # (p2, f2)
    t12 = tl.zeros((BLOCK_B,), tl.float32)  # (p1, f2)
    t21 = tl.zeros((BLOCK_B,), tl.float32)  # (p2, f1)
    sq_p1 = tl.zeros((BLOCK_B,), tl.float32)
    sq_p2 = tl.zeros((BLOCK_B,), tl.float32)
    sq_f1 = tl.zeros((BLOCK_B,), tl.float32)
    sq_f2 = tl.zeros((BLOCK_B,), tl.float32)
    u_p1 = tl.full((BLOCK_B,), POW2_MIN, tl.float32)  # the rows' scales so far
    u_p2 = u_p1
    u_f1 = u_p1
    u_f2 = u_p1
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x1 = tl.load(p1_ptr + rows[:, None] * p1_s0 + cols[None, :] * p1_s1, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2_ptr + rows[:, None] * p2_s0 + cols[None, :] * p2_s1, mask=mask, other=0.0).to(tl.float32)
        y1 = tl.load(f1_ptr + rows[:, None] * f1_s0 + cols[None, :] * f1_s1, mask=mask, other=0.0).to(tl.float32)
        y2 = tl.load(f2_ptr + rows[:, None] * f2_s0 + cols[None, :] * f2_s1, mask=mask, other=0.0).to(tl.float32)
        if COSINE:
            x1, u_p1, r_p1, sq_p1 = _rescaled(x1, u_p1, sq_p1)
            x2, u_p2, r_p2, sq_p2 = _rescaled(x2, u_p2, sq_p2)
            y1, u_f1, r_f1, sq_f1 = _rescaled(y1, u_f1, sq_f1)
            y2, u_f2, r_f2, sq_f2 = _rescaled(y2, u_f2, sq_f2)
            t11 = t11 * (r_p1 * r_f1) + tl.sum(x1 * y1, axis=1)
            t22 = t22 * (r_p2 * r_f2) + tl.sum(x2 * y2, axis=1)
            t12 = t12 * (r_p1 * r_f2) + tl.sum(x1 * y2, axis=1)
            t21 = t21 * (r_p2 * r_f1) + tl.sum(x2 * y1, axis=1)
        else:
            t11 += tl.sum((x1 - y1) * (x1 - y1), axis=1)
            t22 += tl.sum((x2 - y2) * (x2 - y2), axis=1)
            t12 += tl.sum((x1 - y2) * (x1 - y2), axis=1)
            t21 += tl.sum((x2 - y1) * (x2 - y1), axis=1)
    if COSINE:
        # |row / u| and its clamp max(|row|, eps) / u, at the rows' scales
        n_p1, n_p2 = tl.sqrt_rn(sq_p1), tl.sqrt_rn(sq_p2)
        n_f1, n_f2 = tl.sqrt_rn(sq_f1), tl.sqrt_rn(sq_f2)
        c_p1, c_p2 = _clamped(n_p1, EPS / u_p1), _clamped(n_p2, EPS / u_p2)
        c_f1, c_f2 = _clamped(n_f1, EPS / u_f1), _clamped(n_f2, EPS / u_f2)
        # one division per norm: the product of two clamps of all-zero rows (eps / 2**-100 each)
        # would overflow
        t11 = t11 / c_p1 / c_f1
        t22 = t22 / c_p2 / c_f2
        t12 = t12 / c_p1 / c_f2
        t21 = t21 / c_p2 / c_f1
        tl.store(norms_ptr + rows * 4 + 0, n_p1 * u_p1, mask=row_mask)
        tl.store(norms_ptr + rows * 4 + 1, n_p2 * u_p2, mask=row_mask)
        tl.store(norms_ptr + rows * 4 + 2, n_f1 * u_f1, mask=row_mask)
        tl.store(norms_ptr + rows * 4 + 3, n_f2 * u_f2, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 0, t11, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 1, t22, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 2, t12, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 3, t21, mask=row_mask)


@triton.jit
def _inverse_norms(norms_ptr, rows, row_mask, column, EPS: tl.constexpr):
    """1 / max(|x|, eps) and 1 / |x| (0 for an all-zero row) of one input's rows; NaN stays NaN."""
    norm = tl.load(norms_ptr + rows * 4 + column, mask=row_mask, other=1.0)
    return 1.0 / _clamped(norm, EPS), tl.where(norm == 0, 0.0, 1.0 / tl.where(norm == 0, 1.0, norm))


@triton.autotune([PAIRED_CONFIG], key=[])
@triton.jit
def _paired_backward_kernel(grad_terms_ptr, terms_ptr, norms_ptr, p1_ptr, p2_ptr, f1_ptr, f2_ptr, g1_ptr, g2_ptr, B, D,
                            p1_s0, p1_s1, p2_s0, p2_s1, f1_s0, f1_s1, f2_s0, f2_s1,
                            g1_s0, g1_s1, g2_s0, g2_s1,
                            COSINE: tl.constexpr, EPS: tl.constexpr, NEED_P1: tl.constexpr,
                            NEED_P2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """The gradients of p1 and p2 (ops/regularizers.py). For the cosine,
    ``d p = 1 / max(|p|, eps) * sum over p's pairs (g f / max(|f|, eps) - g cos p / |p|)``: the
    vectors are divided by their norms before anything is multiplied, so rows near float32's
    largest values give gradients near its smallest normal ones without underflow."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    g11 = tl.load(grad_terms_ptr + rows * 4 + 0, mask=row_mask, other=0.0)
    g22 = tl.load(grad_terms_ptr + rows * 4 + 1, mask=row_mask, other=0.0)
    g12 = tl.load(grad_terms_ptr + rows * 4 + 2, mask=row_mask, other=0.0)
    g21 = tl.load(grad_terms_ptr + rows * 4 + 3, mask=row_mask, other=0.0)
    if COSINE:
        # d p1 = inv_p1 (g11 f1 inv_f1 + g12 f2 inv_f2 + b1 p1 unit_p1), d p2 likewise
        inv_p1, unit_p1 = _inverse_norms(norms_ptr, rows, row_mask, 0, EPS)
        inv_p2, unit_p2 = _inverse_norms(norms_ptr, rows, row_mask, 1, EPS)
        inv_f1, _ = _inverse_norms(norms_ptr, rows, row_mask, 2, EPS)
        inv_f2, _ = _inverse_norms(norms_ptr, rows, row_mask, 3, EPS)
        c11 = tl.load(terms_ptr + rows * 4 + 0, mask=row_mask, other=0.0)
        c22 = tl.load(terms_ptr + rows * 4 + 1, mask=row_mask, other=0.0)
        c12 = tl.load(terms_ptr + rows * 4 + 2, mask=row_mask, other=0.0)
        c21 = tl.load(terms_ptr + rows * 4 + 3, mask=row_mask, other=0.0)
        b1 = -(g11 * c11 + g12 * c12)
        b2 = -(g22 * c22 + g21 * c21)
    else:
        # d p1 = -2 g11 f1 - 2 g12 f2 + 2 (g11 + g12) p1, d p2 likewise
        ones = tl.full((BLOCK_B,), 1.0, tl.float32)
        inv_p1, inv_p2, inv_f1, inv_f2, unit_p1, unit_p2 = ones, ones, ones, ones, ones, ones
        g11, g12, g21, g22 = -2.0 * g11, -2.0 * g12, -2.0 * g21, -2.0 * g22
        b1, b2 = -(g11 + g12), -(g22 + g21)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        y1 = tl.load(f1_ptr + rows[:, None] * f1_s0 + cols[None, :] * f1_s1, mask=mask, other=0.0).to(tl.float32)
        y2 = tl.load(f2_ptr + rows[:, None] * f2_s0 + cols[None, :] * f2_s1, mask=mask, other=0.0).to(tl.float32)
        if COSINE:
            y1 = y1 * inv_f1[:, None]
            y2 = y2 * inv_f2[:, None]
        if NEED_P1:
            x1 = tl.load(p1_ptr + rows[:, None] * p1_s0 + cols[None, :] * p1_s1, mask=mask, other=0.0).to(tl.float32)
            d1 = g11[:, None] * y1 + g12[:, None] * y2 + b1[:, None] * (x1 * unit_p1[:, None])
            if COSINE:
                d1 = d1 * inv_p1[:, None]
            tl.store(g1_ptr + rows[:, None] * g1_s0 + cols[None, :] * g1_s1, d1.to(g1_ptr.dtype.element_ty), mask=mask)
        if NEED_P2:
            x2 = tl.load(p2_ptr + rows[:, None] * p2_s0 + cols[None, :] * p2_s1, mask=mask, other=0.0).to(tl.float32)
            d2 = g21[:, None] * y1 + g22[:, None] * y2 + b2[:, None] * (x2 * unit_p2[:, None])
            if COSINE:
                d2 = d2 * inv_p2[:, None]
            tl.store(g2_ptr + rows[:, None] * g2_s0 + cols[None, :] * g2_s1, d2.to(g2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scaled_rstd(var_scaled, u, inv_u, EPS: tl.constexpr):
    """u / sqrt(var + eps) for the variance var = u^2 var_scaled of values divided by u."""
    small, large = tl.minimum(u, 1.0), tl.minimum(inv_u, 1.0)  # the branch not taken stays finite
    return tl.where(u >= 1.0, 1.0 / tl.sqrt_rn(var_scaled + EPS * large * large),
                    small / tl.sqrt_rn(var_scaled * (small * small) + EPS))


@triton.autotune([triton.Config({"BLOCK_B": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1)], key=[])
@triton.jit
def _barlow_stats_kernel(a_ptr, b_ptr, stats_ptr, B, D, a_s0, a_s1, b_s0, b_s1, EPS: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    """stats rows: mean_a, rstd_a, mean_b, rstd_b, diag = C_ii, in two passes over the rows (the
    means and largest magnitudes of the columns, then the centred sums). Both passes sum values
    divided by their column's power-of-two scale (``common.pow2_scale``: exact, so the roundings
    are those of the plain sums), the first one growing the scale as it goes (as ``_rescaled``), so
    that columns up to float32's largest values (whose sums and squares overflow float32) still
    give their mean, 1/std and C_ii."""
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    sum_a = tl.zeros((BLOCK_D,), tl.float32)  # the sums divided by u_a, u_b
    sum_b = tl.zeros((BLOCK_D,), tl.float32)
    u_a = tl.full((BLOCK_D,), POW2_MIN, tl.float32)
    u_b = tl.full((BLOCK_D,), POW2_MIN, tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (rows < B)[:, None] & col_mask[None, :]
        xa = tl.load(a_ptr + rows[:, None] * a_s0 + cols[None, :] * a_s1, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(b_ptr + rows[:, None] * b_s0 + cols[None, :] * b_s1, mask=mask, other=0.0).to(tl.float32)
        # a NaN reaches the sums, not the scale (pow2_scale clamps it)
        grown_a = tl.maximum(u_a, pow2_scale(tl.max(tl.abs(xa), axis=0)))
        grown_b = tl.maximum(u_b, pow2_scale(tl.max(tl.abs(xb), axis=0)))
        sum_a = sum_a * (u_a / grown_a) + tl.sum(xa * (1.0 / grown_a)[None, :], axis=0)
        sum_b = sum_b * (u_b / grown_b) + tl.sum(xb * (1.0 / grown_b)[None, :], axis=0)
        u_a, u_b = grown_a, grown_b
    mean_a = sum_a / B * u_a
    mean_b = sum_b / B * u_b
    inv_a, inv_b = 1.0 / u_a, 1.0 / u_b  # |x - mean| / u <= 4 (up to pow2_scale's clamp)
    sq_a = tl.zeros((BLOCK_D,), tl.float32)
    sq_b = tl.zeros((BLOCK_D,), tl.float32)
    cross = tl.zeros((BLOCK_D,), tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (rows < B)[:, None] & col_mask[None, :]
        xa = tl.load(a_ptr + rows[:, None] * a_s0 + cols[None, :] * a_s1, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(b_ptr + rows[:, None] * b_s0 + cols[None, :] * b_s1, mask=mask, other=0.0).to(tl.float32)
        # (x - mean) / u without forming x - mean, which can overflow
        xa = tl.where(mask, xa * inv_a[None, :] - (mean_a * inv_a)[None, :], 0.0)
        xb = tl.where(mask, xb * inv_b[None, :] - (mean_b * inv_b)[None, :], 0.0)
        sq_a += tl.sum(xa * xa, axis=0)
        sq_b += tl.sum(xb * xb, axis=0)
        cross += tl.sum(xa * xb, axis=0)
    # u * rstd = 1 / sqrt(var / u^2 + eps / u^2): finite for every scale (eps / u^2 underflows
    # harmlessly for huge columns; for u < 1, u^2 var is exact or below eps's rounding)
    scaled_a = _scaled_rstd(sq_a / B, u_a, inv_a, EPS)
    scaled_b = _scaled_rstd(sq_b / B, u_b, inv_b, EPS)
    tl.store(stats_ptr + 0 * D + cols, mean_a, mask=col_mask)
    tl.store(stats_ptr + 1 * D + cols, scaled_a * inv_a, mask=col_mask)
    tl.store(stats_ptr + 2 * D + cols, mean_b, mask=col_mask)
    tl.store(stats_ptr + 3 * D + cols, scaled_b * inv_b, mask=col_mask)
    tl.store(stats_ptr + 4 * D + cols, cross * scaled_a * scaled_b / B, mask=col_mask)


@triton.jit
def _standardised_tile(x_ptr, x_s0, x_s1, rows, cols, mean, rstd, B, D):
    """Rows x cols of (x - mean) * rstd in float32, zero outside the matrix; as (x/2 - mean/2) *
    (2 rstd), the same roundings without the overflow of x - mean near float32's largest values
    (csrc/safe_math.h's ``standardise``)."""
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    tile = tl.load(x_ptr + rows[:, None] * x_s0 + cols[None, :] * x_s1, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (tile * 0.5 - (mean * 0.5)[None, :]) * (rstd * 2.0)[None, :], 0.0)


@triton.autotune([triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2)], key=[])
@triton.jit
def _barlow_gram_kernel(a_ptr, b_ptr, stats_ptr, gram_b_ptr, partial_ptr, B, D, a_s0, a_s1, b_s0, b_s1,
                        DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_i, pid_j = tl.program_id(0), tl.program_id(1)
    rows_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rows_j = pid_j * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    gram_a_tile = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)
    gram_b_tile = tl.zeros((BLOCK_M, BLOCK_M), tl.float32)
    for d0 in range(0, D, BLOCK_K):
        cols = d0 + tl.arange(0, BLOCK_K)
        col_mask = cols < D
        mean_a = tl.load(stats_ptr + 0 * D + cols, mask=col_mask, other=0.0)
        rstd_a = tl.load(stats_ptr + 1 * D + cols, mask=col_mask, other=0.0)
        mean_b = tl.load(stats_ptr + 2 * D + cols, mask=col_mask, other=0.0)
        rstd_b = tl.load(stats_ptr + 3 * D + cols, mask=col_mask, other=0.0)
        a_i = _standardised_tile(a_ptr, a_s0, a_s1, rows_i, cols, mean_a, rstd_a, B, D).to(DOT_DTYPE)
        a_j = _standardised_tile(a_ptr, a_s0, a_s1, rows_j, cols, mean_a, rstd_a, B, D).to(DOT_DTYPE)
        b_i = _standardised_tile(b_ptr, b_s0, b_s1, rows_i, cols, mean_b, rstd_b, B, D).to(DOT_DTYPE)
        b_j = _standardised_tile(b_ptr, b_s0, b_s1, rows_j, cols, mean_b, rstd_b, B, D).to(DOT_DTYPE)
        gram_a_tile += tl.dot(a_i, tl.trans(a_j), input_precision=PRECISION)
        gram_b_tile += tl.dot(b_i, tl.trans(b_j), input_precision=PRECISION)
    tl.store(partial_ptr + pid_i * tl.num_programs(1) + pid_j, tl.sum(gram_a_tile * gram_b_tile))
    mask = (rows_i < B)[:, None] & (rows_j < B)[None, :]
    tl.store(gram_b_ptr + rows_i[:, None] * B + rows_j[None, :], gram_b_tile, mask=mask)


@triton.autotune([triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=4, num_stages=2)], key=[])
@triton.jit
def _barlow_grad_kernel(grad_loss_ptr, a_ptr, b_ptr, stats_ptr, gram_b_ptr, grad_std_ptr, col_sums_ptr, B, D,
                        a_s0, a_s1, b_s0, b_s1, off_diagonal_weight, scale, PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # grad_std = d loss / d a^ (B x D, float32); col_sums = its column sums and those of grad_std * a^.
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    mean_a = tl.load(stats_ptr + 0 * D + cols, mask=col_mask, other=0.0)
    rstd_a = tl.load(stats_ptr + 1 * D + cols, mask=col_mask, other=0.0)
    mean_b = tl.load(stats_ptr + 2 * D + cols, mask=col_mask, other=0.0)
    rstd_b = tl.load(stats_ptr + 3 * D + cols, mask=col_mask, other=0.0)
    diag = tl.load(stats_ptr + 4 * D + cols, mask=col_mask, other=0.0)
    g = tl.load(grad_loss_ptr).to(tl.float32) * scale
    alpha = g * (2.0 * (diag - 1.0) - 2.0 * off_diagonal_weight * diag) / B
    beta = g * 2.0 * off_diagonal_weight / B / B
    sum_g = tl.zeros((BLOCK_D,), tl.float32)
    sum_ga = tl.zeros((BLOCK_D,), tl.float32)
    for m0 in range(0, B, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        for k0 in range(0, B, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            gram_tile = tl.load(gram_b_ptr + rows[:, None] * B + ks[None, :],
                                mask=(rows < B)[:, None] & (ks < B)[None, :], other=0.0)
            a_k = _standardised_tile(a_ptr, a_s0, a_s1, ks, cols, mean_a, rstd_a, B, D)
            acc += tl.dot(gram_tile, a_k, input_precision=PRECISION)
        a_m = _standardised_tile(a_ptr, a_s0, a_s1, rows, cols, mean_a, rstd_a, B, D)
        b_m = _standardised_tile(b_ptr, b_s0, b_s1, rows, cols, mean_b, rstd_b, B, D)
        grad_tile = alpha[None, :] * b_m + beta * acc
        sum_g += tl.sum(grad_tile, axis=0)
        sum_ga += tl.sum(grad_tile * a_m, axis=0)
        mask = (rows < B)[:, None] & col_mask[None, :]
        tl.store(grad_std_ptr + rows[:, None] * D + cols[None, :], grad_tile, mask=mask)
    tl.store(col_sums_ptr + cols, sum_g, mask=col_mask)
    tl.store(col_sums_ptr + D + cols, sum_ga, mask=col_mask)


@triton.autotune([triton.Config({"BLOCK_B": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1)], key=[])
@triton.jit
def _barlow_finish_kernel(a_ptr, stats_ptr, grad_std_ptr, col_sums_ptr, out_ptr, B, D, a_s0, a_s1, out_s0, out_s1,
                          BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # d a = rstd_a * (g^ - mean_rows(g^) - a^ * mean_rows(g^ a^))
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    mask = (rows < B)[:, None] & col_mask[None, :]
    mean_a = tl.load(stats_ptr + 0 * D + cols, mask=col_mask, other=0.0)
    rstd_a = tl.load(stats_ptr + 1 * D + cols, mask=col_mask, other=0.0)
    mean_g = tl.load(col_sums_ptr + cols, mask=col_mask, other=0.0) / B
    mean_ga = tl.load(col_sums_ptr + D + cols, mask=col_mask, other=0.0) / B
    a_std = _standardised_tile(a_ptr, a_s0, a_s1, rows, cols, mean_a, rstd_a, B, D)
    grad_tile = tl.load(grad_std_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    result = rstd_a[None, :] * (grad_tile - mean_g[None, :] - a_std * mean_ga[None, :])
    tl.store(out_ptr + rows[:, None] * out_s0 + cols[None, :] * out_s1, result.to(out_ptr.dtype.element_ty), mask=mask)


CORRELATION_CONFIG = triton.Config({"BLOCK": 64}, num_warps=4, num_stages=1)


@triton.jit
def _correlation_tile(c_ptr, c_s0, c_s1, D, BLOCK: tl.constexpr):
    """This program's tile of C, the weight of each entry's square (1 on the diagonal, else 0) and
    its target (1 on the diagonal, else 0), zero outside the matrix."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (rows < D)[:, None] & (cols < D)[None, :]
    c = tl.load(c_ptr + rows[:, None] * c_s0 + cols[None, :] * c_s1, mask=mask, other=0.0).to(tl.float32)
    on_diagonal = (rows[:, None] == cols[None, :]) & mask
    return rows, cols, mask, c, on_diagonal


@triton.autotune([CORRELATION_CONFIG], key=[])
@triton.jit
def _correlation_loss_kernel(c_ptr, partial_ptr, D, c_s0, c_s1, off_diagonal_weight, BLOCK: tl.constexpr):
    # partial[tile] = sum over the tile of (C_ii - 1)^2 on the diagonal and l * C_ij^2 off it
    _, _, mask, c, on_diagonal = _correlation_tile(c_ptr, c_s0, c_s1, D, BLOCK)
    value = tl.where(on_diagonal, (c - 1.0) * (c - 1.0), off_diagonal_weight * c * c)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.where(mask, value, 0.0)))


@triton.autotune([CORRELATION_CONFIG], key=[])
@triton.jit
def _correlation_grad_kernel(grad_loss_ptr, c_ptr, out_ptr, D, c_s0, c_s1, off_diagonal_weight, scale,
                             BLOCK: tl.constexpr):
    rows, cols, mask, c, on_diagonal = _correlation_tile(c_ptr, c_s0, c_s1, D, BLOCK)
    g = tl.load(grad_loss_ptr).to(tl.float32) * scale * 2.0
    grad = tl.where(on_diagonal, g * (c - 1.0), g * off_diagonal_weight * c)
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], grad, mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _dot_config(dtype: torch.dtype):
    """(Gram operand dtype, forward input_precision, backward input_precision) for inputs of
    ``dtype``: float32 inputs get IEEE float32 products; half inputs round the standardised
    values to their own dtype in forward (float32 in the interpreter for bf16) and use tf32 for
    the backward's G_b a^ (its tolerance is 5e-2)."""
    if dtype == torch.float32:
        return tl.float32, "ieee", "ieee"
    operand = tl.float32 if dtype == torch.bfloat16 and interpreting() else _TL_DTYPES[dtype]
    return operand, "ieee", "tf32"


def paired_forward(p1, p2, f1, f2, kind):
    if kind not in regularizers.KINDS:
        raise ValueError(f"kind must be one of {regularizers.KINDS}, got {kind!r}")
    batch, dim = p1.shape
    cosine = kind == "cosine"
    terms = torch.empty((batch, 4), dtype=torch.float32, device=p1.device)
    norms = torch.empty((batch, 4 if cosine else 0), dtype=torch.float32, device=p1.device)
    launch(_paired_forward_kernel, lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]),),
           p1_ptr=p1, p2_ptr=p2, f1_ptr=f1, f2_ptr=f2, terms_ptr=terms, norms_ptr=norms if cosine else terms,
           B=batch, D=dim, **strides(p1=p1, p2=p2, f1=f1, f2=f2), COSINE=cosine, EPS=COSINE_EPS)
    return terms, norms


def paired_backward(grad_terms, terms, norms, p1, p2, f1, f2, kind, p1_needs_grad, p2_needs_grad):
    batch, dim = p1.shape
    cosine = kind == "cosine"
    g1 = torch.empty_like(p1) if p1_needs_grad else p1  # never written when not needed
    g2 = torch.empty_like(p2) if p2_needs_grad else p2
    launch(_paired_backward_kernel, lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]),),
           grad_terms_ptr=grad_terms, terms_ptr=terms, norms_ptr=norms if cosine else terms,
           p1_ptr=p1, p2_ptr=p2, f1_ptr=f1, f2_ptr=f2, g1_ptr=g1, g2_ptr=g2, B=batch, D=dim,
           **strides(p1=p1, p2=p2, f1=f1, f2=f2, g1=g1, g2=g2),
           COSINE=cosine, EPS=COSINE_EPS, NEED_P1=p1_needs_grad, NEED_P2=p2_needs_grad)
    return [g for g, need in ((g1, p1_needs_grad), (g2, p2_needs_grad)) if need]


def barlow_forward(a, b, off_diagonal_weight, scale):
    batch, dim = a.shape
    stats = torch.empty((5, dim), dtype=torch.float32, device=a.device)
    launch(_barlow_stats_kernel, lambda meta: (triton.cdiv(dim, meta["BLOCK_D"]),),
           a_ptr=a, b_ptr=b, stats_ptr=stats, B=batch, D=dim, **strides(a=a, b=b), EPS=BARLOW_VARIANCE_EPS)
    block_m = _barlow_gram_kernel.configs[0].kwargs["BLOCK_M"]  # the partial sums' size needs it
    tiles = triton.cdiv(batch, block_m)
    gram_b = torch.empty((batch, batch), dtype=torch.float32, device=a.device)
    partial = torch.empty((tiles * tiles,), dtype=torch.float32, device=a.device)
    operand, precision, _ = _dot_config(a.dtype)
    launch(_barlow_gram_kernel, (tiles, tiles), a_ptr=a, b_ptr=b, stats_ptr=stats, gram_b_ptr=gram_b,
           partial_ptr=partial, B=batch, D=dim, **strides(a=a, b=b), DOT_DTYPE=operand, PRECISION=precision)
    diag = stats[4]
    loss = scale * (((diag - 1) ** 2).sum()
                    + off_diagonal_weight * (partial.sum() / batch ** 2 - (diag ** 2).sum()))
    return loss, stats, gram_b


def barlow_backward(grad_loss, a, b, stats, gram_b, off_diagonal_weight, scale):
    batch, dim = a.shape
    grad_std = torch.empty((batch, dim), dtype=torch.float32, device=a.device)
    col_sums = torch.empty((2, dim), dtype=torch.float32, device=a.device)
    _, _, precision = _dot_config(a.dtype)
    launch(_barlow_grad_kernel, lambda meta: (triton.cdiv(dim, meta["BLOCK_D"]),),
           grad_loss_ptr=grad_loss.to(torch.float32), a_ptr=a, b_ptr=b, stats_ptr=stats, gram_b_ptr=gram_b,
           grad_std_ptr=grad_std, col_sums_ptr=col_sums, B=batch, D=dim, **strides(a=a, b=b),
           off_diagonal_weight=off_diagonal_weight, scale=scale, PRECISION=precision)
    out = torch.empty_like(a)
    launch(_barlow_finish_kernel,
           lambda meta: (triton.cdiv(batch, meta["BLOCK_B"]), triton.cdiv(dim, meta["BLOCK_D"])),
           a_ptr=a, stats_ptr=stats, grad_std_ptr=grad_std, col_sums_ptr=col_sums, out_ptr=out, B=batch, D=dim,
           **strides(a=a, out=out))
    return out


def correlation_loss_forward(c, off_diagonal_weight, scale):
    dim = c.shape[0]
    tiles = triton.cdiv(dim, CORRELATION_CONFIG.kwargs["BLOCK"])  # the partial sums' size needs it
    partial = torch.empty((tiles * tiles,), dtype=torch.float32, device=c.device)
    launch(_correlation_loss_kernel, (tiles, tiles), c_ptr=c, partial_ptr=partial, D=dim, **strides(c=c),
           off_diagonal_weight=off_diagonal_weight)
    return scale * partial.sum()


def correlation_loss_backward(grad_loss, c, off_diagonal_weight, scale):
    dim = c.shape[0]
    out = torch.empty((dim, dim), dtype=torch.float32, device=c.device)
    launch(_correlation_grad_kernel, lambda meta: (triton.cdiv(dim, meta["BLOCK"]),) * 2,
           grad_loss_ptr=grad_loss.to(torch.float32), c_ptr=c, out_ptr=out, D=dim, **strides(c=c),
           off_diagonal_weight=off_diagonal_weight, scale=scale)
    return out


KERNELS = regularizers.RegularizerKernels(paired_forward, paired_backward, barlow_forward, barlow_backward,
                                          correlation_loss_forward, correlation_loss_backward)


def compile_cases() -> List:
    """For tests/test_compile_triton.py: every kernel at its launch configuration, for each input
    dtype (bf16 and fp16 take the same code paths in the paired and finishing kernels: fp32 and
    bf16 cover them)."""
    cases, every_gpu = [], tuple(SHARED_MEMORY_LIMIT)
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        operand, forward_precision, backward_precision = _dot_config(torch_dtype)
        inputs = {name: dtype for name in ("p1_ptr", "p2_ptr", "f1_ptr", "f2_ptr", "g1_ptr", "g2_ptr", "a_ptr",
                                           "b_ptr", "out_ptr")}
        floats = {name: "fp32" for name in ("terms_ptr", "norms_ptr", "grad_terms_ptr", "stats_ptr", "gram_b_ptr",
                                            "partial_ptr", "grad_loss_ptr", "grad_std_ptr", "col_sums_ptr",
                                            "c_ptr")}
        pointers = {**inputs, **floats}
        scalars = {"off_diagonal_weight": "fp32", "scale": "fp32"}
        # the two kernels with tl.dot (shared memory) on every GPU, the rest on sm_80 and sm_90
        specs = [(_barlow_gram_kernel, "", dict(DOT_DTYPE=operand, PRECISION=forward_precision), every_gpu),
                 (_barlow_grad_kernel, "", dict(PRECISION=backward_precision), every_gpu)]
        if dtype != "fp16":
            for cosine, kind in ((True, "cosine"), (False, "sqdist")):
                flags = dict(COSINE=cosine, EPS=COSINE_EPS)
                specs += [(_paired_forward_kernel, kind, flags, (80, 90)),
                          (_paired_backward_kernel, kind, dict(NEED_P1=True, NEED_P2=True, **flags), (80, 90))]
            specs += [(_barlow_stats_kernel, "", dict(EPS=BARLOW_VARIANCE_EPS), (80, 90)),
                      (_barlow_finish_kernel, "", {}, (80, 90))]
        if dtype == "fp32":  # C is float32 whatever the inputs
            specs += [(_correlation_loss_kernel, "", {}, (80, 90)), (_correlation_grad_kernel, "", {}, (80, 90))]
        for kernel, variant, constexprs, archs in specs:
            name = "_".join(part for part in ("regularizers", jit_function(kernel).fn.__name__.strip("_"),
                                              variant, dtype) if part)
            cases.append(compile_case(name, kernel, kernel.configs[0], constexprs, pointers, scalars, archs))
    return cases
