// Launchers of the CUDA kernels of the fused InfoNCE op (infonce_cuda.cu). Plain C++: included
// by the binding (g++, torch) and by the kernels (nvcc, CUDA toolkit only).
#pragma once

#include "launch.h"

namespace pnr_kernels {

// Row sets and key blocks per launch (the kernels take them by value as launch parameters); the
// binding refuses more, saying so. Every loss of the library uses at most 2 of each.
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

// Gradient accumulators, contiguous float32, zero on entry: rows[r] (splits, M, D), one partial
// gradient per key split (their sum is the gradient), and keys[k] (M_k, D); nullptr where no
// gradient is needed (no work is done for it).
struct InfoNCEGrads {
  float* rows[kMaxInfoNCEOperands];
  float* keys[kMaxInfoNCEOperands];
};

// Key splits of the forward and the row gradients (1 .. kMaxInfoNCEKeySplits): enough blocks for
// the current device's multiprocessors (twice their count), never more than the key tiles.
constexpr int64_t kMaxInfoNCEKeySplits = 64;
int infonce_key_splits(const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys);

// lse: (splits, R, M) contiguous float32, the partial lse of each key split (the lse is their
// logsumexp). Returns nullptr on success, else the CUDA error string.
const char* infonce_forward_cuda(DType dtype, const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys, int splits,
                                 float* lse, void* stream);

// grad_lse, lse: (R, M) contiguous float32 (lse merged over the splits).
const char* infonce_backward_cuda(DType dtype, const InfoNCERowSets& rows, const InfoNCEKeyBlocks& keys, int splits,
                                  const float* grad_lse, const float* lse, const InfoNCEGrads& grads, void* stream);

}  // namespace pnr_kernels
