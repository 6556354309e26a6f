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
from . import compile_case, interpreting

# One launch configuration per kernel (GPU and interpreter alike; not autotuned yet). Blocks are
# not tied to the shapes: every kernel masks its edges.
CONFIGS = {
    "paired": triton.Config({"BLOCK_B": 4, "BLOCK_D": 512}, num_warps=4, num_stages=1),
    "stats": triton.Config({"BLOCK_B": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1),
    "gram": triton.Config({"BLOCK_M": 32, "BLOCK_K": 64}, num_warps=4, num_stages=2),
    "grad": triton.Config({"BLOCK_M": 32, "BLOCK_K": 32, "BLOCK_D": 64}, num_warps=4, num_stages=2),
    "finish": triton.Config({"BLOCK_B": 32, "BLOCK_D": 64}, num_warps=4, num_stages=1),
    "correlation": triton.Config({"BLOCK": 64}, num_warps=4, num_stages=1),
}


@triton.jit
def _paired_forward_kernel(p1_ptr, p2_ptr, f1_ptr, f2_ptr, terms_ptr, norms_ptr, B, D,
                           s_p1b, s_p1d, s_p2b, s_p2d, s_f1b, s_f1d, s_f2b, s_f2d,
                           COSINE: tl.constexpr, EPS: tl.constexpr,
                           BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
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
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        x1 = tl.load(p1_ptr + rows[:, None] * s_p1b + cols[None, :] * s_p1d, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(p2_ptr + rows[:, None] * s_p2b + cols[None, :] * s_p2d, mask=mask, other=0.0).to(tl.float32)
        y1 = tl.load(f1_ptr + rows[:, None] * s_f1b + cols[None, :] * s_f1d, mask=mask, other=0.0).to(tl.float32)
        y2 = tl.load(f2_ptr + rows[:, None] * s_f2b + cols[None, :] * s_f2d, mask=mask, other=0.0).to(tl.float32)
        if COSINE:
            t11 += tl.sum(x1 * y1, axis=1)
            t22 += tl.sum(x2 * y2, axis=1)
            t12 += tl.sum(x1 * y2, axis=1)
            t21 += tl.sum(x2 * y1, axis=1)
            sq_p1 += tl.sum(x1 * x1, axis=1)
            sq_p2 += tl.sum(x2 * x2, axis=1)
            sq_f1 += tl.sum(y1 * y1, axis=1)
            sq_f2 += tl.sum(y2 * y2, axis=1)
        else:
            t11 += tl.sum((x1 - y1) * (x1 - y1), axis=1)
            t22 += tl.sum((x2 - y2) * (x2 - y2), axis=1)
            t12 += tl.sum((x1 - y2) * (x1 - y2), axis=1)
            t21 += tl.sum((x2 - y1) * (x2 - y1), axis=1)
    if COSINE:
        n_p1, n_p2 = tl.sqrt_rn(sq_p1), tl.sqrt_rn(sq_p2)
        n_f1, n_f2 = tl.sqrt_rn(sq_f1), tl.sqrt_rn(sq_f2)
        c_p1, c_p2 = tl.maximum(n_p1, EPS), tl.maximum(n_p2, EPS)
        c_f1, c_f2 = tl.maximum(n_f1, EPS), tl.maximum(n_f2, EPS)
        t11 = t11 / (c_p1 * c_f1)
        t22 = t22 / (c_p2 * c_f2)
        t12 = t12 / (c_p1 * c_f2)
        t21 = t21 / (c_p2 * c_f1)
        tl.store(norms_ptr + rows * 4 + 0, n_p1, mask=row_mask)
        tl.store(norms_ptr + rows * 4 + 1, n_p2, mask=row_mask)
        tl.store(norms_ptr + rows * 4 + 2, n_f1, mask=row_mask)
        tl.store(norms_ptr + rows * 4 + 3, n_f2, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 0, t11, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 1, t22, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 2, t12, mask=row_mask)
    tl.store(terms_ptr + rows * 4 + 3, t21, mask=row_mask)


@triton.jit
def _paired_backward_kernel(grad_terms_ptr, terms_ptr, norms_ptr, p1_ptr, p2_ptr, f1_ptr, f2_ptr, g1_ptr, g2_ptr, B, D,
                            s_p1b, s_p1d, s_p2b, s_p2d, s_f1b, s_f1d, s_f2b, s_f2d,
                            s_g1b, s_g1d, s_g2b, s_g2d,
                            COSINE: tl.constexpr, EPS: tl.constexpr, NEED_P1: tl.constexpr,
                            NEED_P2: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # d p1 = a11 f1_ptr + a12 f2_ptr + b1 p1 and d p2 = a21 f1_ptr + a22 f2_ptr + b2 p2, per row (ops docstring).
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_mask = rows < B
    g11 = tl.load(grad_terms_ptr + rows * 4 + 0, mask=row_mask, other=0.0)
    g22 = tl.load(grad_terms_ptr + rows * 4 + 1, mask=row_mask, other=0.0)
    g12 = tl.load(grad_terms_ptr + rows * 4 + 2, mask=row_mask, other=0.0)
    g21 = tl.load(grad_terms_ptr + rows * 4 + 3, mask=row_mask, other=0.0)
    if COSINE:
        n_p1 = tl.load(norms_ptr + rows * 4 + 0, mask=row_mask, other=1.0)
        n_p2 = tl.load(norms_ptr + rows * 4 + 1, mask=row_mask, other=1.0)
        inv_f1 = 1.0 / tl.maximum(tl.load(norms_ptr + rows * 4 + 2, mask=row_mask, other=1.0), EPS)
        inv_f2 = 1.0 / tl.maximum(tl.load(norms_ptr + rows * 4 + 3, mask=row_mask, other=1.0), EPS)
        inv_p1 = 1.0 / tl.maximum(n_p1, EPS)
        inv_p2 = 1.0 / tl.maximum(n_p2, EPS)
        unit_p1 = tl.where(n_p1 > 0, 1.0 / tl.where(n_p1 > 0, n_p1, 1.0), 0.0)  # no 1/0 even unselected
        unit_p2 = tl.where(n_p2 > 0, 1.0 / tl.where(n_p2 > 0, n_p2, 1.0), 0.0)
        c11 = tl.load(terms_ptr + rows * 4 + 0, mask=row_mask, other=0.0)
        c22 = tl.load(terms_ptr + rows * 4 + 1, mask=row_mask, other=0.0)
        c12 = tl.load(terms_ptr + rows * 4 + 2, mask=row_mask, other=0.0)
        c21 = tl.load(terms_ptr + rows * 4 + 3, mask=row_mask, other=0.0)
        a11, a12 = inv_p1 * g11 * inv_f1, inv_p1 * g12 * inv_f2
        a21, a22 = inv_p2 * g21 * inv_f1, inv_p2 * g22 * inv_f2
        b1 = -inv_p1 * unit_p1 * (g11 * c11 + g12 * c12)
        b2 = -inv_p2 * unit_p2 * (g22 * c22 + g21 * c21)
    else:
        a11, a12, b1 = -2.0 * g11, -2.0 * g12, 2.0 * (g11 + g12)
        a21, a22, b2 = -2.0 * g21, -2.0 * g22, 2.0 * (g22 + g21)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = row_mask[:, None] & (cols < D)[None, :]
        y1 = tl.load(f1_ptr + rows[:, None] * s_f1b + cols[None, :] * s_f1d, mask=mask, other=0.0).to(tl.float32)
        y2 = tl.load(f2_ptr + rows[:, None] * s_f2b + cols[None, :] * s_f2d, mask=mask, other=0.0).to(tl.float32)
        if NEED_P1:
            x1 = tl.load(p1_ptr + rows[:, None] * s_p1b + cols[None, :] * s_p1d, mask=mask, other=0.0).to(tl.float32)
            d1 = a11[:, None] * y1 + a12[:, None] * y2 + b1[:, None] * x1
            tl.store(g1_ptr + rows[:, None] * s_g1b + cols[None, :] * s_g1d, d1.to(g1_ptr.dtype.element_ty), mask=mask)
        if NEED_P2:
            x2 = tl.load(p2_ptr + rows[:, None] * s_p2b + cols[None, :] * s_p2d, mask=mask, other=0.0).to(tl.float32)
            d2 = a21[:, None] * y1 + a22[:, None] * y2 + b2[:, None] * x2
            tl.store(g2_ptr + rows[:, None] * s_g2b + cols[None, :] * s_g2d, d2.to(g2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _barlow_stats_kernel(a_ptr, b_ptr, stats_ptr, B, D, s_ab, s_ad, s_bb, s_bd, EPS: tl.constexpr,
                         BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # stats rows: mean_a, rstd_a, mean_b, rstd_b, diag = C_ii; two passes (mean, then centred sums).
    cols = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    sum_a = tl.zeros((BLOCK_D,), tl.float32)
    sum_b = tl.zeros((BLOCK_D,), tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (rows < B)[:, None] & col_mask[None, :]
        xa = tl.load(a_ptr + rows[:, None] * s_ab + cols[None, :] * s_ad, mask=mask, other=0.0)
        xb = tl.load(b_ptr + rows[:, None] * s_bb + cols[None, :] * s_bd, mask=mask, other=0.0)
        sum_a += tl.sum(xa.to(tl.float32), axis=0)
        sum_b += tl.sum(xb.to(tl.float32), axis=0)
    mean_a = sum_a / B
    mean_b = sum_b / B
    sq_a = tl.zeros((BLOCK_D,), tl.float32)
    sq_b = tl.zeros((BLOCK_D,), tl.float32)
    cross = tl.zeros((BLOCK_D,), tl.float32)
    for r0 in range(0, B, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask = (rows < B)[:, None] & col_mask[None, :]
        xa = tl.load(a_ptr + rows[:, None] * s_ab + cols[None, :] * s_ad, mask=mask, other=0.0).to(tl.float32)
        xb = tl.load(b_ptr + rows[:, None] * s_bb + cols[None, :] * s_bd, mask=mask, other=0.0).to(tl.float32)
        xa = tl.where(mask, xa - mean_a[None, :], 0.0)
        xb = tl.where(mask, xb - mean_b[None, :], 0.0)
        sq_a += tl.sum(xa * xa, axis=0)
        sq_b += tl.sum(xb * xb, axis=0)
        cross += tl.sum(xa * xb, axis=0)
    rstd_a = 1.0 / tl.sqrt_rn(sq_a / B + EPS)
    rstd_b = 1.0 / tl.sqrt_rn(sq_b / B + EPS)
    tl.store(stats_ptr + 0 * D + cols, mean_a, mask=col_mask)
    tl.store(stats_ptr + 1 * D + cols, rstd_a, mask=col_mask)
    tl.store(stats_ptr + 2 * D + cols, mean_b, mask=col_mask)
    tl.store(stats_ptr + 3 * D + cols, rstd_b, mask=col_mask)
    tl.store(stats_ptr + 4 * D + cols, cross * rstd_a * rstd_b / B, mask=col_mask)


@triton.jit
def _standardised_tile(x_ptr, s_xb, s_xd, rows, cols, mean, rstd, B, D):
    """Rows x cols of (x - mean) * rstd in float32, zero outside the matrix."""
    mask = (rows < B)[:, None] & (cols < D)[None, :]
    tile = tl.load(x_ptr + rows[:, None] * s_xb + cols[None, :] * s_xd, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, (tile - mean[None, :]) * rstd[None, :], 0.0)


@triton.jit
def _barlow_gram_kernel(a_ptr, b_ptr, stats_ptr, gram_b_ptr, partial_ptr, B, D, s_ab, s_ad, s_bb, s_bd,
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
        a_i = _standardised_tile(a_ptr, s_ab, s_ad, rows_i, cols, mean_a, rstd_a, B, D).to(DOT_DTYPE)
        a_j = _standardised_tile(a_ptr, s_ab, s_ad, rows_j, cols, mean_a, rstd_a, B, D).to(DOT_DTYPE)
        b_i = _standardised_tile(b_ptr, s_bb, s_bd, rows_i, cols, mean_b, rstd_b, B, D).to(DOT_DTYPE)
        b_j = _standardised_tile(b_ptr, s_bb, s_bd, rows_j, cols, mean_b, rstd_b, B, D).to(DOT_DTYPE)
        gram_a_tile += tl.dot(a_i, tl.trans(a_j), input_precision=PRECISION)
        gram_b_tile += tl.dot(b_i, tl.trans(b_j), input_precision=PRECISION)
    tl.store(partial_ptr + pid_i * tl.num_programs(1) + pid_j, tl.sum(gram_a_tile * gram_b_tile))
    mask = (rows_i < B)[:, None] & (rows_j < B)[None, :]
    tl.store(gram_b_ptr + rows_i[:, None] * B + rows_j[None, :], gram_b_tile, mask=mask)


@triton.jit
def _barlow_grad_kernel(grad_loss_ptr, a_ptr, b_ptr, stats_ptr, gram_b_ptr, grad_std_ptr, col_sums_ptr, B, D,
                        s_ab, s_ad, s_bb, s_bd, off_diagonal_weight, scale, PRECISION: tl.constexpr,
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
            a_k = _standardised_tile(a_ptr, s_ab, s_ad, ks, cols, mean_a, rstd_a, B, D)
            acc += tl.dot(gram_tile, a_k, input_precision=PRECISION)
        a_m = _standardised_tile(a_ptr, s_ab, s_ad, rows, cols, mean_a, rstd_a, B, D)
        b_m = _standardised_tile(b_ptr, s_bb, s_bd, rows, cols, mean_b, rstd_b, B, D)
        grad_tile = alpha[None, :] * b_m + beta * acc
        sum_g += tl.sum(grad_tile, axis=0)
        sum_ga += tl.sum(grad_tile * a_m, axis=0)
        mask = (rows < B)[:, None] & col_mask[None, :]
        tl.store(grad_std_ptr + rows[:, None] * D + cols[None, :], grad_tile, mask=mask)
    tl.store(col_sums_ptr + cols, sum_g, mask=col_mask)
    tl.store(col_sums_ptr + D + cols, sum_ga, mask=col_mask)


@triton.jit
def _barlow_finish_kernel(a_ptr, stats_ptr, grad_std_ptr, col_sums_ptr, out_ptr, B, D, s_ab, s_ad, s_ob, s_od,
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
    a_std = _standardised_tile(a_ptr, s_ab, s_ad, rows, cols, mean_a, rstd_a, B, D)
    grad_tile = tl.load(grad_std_ptr + rows[:, None] * D + cols[None, :], mask=mask, other=0.0)
    result = rstd_a[None, :] * (grad_tile - mean_g[None, :] - a_std * mean_ga[None, :])
    tl.store(out_ptr + rows[:, None] * s_ob + cols[None, :] * s_od, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _correlation_tile(c_ptr, s_ci, s_cj, D, BLOCK: tl.constexpr):
    """This program's tile of C, the weight of each entry's square (1 on the diagonal, else 0) and
    its target (1 on the diagonal, else 0), zero outside the matrix."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = (rows < D)[:, None] & (cols < D)[None, :]
    c = tl.load(c_ptr + rows[:, None] * s_ci + cols[None, :] * s_cj, mask=mask, other=0.0).to(tl.float32)
    on_diagonal = (rows[:, None] == cols[None, :]) & mask
    return rows, cols, mask, c, on_diagonal


@triton.jit
def _correlation_loss_kernel(c_ptr, partial_ptr, D, s_ci, s_cj, off_diagonal_weight, BLOCK: tl.constexpr):
    # partial[tile] = sum over the tile of (C_ii - 1)^2 on the diagonal and l * C_ij^2 off it
    _, _, mask, c, on_diagonal = _correlation_tile(c_ptr, s_ci, s_cj, D, BLOCK)
    value = tl.where(on_diagonal, (c - 1.0) * (c - 1.0), off_diagonal_weight * c * c)
    tl.store(partial_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1),
             tl.sum(tl.where(mask, value, 0.0)))


@triton.jit
def _correlation_grad_kernel(grad_loss_ptr, c_ptr, out_ptr, D, s_ci, s_cj, off_diagonal_weight, scale,
                             BLOCK: tl.constexpr):
    rows, cols, mask, c, on_diagonal = _correlation_tile(c_ptr, s_ci, s_cj, D, BLOCK)
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


def _strides(*tensors):
    return [s for t in tensors for s in t.stride()]


def _launch(kernel, name, grid, *args, **constexprs):
    config = CONFIGS[name]
    kernel[grid](*args, **constexprs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def paired_forward(p1, p2, f1, f2, kind):
    if kind not in regularizers.KINDS:
        raise ValueError(f"kind must be one of {regularizers.KINDS}, got {kind!r}")
    batch, dim = p1.shape
    cosine = kind == "cosine"
    terms = torch.empty((batch, 4), dtype=torch.float32, device=p1.device)
    norms = torch.empty((batch, 4 if cosine else 0), dtype=torch.float32, device=p1.device)
    grid = (triton.cdiv(batch, CONFIGS["paired"].kwargs["BLOCK_B"]),)
    _launch(_paired_forward_kernel, "paired", grid, p1, p2, f1, f2, terms, norms if cosine else terms, batch, dim,
            *_strides(p1, p2, f1, f2), COSINE=cosine, EPS=COSINE_EPS)
    return terms, norms


def paired_backward(grad_terms, terms, norms, p1, p2, f1, f2, kind, p1_needs_grad, p2_needs_grad):
    batch, dim = p1.shape
    cosine = kind == "cosine"
    g1 = torch.empty_like(p1) if p1_needs_grad else p1
    g2 = torch.empty_like(p2) if p2_needs_grad else p2
    grid = (triton.cdiv(batch, CONFIGS["paired"].kwargs["BLOCK_B"]),)
    _launch(_paired_backward_kernel, "paired", grid, grad_terms, terms, norms if cosine else terms,
            p1, p2, f1, f2, g1, g2, batch, dim, *_strides(p1, p2, f1, f2, g1, g2),
            COSINE=cosine, EPS=COSINE_EPS, NEED_P1=p1_needs_grad, NEED_P2=p2_needs_grad)
    return [g for g, need in ((g1, p1_needs_grad), (g2, p2_needs_grad)) if need]


def barlow_forward(a, b, off_diagonal_weight, scale):
    batch, dim = a.shape
    stats = torch.empty((5, dim), dtype=torch.float32, device=a.device)
    _launch(_barlow_stats_kernel, "stats", (triton.cdiv(dim, CONFIGS["stats"].kwargs["BLOCK_D"]),),
            a, b, stats, batch, dim, *_strides(a, b), EPS=BARLOW_VARIANCE_EPS)
    tiles = triton.cdiv(batch, CONFIGS["gram"].kwargs["BLOCK_M"])
    gram_b = torch.empty((batch, batch), dtype=torch.float32, device=a.device)
    partial = torch.empty((tiles * tiles,), dtype=torch.float32, device=a.device)
    operand, precision, _ = _dot_config(a.dtype)
    _launch(_barlow_gram_kernel, "gram", (tiles, tiles), a, b, stats, gram_b, partial, batch, dim,
            *_strides(a, b), DOT_DTYPE=operand, PRECISION=precision)
    diag = stats[4]
    loss = scale * (((diag - 1) ** 2).sum()
                    + off_diagonal_weight * (partial.sum() / batch ** 2 - (diag ** 2).sum()))
    return loss, stats, gram_b


def barlow_backward(grad_loss, a, b, stats, gram_b, off_diagonal_weight, scale):
    batch, dim = a.shape
    grad_std = torch.empty((batch, dim), dtype=torch.float32, device=a.device)
    col_sums = torch.empty((2, dim), dtype=torch.float32, device=a.device)
    _, _, precision = _dot_config(a.dtype)
    _launch(_barlow_grad_kernel, "grad", (triton.cdiv(dim, CONFIGS["grad"].kwargs["BLOCK_D"]),),
            grad_loss.to(torch.float32), a, b, stats, gram_b, grad_std, col_sums, batch, dim,
            *_strides(a, b), off_diagonal_weight, scale, PRECISION=precision)
    out = torch.empty_like(a)
    finish = CONFIGS["finish"].kwargs
    grid = (triton.cdiv(batch, finish["BLOCK_B"]), triton.cdiv(dim, finish["BLOCK_D"]))
    _launch(_barlow_finish_kernel, "finish", grid, a, stats, grad_std, col_sums, out, batch, dim, *_strides(a, out))
    return out


def correlation_loss_forward(c, off_diagonal_weight, scale):
    dim = c.shape[0]
    tiles = triton.cdiv(dim, CONFIGS["correlation"].kwargs["BLOCK"])
    partial = torch.empty((tiles * tiles,), dtype=torch.float32, device=c.device)
    _launch(_correlation_loss_kernel, "correlation", (tiles, tiles), c, partial, dim, *c.stride(), off_diagonal_weight)
    return scale * partial.sum()


def correlation_loss_backward(grad_loss, c, off_diagonal_weight, scale):
    dim = c.shape[0]
    tiles = triton.cdiv(dim, CONFIGS["correlation"].kwargs["BLOCK"])
    out = torch.empty((dim, dim), dtype=torch.float32, device=c.device)
    _launch(_correlation_grad_kernel, "correlation", (tiles, tiles), grad_loss.to(torch.float32), c, out, dim,
            *c.stride(), off_diagonal_weight, scale)
    return out


KERNELS = regularizers.RegularizerKernels(paired_forward, paired_backward, barlow_forward, barlow_backward,
                                          correlation_loss_forward, correlation_loss_backward)


def _compile_cases() -> List:
    """Every kernel at its launch configuration, for each input dtype (bf16 and fp16 take the same
    code paths in the paired and finishing kernels: fp32 and bf16 cover them)."""
    cases = []
    for dtype, torch_dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        operand, forward_precision, backward_precision = _dot_config(torch_dtype)
        inputs = {name: dtype for name in ("p1_ptr", "p2_ptr", "f1_ptr", "f2_ptr", "g1_ptr", "g2_ptr", "a_ptr",
                                           "b_ptr", "out_ptr")}
        floats = {name: "fp32" for name in ("terms_ptr", "norms_ptr", "grad_terms_ptr", "stats_ptr", "gram_b_ptr",
                                            "partial_ptr", "grad_loss_ptr", "grad_std_ptr", "col_sums_ptr",
                                            "c_ptr")}
        pointers = {**inputs, **floats}
        scalars = {"off_diagonal_weight": "fp32", "scale": "fp32"}
        specs = [("gram", _barlow_gram_kernel, "", dict(DOT_DTYPE=operand, PRECISION=forward_precision)),
                 ("grad", _barlow_grad_kernel, "", dict(PRECISION=backward_precision))]
        if dtype != "fp16":
            for cosine, kind in ((True, "cosine"), (False, "sqdist")):
                flags = dict(COSINE=cosine, EPS=COSINE_EPS)
                specs += [("paired", _paired_forward_kernel, kind, flags),
                          ("paired", _paired_backward_kernel, kind, dict(NEED_P1=True, NEED_P2=True, **flags))]
            specs += [("stats", _barlow_stats_kernel, "", dict(EPS=BARLOW_VARIANCE_EPS)),
                      ("finish", _barlow_finish_kernel, "", {})]
        if dtype == "fp32":  # C is float32 whatever the inputs
            specs += [("correlation", _correlation_loss_kernel, "", {}),
                      ("correlation", _correlation_grad_kernel, "", {})]
        for config_name, kernel, variant, constexprs in specs:
            name = "_".join(part for part in ("regularizers", kernel.fn.__name__.strip("_"), variant, dtype) if part)
            cases.append(compile_case(name, kernel, CONFIGS[config_name], constexprs, pointers, scalars))
    return cases


# Read by tests/test_triton_compile.py (see its docstring for the convention).
COMPILE_CASES = _compile_cases()
