"""Triton kernels of the fused multi-key InfoNCE op (contract: pnr_kernels/ops/infonce.py).

    lse[r, i] = LSE_{k, j (j != i where exclude_diagonal[k])} scales[r] * rows[r][i] . keys[k][j]
    d rows[r][i] = scales[r] g[r, i] sum_{k, j} p[r, k, i, j] keys[k][j]
    d keys[k][j] = sum_r scales[r] sum_i g[r, i] p[r, k, i, j] rows[r][i],  p = exp(logit - lse)

Three kernels, the scheme of flash attention's forward and recompute backward:

- ``_infonce_fwd_kernel``: one program per (row tile, key split); it walks its key tiles of every
  key block with a running max and running sum in fp32 (base-2 online log-sum-exp) and stores
  only the (R, M) fp32 LSE. Each key tile is loaded once and multiplied with every row set of the
  launch (SimCLR-PNR: rows [Z, P] x keys [Z, F], so one load of a Z or F tile serves both terms).
- ``_infonce_drow_kernel``: one program per (row tile, output D slice, key split) of the row sets
  that need a gradient; it recomputes the logits tile by tile from the saved LSE and accumulates
  ``p @ keys`` in registers. No atomics: each program owns its output tile.
- ``_infonce_dkey_kernel``: one program per (key tile, output D slice) of one key block that
  needs a gradient; it walks the row tiles of every row set and accumulates ``(g p)^T @ rows``.
  Key blocks and row sets that need no gradient get no program at all.

Nothing of size rows x keys is written to memory. Logits are accumulated in fp32 (bf16/fp16
operands on tensor cores; fp32 operands follow torch's fp32 matmul precision, read from the new or
the legacy API by ``common.fp32_matmul_precision``: IEEE fp32 or TF32). The probabilities are
rounded to the input dtype before the gradient products, as flash attention does.

Width D (``d_blocking``): up to ``RESIDENT_D`` (256 for bf16/fp16, 64 for fp32; half that for
bf16/fp16 on GPUs with 99 KiB of shared memory per block, sm_86/sm_89: ``resident_d``) a tile
spans all of D; the operand a program reuses across its loop (rows in forward and dRow, the key
tile in dKey) is loaded once, and the tiles loaded for the logits are reused by the gradient
products. Wider D is walked in ``CHUNK_D`` chunks for the logits and the gradients are written in
slices of the resident width, each slice's program recomputing its logits.

Group sizes: a launch serves at most ``MAX_ROW_SETS`` row sets and ``MAX_KEY_BLOCKS`` key blocks
(constexpr-specialised; every loss of this library fits in one launch). Larger lists are split
into groups on the host: forward LSEs of key groups are merged with ``logaddexp`` (O(M)), and
gradients of several groups are summed in fp32 (O(M x D)); correct for any counts, optimal for
the counts the losses use. ``DROW_ROW_SETS`` sets how many row sets one dRow launch shares key
tiles between: 1, because two fp32 accumulators of a (64, 256) tile spill registers on sm_90
(cuobjdump of the sm_90 cubins for contiguous bf16, D = 256, 64 x 64 tiles: 488 bytes of spill
stack with two row sets, none and 181 registers with one); the second row set rereads the key
tiles, mostly from L2.

Key splits (``key_splits``): when the row tiles alone cannot fill the GPU (MoCo-PNR: 256 rows
against 2 x 65536 queue entries would be 2-4 programs), the keys of each row tile are split
across programs, flash-decoding style: each split writes a partial LSE (merged with
``torch.logsumexp``, O(splits x M)) or fp32 partial row gradients (summed, O(splits x M x D),
a few MB at that shape). With many rows (SimCLR-PNR at N = 8192) there are 1-2 splits.

Strides: any. MoCo's queues are transposed views ((K, D) with stride 1 along the keys) and are
read in place, not copied. Compiled for that specialisation (bf16, contiguous rows; cuobjdump
-res-usage), the forward and dRow kernels spill nothing at D = 128 (the forward's two configs
use 154 and 149 registers on sm_90, 128 and 114 with contiguous keys); at D = 256 only the
forward's 64 x 64 config does (88 bytes of stack on sm_80, 56 on sm_90, against 0 and 24 with
contiguous keys; the 128 x 64 config has none). The 1.1-1.9 KB of stack cuobjdump shows belong to
the variant with no unit stride at all and int64 offsets, which MoCo does not launch. A
contiguous copy would read and write the four (K, D) queue views of every MoCo-PNR call (64 MB
each way for bf16, K = 65536, D = 128: ~30 us at 4.3 TB/s) and keep them for the backward (64 MB
more memory).

Offsets switch to int64 when any tensor's largest element offset reaches 2**31 (``needs_int64``).
"""
from __future__ import annotations

import functools
import inspect
import math
from typing import Dict, List, Optional, Sequence

import torch
import triton
import triton.language as tl

from ..ops.infonce import InfoNCEKernels
from ._interpret import interpreting
from .common import (SHARED_MEMORY_LIMIT, compile_case, fp32_matmul_precision, jit_function, launch, pow2_scale,
                     gpu_shared_memory, strides)

MAX_ROW_SETS = 2
MAX_KEY_BLOCKS = 2
DROW_ROW_SETS = 1  # <= MAX_ROW_SETS
SPLIT_TILE = 64  # rows / keys per nominal tile when choosing key splits (key_splits)
LOG2E = math.log2(math.e)  # the kernels work in base 2 (exp2/log2) and write natural-log LSEs
# D blocking, by element size: up to RESIDENT_D the whole width is one chunk, the operand a
# program reuses across its loop stays on chip, and a gradient program writes the whole width;
# wider D is walked in CHUNK_D chunks for the logits and written in RESIDENT_D slices. MIN_BLOCK
# is tl.dot's smallest K / N.
RESIDENT_D = {2: 256, 4: 64}
CHUNK_D = {2: 64, 4: 32}
# Shared memory (bytes) of the most demanding autotune config at the full RESIDENT_D, by element
# size, as compiled for sm_80-sm_89 (fwd, 128 x 64 tiles: 163840 for bf16/fp16 D = 256; fp32 dKey:
# 82944 for D = 64) and for sm_90 and later (its pipelines use more: 196608; 98304). Devices with
# less get half the resident width, and so on (``resident_d``): bf16/fp16 on sm_86/sm_89 (99 KiB).
# tests/test_compile_triton.py compiles every config at the blocking each GPU gets and checks it
# against that GPU's limit.
RESIDENT_SHARED_MEMORY = {False: {2: 163840, 4: 82944}, True: {2: 196608, 4: 98304}}  # by "sm_90 or later"
MIN_BLOCK = 16


# Autotune configs: (BLOCK_M, BLOCK_N, num_warps, num_stages) tried on a GPU, listed above each
# kernel. tests/test_compile_triton.py compiles every one for sm_80, sm_86, sm_89 and sm_90.
# The interpreter runs a tile in ~2 ms whatever its size, and refuses several autotune configs.
INTERPRETER_CONFIG = (32, 32, 4, 1)


def launch_configs(table, interpret: bool = interpreting()) -> List[triton.Config]:
    """The autotune configs of a kernel from its GPU table: one when interpreting."""
    table = [INTERPRETER_CONFIG] if interpret else table
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in table]


# ---------------------------------------------------------------------------------------------
# Tile helpers
# ---------------------------------------------------------------------------------------------

@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ b in fp32. UPCAST: bf16 tl.dot is wrong in the interpreter, so upcast there."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _weighted_mma(w, b, acc, RESCALE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """acc + w @ b for fp32 weights w rounded to b's dtype. RESCALE (fp16): w is divided by the
    power of two at its largest magnitude before the rounding and the product multiplied back
    (both exact), so that w keeps fp16's 11 bits instead of going subnormal: the key gradient's
    weights ``g scale p`` are about 1 / (2 N^2 tau) at batch N, below fp16's 2**-14 from N ~ 2000.
    A NaN in w stays in the product (the max may drop it; the division does not)."""
    if RESCALE:
        u = pow2_scale(tl.max(tl.max(tl.abs(w), 1), 0))
        acc += u * _mma((w * (1.0 / u)).to(b.dtype), b, tl.zeros_like(acc), UPCAST, PRECISION)
    else:
        acc = _mma(w.to(b.dtype), b, acc, UPCAST, PRECISION)
    return acc


@triton.jit
def _load_tile(ptr, stride_0, stride_1, offs_0, mask_0, offs_1, mask_1):
    """The (len(offs_0), len(offs_1)) tile ``ptr[offs_0, offs_1]``, zero outside the masks."""
    return tl.load(ptr + offs_0[:, None] * stride_0 + offs_1[None, :] * stride_1,
                   mask=mask_0[:, None] & mask_1[None, :], other=0.0)


@triton.jit
def _d_range(start, D, BLOCK_D: tl.constexpr, INT64: tl.constexpr):
    offs_d = start + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    if INT64:
        offs_d = offs_d.to(tl.int64)
    return offs_d, mask_d


@triton.jit
def _full_width(ptr, stride_0, stride_1, offs_0, mask_0, D, SINGLE_CHUNK: tl.constexpr,
                INT64: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (len(offs_0), BLOCK_D) tile covering all of D when SINGLE_CHUNK; otherwise a
    placeholder that is never read."""
    tile = tl.zeros([1, 1], dtype=tl.float32)
    if SINGLE_CHUNK:
        offs_d, mask_d = _d_range(0, D, BLOCK_D, INT64)
        tile = _load_tile(ptr, stride_0, stride_1, offs_0, mask_0, offs_d, mask_d)
    return tile


@triton.jit
def _logits(row0, row1, key, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0, r1_s1, offs_m, mask_m,
            k_ptr, k_s0, k_s1, offs_n, mask_n, D,
            TWO_ROWS: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
            INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Unscaled dot products (BLOCK_M, BLOCK_N) of one row tile of one or two row sets with one key
    tile; each key chunk serves both row sets.

    SINGLE_CHUNK (D <= BLOCK_D): ``row0, row1, key`` are the full-width tiles (``_full_width``),
    loaded by the caller, which keeps one side on chip across its loop and reuses the other as
    the operand of its gradient product. Otherwise D is walked here in BLOCK_D chunks and the
    tiles passed are placeholders."""
    s0 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    s1 = s0
    if SINGLE_CHUNK:
        s0 = _mma(row0, tl.trans(key), s0, UPCAST, PRECISION)
        if TWO_ROWS:
            s1 = _mma(row1, tl.trans(key), s1, UPCAST, PRECISION)
    else:
        for d_start in range(0, D, BLOCK_D):
            offs_d, mask_d = _d_range(d_start, D, BLOCK_D, INT64)
            key_t = tl.trans(_load_tile(k_ptr, k_s0, k_s1, offs_n, mask_n, offs_d, mask_d))
            s0 = _mma(_load_tile(r0_ptr, r0_s0, r0_s1, offs_m, mask_m, offs_d, mask_d), key_t, s0,
                      UPCAST, PRECISION)
            if TWO_ROWS:
                s1 = _mma(_load_tile(r1_ptr, r1_s0, r1_s1, offs_m, mask_m, offs_d, mask_d), key_t, s1,
                          UPCAST, PRECISION)
    return s0, s1


@triton.jit
def _excluded(offs_m, offs_n, mask_n, EXCLUDE: tl.constexpr):
    """Mask (broadcastable to BLOCK_M x BLOCK_N) of the logits outside the LSE: padding keys and,
    if EXCLUDE, the key whose index equals the row index."""
    out = ~mask_n[None, :]
    if EXCLUDE:
        out = out | (offs_m[:, None] == offs_n[None, :])
    return out


@triton.jit
def _online_update(m, l, s, excluded):
    """Fold a tile of base-2 logits s into the running max m and running sum l (fp32), leaving
    out the excluded ones. A row whose logits are all excluded so far keeps m = -inf and l = 0.

    Non-finite logits poison l, by construction rather than by the target's max semantics (PTX
    max.f32 and the interpreter's max both drop a NaN operand): the max is taken over the non-NaN
    logits only, and ``s - s`` (0, or NaN for a NaN or infinite logit) is added to the sum, so a
    NaN or infinite input gives a NaN LSE (docs/losses.md, "Precision")."""
    poison = tl.where(excluded, 0.0, s - s)
    s = tl.where(excluded, float("-inf"), s)
    m_new = tl.maximum(m, tl.max(tl.where(s != s, float("-inf"), s), 1))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    l = l * tl.exp2(m - m_ref) + tl.sum(tl.exp2(s - m_ref[:, None]) + poison, 1)
    return m_new, l


@triton.jit
def _lse(m, l):
    """The natural-log LSE from the base-2 running max and sum: l >= 1 once any logit is kept
    (the max contributes exp2(0)); l = 0 means m = -inf and the LSE is -inf, as torch.logsumexp
    gives for a row with every key excluded (or an empty split); a NaN l stays NaN (``l < 1`` is
    false for NaN, where a max might drop it)."""
    return (m + tl.log2(tl.where(l < 1.0, 1.0, l))) * 0.6931471805599453


@triton.jit
def _probs(s, scale_log2, lse_log2, excluded):
    """exp(logit - lse) from unscaled dots s and a base-2 LSE that is finite (0 for rows whose
    LSE is -inf: all their logits are excluded, so p = 0 there)."""
    return tl.exp2(tl.where(excluded, float("-inf"), s * scale_log2 - lse_log2[:, None]))


@triton.jit
def _split_range(split, SPLITS, MK, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of a key block that split ``split`` of SPLITS walks: whole BLOCK_N tiles,
    as evenly as they go (trailing splits may get none)."""
    per_split = tl.cdiv(tl.cdiv(MK, BLOCK_N), SPLITS) * BLOCK_N
    lo = split * per_split
    return lo, tl.minimum(lo + per_split, MK)


@triton.jit
def _load_lse_log2(lse_ptr, offs_m, mask_m):
    lse = tl.load(lse_ptr + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    return tl.where(lse == float("-inf"), 0.0, lse)


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------

@triton.jit
def _fwd_key_block(m0, l0, m1, l1, row0, row1, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0, r1_s1,
                   offs_m, mask_m, k_ptr, k_s0, k_s1, MK, split, SPLITS, scale0_log2, scale1_log2, D,
                   EXCLUDE: tl.constexpr, TWO_ROWS: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
                   INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    lo, hi = _split_range(split, SPLITS, MK, BLOCK_N)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < MK
        if INT64:
            offs_n = offs_n.to(tl.int64)
        key = _full_width(k_ptr, k_s0, k_s1, offs_n, mask_n, D, SINGLE_CHUNK, INT64, BLOCK_D)
        s0, s1 = _logits(row0, row1, key, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0, r1_s1, offs_m, mask_m,
                         k_ptr, k_s0, k_s1, offs_n, mask_n, D, TWO_ROWS, SINGLE_CHUNK,
                         INT64, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        excluded = _excluded(offs_m, offs_n, mask_n, EXCLUDE)
        m0, l0 = _online_update(m0, l0, s0 * scale0_log2, excluded)
        if TWO_ROWS:
            m1, l1 = _online_update(m1, l1, s1 * scale1_log2, excluded)
    return m0, l0, m1, l1


FWD_CONFIGS = [(128, 64, 8, 2), (64, 64, 4, 3)]


@triton.autotune(launch_configs(FWD_CONFIGS), key=["D", "NUM_ROWS", "NUM_KEYS", "BLOCK_D"])
@triton.jit
def _infonce_fwd_kernel(
    r0_ptr, r1_ptr, k0_ptr, k1_ptr, lse_ptr,
    scale0_log2, scale1_log2,
    M, MK0, MK1, D, SPLITS,
    r0_s0, r0_s1, r1_s0, r1_s1, k0_s0, k0_s1, k1_s0, k1_s1,
    NUM_ROWS: tl.constexpr, NUM_KEYS: tl.constexpr, EXCLUDE0: tl.constexpr, EXCLUDE1: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The LSE (NUM_ROWS, M) of one row tile over split program_id(1) of SPLITS of the keys:
    lse_ptr is (SPLITS, NUM_ROWS, M) fp32, contiguous (the host merges the splits)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    split = tl.program_id(1)
    if INT64:
        offs_m = offs_m.to(tl.int64)
    lse_ptr += split * NUM_ROWS * M
    # the row tiles stay on chip across the key loop when D fits one chunk
    row0 = _full_width(r0_ptr, r0_s0, r0_s1, offs_m, mask_m, D, SINGLE_CHUNK, INT64, BLOCK_D)
    row1 = row0
    if NUM_ROWS == 2:
        row1 = _full_width(r1_ptr, r1_s0, r1_s1, offs_m, mask_m, D, SINGLE_CHUNK, INT64, BLOCK_D)
    m0 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l0 = tl.zeros([BLOCK_M], dtype=tl.float32)
    m1 = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l1 = tl.zeros([BLOCK_M], dtype=tl.float32)
    m0, l0, m1, l1 = _fwd_key_block(m0, l0, m1, l1, row0, row1, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0,
                                    r1_s1, offs_m, mask_m, k0_ptr, k0_s0, k0_s1, MK0, split, SPLITS,
                                    scale0_log2, scale1_log2, D, EXCLUDE0, NUM_ROWS == 2, SINGLE_CHUNK, INT64,
                                    UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    if NUM_KEYS == 2:
        m0, l0, m1, l1 = _fwd_key_block(m0, l0, m1, l1, row0, row1, r0_ptr, r0_s0, r0_s1, r1_ptr,
                                        r1_s0, r1_s1, offs_m, mask_m, k1_ptr, k1_s0, k1_s1, MK1,
                                        split, SPLITS, scale0_log2, scale1_log2, D, EXCLUDE1, NUM_ROWS == 2,
                                        SINGLE_CHUNK, INT64, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
    tl.store(lse_ptr + offs_m, _lse(m0, l0), mask=mask_m)
    if NUM_ROWS == 2:
        tl.store(lse_ptr + M + offs_m, _lse(m1, l1), mask=mask_m)


# ---------------------------------------------------------------------------------------------
# Backward: row gradients
# ---------------------------------------------------------------------------------------------

@triton.jit
def _drow_key_block(acc0, acc1, row0, row1, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0, r1_s1, offs_m,
                    mask_m, lse0_log2, lse1_log2, k_ptr, k_s0, k_s1, MK, split, SPLITS, scale0_log2,
                    scale1_log2, D, offs_dv, mask_dv,
                    EXCLUDE: tl.constexpr, TWO_ROWS: tl.constexpr, SINGLE_CHUNK: tl.constexpr,
                    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    lo, hi = _split_range(split, SPLITS, MK, BLOCK_N)
    for n_start in range(lo, hi, BLOCK_N):
        offs_n = n_start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < MK
        if INT64:
            offs_n = offs_n.to(tl.int64)
        key = _full_width(k_ptr, k_s0, k_s1, offs_n, mask_n, D, SINGLE_CHUNK, INT64, BLOCK_D)
        s0, s1 = _logits(row0, row1, key, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0, r1_s1, offs_m, mask_m,
                         k_ptr, k_s0, k_s1, offs_n, mask_n, D, TWO_ROWS, SINGLE_CHUNK,
                         INT64, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        excluded = _excluded(offs_m, offs_n, mask_n, EXCLUDE)
        if not SINGLE_CHUNK:  # else the logits' key tile spans this program's whole output width
            key = _load_tile(k_ptr, k_s0, k_s1, offs_n, mask_n, offs_dv, mask_dv)
        p0 = _probs(s0, scale0_log2, lse0_log2, excluded)
        acc0 = _mma(p0.to(key.dtype), key, acc0, UPCAST, PRECISION)
        if TWO_ROWS:
            p1 = _probs(s1, scale1_log2, lse1_log2, excluded)
            acc1 = _mma(p1.to(key.dtype), key, acc1, UPCAST, PRECISION)
    return acc0, acc1


DROW_CONFIGS = [(64, 64, 8, 2), (64, 32, 4, 3)]


@triton.autotune(launch_configs(DROW_CONFIGS), key=["D", "NUM_ROWS", "NUM_KEYS", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _infonce_drow_kernel(
    r0_ptr, r1_ptr, k0_ptr, k1_ptr, lse_ptr, g_ptr, dr0_ptr, dr1_ptr,
    scale0_log2, scale1_log2,
    M, MK0, MK1, D, SPLITS,
    r0_s0, r0_s1, r1_s0, r1_s1, k0_s0, k0_s1, k1_s0, k1_s1,
    NUM_ROWS: tl.constexpr, NUM_KEYS: tl.constexpr, EXCLUDE0: tl.constexpr, EXCLUDE1: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """d rows of one row tile and one BLOCK_DV slice of D, from split program_id(2) of SPLITS of
    the keys: dr*_ptr are (SPLITS, M, D) contiguous (the host sums the splits). lse_ptr and g_ptr
    point at (NUM_ROWS, M) contiguous fp32 rows of these row sets."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    split = tl.program_id(2)
    if SINGLE_CHUNK:  # the gradient products reuse the full-width logit tiles
        tl.static_assert(BLOCK_DV == BLOCK_D)
    offs_dv, mask_dv = _d_range(tl.program_id(1) * BLOCK_DV, D, BLOCK_DV, INT64)
    if INT64:
        offs_m = offs_m.to(tl.int64)
        split = split.to(tl.int64)
    # the row tiles stay on chip across the key loop when D fits one chunk
    row0 = _full_width(r0_ptr, r0_s0, r0_s1, offs_m, mask_m, D, SINGLE_CHUNK, INT64, BLOCK_D)
    row1 = row0
    if NUM_ROWS == 2:
        row1 = _full_width(r1_ptr, r1_s0, r1_s1, offs_m, mask_m, D, SINGLE_CHUNK, INT64, BLOCK_D)
    lse0_log2 = _load_lse_log2(lse_ptr, offs_m, mask_m)
    lse1_log2 = lse0_log2
    if NUM_ROWS == 2:
        lse1_log2 = _load_lse_log2(lse_ptr + M, offs_m, mask_m)
    acc0 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc0, acc1 = _drow_key_block(acc0, acc1, row0, row1, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0, r1_s1,
                                 offs_m, mask_m, lse0_log2, lse1_log2, k0_ptr, k0_s0, k0_s1, MK0,
                                 split, SPLITS, scale0_log2, scale1_log2, D, offs_dv, mask_dv,
                                 EXCLUDE0, NUM_ROWS == 2, SINGLE_CHUNK, INT64, UPCAST, PRECISION,
                                 BLOCK_M, BLOCK_N, BLOCK_D)
    if NUM_KEYS == 2:
        acc0, acc1 = _drow_key_block(acc0, acc1, row0, row1, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0,
                                     r1_s1, offs_m, mask_m, lse0_log2, lse1_log2, k1_ptr, k1_s0, k1_s1,
                                     MK1, split, SPLITS, scale0_log2, scale1_log2, D, offs_dv, mask_dv,
                                     EXCLUDE1, NUM_ROWS == 2, SINGLE_CHUNK, INT64, UPCAST, PRECISION,
                                     BLOCK_M, BLOCK_N, BLOCK_D)
    out_offs = split * M * D + offs_m[:, None] * D + offs_dv[None, :]
    out_mask = mask_m[:, None] & mask_dv[None, :]
    # d rows[r][i] = scales[r] g[r, i] (p @ keys)[i]; scale_log2 * ln 2 = scales[r]
    g0 = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0) * (scale0_log2 * 0.6931471805599453)
    tl.store(dr0_ptr + out_offs, (acc0 * g0[:, None]).to(dr0_ptr.dtype.element_ty), mask=out_mask)
    if NUM_ROWS == 2:
        g1 = tl.load(g_ptr + M + offs_m, mask=mask_m, other=0.0) * (scale1_log2 * 0.6931471805599453)
        tl.store(dr1_ptr + out_offs, (acc1 * g1[:, None]).to(dr1_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------
# Backward: key gradients
# ---------------------------------------------------------------------------------------------

DKEY_CONFIGS = [(64, 64, 8, 2), (32, 64, 4, 3)]


@triton.autotune(launch_configs(DKEY_CONFIGS), key=["D", "NUM_ROWS", "BLOCK_D", "BLOCK_DV"])
@triton.jit
def _infonce_dkey_kernel(
    r0_ptr, r1_ptr, k_ptr, lse_ptr, g_ptr, dk_ptr,
    scale0_log2, scale1_log2,
    M, MK, D,
    r0_s0, r0_s1, r1_s0, r1_s1, k_s0, k_s1,
    NUM_ROWS: tl.constexpr, EXCLUDE: tl.constexpr,
    INT64: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr, RESCALE: tl.constexpr,
    SINGLE_CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """d keys (MK, D) contiguous of one key block, for one key tile and one BLOCK_DV slice of D,
    summed over the NUM_ROWS row sets (lse_ptr, g_ptr: their (NUM_ROWS, M) fp32 rows). RESCALE
    (fp16 inputs) keeps the weights in fp16's normal range (``_weighted_mma``)."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < MK
    if SINGLE_CHUNK:  # the gradient products reuse the full-width logit tiles
        tl.static_assert(BLOCK_DV == BLOCK_D)
    offs_dv, mask_dv = _d_range(tl.program_id(1) * BLOCK_DV, D, BLOCK_DV, INT64)
    if INT64:
        offs_n = offs_n.to(tl.int64)
    # the key tile stays on chip across the row loop when D fits one chunk
    key = _full_width(k_ptr, k_s0, k_s1, offs_n, mask_n, D, SINGLE_CHUNK, INT64, BLOCK_D)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for m_start in range(0, M, BLOCK_M):
        offs_m = m_start + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        if INT64:
            offs_m = offs_m.to(tl.int64)
        row0 = _full_width(r0_ptr, r0_s0, r0_s1, offs_m, mask_m, D, SINGLE_CHUNK, INT64, BLOCK_D)
        row1 = row0
        if NUM_ROWS == 2:
            row1 = _full_width(r1_ptr, r1_s0, r1_s1, offs_m, mask_m, D, SINGLE_CHUNK, INT64, BLOCK_D)
        s0, s1 = _logits(row0, row1, key, r0_ptr, r0_s0, r0_s1, r1_ptr, r1_s0, r1_s1, offs_m, mask_m,
                         k_ptr, k_s0, k_s1, offs_n, mask_n, D, NUM_ROWS == 2, SINGLE_CHUNK,
                         INT64, UPCAST, PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        excluded = _excluded(offs_m, offs_n, mask_n, EXCLUDE)
        # weights g[r, i] scales[r] p[i, j]; padding rows load g = 0
        g0 = tl.load(g_ptr + offs_m, mask=mask_m, other=0.0) * (scale0_log2 * 0.6931471805599453)
        w0 = _probs(s0, scale0_log2, _load_lse_log2(lse_ptr, offs_m, mask_m), excluded) * g0[:, None]
        if not SINGLE_CHUNK:  # else the logits' row tiles span this program's whole output width
            row0 = _load_tile(r0_ptr, r0_s0, r0_s1, offs_m, mask_m, offs_dv, mask_dv)
        acc = _weighted_mma(tl.trans(w0), row0, acc, RESCALE, UPCAST, PRECISION)
        if NUM_ROWS == 2:
            g1 = tl.load(g_ptr + M + offs_m, mask=mask_m, other=0.0) * (scale1_log2 * 0.6931471805599453)
            w1 = _probs(s1, scale1_log2, _load_lse_log2(lse_ptr + M, offs_m, mask_m), excluded) * g1[:, None]
            if not SINGLE_CHUNK:
                row1 = _load_tile(r1_ptr, r1_s0, r1_s1, offs_m, mask_m, offs_dv, mask_dv)
            acc = _weighted_mma(tl.trans(w1), row1, acc, RESCALE, UPCAST, PRECISION)
    tl.store(dk_ptr + offs_n[:, None] * D + offs_dv[None, :], acc.to(dk_ptr.dtype.element_ty),
             mask=mask_n[:, None] & mask_dv[None, :])


def resident_d(element_size: int, shared_memory: Optional[int], arch: Optional[int] = None) -> int:
    """The widest D kept resident on a GPU of compute capability ``arch`` (80 for sm_80) with
    ``shared_memory`` bytes per block (None: no limit, the interpreter): RESIDENT_D, halved while
    the most demanding config would not fit (its shared memory scales with the width;
    RESIDENT_SHARED_MEMORY), never below CHUNK_D."""
    width = RESIDENT_D[element_size]
    need = RESIDENT_SHARED_MEMORY[arch is not None and arch >= 90][element_size]
    while shared_memory is not None and need > shared_memory and width > CHUNK_D[element_size]:
        width, need = width // 2, need // 2
    return width


def d_blocking(dim: int, element_size: int, shared_memory: Optional[int] = None,
               arch: Optional[int] = None) -> Dict[str, object]:
    """SINGLE_CHUNK, BLOCK_D (logits) and BLOCK_DV (gradient output slice) for width ``dim`` on a
    GPU of compute capability ``arch`` with ``shared_memory`` bytes per block: one chunk covering
    D up to ``resident_d`` (then BLOCK_DV = BLOCK_D: the gradient products reuse the logits'
    tiles), else CHUNK_D chunks and ``resident_d`` slices (each slice's program recomputes the
    logits: D / resident_d times the logit work in backward)."""
    resident = resident_d(element_size, shared_memory, arch)
    covering = max(MIN_BLOCK, triton.next_power_of_2(dim))
    if covering <= resident:
        return dict(SINGLE_CHUNK=True, BLOCK_D=covering, BLOCK_DV=covering)
    return dict(SINGLE_CHUNK=False, BLOCK_D=CHUNK_D[element_size], BLOCK_DV=resident)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when some element of some tensor sits 2**31 or more elements from its base pointer, so
    int32 offset arithmetic would overflow."""
    return any(t.numel() > 0 and sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= 2**31
               for t in tensors)


def _common_flags(rows: Sequence[torch.Tensor], keys: Sequence[torch.Tensor], force_int64: bool) -> Dict:
    dtype = rows[0].dtype
    for name, t in [("rows", r) for r in rows] + [("keys", k) for k in keys]:
        if t.dtype != dtype:
            raise TypeError(f"the Triton InfoNCE kernels need one dtype for all {name} and rows; got "
                            f"{dtype} and {t.dtype}")
    return dict(
        INT64=force_int64 or needs_int64(*rows, *keys),
        UPCAST=interpreting() and dtype == torch.bfloat16,
        PRECISION=fp32_matmul_precision() if dtype == torch.float32 else "tf32",
        **d_blocking(rows[0].shape[1], rows[0].element_size(), *gpu_shared_memory(rows[0].device)),
    )


@functools.lru_cache(maxsize=None)
def _programs_wanted(device: torch.device) -> int:
    """Programs that fill the device: two per SM on a GPU. The interpreter runs programs one after
    another, so there 4 only serves to exercise split key ranges in the tests."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def key_splits(rows: int, key_sizes: Sequence[int], device: torch.device) -> int:
    """Programs that share one row tile's keys (forward and row gradients): 1 when the row tiles
    alone fill the device (SimCLR-PNR at large N), more when there are few rows against many
    keys (MoCo-PNR: 256 rows against 2 x 65536 queue entries), never more than the key tiles.
    Counted in SPLIT_TILE tiles, whatever block sizes the autotuner picks."""
    row_tiles = triton.cdiv(rows, SPLIT_TILE)
    key_tiles = sum(triton.cdiv(n, SPLIT_TILE) for n in key_sizes)
    return max(1, min(key_tiles, _programs_wanted(device) // row_tiles))


def _check_lists(rows, keys):
    if not rows or not keys:
        raise ValueError(f"the InfoNCE op needs at least one row set and one key block, got "
                         f"{len(rows)} and {len(keys)}")


def _pair(items):
    """Two kernel arguments from a group of one or two (the second is never read when absent)."""
    return items[0], items[-1]


def _groups(n: int, size: int) -> List[range]:
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


def _summed(parts_of_group, groups, dtypes):
    """Outputs of one launch per group, summed: written in their final dtypes by a single launch,
    or in fp32 and summed when the lists needed several groups."""
    if len(groups) == 1:
        return parts_of_group(groups[0], dtypes)
    total = None
    for group in groups:
        parts = parts_of_group(group, [torch.float32] * len(dtypes))
        total = parts if total is None else [a + b for a, b in zip(total, parts)]
    return [t.to(dtype) for t, dtype in zip(total, dtypes)]


# ---------------------------------------------------------------------------------------------
# Host entry points (the InfoNCEKernels pair)
# ---------------------------------------------------------------------------------------------

def infonce_forward(rows, keys, exclude_diagonal, scales, *, force_int64=False):
    """The op's forward: lse (R, M) fp32. ``force_int64`` runs the int64-offset path (tests)."""
    _check_lists(rows, keys)
    flags = _common_flags(rows, keys, force_int64)
    del flags["BLOCK_DV"]
    m, d = rows[0].shape
    out = []
    for row_group in _groups(len(rows), MAX_ROW_SETS):
        r = [rows[i] for i in row_group]
        partial = []
        for key_group in _groups(len(keys), MAX_KEY_BLOCKS):
            k = [keys[j] for j in key_group]
            exclude = [exclude_diagonal[j] for j in key_group]
            scale = [scales[i] * LOG2E for i in row_group]
            splits = key_splits(m, [t.shape[0] for t in k], rows[0].device)
            lse = torch.empty((splits, len(r), m), dtype=torch.float32, device=rows[0].device)
            r0, r1 = _pair(r)
            k0, k1 = _pair(k)
            launch(_infonce_fwd_kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), splits),
                   r0_ptr=r0, r1_ptr=r1, k0_ptr=k0, k1_ptr=k1, lse_ptr=lse,
                   scale0_log2=scale[0], scale1_log2=scale[-1],
                   M=m, MK0=k0.shape[0], MK1=k1.shape[0], D=d, SPLITS=splits,
                   **strides(r0=r0, r1=r1, k0=k0, k1=k1),
                   NUM_ROWS=len(r), NUM_KEYS=len(k), EXCLUDE0=exclude[0], EXCLUDE1=exclude[-1], **flags)
            partial.append(torch.logsumexp(lse, 0) if splits > 1 else lse[0])
        out.append(functools.reduce(torch.logaddexp, partial))
    return torch.cat(out)


def infonce_backward(grad_lse, lse, rows, keys, exclude_diagonal, scales, rows_need_grad,
                     keys_need_grad, *, force_int64=False):
    """The op's backward: gradients of the rows, then keys, that need one (ops/infonce.py)."""
    _check_lists(rows, keys)
    flags = _common_flags(rows, keys, force_int64)
    m, d = rows[0].shape
    dv = flags["BLOCK_DV"]
    grad_lse = grad_lse.to(torch.float32).contiguous()
    lse = lse.contiguous()
    # the gradients are written contiguously: (M or M_k) x D elements
    flags["INT64"] = flags["INT64"] or max(t.shape[0] for t in list(rows) + list(keys)) * d >= 2**31

    def row_grads(row_group, key_group, dtypes):
        r = [rows[i] for i in row_group]
        k = [keys[j] for j in key_group]
        exclude = [exclude_diagonal[j] for j in key_group]
        scale = [scales[i] * LOG2E for i in row_group]
        splits = key_splits(m, [t.shape[0] for t in k], r[0].device)
        # one split writes the gradient in its dtype; several write fp32 partial sums
        out = [torch.empty((splits, m, d), dtype=dtype if splits == 1 else torch.float32, device=r[0].device)
               for dtype in dtypes]
        r0, r1 = _pair(r)
        k0, k1 = _pair(k)
        dr0, dr1 = _pair(out)
        launch(_infonce_drow_kernel, lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(d, dv), splits),
               r0_ptr=r0, r1_ptr=r1, k0_ptr=k0, k1_ptr=k1, lse_ptr=lse[list(row_group)],
               g_ptr=grad_lse[list(row_group)], dr0_ptr=dr0, dr1_ptr=dr1,
               scale0_log2=scale[0], scale1_log2=scale[-1],
               M=m, MK0=k0.shape[0], MK1=k1.shape[0], D=d, SPLITS=splits,
               **strides(r0=r0, r1=r1, k0=k0, k1=k1),
               NUM_ROWS=len(r), NUM_KEYS=len(k), EXCLUDE0=exclude[0], EXCLUDE1=exclude[-1],
               **{**flags, "INT64": flags["INT64"] or splits * m * d >= 2**31})
        return [o[0] if splits == 1 else o.sum(0).to(dtype) for o, dtype in zip(out, dtypes)]

    def key_grad(j, row_group, dtypes):
        r = [rows[i] for i in row_group]
        mk = keys[j].shape[0]
        scale = [scales[i] * LOG2E for i in row_group]
        out = torch.empty((mk, d), dtype=dtypes[0], device=keys[j].device)
        if mk == 0:  # an empty key block: nothing to launch
            return [out]
        r0, r1 = _pair(r)
        launch(_infonce_dkey_kernel, lambda meta: (triton.cdiv(mk, meta["BLOCK_N"]), triton.cdiv(d, dv)),
               r0_ptr=r0, r1_ptr=r1, k_ptr=keys[j], lse_ptr=lse[list(row_group)],
               g_ptr=grad_lse[list(row_group)], dk_ptr=out, scale0_log2=scale[0], scale1_log2=scale[-1],
               M=m, MK=mk, D=d, **strides(r0=r0, r1=r1, k=keys[j]),
               NUM_ROWS=len(r), EXCLUDE=exclude_diagonal[j], RESCALE=rows[0].dtype == torch.float16, **flags)
        return [out]

    grads = []
    need_rows = [i for i, need in enumerate(rows_need_grad) if need]
    for start in range(0, len(need_rows), DROW_ROW_SETS):
        row_group = need_rows[start:start + DROW_ROW_SETS]
        grads += _summed(lambda key_group, dtypes: row_grads(row_group, key_group, dtypes),
                         _groups(len(keys), MAX_KEY_BLOCKS), [rows[i].dtype for i in row_group])
    for j, need in enumerate(keys_need_grad):
        if need:
            grads += _summed(lambda row_group, dtypes: key_grad(j, row_group, dtypes),
                             _groups(len(rows), MAX_ROW_SETS), [keys[j].dtype])
    return grads


KERNELS = InfoNCEKernels(infonce_forward, infonce_backward)


def compile_cases() -> List:
    """For tests/test_compile_triton.py: every kernel x every GPU autotune config at the largest
    specialisation the host launches (two row sets, DROW_ROW_SETS for dRow, two key blocks), at
    the D blocking each GPU gets (``d_blocking`` with its shared memory): bf16 and fp32 at their
    widest resident D on contiguous, aligned tensors (what a training step launches; the most
    shared memory) for sm_80, sm_86, sm_89 and sm_90, and the chunked loop sm_86/sm_89 run just
    past their resident width; MoCo's launch (contiguous rows, queue keys that are transposed
    views); bf16 resident with general strides and int64 offsets; the
    chunked-D loop of each dtype; bf16 at the narrowest tiles (tl.dot's minimum shapes); and
    fp16's rescaled key-gradient weights (``_weighted_mma``), the only code fp16 does not share
    with bf16."""
    every_gpu = tuple(SHARED_MEMORY_LIMIT)
    variants = [  # dtype, layout ("resident", "chunked", "narrow"), INT64, strides, archs
        ("bf16", "resident", False, "contiguous", every_gpu),
        ("fp32", "resident", False, "contiguous", every_gpu),
        ("bf16", "chunked", False, "contiguous", (86, 89)),
        ("bf16", "resident", False, "queue", (80, 90)),
        ("bf16", "resident", True, "strided", (90,)),
        ("bf16", "chunked", True, "strided", (90,)),
        ("fp32", "chunked", True, "strided", (80,)),
        ("bf16", "narrow", False, "strided", (80,)),
        ("fp16", "resident", False, "contiguous", every_gpu),
    ]
    scalars = {"scale0_log2": "fp32", "scale1_log2": "fp32"}
    cases = []
    for dtype, layout, int64, layout_of_strides, archs in variants:
        element_size = 4 if dtype == "fp32" else 2
        blockings = {}  # (BLOCK_D, BLOCK_DV) -> the archs that launch it
        for arch in archs:
            resident = resident_d(element_size, SHARED_MEMORY_LIMIT[arch], arch)
            blocking = {"resident": (resident, resident), "chunked": (CHUNK_D[element_size], resident),
                        "narrow": (MIN_BLOCK, MIN_BLOCK)}[layout]
            blockings.setdefault(blocking, []).append(arch)
        for (d_block, dv_block), block_archs in blockings.items():
            common = dict(INT64=int64, UPCAST=False, PRECISION="tf32", SINGLE_CHUNK=layout != "chunked",
                          BLOCK_D=d_block)
            pointers = {"lse_ptr": "fp32", "g_ptr": "fp32", **{
                name: dtype for name in ("r0_ptr", "r1_ptr", "k0_ptr", "k1_ptr", "k_ptr", "dr0_ptr", "dr1_ptr",
                                         "dk_ptr")}}
            specs = [
                ("fwd", _infonce_fwd_kernel, FWD_CONFIGS,
                 dict(NUM_ROWS=2, NUM_KEYS=2, EXCLUDE0=True, EXCLUDE1=False, **common)),
                ("drow", _infonce_drow_kernel, DROW_CONFIGS,
                 dict(NUM_ROWS=DROW_ROW_SETS, NUM_KEYS=2, EXCLUDE0=True, EXCLUDE1=False, BLOCK_DV=dv_block,
                      **common)),
                ("dkey", _infonce_dkey_kernel, DKEY_CONFIGS,
                 dict(NUM_ROWS=2, EXCLUDE=True, BLOCK_DV=dv_block, RESCALE=dtype == "fp16", **common)),
            ]
            if dtype == "fp16":
                specs = [spec for spec in specs if spec[0] == "dkey"]
            if layout_of_strides == "queue":  # frozen queues get no key gradient
                specs = [spec for spec in specs if spec[0] != "dkey"]
            shape = ("chunked" if layout == "chunked" else "resident") + "_" + layout_of_strides
            for kind, kernel, table, constexprs in specs:
                names = list(inspect.signature(jit_function(kernel).fn).parameters)
                strides_ = [n for n in names if n.endswith(("_s0", "_s1"))]
                unit = {"contiguous": [n for n in strides_ if n.endswith("_s1")], "strided": [],
                        # MoCo: contiguous rows against queue keys laid out as (D, K) transposed
                        "queue": [n for n in strides_ if n.endswith("_s1" if n.startswith("r") else "_s0")],
                        }[layout_of_strides]
                divisible = [n for n in names if n.endswith("_ptr") or n in ("D", "M", "MK", "MK0", "MK1")
                             or (n in strides_ and n not in unit)] if layout_of_strides != "strided" else []
                for (bm, bn, warps, stages), config in zip(table, launch_configs(table, interpret=False)):
                    name = (f"infonce_{kind}_{dtype}_{shape}_d{d_block}"
                            f"{f'v{dv_block}' if dv_block != d_block else ''}_m{bm}n{bn}w{warps}s{stages}")
                    cases.append(compile_case(name, kernel, config, constexprs, pointers, scalars, tuple(block_archs),
                                              unit, divisible))
    return cases
