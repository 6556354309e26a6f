// Binding-side helpers shared by every op family of the extension (see pnr_kernels/native.py for
// the build contract). Core torch headers only: no torch/extension.h, no c10/cuda.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <vector>

#include "launch.h"

namespace pnr_kernels {

// Held by every op implementation for its whole run. The kernels choose their compute dtypes
// themselves (float32 accumulation, float64 for float64), so the ATen ops they call (at::mm for the
// Gram matrices, conversions) must not be autocast when the caller is inside torch.autocast: the
// autocast dispatch keys are excluded on this thread.
struct KernelGuard {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
};

// Every tensor of `tensors` is a 2-D matrix on `device` with dtype `dtype` and `cols` columns.
inline void check_matrices(const std::vector<at::Tensor>& tensors, const char* name, const at::Device& device,
                           at::ScalarType dtype, int64_t cols) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.dim() == 2, name, "[", i, "] must be 2-D, got shape ", t.sizes());
    TORCH_CHECK(t.device() == device, name, "[", i, "] is on ", t.device(), ", expected ", device);
    TORCH_CHECK(t.scalar_type() == dtype, name, "[", i, "] has dtype ", t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK(t.size(1) == cols, name, "[", i, "] has ", t.size(1), " columns, expected ", cols);
  }
}

// The accumulation dtype of an input dtype: float64 stays float64, the rest accumulate in float32.
inline at::ScalarType compute_dtype(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Launcher element type of a CUDA input.
inline DType launch_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return DType::Float32;
    case at::kBFloat16: return DType::BFloat16;
    case at::kHalf: return DType::Float16;
    default: TORCH_CHECK(false, "the CUDA kernels take float32, bfloat16 and float16, got ", dtype);
  }
}

inline StridedMatrix strided_matrix(const at::Tensor& t) {
  return {t.data_ptr(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

inline StridedOutput strided_output(at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "launcher outputs are float32");
  return {t.data_ptr<float>(), t.size(0), t.size(1), t.stride(0), t.stride(1)};
}

// The current stream of `device` as its native handle (a cudaStream_t for CUDA), reached through
// the device-guard interface so that the binding needs no CUDA headers.
inline void* current_stream(const at::Device& device) {
  const auto* impl = c10::impl::getDeviceGuardImpl(device.type());
  return impl->getStream(device).native_handle();
}

// Launchers return nullptr on success, else the CUDA error string.
inline void check_launch(const char* error, const char* launcher) {
  TORCH_CHECK(error == nullptr, launcher, " failed: ", error);
}

}  // namespace pnr_kernels
