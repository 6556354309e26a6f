// SimCLR-PNR and NT-Xent of one process on CPU tensors as one op with its own autograd node (C++):
// the eager path of simclr_pnr_loss and nt_xent_loss in pnr_kernels/ops/infonce.py. Their
// composition in Python (two unit-rows ops, the InfoNCE op, the positives and means: three Python
// autograd Functions and some twenty recorded ATen ops) spends about a third of an NT-Xent step at
// B = 256 outside the kernels on a 2-core CPU. This calls the same kernels with the same arguments
// and the positives and means with the same ATen calls, in the same order, so that its loss and
// gradients are the composition's bitwise (tests/test_infonce_native_views.py), and records one
// node whose backward runs no Python.
//   inputs:   z1, z2 (B, D), and for SimCLR-PNR pnr = [p1, p2, f1, f2] (B, D);
//   forward:  z = unit([z1; z2]), P = unit([p1; p2]), F = unit([f1; f2]) (unit_rows_cpu.h);
//             lse = the InfoNCE op of rows [z, P] against keys [z, F], diagonals excluded, scale 1/t;
//             loss = mean lse[0] - mean_i (z_i . z_{B+i}) / t [+ mean_i (lse[1, i] - P_i . F_i / t)];
//   backward: d lse = g / 2B per entry into the op's backward, the positives' -g / t spread over
//             their means, then each unit-rows backward per input half.
// Under create_graph the backward is the registered op infonce_views_loss_backward, whose autograd
// (pnr_kernels/ops/_common.py, first_order_only) refuses a second differentiation.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/cat.h>
#include <torch/csrc/autograd/custom_function.h>

#include "common.h"
#include "infonce_cpu.h"
#include "unit_rows_cpu.h"

namespace pnr_kernels {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The row sets and key blocks of the InfoNCE op, from the saved unit rows [z, P, F] (or [z]).
struct Blocks {
  std::vector<at::Tensor> rows, keys;
  std::vector<bool> exclude_diagonal;
  std::vector<double> scales;
  std::vector<bool> rows_need_grad, keys_need_grad;

  Blocks(const std::vector<at::Tensor>& sets, const std::vector<bool>& set_needs, double temperature) {
    rows.push_back(sets[0]);
    keys.push_back(sets[0]);
    rows_need_grad.push_back(set_needs[0]);
    keys_need_grad.push_back(set_needs[0]);
    if (sets.size() == 3) {
      rows.push_back(sets[1]);
      keys.push_back(sets[2]);
      rows_need_grad.push_back(set_needs[1]);
      keys_need_grad.push_back(set_needs[2]);
    }
    exclude_diagonal.assign(rows.size(), true);
    scales.assign(rows.size(), 1.0 / temperature);
  }
};

// Per unit-row set (z, P, F): whether one of its two inputs needs a gradient.
std::vector<bool> set_needs(const std::vector<bool>& needs) {
  std::vector<bool> sets;
  for (size_t i = 0; i + 1 < needs.size(); i += 2) sets.push_back(needs[i] || needs[i + 1]);
  return sets;
}

// The inputs: z1, z2 and none or four PNR inputs, CPU matrices of one dtype and shape.
std::vector<at::Tensor> checked_inputs(const at::Tensor& z1, const at::Tensor& z2, at::TensorList pnr) {
  TORCH_CHECK(pnr.empty() || pnr.size() == 4, "pnr must be empty (NT-Xent) or [p1, p2, f1, f2], got ", pnr.size(),
              " tensors");
  TORCH_CHECK(z1.dim() == 2 && z1.device().is_cpu(), "z1 must be a 2-D CPU tensor, got shape ", z1.sizes(), " on ",
              z1.device());
  std::vector<at::Tensor> inputs{z1, z2};
  inputs.insert(inputs.end(), pnr.begin(), pnr.end());
  check_matrices(inputs, "inputs", z1.device(), z1.scalar_type(), z1.size(1));
  for (const auto& x : inputs) {
    TORCH_CHECK(x.size(0) == z1.size(0), "every input must have ", z1.size(0), " rows, got ", x.size(0));
  }
  return inputs;
}

// (a . b per row) in the compute dtype, as ops/infonce.py's _row_dot.
at::Tensor row_dot(const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType dtype = compute_dtype(a.scalar_type());
  return a.to(dtype).mul(b.to(dtype)).sum(1);
}

// [loss (0-d, the inputs' dtype), lse (R, 2B), z, and for SimCLR-PNR P, F].
std::vector<at::Tensor> views_forward(const std::vector<at::Tensor>& inputs, double temperature,
                                      const std::vector<bool>& needs, double huge, double eps) {
  const KernelGuard kernel_guard;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t b = inputs[0].size(0);
  std::vector<at::Tensor> sets;
  for (size_t i = 0; i < inputs.size(); i += 2) {
    sets.push_back(unit_rows_forward_cpu(at::cat({inputs[i], inputs[i + 1]}), huge, eps));
  }
  const Blocks blocks(sets, set_needs(needs), temperature);
  const at::Tensor lse = infonce_forward_cpu(blocks.rows, blocks.keys, blocks.exclude_diagonal, blocks.scales,
                                             blocks.rows_need_grad, blocks.keys_need_grad);
  const at::Tensor& z = sets[0];
  at::Tensor loss = lse.select(0, 0).mean().sub(row_dot(z.narrow(0, 0, b), z.narrow(0, b, b)).mean().div(temperature));
  if (sets.size() == 3) loss = loss.add(lse.select(0, 1).sub(row_dot(sets[1], sets[2]).div(temperature)).mean());
  std::vector<at::Tensor> out{loss.to(inputs[0].scalar_type()), lse};
  out.insert(out.end(), sets.begin(), sets.end());
  return out;
}

// x += (coefficient * other) in the compute dtype, rounded to x's dtype; coefficient is (n, 1).
void add_scaled(at::Tensor x, const at::Tensor& coefficient, const at::Tensor& other) {
  x.add_(coefficient.mul(other.to(coefficient.scalar_type())).to(x.scalar_type()));
}

// The gradients of the inputs that need one, in input order. saved = [lse, z(, P, F)].
std::vector<at::Tensor> views_backward_cpu(const at::Tensor& grad_loss, at::TensorList saved, at::TensorList inputs,
                                           double temperature, double huge, double eps,
                                           const c10::List<bool>& needs_list) {
  const KernelGuard kernel_guard;
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const std::vector<bool> needs(needs_list.begin(), needs_list.end());
  TORCH_CHECK(saved.size() == 2 || saved.size() == 4, "saved must be [lse, z] or [lse, z, p, f]");
  TORCH_CHECK(inputs.size() == 2 * (saved.size() - 1) && needs.size() == inputs.size(),
              "inputs and needs must have two entries per saved unit-row set");
  const at::Tensor& lse = saved[0];
  const std::vector<at::Tensor> sets(saved.begin() + 1, saved.end());
  const int64_t n = lse.size(1), b = n / 2;
  const at::Tensor g = grad_loss.to(lse.scalar_type());
  const std::vector<bool> set_need = set_needs(needs);
  const Blocks blocks(sets, set_need, temperature);
  const std::vector<at::Tensor> grads =
      infonce_backward_cpu(g.expand(lse.sizes()).div(n).contiguous(), lse, blocks.rows, blocks.keys,
                           blocks.exclude_diagonal, blocks.scales, blocks.rows_need_grad, blocks.keys_need_grad);
  // grads: the rows that need one (z, P), then the keys (z, F)
  std::vector<at::Tensor> rows_grad(blocks.rows.size()), keys_grad(blocks.keys.size());
  size_t next = 0;
  for (size_t r = 0; r < rows_grad.size(); ++r) {
    if (blocks.rows_need_grad[r]) rows_grad[r] = grads[next++];
  }
  for (size_t k = 0; k < keys_grad.size(); ++k) {
    if (blocks.keys_need_grad[k]) keys_grad[k] = grads[next++];
  }
  std::vector<at::Tensor> set_grads(sets.size());
  if (set_need[0]) {  // the main term: z against itself, and z_i . z_{B+i} / t
    const at::Tensor& z = sets[0];
    at::Tensor dz = rows_grad[0].add_(keys_grad[0]);
    const at::Tensor coefficient = g.neg().div(temperature).expand({b}).div(b).unsqueeze(1);
    add_scaled(dz.narrow(0, 0, b), coefficient, z.narrow(0, b, b));
    add_scaled(dz.narrow(0, b, b), coefficient, z.narrow(0, 0, b));
    set_grads[0] = dz;
  }
  if (sets.size() == 3) {  // the pseudo-negatives: P against F, and P_i . F_i / t
    const at::Tensor coefficient = g.expand({n}).div(n).neg().div(temperature).unsqueeze(1);
    if (set_need[1]) add_scaled(set_grads[1] = rows_grad[1], coefficient, sets[2]);
    if (set_need[2]) add_scaled(set_grads[2] = keys_grad[1], coefficient, sets[1]);
  }
  std::vector<at::Tensor> out;  // each set's rows are [x1; x2]: its unit-rows backward per half
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (needs[i]) {
      out.push_back(unit_rows_backward_cpu(set_grads[i / 2].narrow(0, (i % 2) * b, b), inputs[i], huge, eps));
    }
  }
  return out;
}

struct ViewsLoss : public torch::autograd::Function<ViewsLoss> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z1, const at::Tensor& z2, at::TensorList pnr,
                               double temperature, double huge, double eps, const std::vector<bool>& needs) {
    const std::vector<at::Tensor> inputs = checked_inputs(z1, z2, pnr);
    const std::vector<at::Tensor> out = views_forward(inputs, temperature, needs, huge, eps);
    std::vector<at::Tensor> to_save(out.begin() + 1, out.end());  // lse and the unit rows, then the inputs
    const auto num_saved = static_cast<int64_t>(to_save.size());
    to_save.insert(to_save.end(), inputs.begin(), inputs.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["temperature"] = temperature;
    ctx->saved_data["huge"] = huge;
    ctx->saved_data["eps"] = eps;
    c10::List<bool> need_list;
    for (bool need : needs) need_list.push_back(need);
    ctx->saved_data["needs"] = need_list;
    ctx->saved_data["num_saved"] = num_saved;
    return {out[0]};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    variable_list result(needs.size() + 4);  // the inputs, then temperature, huge, eps, needs
    if (!grads[0].defined()) return result;
    const variable_list all = ctx->get_saved_variables();
    const int64_t num_saved = ctx->saved_data["num_saved"].toInt();
    const std::vector<at::Tensor> saved(all.begin(), all.begin() + num_saved), inputs(all.begin() + num_saved, all.end());
    const double temperature = ctx->saved_data["temperature"].toDouble();
    const double huge = ctx->saved_data["huge"].toDouble(), eps = ctx->saved_data["eps"].toDouble();
    std::vector<at::Tensor> computed;
    if (at::GradMode::is_enabled()) {  // create_graph: through the op, whose autograd refuses order two
      static const auto backward_op =
          c10::Dispatcher::singleton()
              .findSchemaOrThrow("pnr_kernels::infonce_views_loss_backward", "")
              .typed<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, double, double, double,
                                             const c10::List<bool>&)>();
      computed = backward_op.call(grads[0], saved, inputs, temperature, huge, eps, needs);
    } else {
      computed = views_backward_cpu(grads[0], saved, inputs, temperature, huge, eps, needs);
    }
    for (size_t i = 0, k = 0; i < needs.size(); ++i) {
      if (needs[i]) result[i] = computed[k++];
    }
    return result;
  }
};

// The loss; records ViewsLoss where an input requires a gradient and grad mode is on.
at::Tensor views_loss(const at::Tensor& z1, const at::Tensor& z2, at::TensorList pnr, double temperature, double huge,
                      double eps) {
  std::vector<bool> needs{z1.requires_grad(), z2.requires_grad()};
  for (const auto& x : pnr) needs.push_back(x.requires_grad());
  if (!at::GradMode::is_enabled()) needs.assign(needs.size(), false);
  return ViewsLoss::apply(z1, z2, pnr, temperature, huge, eps, needs)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pnr_kernels, m) {
  // one kernel for every dispatch key (the node is recorded by the op itself)
  m.def("infonce_views_loss(Tensor z1, Tensor z2, Tensor[] pnr, float temperature, float huge, float eps) -> Tensor",
        &views_loss);
  m.def("infonce_views_loss_backward(Tensor grad_loss, Tensor[] saved, Tensor[] inputs, float temperature, "
        "float huge, float eps, bool[] needs) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(pnr_kernels, CPU, m) { m.impl("infonce_views_loss_backward", &views_backward_cpu); }

}  // namespace pnr_kernels
