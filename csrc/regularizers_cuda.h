// CUDA launchers of the non-contrastive PNR regularisers (contract: pnr_kernels/ops/regularizers.py).
// Plain C++ (compiled by both g++ and nvcc): raw pointers, sizes, strides and a `void*` stream;
// each returns nullptr on success, else the CUDA error string. Float32 buffers are contiguous.
// The Barlow Gram products themselves run through at::mm in regularizers_binding.cpp.
#pragma once

#include "launch.h"

namespace pnr_kernels {

// terms (B, 4) for (p1, f1), (p2, f2), (p1, f2), (p2, f1); norms (B, 4) of p1, p2, f1, f2 when cosine.
const char* launch_paired_forward(StridedMatrix p1, StridedMatrix p2, StridedMatrix f1, StridedMatrix f2,
                                  DType dtype, bool cosine, float* terms, float* norms, void* stream);

// g1, g2: contiguous (B, D) gradients of p1, p2 in the input dtype, or nullptr when not needed.
const char* launch_paired_backward(const float* grad_terms, const float* terms, const float* norms,
                                   StridedMatrix p1, StridedMatrix p2, StridedMatrix f1, StridedMatrix f2,
                                   DType dtype, bool cosine, void* g1, void* g2, void* stream);

// stats (5, D): column mean and 1/std of a and b, and diag(C) = column means of a^ b^.
const char* launch_barlow_stats(StridedMatrix a, StridedMatrix b, DType dtype, float* stats, void* stream);

// out (rows, cols) = (x - mean) * rstd per column.
const char* launch_standardise(StridedMatrix x, DType dtype, const float* mean, const float* rstd, float* out,
                               void* stream);

// grad_std holds G_b a^ on entry and d loss / d a^ on exit; col_sums (2, D) gets its column sums
// and those of grad_std * a^. grad_loss is one float on the device.
const char* launch_barlow_grad(const float* grad_loss, StridedMatrix b, DType dtype, const float* stats,
                               const float* a_std, float* grad_std, float* col_sums, double off_diagonal_weight,
                               double scale, void* stream);

// out (B, D), contiguous, input dtype: rstd_a * (g^ - mean_rows(g^) - a^ * mean_rows(g^ a^)).
const char* launch_barlow_finish(const float* a_std, const float* stats, const float* grad_std,
                                 const float* col_sums, int64_t rows, int64_t cols, DType dtype, void* out,
                                 void* stream);

// partial (blocks) = per-block sums of (C_ii - 1)^2 and l * C_ij^2 (i != j) over the contiguous float32
// (D, D) matrix c; `blocks` is correlation_loss_blocks(D).
int64_t correlation_loss_blocks(int64_t dim);
const char* launch_correlation_loss(const float* c, int64_t dim, double off_diagonal_weight, float* partial,
                                    void* stream);

// out (D, D) = grad_loss * scale * (2 (C_ii - 1) on the diagonal, 2 l C_ij off it).
const char* launch_correlation_grad(const float* grad_loss, const float* c, int64_t dim, double off_diagonal_weight,
                                    double scale, float* out, void* stream);

}  // namespace pnr_kernels
