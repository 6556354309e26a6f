// Types shared by the C++ bindings and the CUDA launchers. Plain C++ only: this header is
// compiled by both g++ (against torch) and nvcc (against the CUDA toolkit alone).
#pragma once

#include <cstdint>

namespace pnr_kernels {

// The element types a launcher may be asked to read; results are accumulated in float32.
enum class DType : int { Float32 = 0, BFloat16 = 1, Float16 = 2 };

// A row-major view of a (rows, cols) matrix with arbitrary element strides, as torch gives it.
struct StridedMatrix {
  const void* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;
};

// A writable float32 (rows, cols) matrix with arbitrary strides.
struct StridedOutput {
  float* data;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t col_stride;
};

}  // namespace pnr_kernels
