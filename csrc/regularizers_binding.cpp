// Registers the kernels of the non-contrastive PNR regularisers as torch ops (schemas, input
// checks, CPU and CUDA implementations). The math and the autograd wiring are in
// pnr_kernels/ops/regularizers.py; the kernels in regularizers_cpu.cpp and regularizers_cuda.cu.
#include <functional>
#include <string>

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>

#include "common.h"
#include "output_pool_cpu.h"
#include "regularizers_cpu.h"
#ifdef PNR_KERNELS_WITH_CUDA
#include <ATen/ops/dot.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "regularizers_cuda.h"
#endif

namespace pnr_kernels {
namespace {

bool is_cosine(const std::string& kind) {
  TORCH_CHECK(kind == "cosine" || kind == "squared_distance",
              "kind must be 'cosine' or 'squared_distance', got '", kind, "'");
  return kind == "cosine";
}

// The four embeddings share one (B, D) shape, dtype and device.
void check_embeddings(const std::vector<at::Tensor>& x, const char* name) {
  TORCH_CHECK(x[0].dim() == 2, name, "[0] must be 2-D, got shape ", x[0].sizes());
  check_matrices(x, name, x[0].device(), x[0].scalar_type(), x[0].size(1));
  for (const auto& t : x) TORCH_CHECK(t.size(0) == x[0].size(0), name, " must all have ", x[0].size(0), " rows");
}

// A float buffer the op produced (terms, norms, stats, Gram matrix, gradient of the loss).
void check_saved(const at::Tensor& t, const char* name, const at::Tensor& like, std::vector<int64_t> shape) {
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
  TORCH_CHECK(t.scalar_type() == compute_dtype(like.scalar_type()), name, " must be ",
              compute_dtype(like.scalar_type()), ", got ", t.scalar_type());
}

void check_paired_backward(const at::Tensor& grad_terms, const at::Tensor& terms, const at::Tensor& norms,
                           const std::vector<at::Tensor>& x, bool cosine) {
  check_embeddings(x, "paired inputs");
  const int64_t rows = x[0].size(0);
  check_saved(grad_terms, "grad_terms", x[0], {rows, 4});
  check_saved(terms, "terms", x[0], {rows, 4});
  check_saved(norms, "norms", x[0], {rows, cosine ? 4 : 0});
}

void check_barlow_backward(const at::Tensor& grad_loss, const at::Tensor& a, const at::Tensor& b,
                           const at::Tensor& stats, const at::Tensor& gram_b) {
  check_embeddings({a, b}, "barlow inputs");
  check_saved(grad_loss, "grad_loss", a, {});
  check_saved(stats, "stats", a, {5, a.size(1)});
  // the CPU kernels save C (D, D) in G_b's place when B > D (regularizers_cpu.h)
  const int64_t saved = a.is_cpu() && a.size(0) > a.size(1) ? a.size(1) : a.size(0);
  check_saved(gram_b, "gram_b", a, {saved, saved});
}

// c must be a square float32 matrix (float64 also on CPU): a cross-correlation matrix.
void check_correlation(const at::Tensor& c) {
  TORCH_CHECK(c.dim() == 2 && c.size(0) == c.size(1), "c must be a square matrix, got shape ", c.sizes());
  TORCH_CHECK(c.scalar_type() == at::kFloat || (c.scalar_type() == at::kDouble && c.device().is_cpu()),
              "c must be float32 (or float64 on CPU), got ", c.scalar_type());
}

at::Tensor correlation_loss_forward_cpu(const at::Tensor& c, double off_diagonal_weight, double scale) {
  const KernelGuard kernel_guard;
  check_correlation(c);
  return barlow_correlation_loss_forward_cpu(c, off_diagonal_weight, scale);
}

at::Tensor correlation_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& c, double off_diagonal_weight,
                                         double scale) {
  const KernelGuard kernel_guard;
  check_correlation(c);
  check_saved(grad_loss, "grad_loss", c, {});
  return barlow_correlation_loss_backward_cpu(grad_loss, c, off_diagonal_weight, scale);
}

std::tuple<at::Tensor, at::Tensor> paired_forward_cpu(const at::Tensor& p1, const at::Tensor& p2,
                                                      const at::Tensor& f1, const at::Tensor& f2,
                                                      const std::string& kind) {
  const KernelGuard kernel_guard;
  const bool cosine = is_cosine(kind);
  check_embeddings({p1, p2, f1, f2}, "paired inputs");
  return paired_terms_forward_cpu(p1, p2, f1, f2, cosine);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> paired_loss_cpu(const at::Tensor& p1, const at::Tensor& p2,
                                                               const at::Tensor& f1, const at::Tensor& f2,
                                                               const std::string& kind, at::ArrayRef<double> weights,
                                                               double constant, bool p1_needs_grad,
                                                               bool p2_needs_grad) {
  const KernelGuard kernel_guard;
  const bool cosine = is_cosine(kind);
  check_embeddings({p1, p2, f1, f2}, "paired inputs");
  TORCH_CHECK(weights.size() == 4, "weights must have 4 entries (one per pair), got ", weights.size());
  return paired_loss_forward_cpu(p1, p2, f1, f2, cosine, {weights[0], weights[1], weights[2], weights[3]}, constant,
                                 p1_needs_grad, p2_needs_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_pnr_loss_cpu(const at::Tensor& p1, const at::Tensor& p2,
                                                                   const at::Tensor& f1, const at::Tensor& f2,
                                                                   double distill_weight, double negative_weight,
                                                                   double off_diagonal_weight, double scale,
                                                                   bool p1_needs_grad, bool p2_needs_grad) {
  const KernelGuard kernel_guard;
  check_embeddings({p1, p2, f1, f2}, "barlow_pnr inputs");
  return barlow_pnr_loss_forward_cpu(p1, p2, f1, f2, distill_weight, negative_weight, off_diagonal_weight, scale,
                                     p1_needs_grad, p2_needs_grad);
}

// The eager autograd of the CPU losses whose forward computes their gradients (paired_loss,
// barlow_pnr_loss), in C++: the twin of the eager path that define_loss_op builds in
// pnr_kernels/ops/regularizers.py (loss_setup, loss_formula, scaled_gradients), so that a forward +
// backward runs no Python after the op call. That Python costs about 0.1 ms a step on a 2-core CPU
// whose caches the rest of the step has evicted: an eighth of a VICReg-PNR step at B = 4096, D = 128.
//   forward:  Op::kernel's (loss, grad p1, grad p2); the gradients are saved, not differentiable.
//   backward: the saved gradients themselves when the incoming gradient is exactly 1, else scaled
//             by it. When autograd records the backward (create_graph), the registered backward
//             op Op::backward_op computes them instead: ops/_common.py's first_order_only makes
//             differentiating its results raise the fused backends' error, as the Python paths do.
template <class Op>
struct SavedGradientLoss : public torch::autograd::Function<SavedGradientLoss<Op>> {
  using Kernel = std::function<std::tuple<at::Tensor, at::Tensor, at::Tensor>()>;

  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& p1,
                                                const at::Tensor& p2, const Kernel& kernel, bool p1_needs_grad,
                                                bool p2_needs_grad) {
    auto [loss, g1, g2] = kernel();
    ctx->mark_non_differentiable({g1, g2});
    ctx->set_materialize_grads(false);  // no (B, D) zeros for the gradients of g1, g2
    ctx->save_for_backward({g1, g2, p1, p2});
    ctx->saved_data["p1_needs_grad"] = p1_needs_grad;
    ctx->saved_data["p2_needs_grad"] = p2_needs_grad;
    return {loss, g1, g2};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const at::Tensor& grad_loss = grads[0];
    const bool needs[2] = {ctx->saved_data["p1_needs_grad"].toBool(), ctx->saved_data["p2_needs_grad"].toBool()};
    torch::autograd::variable_list result(5);  // one per forward argument: p1, p2, kernel, the flags
    if (!grad_loss.defined() || !(needs[0] || needs[1])) return result;
    const torch::autograd::variable_list saved = ctx->get_saved_variables();  // g1, g2, p1, p2
    if (at::GradMode::is_enabled()) {  // p1 or p2 requires a gradient: one of them is needed
      static const auto backward_op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow(Op::backward_op, "")
              .template typed<std::vector<at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const at::Tensor&, const at::Tensor&, bool, bool)>();
      const std::vector<at::Tensor> computed =
          backward_op.call(grad_loss, saved[0], saved[1], saved[2], saved[3], needs[0], needs[1]);
      for (size_t i = 0, k = 0; i < 2; ++i) {
        if (needs[i]) result[i] = computed[k++];
      }
      return result;
    }
    const bool one = grad_loss.item<double>() == 1.0;
    for (size_t i = 0; i < 2; ++i) {
      if (needs[i]) result[i] = one ? saved[i] : grad_loss.mul(saved[i]).to(saved[i].scalar_type());
    }
    return result;
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> call(const at::Tensor& p1, const at::Tensor& p2,
                                                             const Kernel& kernel, bool p1_needs_grad,
                                                             bool p2_needs_grad) {
    const auto out = SavedGradientLoss::apply(p1, p2, kernel, p1_needs_grad, p2_needs_grad);
    return {out[0], out[1], out[2]};
  }
};

// The backward ops that pnr_kernels/ops/regularizers.py registers for the native backend.
struct PairedLossOp {
  static constexpr const char* backward_op = "pnr_kernels::paired_loss_native_backward";
};
struct BarlowPNRLossOp {
  static constexpr const char* backward_op = "pnr_kernels::barlow_pnr_loss_native_backward";
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> paired_loss_autograd(const at::Tensor& p1, const at::Tensor& p2,
                                                                    const at::Tensor& f1, const at::Tensor& f2,
                                                                    const std::string& kind,
                                                                    at::ArrayRef<double> weights, double constant,
                                                                    bool p1_needs_grad, bool p2_needs_grad) {
  return SavedGradientLoss<PairedLossOp>::call(
      p1, p2, [&] { return paired_loss_cpu(p1, p2, f1, f2, kind, weights, constant, p1_needs_grad, p2_needs_grad); },
      p1_needs_grad, p2_needs_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_pnr_loss_autograd(
    const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& f1, const at::Tensor& f2, double distill_weight,
    double negative_weight, double off_diagonal_weight, double scale, bool p1_needs_grad, bool p2_needs_grad) {
  return SavedGradientLoss<BarlowPNRLossOp>::call(
      p1, p2,
      [&] {
        return barlow_pnr_loss_cpu(p1, p2, f1, f2, distill_weight, negative_weight, off_diagonal_weight, scale,
                                   p1_needs_grad, p2_needs_grad);
      },
      p1_needs_grad, p2_needs_grad);
}

std::vector<at::Tensor> paired_backward_cpu(const at::Tensor& grad_terms, const at::Tensor& terms,
                                            const at::Tensor& norms, const at::Tensor& p1, const at::Tensor& p2,
                                            const at::Tensor& f1, const at::Tensor& f2, const std::string& kind,
                                            bool p1_needs_grad, bool p2_needs_grad) {
  const KernelGuard kernel_guard;
  const bool cosine = is_cosine(kind);
  check_paired_backward(grad_terms, terms, norms, {p1, p2, f1, f2}, cosine);
  return paired_terms_backward_cpu(grad_terms, terms, norms, p1, p2, f1, f2, cosine, p1_needs_grad, p2_needs_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_forward_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                  double off_diagonal_weight, double scale) {
  const KernelGuard kernel_guard;
  check_embeddings({a, b}, "barlow inputs");
  return barlow_gram_forward_cpu(a, b, off_diagonal_weight, scale);
}

at::Tensor barlow_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& a, const at::Tensor& b,
                               const at::Tensor& stats, const at::Tensor& gram_b, double off_diagonal_weight,
                               double scale) {
  const KernelGuard kernel_guard;
  check_barlow_backward(grad_loss, a, b, stats, gram_b);
  return barlow_gram_backward_cpu(grad_loss, a, b, stats, gram_b, off_diagonal_weight, scale);
}

#ifdef PNR_KERNELS_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> paired_forward_cuda(const at::Tensor& p1, const at::Tensor& p2,
                                                       const at::Tensor& f1, const at::Tensor& f2,
                                                       const std::string& kind) {
  const KernelGuard kernel_guard;
  const bool cosine = is_cosine(kind);
  check_embeddings({p1, p2, f1, f2}, "paired inputs");
  const c10::DeviceGuard device_guard(p1.device());
  const auto options = p1.options().dtype(at::kFloat);
  at::Tensor terms = at::empty({p1.size(0), 4}, options);
  at::Tensor norms = at::empty({p1.size(0), cosine ? 4 : 0}, options);
  check_launch(launch_paired_forward(strided_matrix(p1), strided_matrix(p2), strided_matrix(f1), strided_matrix(f2),
                                     launch_dtype(p1.scalar_type()), cosine, terms.data_ptr<float>(),
                                     cosine ? norms.data_ptr<float>() : nullptr, current_stream(p1.device())),
               "launch_paired_forward");
  return {terms, norms};
}

std::vector<at::Tensor> paired_backward_cuda(const at::Tensor& grad_terms, const at::Tensor& terms,
                                             const at::Tensor& norms, const at::Tensor& p1, const at::Tensor& p2,
                                             const at::Tensor& f1, const at::Tensor& f2, const std::string& kind,
                                             bool p1_needs_grad, bool p2_needs_grad) {
  const KernelGuard kernel_guard;
  const bool cosine = is_cosine(kind);
  check_paired_backward(grad_terms, terms, norms, {p1, p2, f1, f2}, cosine);
  const c10::DeviceGuard device_guard(p1.device());
  at::Tensor g1 = at::empty({p1_needs_grad ? p1.size(0) : 0, p1.size(1)}, p1.options());
  at::Tensor g2 = at::empty({p2_needs_grad ? p2.size(0) : 0, p2.size(1)}, p2.options());
  const at::Tensor grad = grad_terms.contiguous(), saved = terms.contiguous(), row_norms = norms.contiguous();
  check_launch(launch_paired_backward(grad.data_ptr<float>(), saved.data_ptr<float>(),
                                      cosine ? row_norms.data_ptr<float>() : nullptr, strided_matrix(p1),
                                      strided_matrix(p2), strided_matrix(f1), strided_matrix(f2),
                                      launch_dtype(p1.scalar_type()), cosine, p1_needs_grad ? g1.data_ptr() : nullptr,
                                      p2_needs_grad ? g2.data_ptr() : nullptr, current_stream(p1.device())),
               "launch_paired_backward");
  std::vector<at::Tensor> grads;
  if (p1_needs_grad) grads.push_back(g1);
  if (p2_needs_grad) grads.push_back(g2);
  return grads;
}

// (x - mean) * rstd as a contiguous float32 matrix.
at::Tensor standardised_cuda(const at::Tensor& x, const at::Tensor& stats, int mean_row) {
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(at::kFloat));
  const float* s = stats.data_ptr<float>();
  check_launch(launch_standardise(strided_matrix(x), launch_dtype(x.scalar_type()), s + mean_row * x.size(1),
                                  s + (mean_row + 1) * x.size(1), out.data_ptr<float>(), current_stream(x.device())),
               "launch_standardise");
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_forward_cuda(const at::Tensor& a, const at::Tensor& b,
                                                                   double off_diagonal_weight, double scale) {
  const KernelGuard kernel_guard;
  check_embeddings({a, b}, "barlow inputs");
  const c10::DeviceGuard device_guard(a.device());
  const int64_t rows = a.size(0);
  at::Tensor stats = at::empty({5, a.size(1)}, a.options().dtype(at::kFloat));
  check_launch(launch_barlow_stats(strided_matrix(a), strided_matrix(b), launch_dtype(a.scalar_type()),
                                   stats.data_ptr<float>(), current_stream(a.device())),
               "launch_barlow_stats");
  const at::Tensor a_std = standardised_cuda(a, stats, 0), b_std = standardised_cuda(b, stats, 2);
  const at::Tensor gram_a = at::mm(a_std, a_std.t());
  at::Tensor gram_b = at::mm(b_std, b_std.t());
  const at::Tensor diag = stats.select(0, 4);
  const at::Tensor off_diagonal =
      at::dot(gram_a.view(-1), gram_b.view(-1)).div(static_cast<double>(rows) * rows).sub(diag.dot(diag));
  const at::Tensor on_diagonal = diag.sub(1).pow(2).sum();
  return {on_diagonal.add(off_diagonal, off_diagonal_weight).mul(scale), stats, gram_b};
}

at::Tensor barlow_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& a, const at::Tensor& b,
                                const at::Tensor& stats_in, const at::Tensor& gram_b, double off_diagonal_weight,
                                double scale) {
  const KernelGuard kernel_guard;
  check_barlow_backward(grad_loss, a, b, stats_in, gram_b);
  const c10::DeviceGuard device_guard(a.device());
  const at::Tensor stats = stats_in.contiguous(), grad = grad_loss.contiguous();
  const at::Tensor a_std = standardised_cuda(a, stats, 0);
  at::Tensor grad_std = at::mm(gram_b, a_std);
  at::Tensor col_sums = at::empty({2, a.size(1)}, stats.options());
  void* stream = current_stream(a.device());
  check_launch(launch_barlow_grad(grad.data_ptr<float>(), strided_matrix(b), launch_dtype(b.scalar_type()),
                                  stats.data_ptr<float>(), a_std.data_ptr<float>(), grad_std.data_ptr<float>(),
                                  col_sums.data_ptr<float>(), off_diagonal_weight, scale, stream),
               "launch_barlow_grad");
  at::Tensor out = at::empty(a.sizes(), a.options());
  check_launch(launch_barlow_finish(a_std.data_ptr<float>(), stats.data_ptr<float>(), grad_std.data_ptr<float>(),
                                    col_sums.data_ptr<float>(), a.size(0), a.size(1), launch_dtype(a.scalar_type()),
                                    out.data_ptr(), stream),
               "launch_barlow_finish");
  return out;
}

at::Tensor correlation_loss_forward_cuda(const at::Tensor& c_in, double off_diagonal_weight, double scale) {
  const KernelGuard kernel_guard;
  check_correlation(c_in);
  const c10::DeviceGuard device_guard(c_in.device());
  const at::Tensor c = c_in.contiguous();
  at::Tensor partial = at::empty({correlation_loss_blocks(c.size(0))}, c.options());
  check_launch(launch_correlation_loss(c.data_ptr<float>(), c.size(0), off_diagonal_weight, partial.data_ptr<float>(),
                                       current_stream(c.device())),
               "launch_correlation_loss");
  return partial.sum().mul(scale);
}

at::Tensor correlation_loss_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& c_in,
                                          double off_diagonal_weight, double scale) {
  const KernelGuard kernel_guard;
  check_correlation(c_in);
  check_saved(grad_loss, "grad_loss", c_in, {});
  const c10::DeviceGuard device_guard(c_in.device());
  const at::Tensor c = c_in.contiguous(), grad = grad_loss.contiguous();
  at::Tensor out = at::empty(c.sizes(), c.options());
  check_launch(launch_correlation_grad(grad.data_ptr<float>(), c.data_ptr<float>(), c.size(0), off_diagonal_weight,
                                       scale, out.data_ptr<float>(), current_stream(c.device())),
               "launch_correlation_grad");
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(pnr_kernels, m) {
  m.def("paired_terms_forward(Tensor p1, Tensor p2, Tensor f1, Tensor f2, str kind) -> (Tensor, Tensor)");
  m.def("paired_terms_backward(Tensor grad_terms, Tensor terms, Tensor norms, Tensor p1, Tensor p2, Tensor f1, "
        "Tensor f2, str kind, bool p1_needs_grad, bool p2_needs_grad) -> Tensor[]");
  m.def("paired_loss_forward(Tensor p1, Tensor p2, Tensor f1, Tensor f2, str kind, float[] weights, float constant, "
        "bool p1_needs_grad, bool p2_needs_grad) -> (Tensor, Tensor, Tensor)");
  m.def("barlow_pnr_loss_forward(Tensor p1, Tensor p2, Tensor f1, Tensor f2, float distill_weight, "
        "float negative_weight, float off_diagonal_weight, float scale, bool p1_needs_grad, bool p2_needs_grad) -> "
        "(Tensor, Tensor, Tensor)");
  // paired_loss_forward and barlow_pnr_loss_forward with their eager autograd (SavedGradientLoss;
  // CPU tensors); one kernel for every dispatch key
  m.def("paired_loss_autograd(Tensor p1, Tensor p2, Tensor f1, Tensor f2, str kind, float[] weights, "
        "float constant, bool p1_needs_grad, bool p2_needs_grad) -> (Tensor, Tensor, Tensor)",
        &paired_loss_autograd);
  m.def("barlow_pnr_loss_autograd(Tensor p1, Tensor p2, Tensor f1, Tensor f2, float distill_weight, "
        "float negative_weight, float off_diagonal_weight, float scale, bool p1_needs_grad, bool p2_needs_grad) -> "
        "(Tensor, Tensor, Tensor)",
        &barlow_pnr_loss_autograd);
  m.def("release_cpu_output_pool() -> int", &release_output_pool);  // no tensors: one kernel for all
  m.def("barlow_gram_forward(Tensor a, Tensor b, float off_diagonal_weight, float scale) -> (Tensor, Tensor, Tensor)");
  m.def("barlow_gram_backward(Tensor grad_loss, Tensor a, Tensor b, Tensor stats, Tensor gram_b, "
        "float off_diagonal_weight, float scale) -> Tensor");
  m.def("barlow_correlation_loss_forward(Tensor c, float off_diagonal_weight, float scale) -> Tensor");
  m.def("barlow_correlation_loss_backward(Tensor grad_loss, Tensor c, float off_diagonal_weight, float scale) -> "
        "Tensor");
}

TORCH_LIBRARY_IMPL(pnr_kernels, CPU, m) {
  m.impl("paired_terms_forward", &paired_forward_cpu);
  m.impl("paired_terms_backward", &paired_backward_cpu);
  m.impl("paired_loss_forward", &paired_loss_cpu);
  m.impl("barlow_pnr_loss_forward", &barlow_pnr_loss_cpu);
  m.impl("barlow_gram_forward", &barlow_forward_cpu);
  m.impl("barlow_gram_backward", &barlow_backward_cpu);
  m.impl("barlow_correlation_loss_forward", &correlation_loss_forward_cpu);
  m.impl("barlow_correlation_loss_backward", &correlation_loss_backward_cpu);
}

#ifdef PNR_KERNELS_WITH_CUDA
TORCH_LIBRARY_IMPL(pnr_kernels, CUDA, m) {
  m.impl("paired_terms_forward", &paired_forward_cuda);
  m.impl("paired_terms_backward", &paired_backward_cuda);
  m.impl("barlow_gram_forward", &barlow_forward_cuda);
  m.impl("barlow_gram_backward", &barlow_backward_cuda);
  m.impl("barlow_correlation_loss_forward", &correlation_loss_forward_cuda);
  m.impl("barlow_correlation_loss_backward", &correlation_loss_backward_cuda);
}
#endif

}  // namespace pnr_kernels
