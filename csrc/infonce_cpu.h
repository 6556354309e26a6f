// The fused multi-key InfoNCE op (pnr_kernels/ops/infonce.py has the exact contract):
//   lse[r, i] = LSE over key blocks k and keys j (j != i where exclude_diagonal[k]) of
//               scales[r] * rows[r][i] . keys[k][j]
// and its gradient with respect to the rows and keys that need one. Inputs are validated by the
// binding (infonce_binding.cpp); the CPU kernels live in infonce_cpu.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

namespace pnr_kernels {

// lse (R, M) in the compute dtype (float64 for float64 inputs, float32 otherwise). The need flags
// say which rows and keys backward will differentiate (what forward keeps for it: the logits stash
// and folded blocks); backward must be given the same.
at::Tensor infonce_forward_cpu(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
                               const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales,
                               const std::vector<bool>& rows_need_grad, const std::vector<bool>& keys_need_grad);

// The gradients of the rows that need one, then of the keys that need one, in input order, each
// in its input's dtype and shape. grad_lse and lse are (R, M) in the compute dtype.
std::vector<at::Tensor> infonce_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse,
                                             const std::vector<at::Tensor>& rows,
                                             const std::vector<at::Tensor>& keys,
                                             const std::vector<bool>& exclude_diagonal,
                                             const std::vector<double>& scales,
                                             const std::vector<bool>& rows_need_grad,
                                             const std::vector<bool>& keys_need_grad);

// The cross pair (infonce_cpu.cpp): with S = scale a b^T, lse (M + M') in the compute dtype holds
// S's row log-sum-exps (M) then its column log-sum-exps (M'), one pass over S.
at::Tensor infonce_cross_forward_cpu(const at::Tensor& a, const at::Tensor& b, double scale);

// The gradients of a and of b, those that need one, in their input's dtype and shape.
std::vector<at::Tensor> infonce_cross_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse,
                                                   const at::Tensor& a, const at::Tensor& b, double scale,
                                                   bool a_needs_grad, bool b_needs_grad);

}  // namespace pnr_kernels
