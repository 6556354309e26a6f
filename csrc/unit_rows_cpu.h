// The contrastive losses' row normalisation on the CPU (unit_rows_cpu.cpp has the math), for the
// ops that compose it in C++ (infonce_views_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace pnr_kernels {

// y = x' / max(||x'||, eps) per row, x' = x / g (g = max |x| of the row where it exceeds huge),
// in x's dtype.
at::Tensor unit_rows_forward_cpu(const at::Tensor& x, double huge, double eps);

// dx for the incoming gradient `grad` (converted to x's dtype), y recomputed from x.
at::Tensor unit_rows_backward_cpu(const at::Tensor& grad, const at::Tensor& x, double huge, double eps);

}  // namespace pnr_kernels
