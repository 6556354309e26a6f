// Large CPU outputs from a small pool of blocks kept after they are freed (output_pool_cpu.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstddef>

namespace pnr_kernels {

// An uninitialised contiguous CPU tensor; from the pool when it holds kPoolMinBytes or more.
at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype);

// Gives every block the pool holds back to the system; returns their bytes.
int64_t release_output_pool();

}  // namespace pnr_kernels
