// The contrastive losses' row normalisation as one fused CPU op pair (contract: the docstring of
// pnr_kernels/ops/infonce.py, "unit rows"; the math is reference.normalize's):
//   forward:  g = max_j |x_ij| where it exceeds `huge`, else 1;  x' = x / g;  n = ||x'||;
//             y = x' / max(n, eps), computed in the compute dtype and stored in x's dtype;
//   backward: dx = (dy - [n >= eps] (dy . y) y) / (max(n, eps) g), y recomputed from x in the
//             compute dtype (so nothing but x is saved, and half inputs keep float32 y).
// PyTorch's composition of the same (abs, amax, where, div, norm, clamp_min, div and their
// backward) is some twenty ATen calls, each a pass over the rows and, above 32k elements, a
// fork/join of the thread pool: 0.5-0.7 ms of a 2.5 ms NT-Xent step at B = 256 on 2 cores. Here
// each row is read once per direction, in tasks of at least kMinTaskElements (smaller inputs run
// on the calling thread: waking the pool costs more than the pass).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

#include "common.h"
#include "unit_rows_cpu.h"

namespace pnr_kernels {
namespace {

constexpr int64_t kMinTaskElements = int64_t(1) << 17;

// Per row of x (D values, in_t), in acc_t: the guard g, c = max(n, eps) and whether n >= eps.
template <typename acc_t>
struct RowNorm {
  acc_t g, c;
  bool unclamped;
  // y_d = x_d / g / c (one division where g = 1, as for every ordinary row)
  acc_t unit(acc_t x) const { return g == acc_t(1) ? x / c : x / g / c; }
};

template <typename acc_t, typename in_t>
RowNorm<acc_t> row_norm(const in_t* x, int64_t dim, acc_t huge, acc_t eps) {
  acc_t largest = 0;
#pragma omp simd reduction(max : largest)
  for (int64_t d = 0; d < dim; ++d) largest = std::max(largest, std::abs(static_cast<acc_t>(x[d])));
  // (The reference's max of a row with a NaN is NaN, so g = 1 there; g does not matter then: the
  // NaN reaches n, and so every y and dx of the row.)
  const acc_t g = largest > huge ? largest : acc_t(1);
  acc_t squares = 0;
  if (g == acc_t(1)) {
#pragma omp simd reduction(+ : squares)
    for (int64_t d = 0; d < dim; ++d) squares += static_cast<acc_t>(x[d]) * static_cast<acc_t>(x[d]);
  } else {
#pragma omp simd reduction(+ : squares)
    for (int64_t d = 0; d < dim; ++d) {
      const acc_t v = static_cast<acc_t>(x[d]) / g;
      squares += v * v;
    }
  }
  const acc_t n = std::sqrt(squares);
  return {g, std::max(n, eps), n >= eps};  // n >= eps is false for a NaN n
}

int64_t grain(int64_t dim) { return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(dim, 1)); }

template <typename acc_t, typename in_t>
void forward_rows(const in_t* x, in_t* y, int64_t rows, int64_t dim, acc_t huge, acc_t eps) {
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const in_t* xi = x + i * dim;
      const RowNorm<acc_t> r = row_norm<acc_t, in_t>(xi, dim, huge, eps);
      for (int64_t d = 0; d < dim; ++d) y[i * dim + d] = static_cast<in_t>(r.unit(static_cast<acc_t>(xi[d])));
    }
  });
}

template <typename acc_t, typename in_t>
void backward_rows(const in_t* dy, const in_t* x, in_t* dx, int64_t rows, int64_t dim, acc_t huge, acc_t eps) {
  at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const in_t* xi = x + i * dim;
      const in_t* dyi = dy + i * dim;
      const RowNorm<acc_t> r = row_norm<acc_t, in_t>(xi, dim, huge, eps);
      acc_t dot = 0;
      if (r.unclamped) {
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < dim; ++d) dot += static_cast<acc_t>(dyi[d]) * r.unit(static_cast<acc_t>(xi[d]));
      }
      const acc_t factor = acc_t(1) / (r.c * r.g);
      for (int64_t d = 0; d < dim; ++d) {
        const acc_t yd = r.unit(static_cast<acc_t>(xi[d]));
        dx[i * dim + d] = static_cast<in_t>((static_cast<acc_t>(dyi[d]) - dot * yd) * factor);
      }
    }
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, name, " must be 2-D, got shape ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), name, " must be floating point, got ", x.scalar_type());
}

}  // namespace

at::Tensor unit_rows_forward_cpu(const at::Tensor& x, double huge, double eps) {
  const KernelGuard kernel_guard;
  check_rows(x, "x");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty(xc.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "unit_rows_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<acc_t, scalar_t>(xc.const_data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), xc.size(0), xc.size(1),
                                  static_cast<acc_t>(huge), static_cast<acc_t>(eps));
  });
  return y;
}

at::Tensor unit_rows_backward_cpu(const at::Tensor& grad, const at::Tensor& x, double huge, double eps) {
  const KernelGuard kernel_guard;
  check_rows(x, "x");
  TORCH_CHECK(grad.sizes() == x.sizes(), "grad has shape ", grad.sizes(), ", expected x's ", x.sizes());
  const at::Tensor xc = x.contiguous(), gc = grad.to(x.scalar_type()).contiguous();
  at::Tensor dx = at::empty(xc.sizes(), xc.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xc.scalar_type(), "unit_rows_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    backward_rows<acc_t, scalar_t>(gc.const_data_ptr<scalar_t>(), xc.const_data_ptr<scalar_t>(),
                                   dx.data_ptr<scalar_t>(), xc.size(0), xc.size(1), static_cast<acc_t>(huge),
                                   static_cast<acc_t>(eps));
  });
  return dx;
}

TORCH_LIBRARY_FRAGMENT(pnr_kernels, m) {
  m.def("unit_rows_forward(Tensor x, float huge, float eps) -> Tensor");
  m.def("unit_rows_backward(Tensor grad, Tensor x, float huge, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(pnr_kernels, CPU, m) {
  m.impl("unit_rows_forward", &unit_rows_forward_cpu);
  m.impl("unit_rows_backward", &unit_rows_backward_cpu);
}

}  // namespace pnr_kernels
