// CPU kernels of the fused InfoNCE op (contract: infonce_cpu.h, pnr_kernels/ops/infonce.py).
//
// Work is split into units of one row tile of one row set; at::parallel_for hands contiguous
// ranges of units to the threads. A unit walks every key tile of every key block with the online
// log-sum-exp: each (row tile x key tile) block of logits is one BLAS product into a per-thread
// buffer, so nothing of size rows x keys is ever allocated. Backward recomputes each logits tile
// once and turns it into the weights W = g * exp(logit - lse) (masked entries 0), then
//   d rows tile += scale * W @ keys tile          (the unit owns its rows: no race, accumulated
//                                                  in place in the result)
//   d keys tile += scale * W^T @ rows tile        (into the calling thread's own accumulator:
//                                                  thread 0's is the result, the others are
//                                                  allocated when first used and added at the end)
// Inputs are read in the compute dtype: float64 stays float64, float32/bfloat16/float16 are
// computed in float32 (half inputs are converted once, O((rows + keys) x D) memory).
#include "infonce_cpu.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/amax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/maximum.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>

#include "common.h"

namespace pnr_kernels {
namespace {

constexpr int64_t kRowTile = 256;
constexpr int64_t kMinRowTile = 32;
constexpr int64_t kKeyTile = 512;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::vector<at::Tensor> in_compute_dtype(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const auto& t : tensors) out.push_back(t.to(compute_dtype(t.scalar_type())));
  return out;
}

// Sets the entries (i, j) of a tile of rows i0.. and keys j0.. with i0 + i == j0 + j to `value`.
template <typename acc_t>
void fill_diagonal(at::Tensor& tile, int64_t i0, int64_t j0, acc_t value) {
  const int64_t tm = tile.size(0), tn = tile.size(1), stride = tile.stride(0);
  acc_t* data = tile.data_ptr<acc_t>();
  const int64_t first = std::max<int64_t>(0, j0 - i0), last = std::min(tm, j0 + tn - i0);
  for (int64_t i = first; i < last; ++i) data[i * stride + (i0 + i - j0)] = value;
}

// A (tm, tn) view of a per-thread tile buffer, contiguous so that BLAS writes it directly.
at::Tensor tile_view(const at::Tensor& buffer, int64_t tm, int64_t tn) {
  return buffer.narrow(0, 0, tm * tn).view({tm, tn});
}

// Rows per unit: kRowTile, halved (down to kMinRowTile) until every thread gets two units.
int64_t row_tile(int64_t num_row_sets, int64_t num_rows) {
  int64_t tile = kRowTile;
  while (tile > kMinRowTile && num_row_sets * ceil_div(num_rows, tile) < 2 * at::get_num_threads()) tile /= 2;
  return tile;
}

// Calls body(r, i0, tm) for row set r, rows i0 .. i0 + tm, for every unit, in parallel.
template <typename F>
void for_each_row_tile(int64_t num_row_sets, int64_t num_rows, const F& body) {
  const int64_t tile = row_tile(num_row_sets, num_rows), tiles = ceil_div(num_rows, tile);
  at::parallel_for(0, num_row_sets * tiles, 1, [&](int64_t begin, int64_t end) {
    const at::AutoDispatchBelowADInplaceOrView below_autograd;  // dispatch state is per thread
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t r = unit / tiles, i0 = (unit % tiles) * tile;
      body(r, i0, std::min(tile, num_rows - i0));
    }
  });
}

template <typename acc_t>
void forward_kernel(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
                    const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales,
                    at::Tensor& lse) {
  const acc_t neg_inf = -std::numeric_limits<acc_t>::infinity();
  const auto options = rows[0].options();
  for_each_row_tile(rows.size(), rows[0].size(0), [&](int64_t r, int64_t i0, int64_t tm) {
    at::Tensor buffer = at::empty({kRowTile * kKeyTile}, options);
    at::Tensor a = rows[r].narrow(0, i0, tm).mul(scales[r]);
    at::Tensor running_max = at::full({tm}, neg_inf, options);
    at::Tensor running_sum = at::zeros({tm}, options);
    for (size_t k = 0; k < keys.size(); ++k) {
      for (int64_t j0 = 0; j0 < keys[k].size(0); j0 += kKeyTile) {
        const int64_t tn = std::min(kKeyTile, keys[k].size(0) - j0);
        at::Tensor logits = tile_view(buffer, tm, tn);
        at::mm_out(logits, a, keys[k].narrow(0, j0, tn).t());
        if (exclude_diagonal[k]) fill_diagonal<acc_t>(logits, i0, j0, neg_inf);
        at::Tensor new_max = at::maximum(running_max, logits.amax(1));
        // Shift by 0 where every logit so far is -inf, so that -inf - -inf never makes a NaN.
        at::Tensor shift = new_max.masked_fill(new_max.eq(neg_inf), 0);
        logits.sub_(shift.unsqueeze(1)).exp_();
        running_sum.mul_(running_max.sub_(shift).exp_()).add_(logits.sum(1));
        running_max = new_max;
      }
    }
    lse[r].narrow(0, i0, tm).copy_(running_max.add_(running_sum.log_()));
  });
}

template <typename acc_t>
void backward_kernel(const at::Tensor& grad_lse, const at::Tensor& lse, const std::vector<at::Tensor>& rows,
                     const std::vector<at::Tensor>& keys, const std::vector<bool>& exclude_diagonal,
                     const std::vector<double>& scales, const std::vector<bool>& rows_need_grad,
                     const std::vector<bool>& keys_need_grad, std::vector<at::Tensor>& rows_grad,
                     std::vector<std::vector<at::Tensor>>& keys_grad_per_thread) {
  const auto options = rows[0].options();
  const int64_t num_threads = at::get_num_threads();
  // A row with no key at all has lse = -inf and gets no gradient: +inf makes its weights 0.
  const at::Tensor safe_lse = lse.masked_fill(lse.eq(-std::numeric_limits<acc_t>::infinity()),
                                              std::numeric_limits<acc_t>::infinity());
  for_each_row_tile(rows.size(), rows[0].size(0), [&](int64_t r, int64_t i0, int64_t tm) {
    const int64_t thread = at::get_thread_num();
    TORCH_CHECK(thread < num_threads, "thread ", thread, " outside the ", num_threads, " accumulators");
    at::Tensor buffer = at::empty({kRowTile * kKeyTile}, options);
    at::Tensor a = rows[r].narrow(0, i0, tm).mul(scales[r]);
    at::Tensor g = grad_lse[r].narrow(0, i0, tm).unsqueeze(1);
    at::Tensor row_lse = safe_lse[r].narrow(0, i0, tm).unsqueeze(1);
    at::Tensor row_grad = rows_need_grad[r] ? rows_grad[r].narrow(0, i0, tm).zero_() : at::Tensor();
    for (size_t k = 0; k < keys.size(); ++k) {
      if (!rows_need_grad[r] && !keys_need_grad[k]) continue;
      for (int64_t j0 = 0; j0 < keys[k].size(0); j0 += kKeyTile) {
        const int64_t tn = std::min(kKeyTile, keys[k].size(0) - j0);
        at::Tensor key_tile = keys[k].narrow(0, j0, tn);
        at::Tensor weights = tile_view(buffer, tm, tn);
        at::mm_out(weights, a, key_tile.t());
        weights.sub_(row_lse).exp_().mul_(g);
        if (exclude_diagonal[k]) fill_diagonal<acc_t>(weights, i0, j0, 0);
        if (rows_need_grad[r]) row_grad.addmm_(weights, key_tile);
        if (keys_need_grad[k]) {
          at::Tensor& accumulator = keys_grad_per_thread[k][thread];
          if (!accumulator.defined()) accumulator = at::zeros(keys[k].sizes(), options);
          accumulator.narrow(0, j0, tn).addmm_(weights.t(), a);
        }
      }
    }
    if (rows_need_grad[r]) row_grad.mul_(scales[r]);
  });
}

}  // namespace

at::Tensor infonce_forward_cpu(const std::vector<at::Tensor>& rows, const std::vector<at::Tensor>& keys,
                               const std::vector<bool>& exclude_diagonal, const std::vector<double>& scales) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto rows_c = in_compute_dtype(rows), keys_c = in_compute_dtype(keys);
  at::Tensor lse = at::empty({static_cast<int64_t>(rows.size()), rows[0].size(0)}, rows_c[0].options());
  AT_DISPATCH_FLOATING_TYPES(lse.scalar_type(), "infonce_forward_cpu", [&] {
    forward_kernel<scalar_t>(rows_c, keys_c, exclude_diagonal, scales, lse);
  });
  return lse;
}

std::vector<at::Tensor> infonce_backward_cpu(const at::Tensor& grad_lse, const at::Tensor& lse,
                                             const std::vector<at::Tensor>& rows,
                                             const std::vector<at::Tensor>& keys,
                                             const std::vector<bool>& exclude_diagonal,
                                             const std::vector<double>& scales,
                                             const std::vector<bool>& rows_need_grad,
                                             const std::vector<bool>& keys_need_grad) {
  const at::AutoDispatchBelowADInplaceOrView below_autograd;
  const auto rows_c = in_compute_dtype(rows), keys_c = in_compute_dtype(keys);
  const auto options = rows_c[0].options();
  std::vector<at::Tensor> rows_grad(rows.size());
  std::vector<std::vector<at::Tensor>> keys_grad_per_thread(keys.size());
  for (size_t r = 0; r < rows.size(); ++r) {
    if (rows_need_grad[r]) rows_grad[r] = at::empty(rows[r].sizes(), options);
  }
  for (size_t k = 0; k < keys.size(); ++k) {
    if (keys_need_grad[k]) {
      keys_grad_per_thread[k].resize(at::get_num_threads());
      keys_grad_per_thread[k][0] = at::zeros(keys[k].sizes(), options);
    }
  }
  AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "infonce_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_lse.to(options.dtype()), lse.to(options.dtype()), rows_c, keys_c,
                              exclude_diagonal, scales, rows_need_grad, keys_need_grad, rows_grad,
                              keys_grad_per_thread);
  });
  std::vector<at::Tensor> grads;
  for (size_t r = 0; r < rows.size(); ++r) {
    if (rows_need_grad[r]) grads.push_back(rows_grad[r].to(rows[r].scalar_type()));
  }
  for (size_t k = 0; k < keys.size(); ++k) {
    if (!keys_need_grad[k]) continue;
    at::Tensor& total = keys_grad_per_thread[k][0];
    for (size_t thread = 1; thread < keys_grad_per_thread[k].size(); ++thread) {
      if (keys_grad_per_thread[k][thread].defined()) total.add_(keys_grad_per_thread[k][thread]);
    }
    grads.push_back(total.to(keys[k].scalar_type()));
  }
  return grads;
}

}  // namespace pnr_kernels
