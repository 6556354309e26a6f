// Kernel-side helpers shared by every .cu of the extension: element conversion, strided loads,
// dtype dispatch of launchers and launch error reporting. CUDA toolkit headers only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace pnr_kernels {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16(x); }

// Element (i, j) of a strided matrix, with 64-bit offsets.
template <typename T>
__device__ __forceinline__ T load_element(const StridedMatrix& m, int64_t i, int64_t j) {
  return static_cast<const T*>(m.data)[i * m.row_stride + j * m.col_stride];
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// nullptr if the last launch succeeded, else its error string.
inline const char* launch_error() {
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

// Calls launch(T{}) with T the element type of dtype (float, __nv_bfloat16, __half).
template <typename F>
const char* dispatch_dtype(DType dtype, const F& launch) {
  switch (dtype) {
    case DType::Float32: return launch(float{});
    case DType::BFloat16: return launch(__nv_bfloat16{});
    case DType::Float16: return launch(__half{});
  }
  return "unknown dtype";
}

}  // namespace pnr_kernels
