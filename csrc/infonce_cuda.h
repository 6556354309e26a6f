// Launchers of the CUDA kernels of the fused InfoNCE op (infonce_cuda.cu). Plain C++: included
// by the binding (g++, torch) and by the kernels (nvcc, CUDA toolkit only).
#pragma once

#include "launch.h"

namespace pnr_kernels {

// Row sets and key blocks per launch; the binding refuses more.
constexpr int kMaxInfoNCEOperands = 8;

struct InfoNCERowSets {
  StridedMatrix set[kMaxInfoNCEOperands];  // each (M, D), the same M
  float scale[kMaxInfoNCEOperands];
  int count;
};

struct InfoNCEKeyBlocks {
  StridedMatrix block[kMaxInfoNCEOperands];  // each (M_k, D)
  bool exclude_diagonal[kMaxInfoNCEOperands];
  int count;
};

// Gradient accumulators, contiguous float32: rows[r] (M, D) and keys[k] (M_k, D), zero on entry;
// nullptr where no gradient is needed (no work is done for a row set / key block pair whose
// accumulators are both nullptr).
struct InfoNCEGrads {
  float* rows[kMaxInfoNCEOperands];
  float* keys[kMaxInfoNCEOperands];
};

// lse: (R, M) contiguous float32. Returns nullptr on success, else the CUDA error string.
const char* infonce_forward_cuda(DType dtype, const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys, float* lse,
                                 void* stream);

// grad_lse, lse: (R, M) contiguous float32.
const char* infonce_backward_cuda(DType dtype, const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys,
                                  const float* grad_lse, const float* lse, const InfoNCEGrads& grads, void* stream);

}  // namespace pnr_kernels
