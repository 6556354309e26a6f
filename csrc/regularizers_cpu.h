// CPU kernels of the non-contrastive PNR regularisers. The exact contract (outputs, saved
// statistics, gradient formulas) is the module docstring of pnr_kernels/ops/regularizers.py;
// regularizers_binding.cpp checks the inputs and registers these as torch ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <string>
#include <tuple>
#include <vector>

namespace pnr_kernels {

// terms (B, 4) for the pairs (p1, f1), (p2, f2), (p1, f2), (p2, f1) and, for "cosine", the row
// norms (B, 4) of p1, p2, f1, f2 ((B, 0) for "squared_distance"), in the compute dtype.
std::tuple<at::Tensor, at::Tensor> paired_terms_forward_cpu(const at::Tensor& p1, const at::Tensor& p2,
                                                            const at::Tensor& f1, const at::Tensor& f2,
                                                            bool cosine);

// The gradients of p1 and p2 that are needed, in that order, in the inputs' dtype.
std::vector<at::Tensor> paired_terms_backward_cpu(const at::Tensor& grad_terms, const at::Tensor& terms,
                                                  const at::Tensor& norms, const at::Tensor& p1,
                                                  const at::Tensor& p2, const at::Tensor& f1,
                                                  const at::Tensor& f2, bool cosine, bool p1_needs_grad,
                                                  bool p2_needs_grad);

// (loss, grad p1, grad p2): loss = constant + sum_ik weights[k] * terms[i, k] (0-d, compute dtype)
// with terms as paired_terms_forward_cpu's, and its gradients of p1 and p2 (inputs' dtype; (0, D)
// where not asked for), in one read of the inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> paired_loss_forward_cpu(const at::Tensor& p1, const at::Tensor& p2,
                                                                       const at::Tensor& f1, const at::Tensor& f2,
                                                                       bool cosine, const std::array<double, 4>& weights,
                                                                       double constant, bool p1_needs_grad,
                                                                       bool p2_needs_grad);

// (loss (0-d), stats (5, D) = mean_a, rstd_a, mean_b, rstd_b, diag(C), gram_b): gram_b is G_b (B, B)
// for B <= D, C = a^T b^ / B (D, D) for B > D.
std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_gram_forward_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                       double off_diagonal_weight, double scale);

// d loss / d a, in a's dtype.
at::Tensor barlow_gram_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& stats, const at::Tensor& gram_b,
                                    double off_diagonal_weight, double scale);

// (loss, grad p1, grad p2) of the whole Barlow-PNR regulariser on one process (docs/losses.md,
// section 4): w_d (barlow(p1, f1) + barlow(p2, f2)) / 2 + w_n (mean cos(p1, f2) + mean cos(p2, f1)) / 2,
// loss 0-d in the compute dtype, gradients in the inputs' dtype ((0, D) where not asked for), all
// computed in this one call.
std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_pnr_loss_forward_cpu(
    const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& f1, const at::Tensor& f2, double distill_weight,
    double negative_weight, double off_diagonal_weight, double scale, bool p1_needs_grad, bool p2_needs_grad);

// s * (sum_i (C_ii - 1)^2 + l * sum_{i != j} C_ij^2) of a square float32/float64 C, 0-d, C's dtype.
at::Tensor barlow_correlation_loss_forward_cpu(const at::Tensor& c, double off_diagonal_weight, double scale);

// d loss / d C, C's dtype and shape.
at::Tensor barlow_correlation_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& c,
                                                double off_diagonal_weight, double scale);

}  // namespace pnr_kernels
