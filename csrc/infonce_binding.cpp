// Registers the fused InfoNCE kernel pair as torch ops (schemas, input checks, CPU and CUDA
// implementations). The math and the autograd wiring are in pnr_kernels/ops/infonce.py; the
// kernels in infonce_cpu.cpp and infonce_cuda.cu.
#include <ATen/ops/to.h>

#include "common.h"
#include "infonce.h"
#ifdef PNR_KERNELS_WITH_CUDA
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include "infonce_cuda.h"
#endif

namespace pnr_kernels {
namespace {

// Checks the op's inputs against each other (the public API has validated the loss inputs).
void check_inputs(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
                  const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales) {
  TORCH_CHECK(!rows.empty() && !keys.empty(), "infonce_lse needs at least one row set and one key block");
  TORCH_CHECK(scales.size() == rows.size(), "scales has ", scales.size(), " entries for ", rows.size(), " row sets");
  TORCH_CHECK(exclude_diagonal.size() == keys.size(), "exclude_diagonal has ", exclude_diagonal.size(),
              " entries for ", keys.size(), " key blocks");
  TORCH_CHECK(rows[0].dim() == 2, "rows[0] must be 2-D, got shape ", rows[0].sizes());
  const at::Device device = rows[0].device();
  const at::ScalarType dtype = rows[0].scalar_type();
  const int64_t dim = rows[0].size(1);
  check_matrices(rows, "rows", device, dtype, dim);
  check_matrices(keys, "keys", device, dtype, dim);
  for (const auto& row : rows) {
    TORCH_CHECK(row.size(0) == rows[0].size(0), "every row set must have ", rows[0].size(0), " rows");
  }
}

void check_gradient_inputs(const at::Tensor& grad_lse, const at::Tensor& lse, const std::vector<at::Tensor>& rows,
                           const std::vector<at::Tensor>& keys, const std::vector<bool>& rows_need_grad,
                           const std::vector<bool>& keys_need_grad) {
  const std::vector<int64_t> shape{static_cast<int64_t>(rows.size()), rows[0].size(0)};
  TORCH_CHECK(grad_lse.sizes() == shape && lse.sizes() == shape, "grad_lse and lse must have shape ", shape);
  TORCH_CHECK(rows_need_grad.size() == rows.size() && keys_need_grad.size() == keys.size(),
              "rows_need_grad and keys_need_grad need one entry per row set and key block");
}

std::vector<bool> to_vector(const c10::List<bool>& flags) { return {flags.begin(), flags.end()}; }

// The op's arguments as the kernels take them, checked.
struct Arguments {
  std::vector<at::Tensor> rows, keys;
  std::vector<bool> exclude_diagonal;
  std::vector<double> scales;

  Arguments(at::TensorList rows_, at::TensorList keys_, const c10::List<bool>& exclude_diagonal_,
            c10::ArrayRef<double> scales_)
      : rows(rows_.vec()), keys(keys_.vec()), exclude_diagonal(to_vector(exclude_diagonal_)), scales(scales_.vec()) {
    check_inputs(rows, keys, exclude_diagonal, scales);
  }
};

at::Tensor forward_cpu(at::TensorList rows, at::TensorList keys, const c10::List<bool>& exclude_diagonal,
                       c10::ArrayRef<double> scales) {
  const Arguments args(rows, keys, exclude_diagonal, scales);
  return infonce_forward_cpu(args.rows, args.keys, args.exclude_diagonal, args.scales);
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse, at::TensorList rows,
                                     at::TensorList keys, const c10::List<bool>& exclude_diagonal,
                                     c10::ArrayRef<double> scales, const c10::List<bool>& rows_need_grad,
                                     const c10::List<bool>& keys_need_grad) {
  const Arguments args(rows, keys, exclude_diagonal, scales);
  const auto rows_flags = to_vector(rows_need_grad), keys_flags = to_vector(keys_need_grad);
  check_gradient_inputs(grad_lse, lse, args.rows, args.keys, rows_flags, keys_flags);
  return infonce_backward_cpu(grad_lse, lse, args.rows, args.keys, args.exclude_diagonal, args.scales, rows_flags,
                              keys_flags);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pnr_kernels, m) {
  m.def("infonce_lse_forward(Tensor[] rows, Tensor[] keys, bool[] exclude_diagonal, float[] scales) -> Tensor");
  m.def(
      "infonce_lse_backward(Tensor grad_lse, Tensor lse, Tensor[] rows, Tensor[] keys, bool[] exclude_diagonal, "
      "float[] scales, bool[] rows_need_grad, bool[] keys_need_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pnr_kernels, CPU, m) {
  m.impl("infonce_lse_forward", &forward_cpu);
  m.impl("infonce_lse_backward", &backward_cpu);
}

}  // namespace pnr_kernels
