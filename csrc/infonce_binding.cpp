// Registers the fused InfoNCE kernel pair as torch ops (schemas, input checks, CPU and CUDA
// implementations). The math and the autograd wiring are in pnr_kernels/ops/infonce.py; the
// kernels in infonce_cpu.cpp and infonce_cuda.cu.
#include <ATen/ops/to.h>

#include "common.h"
#include "infonce_cpu.h"
#ifdef PNR_KERNELS_WITH_CUDA
#include <ATen/ops/empty.h>
#include <ATen/ops/logsumexp.h>
#include <ATen/ops/sum.h>
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
  const KernelGuard kernel_guard;
  const Arguments args(rows, keys, exclude_diagonal, scales);
  // The op's contract (pnr_kernels/ops/infonce.py): the inputs that require a gradient get one.
  std::vector<bool> rows_need_grad, keys_need_grad;
  for (const auto& row : args.rows) rows_need_grad.push_back(row.requires_grad());
  for (const auto& key : args.keys) keys_need_grad.push_back(key.requires_grad());
  return infonce_forward_cpu(args.rows, args.keys, args.exclude_diagonal, args.scales, rows_need_grad,
                             keys_need_grad);
}

std::vector<at::Tensor> backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse, at::TensorList rows,
                                     at::TensorList keys, const c10::List<bool>& exclude_diagonal,
                                     c10::ArrayRef<double> scales, const c10::List<bool>& rows_need_grad,
                                     const c10::List<bool>& keys_need_grad) {
  const KernelGuard kernel_guard;
  const Arguments args(rows, keys, exclude_diagonal, scales);
  const auto rows_flags = to_vector(rows_need_grad), keys_flags = to_vector(keys_need_grad);
  check_gradient_inputs(grad_lse, lse, args.rows, args.keys, rows_flags, keys_flags);
  return infonce_backward_cpu(grad_lse, lse, args.rows, args.keys, args.exclude_diagonal, args.scales, rows_flags,
                              keys_flags);
}

// The cross pair's inputs: a (M, D) and b (M', D) on one device, of one dtype; grad_lse and lse
// (M + M') when given.
void check_cross_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor* grad_lse = nullptr,
                        const at::Tensor* lse = nullptr) {
  TORCH_CHECK(a.dim() == 2, "a must be 2-D, got shape ", a.sizes());
  check_matrices({b}, "b", a.device(), a.scalar_type(), a.size(1));
  if (grad_lse != nullptr) {
    const std::vector<int64_t> shape{a.size(0) + b.size(0)};
    TORCH_CHECK(grad_lse->sizes() == shape && lse->sizes() == shape, "grad_lse and lse must have shape ", shape);
  }
}

at::Tensor cross_forward_cpu(const at::Tensor& a, const at::Tensor& b, double scale) {
  const KernelGuard kernel_guard;
  check_cross_inputs(a, b);
  return infonce_cross_forward_cpu(a, b, scale);
}

std::vector<at::Tensor> cross_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse, const at::Tensor& a,
                                           const at::Tensor& b, double scale, bool a_needs_grad, bool b_needs_grad) {
  const KernelGuard kernel_guard;
  check_cross_inputs(a, b, &grad_lse, &lse);
  return infonce_cross_backward_cpu(grad_lse, lse, a, b, scale, a_needs_grad, b_needs_grad);
}

#ifdef PNR_KERNELS_WITH_CUDA
InfoNCERowSets row_sets(const Arguments& args) {
  TORCH_CHECK(args.rows.size() <= kMaxInfoNCEOperands, "the CUDA kernels take at most ", kMaxInfoNCEOperands,
              " row sets, got ", args.rows.size());
  InfoNCERowSets sets{};
  sets.count = static_cast<int>(args.rows.size());
  for (int r = 0; r < sets.count; ++r) {
    sets.set[r] = strided_matrix(args.rows[r]);
    sets.scale[r] = static_cast<float>(args.scales[r]);
  }
  return sets;
}

InfoNCEKeyBlocks key_blocks(const Arguments& args) {
  TORCH_CHECK(args.keys.size() <= kMaxInfoNCEOperands, "the CUDA kernels take at most ", kMaxInfoNCEOperands,
              " key blocks, got ", args.keys.size());
  InfoNCEKeyBlocks blocks{};
  blocks.count = static_cast<int>(args.keys.size());
  for (int k = 0; k < blocks.count; ++k) {
    blocks.block[k] = strided_matrix(args.keys[k]);
    blocks.exclude_diagonal[k] = args.exclude_diagonal[k];
  }
  return blocks;
}

at::Tensor forward_cuda(at::TensorList rows, at::TensorList keys, const c10::List<bool>& exclude_diagonal,
                        c10::ArrayRef<double> scales) {
  const KernelGuard kernel_guard;
  const Arguments args(rows, keys, exclude_diagonal, scales);
  const at::Device device = args.rows[0].device();
  const c10::DeviceGuard device_guard(device);
  const InfoNCERowSets sets = row_sets(args);
  const InfoNCEKeyBlocks blocks = key_blocks(args);
  const int splits = infonce_key_splits(sets, blocks);
  at::Tensor partial = at::empty({splits, static_cast<int64_t>(args.rows.size()), args.rows[0].size(0)},
                                 args.rows[0].options().dtype(at::kFloat));
  check_launch(infonce_forward_cuda(launch_dtype(args.rows[0].scalar_type()), sets, blocks, splits,
                                    partial.data_ptr<float>(), current_stream(device)),
               "infonce_forward_cuda");
  // The splits' partial lse merged in a fixed order (NaN propagates, -inf splits drop out).
  return splits == 1 ? partial[0] : at::logsumexp(partial, {0});
}

std::vector<at::Tensor> backward_cuda(const at::Tensor& grad_lse, const at::Tensor& lse, at::TensorList rows,
                                      at::TensorList keys, const c10::List<bool>& exclude_diagonal,
                                      c10::ArrayRef<double> scales, const c10::List<bool>& rows_need_grad,
                                      const c10::List<bool>& keys_need_grad) {
  const KernelGuard kernel_guard;
  const Arguments args(rows, keys, exclude_diagonal, scales);
  const auto rows_flags = to_vector(rows_need_grad), keys_flags = to_vector(keys_need_grad);
  check_gradient_inputs(grad_lse, lse, args.rows, args.keys, rows_flags, keys_flags);
  const at::Device device = args.rows[0].device();
  const c10::DeviceGuard device_guard(device);
  const auto accumulator = args.rows[0].options().dtype(at::kFloat);
  const at::Tensor grad_lse_f = grad_lse.to(at::kFloat).contiguous(), lse_f = lse.to(at::kFloat).contiguous();
  const InfoNCERowSets sets = row_sets(args);
  const InfoNCEKeyBlocks blocks = key_blocks(args);
  const int splits = infonce_key_splits(sets, blocks);
  std::vector<at::Tensor> rows_grad(args.rows.size()), keys_grad(args.keys.size());
  InfoNCEGrads grads{};
  for (size_t r = 0; r < args.rows.size(); ++r) {
    if (rows_flags[r]) {  // one partial gradient per key split, summed below
      rows_grad[r] = at::zeros({splits, args.rows[r].size(0), args.rows[r].size(1)}, accumulator);
      grads.rows[r] = rows_grad[r].data_ptr<float>();
    }
  }
  for (size_t k = 0; k < args.keys.size(); ++k) {
    if (keys_flags[k]) {
      keys_grad[k] = at::zeros(args.keys[k].sizes(), accumulator);
      grads.keys[k] = keys_grad[k].data_ptr<float>();
    }
  }
  check_launch(infonce_backward_cuda(launch_dtype(args.rows[0].scalar_type()), sets, blocks, splits,
                                     grad_lse_f.data_ptr<float>(), lse_f.data_ptr<float>(), grads,
                                     current_stream(device)),
               "infonce_backward_cuda");
  std::vector<at::Tensor> out;
  for (size_t r = 0; r < args.rows.size(); ++r) {
    if (rows_flags[r]) {
      const at::Tensor total = splits == 1 ? rows_grad[r][0] : rows_grad[r].sum(0);
      out.push_back(total.to(args.rows[r].scalar_type()));
    }
  }
  for (size_t k = 0; k < args.keys.size(); ++k) {
    if (keys_flags[k]) out.push_back(keys_grad[k].to(args.keys[k].scalar_type()));
  }
  return out;
}
#endif  // PNR_KERNELS_WITH_CUDA

}  // namespace

TORCH_LIBRARY_FRAGMENT(pnr_kernels, m) {
  m.def("infonce_lse_forward(Tensor[] rows, Tensor[] keys, bool[] exclude_diagonal, float[] scales) -> Tensor");
  m.def(
      "infonce_lse_backward(Tensor grad_lse, Tensor lse, Tensor[] rows, Tensor[] keys, bool[] exclude_diagonal, "
      "float[] scales, bool[] rows_need_grad, bool[] keys_need_grad) -> Tensor[]");
  // The cross pair (CPU only): both directions of a against b, see infonce_cpu.h.
  m.def("infonce_cross_lse_forward(Tensor a, Tensor b, float scale) -> Tensor");
  m.def(
      "infonce_cross_lse_backward(Tensor grad_lse, Tensor lse, Tensor a, Tensor b, float scale, bool a_needs_grad, "
      "bool b_needs_grad) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pnr_kernels, CPU, m) {
  m.impl("infonce_lse_forward", &forward_cpu);
  m.impl("infonce_lse_backward", &backward_cpu);
  m.impl("infonce_cross_lse_forward", &cross_forward_cpu);
  m.impl("infonce_cross_lse_backward", &cross_backward_cpu);
}

}  // namespace pnr_kernels

#ifdef PNR_KERNELS_WITH_CUDA
namespace pnr_kernels {
TORCH_LIBRARY_IMPL(pnr_kernels, CUDA, m) {
  m.impl("infonce_lse_forward", &forward_cuda);
  m.impl("infonce_lse_backward", &backward_cuda);
}
}  // namespace pnr_kernels
#endif
