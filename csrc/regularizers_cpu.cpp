// CPU kernels of the non-contrastive PNR regularisers (contract: pnr_kernels/ops/regularizers.py).
//
// Paired terms: one parallel loop over rows; each row of p1, p2, f1, f2 is read once, its sums are
// kept in kLanes independent partial sums per quantity so that the compiler vectorises them.
// Barlow (Gram form): column statistics in one parallel loop over column stripes, the two B x B
// Gram matrices and the backward's G_b a^ product through at::mm (the CPU BLAS), everything else
// (standardisation, diagonal, loss, standardisation backward) in fused loops, O(B D). For B > D the
// same op computes and saves the D x D C = a^T b^ / B instead (the smaller matrix; G_b a^ = B b^ C^T).
// Barlow-PNR in one call (one process): both Barlow terms and their gradients (computed in the forward,
// in place of the product's output: the correlation form folds the diagonal into the product's
// matrix, one product b^ M^T), the cosine negatives' row gradients added to them.
// Barlow over a given C (DDP, B > D): one read of C for the loss, one read and write for d C.
// Gradients and standardised copies of 32 MiB or more come from output_pool_cpu.cpp's pool (no page
// faults at every step), and the paired kernels write float32 gradients with non-temporal stores (no
// read of the lines first).
// Half-precision inputs accumulate in float32, float64 inputs in float64.
// Huge magnitudes: where a row's (cosine) or column's (Barlow statistics) sums overflow, that row or
// column is summed again divided by a power of two near its largest magnitude (safe_math.h), so
// inputs up to the format's largest finite values give the unit-scale cosines and standardisation
// (the standardised values themselves without forming x - mean: safe_math.h); at ordinary scales
// nothing changes. NaN and Inf inputs propagate (the rescaled sums are non-finite again).
#include "regularizers_cpu.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <type_traits>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "output_pool_cpu.h"
#include "safe_math.h"

namespace pnr_kernels {
namespace {

constexpr double kCosineEps = 1e-8;          // torch.nn.functional.cosine_similarity's eps
constexpr double kBarlowVarianceEps = 1e-5;  // pnr_kernels.reference.BARLOW_VARIANCE_EPS
constexpr int64_t kLanes = 16;
// Elements per parallel task, at least: waking a second OpenMP thread that sleeps (OMP_WAIT_POLICY=
// passive, or a busy machine) costs some 40 us, more than 4 x 256 x 128 elements take on one thread
// (measured: the fused paired loss at B = 256, D = 128 0.040 ms on one thread, 0.086 ms on two;
// D = 512 0.11 vs 0.09 ms).
constexpr int64_t kParallelElements = 1 << 17;

// Gradients of at least kStreamingBytes (beyond the caches) are written with non-temporal stores,
// kStreamChunk values at a time from a buffer in L1: an ordinary store first reads the line it
// writes, a third more memory traffic for a kernel that reads four inputs and writes two outputs.
constexpr int64_t kStreamingBytes = int64_t(32) << 20;
constexpr int64_t kStreamChunk = 256;

// Whether the float32 outputs g1, g2 (B, D each; either may be null) are written with non-temporal
// stores: both large enough, with 16-byte aligned rows.
template <typename out_t>
bool streamed(const out_t* g1, const out_t* g2, int64_t B, int64_t D) {
#if defined(__x86_64__)
  const auto fits = [&](const out_t* g) { return g == nullptr || reinterpret_cast<uintptr_t>(g) % 16 == 0; };
  return std::is_same_v<out_t, float> && (g1 != nullptr || g2 != nullptr) && fits(g1) && fits(g2) && D % 4 == 0 &&
         B * D * static_cast<int64_t>(sizeof(float)) >= kStreamingBytes;
#else
  return false;
#endif
}

int64_t grain(int64_t per_item) { return std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, per_item)); }

// The paired kernels' row loops are compiled three times, for AVX-512, AVX2 + FMA and the build's
// baseline (the build flags have no -march), and the widest the CPU has runs: the per-row helpers
// are forced inline into each so that their loops vectorise at that width. Sums are the same
// kLanes-way partial sums on every path (an FMA contracts a product and a sum: rounding differs in
// the last bits, not the method).
#define PNR_INLINE inline __attribute__((always_inline))
#define PNR_LAMBDA_INLINE __attribute__((always_inline))
#if defined(__x86_64__)
#define PNR_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,fma")))
#define PNR_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

enum class RowIsa { kBaseline, kAvx2, kAvx512 };

RowIsa row_isa() {
#if defined(__x86_64__)
  static const RowIsa isa = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                                    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
                                ? RowIsa::kAvx512
                            : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? RowIsa::kAvx2
                                                                                              : RowIsa::kBaseline;
  return isa;
#else
  return RowIsa::kBaseline;
#endif
}

template <typename Body>
void rows_baseline(int64_t begin, int64_t end, const Body& body) {
  for (int64_t i = begin; i < end; ++i) body(i);
}
#if defined(__x86_64__)
template <typename Body>
PNR_TARGET_AVX2 void rows_avx2(int64_t begin, int64_t end, const Body& body) {
  for (int64_t i = begin; i < end; ++i) body(i);
}
template <typename Body>
PNR_TARGET_AVX512 void rows_avx512(int64_t begin, int64_t end, const Body& body) {
  for (int64_t i = begin; i < end; ++i) body(i);
}
#endif

// body(i) for every row i < B, in parallel tasks of at least kParallelElements / per_row rows, on the
// widest instruction set (body must be a PNR_LAMBDA_INLINE lambda).
template <typename Body>
void for_each_row(int64_t B, int64_t per_row, const Body& body) {
  const RowIsa isa = row_isa();
  at::parallel_for(0, B, grain(per_row), [&](int64_t begin, int64_t end) {
#if defined(__x86_64__)
    if (isa == RowIsa::kAvx512) {
      rows_avx512(begin, end, body);
    } else if (isa == RowIsa::kAvx2) {
      rows_avx2(begin, end, body);
    } else {
      rows_baseline(begin, end, body);
    }
    _mm_sfence();  // this thread's non-temporal stores (if any) before the join
#else
    rows_baseline(begin, end, body);
#endif
  });
}

// `t` with unit stride along its columns (its rows may have any stride).
at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(1) == 1 ? t : t.contiguous(); }

template <typename scalar_t>
at::ScalarType compute_scalar_type() {
  return c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
}

// {sum over d < D of f(d)[q]} for the Q quantities f returns, in kLanes partial sums each.
template <typename acc_t, size_t Q, typename F>
PNR_INLINE std::array<acc_t, Q> row_sums(int64_t D, const F& f) {
  acc_t lanes[Q][kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const std::array<acc_t, Q> v = f(d + k);
      for (size_t q = 0; q < Q; ++q) lanes[q][k] += v[q];
    }
  }
  for (; d < D; ++d) {
    const std::array<acc_t, Q> v = f(d);
    for (size_t q = 0; q < Q; ++q) lanes[q][0] += v[q];
  }
  std::array<acc_t, Q> out{};
  for (size_t q = 0; q < Q; ++q) {
    for (int64_t k = 0; k < kLanes; ++k) out[q] += lanes[q][k];
  }
  return out;
}

// The four inputs with unit column stride, as raw row pointers.
template <typename scalar_t>
struct Rows {
  at::Tensor keep[4];
  const scalar_t* data[4];
  int64_t stride[4];

  Rows(const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& f1, const at::Tensor& f2) {
    const at::Tensor* in[4] = {&p1, &p2, &f1, &f2};
    for (int k = 0; k < 4; ++k) {
      keep[k] = unit_column_stride(*in[k]);
      data[k] = keep[k].template const_data_ptr<scalar_t>();
      stride[k] = keep[k].stride(0);
    }
  }
  const scalar_t* row(int k, int64_t i) const { return data[k] + i * stride[k]; }
};

// The cosine terms and norms of one row of p1, p2, f1, f2 whose sums overflow: each row is divided by
// the power of two above its largest magnitude before summing (safe_math.h).
template <typename scalar_t>
void scaled_cosines(const scalar_t* p1, const scalar_t* p2, const scalar_t* f1, const scalar_t* f2, int64_t D,
                    at::opmath_type<scalar_t>* terms, at::opmath_type<scalar_t>* norms) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x[4] = {p1, p2, f1, f2};
  int e[4];
  acc_t inv[4];
  for (int k = 0; k < 4; ++k) {
    acc_t largest = 0;
    for (int64_t d = 0; d < D; ++d) largest = nan_max(largest, std::abs(static_cast<acc_t>(x[k][d])));
    e[k] = scale_exponent(largest);
    inv[k] = inverse_scale<acc_t>(e[k]);
  }
  const auto s = row_sums<acc_t, 8>(D, [&](int64_t d) {
    const acc_t u1 = static_cast<acc_t>(p1[d]) * inv[0], u2 = static_cast<acc_t>(p2[d]) * inv[1];
    const acc_t v1 = static_cast<acc_t>(f1[d]) * inv[2], v2 = static_cast<acc_t>(f2[d]) * inv[3];
    return std::array<acc_t, 8>{u1 * v1, u2 * v2, u1 * v2, u2 * v1, u1 * u1, u2 * u2, v1 * v1, v2 * v2};
  });
  acc_t r[4];
  for (int k = 0; k < 4; ++k) {
    const acc_t scaled_norm = std::sqrt(s[4 + k]);
    norms[k] = std::ldexp(scaled_norm, e[k]);
    r[k] = scaled_inverse_clamped_norm(scaled_norm, e[k], static_cast<acc_t>(kCosineEps));
  }
  terms[0] = s[0] * r[0] * r[2];
  terms[1] = s[1] * r[1] * r[3];
  terms[2] = s[2] * r[0] * r[3];
  terms[3] = s[3] * r[1] * r[2];
}

// The terms t[4] (and for cosines the norms n[4]) of row i (see paired_terms_forward_cpu).
template <typename scalar_t>
PNR_INLINE void row_terms(const Rows<scalar_t>& x, int64_t i, int64_t D, bool cosine, at::opmath_type<scalar_t>* t,
               at::opmath_type<scalar_t>* n) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *p1 = x.row(0, i), *p2 = x.row(1, i), *f1 = x.row(2, i), *f2 = x.row(3, i);
  // omp simd reductions: vector-wide partial sums per quantity (kLanes-like, at the ISA's width)
  if (!cosine) {
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t d = 0; d < D; ++d) {
      const acc_t u1 = p1[d], u2 = p2[d], v1 = f1[d], v2 = f2[d];
      s0 += (u1 - v1) * (u1 - v1), s1 += (u2 - v2) * (u2 - v2), s2 += (u1 - v2) * (u1 - v2);
      s3 += (u2 - v1) * (u2 - v1);
    }
    t[0] = s0, t[1] = s1, t[2] = s2, t[3] = s3;
    return;
  }
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
  for (int64_t d = 0; d < D; ++d) {
    const acc_t u1 = p1[d], u2 = p2[d], v1 = f1[d], v2 = f2[d];
    s0 += u1 * v1, s1 += u2 * v2, s2 += u1 * v2, s3 += u2 * v1;
    s4 += u1 * u1, s5 += u2 * u2, s6 += v1 * v1, s7 += v2 * v2;
  }
  const std::array<acc_t, 8> s{s0, s1, s2, s3, s4, s5, s6, s7};
  if (!std::all_of(s.begin(), s.end(), [](acc_t v) { return is_finite(v); })) {
    scaled_cosines<scalar_t>(p1, p2, f1, f2, D, t, n);
    return;
  }
  acc_t clamped[4];
  for (int k = 0; k < 4; ++k) {
    n[k] = std::sqrt(s[4 + k]);
    clamped[k] = nan_max(n[k], static_cast<acc_t>(kCosineEps));
  }
  t[0] = s[0] / (clamped[0] * clamped[2]);
  t[1] = s[1] / (clamped[1] * clamped[3]);
  t[2] = s[2] / (clamped[0] * clamped[3]);
  t[3] = s[3] / (clamped[1] * clamped[2]);
}

template <typename scalar_t>
void paired_forward_kernel(const Rows<scalar_t>& x, int64_t B, int64_t D, bool cosine, at::Tensor& terms,
                           at::Tensor& norms) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t* t = terms.data_ptr<acc_t>();
  acc_t* n = cosine ? norms.data_ptr<acc_t>() : nullptr;
  for_each_row(B, 4 * D, [&](int64_t i) PNR_LAMBDA_INLINE {
    row_terms(x, i, D, cosine, t + i * 4, cosine ? n + i * 4 : nullptr);
  });
}

// d p = k * (c_f1 * f1 + c_f2 * f2 + c_p * p) for one row of p1 or p2, written to out or, with
// `accumulate`, added to it. For cosines k = 1 / max(|p|, eps) and the c's carry 1 / |f| and 1 / |p|:
// each product in the parentheses is O(|g|) whatever the rows' scale, so nothing underflows for huge
// rows (k * c_f1 would: 1e-30 * 1e-30 in float32).
template <typename out_t, typename scalar_t, typename acc_t>
PNR_INLINE void write_row_gradient(out_t* out, const scalar_t* p, const scalar_t* f1, const scalar_t* f2, int64_t D,
                                   acc_t k, acc_t c_f1, acc_t c_f2, acc_t c_p, bool accumulate, bool streaming) {
  const auto value = [&](int64_t d) PNR_LAMBDA_INLINE {
    return k * (c_f1 * static_cast<acc_t>(f1[d]) + c_f2 * static_cast<acc_t>(f2[d]) + c_p * static_cast<acc_t>(p[d]));
  };
#if defined(__x86_64__)
  if constexpr (std::is_same_v<out_t, float>) {
    if (streaming) {  // non-temporal stores: no read of the output's lines before they are written
      alignas(64) float chunk[kStreamChunk];
      for (int64_t d0 = 0; d0 < D; d0 += kStreamChunk) {
        const int64_t n = std::min(kStreamChunk, D - d0);
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) chunk[j] = value(d0 + j);
        for (int64_t j = 0; j < n; j += 4) _mm_stream_ps(out + d0 + j, _mm_load_ps(chunk + j));
      }
      return;
    }
  }
#endif
  if (accumulate) {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<out_t>(static_cast<acc_t>(out[d]) + value(d));
  } else {
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<out_t>(value(d));
  }
}

// The gradients of row i of p1 and p2 (either output may be null) from the gradients g[4] of its
// terms t[4] and, for cosines, its norms n[4] (the formulas of paired_terms_backward_cpu), written to
// g1 and g2 or, with `accumulate`, added to them.
template <typename scalar_t, typename out_t>
PNR_INLINE void row_gradients(const Rows<scalar_t>& x, int64_t i, int64_t D, bool cosine, const at::opmath_type<scalar_t>* g,
                   const at::opmath_type<scalar_t>* t, const at::opmath_type<scalar_t>* n, out_t* g1,
                   out_t* g2, bool accumulate = false, bool streaming = false) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(kCosineEps);
  const acc_t g11 = g[0], g22 = g[1], g12 = g[2], g21 = g[3];
  // d p1 = k1 (a11 f1 + a12 f2 + b1 p1);  d p2 = k2 (a21 f1 + a22 f2 + b2 p2)
  acc_t k1 = 1, k2 = 1, a11, a12, b1, a21, a22, b2;
  if (cosine) {
    k1 = 1 / nan_max(n[0], eps), k2 = 1 / nan_max(n[1], eps);
    const acc_t inv_f1 = 1 / nan_max(n[2], eps), inv_f2 = 1 / nan_max(n[3], eps);
    const acc_t unit_p1 = n[0] > 0 ? 1 / n[0] : (n[0] == 0 ? 0 : n[0]);
    const acc_t unit_p2 = n[1] > 0 ? 1 / n[1] : (n[1] == 0 ? 0 : n[1]);
    a11 = g11 * inv_f1, a12 = g12 * inv_f2;
    a21 = g21 * inv_f1, a22 = g22 * inv_f2;
    b1 = -unit_p1 * (g11 * t[0] + g12 * t[2]);
    b2 = -unit_p2 * (g22 * t[1] + g21 * t[3]);
  } else {
    a11 = -2 * g11, a12 = -2 * g12, b1 = 2 * (g11 + g12);
    a21 = -2 * g21, a22 = -2 * g22, b2 = 2 * (g22 + g21);
  }
  if (g1 != nullptr) write_row_gradient(g1, x.row(0, i), x.row(2, i), x.row(3, i), D, k1, a11, a12, b1, accumulate, streaming);
  if (g2 != nullptr) write_row_gradient(g2, x.row(1, i), x.row(2, i), x.row(3, i), D, k2, a21, a22, b2, accumulate, streaming);
}

template <typename scalar_t>
void paired_backward_kernel(const at::Tensor& grad_terms, const at::Tensor& terms, const at::Tensor& norms,
                            const Rows<scalar_t>& x, int64_t B, int64_t D, bool cosine, scalar_t* g1,
                            scalar_t* g2) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* g = grad_terms.const_data_ptr<acc_t>();
  const acc_t* t = terms.const_data_ptr<acc_t>();
  const acc_t* n = cosine ? norms.const_data_ptr<acc_t>() : nullptr;
  const bool streaming = streamed(g1, g2, B, D);
  for_each_row(B, 4 * D, [&](int64_t i) PNR_LAMBDA_INLINE {
    row_gradients(x, i, D, cosine, g + i * 4, t + i * 4, cosine ? n + i * 4 : nullptr,
                  g1 != nullptr ? g1 + i * D : nullptr, g2 != nullptr ? g2 + i * D : nullptr, false, streaming);
  });
}

// The fused loss constant + sum_ik w_k terms[i, k] (accumulated in float64, in row order, so the
// result does not depend on the thread count) and, where asked for, its gradients of p1 and p2
// (written to g1, g2 or, with `accumulate`, added to them): each row is read from memory once, its
// gradients computed while it is in cache.
template <typename scalar_t, typename out_t>
double paired_loss_kernel(const Rows<scalar_t>& x, int64_t B, int64_t D, bool cosine, const double* w,
                          out_t* g1, out_t* g2, bool accumulate = false) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t g[4] = {static_cast<acc_t>(w[0]), static_cast<acc_t>(w[1]), static_cast<acc_t>(w[2]),
                      static_cast<acc_t>(w[3])};
  std::vector<double> row_loss(B);
  const bool streaming = !accumulate && streamed(g1, g2, B, D);
  for_each_row(B, 4 * D, [&](int64_t i) PNR_LAMBDA_INLINE {
    acc_t t[4], n[4];
    row_terms(x, i, D, cosine, t, n);
    double r = 0;
    for (int k = 0; k < 4; ++k) {
      if (w[k] != 0) r += w[k] * static_cast<double>(t[k]);
    }
    row_loss[i] = r;
    if (g1 != nullptr || g2 != nullptr) {
      row_gradients(x, i, D, cosine, g, t, n, g1 != nullptr ? g1 + i * D : nullptr,
                    g2 != nullptr ? g2 + i * D : nullptr, accumulate, streaming);
    }
  });
  double total = 0;
  for (int64_t i = 0; i < B; ++i) total += row_loss[i];
  return total;
}

// The statistics of one column (a[r * sa], b[r * sb]) whose sums overflow, written to stats[k * D]:
// each column is divided by the power of two above its largest magnitude (safe_math.h).
template <typename scalar_t>
void scaled_column_stats(const scalar_t* a, int64_t sa, const scalar_t* b, int64_t sb, int64_t B, int64_t D,
                         at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t largest_a = 0, largest_b = 0;
  for (int64_t r = 0; r < B; ++r) {
    largest_a = nan_max(largest_a, std::abs(static_cast<acc_t>(a[r * sa])));
    largest_b = nan_max(largest_b, std::abs(static_cast<acc_t>(b[r * sb])));
  }
  const int ea = scale_exponent(largest_a), eb = scale_exponent(largest_b);
  const acc_t inv_a = inverse_scale<acc_t>(ea), inv_b = inverse_scale<acc_t>(eb);
  acc_t mean_a = 0, mean_b = 0, sq_a = 0, sq_b = 0, cross = 0;
  for (int64_t r = 0; r < B; ++r) {
    mean_a += static_cast<acc_t>(a[r * sa]) * inv_a, mean_b += static_cast<acc_t>(b[r * sb]) * inv_b;
  }
  mean_a /= B, mean_b /= B;
  for (int64_t r = 0; r < B; ++r) {
    const acc_t xa = static_cast<acc_t>(a[r * sa]) * inv_a - mean_a, xb = static_cast<acc_t>(b[r * sb]) * inv_b - mean_b;
    sq_a += xa * xa, sq_b += xb * xb, cross += xa * xb;
  }
  const acc_t eps = static_cast<acc_t>(kBarlowVarianceEps);
  const acc_t rstd_a = scaled_rstd(sq_a / B, ea, eps), rstd_b = scaled_rstd(sq_b / B, eb, eps);
  stats[0] = std::ldexp(mean_a, ea);
  stats[D] = rstd_a;
  stats[2 * D] = std::ldexp(mean_b, eb);
  stats[3 * D] = rstd_b;
  // diag = (2^(ea+eb) cross / B) rstd_a rstd_b, with the powers of two folded into the rstds
  stats[4 * D] = cross == 0 ? acc_t(0) : cross / B * std::ldexp(rstd_a, ea) * std::ldexp(rstd_b, eb);
}

// Column mean, 1/std (biased variance + eps) of a and b and diag(C), written to stats (5, D): two
// passes (mean, then centred sums) over stripes of kStripe columns, each stripe's sums in local
// arrays so that the row loops vectorise; stripes in parallel.
constexpr int64_t kStripe = 64;

template <typename scalar_t>
void barlow_stats_kernel(const scalar_t* a, int64_t sa, const scalar_t* b, int64_t sb, int64_t B, int64_t D,
                         at::opmath_type<scalar_t>* stats) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stripes = (D + kStripe - 1) / kStripe;
  at::parallel_for(0, stripes, grain(2 * B * kStripe), [&](int64_t s0, int64_t s1) {
    for (int64_t stripe = s0; stripe < s1; ++stripe) {
      const int64_t c0 = stripe * kStripe, w = std::min(kStripe, D - c0);
      acc_t mean_a[kStripe] = {}, mean_b[kStripe] = {}, sq_a[kStripe] = {}, sq_b[kStripe] = {}, cross[kStripe] = {};
      for (int64_t r = 0; r < B; ++r) {
        const scalar_t *ra = a + r * sa + c0, *rb = b + r * sb + c0;
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) mean_a[c] += static_cast<acc_t>(ra[c]), mean_b[c] += static_cast<acc_t>(rb[c]);
      }
      for (int64_t c = 0; c < w; ++c) mean_a[c] /= B, mean_b[c] /= B;
      for (int64_t r = 0; r < B; ++r) {
        const scalar_t *ra = a + r * sa + c0, *rb = b + r * sb + c0;
#pragma omp simd
        for (int64_t c = 0; c < w; ++c) {
          const acc_t xa = static_cast<acc_t>(ra[c]) - mean_a[c], xb = static_cast<acc_t>(rb[c]) - mean_b[c];
          sq_a[c] += xa * xa, sq_b[c] += xb * xb, cross[c] += xa * xb;
        }
      }
      for (int64_t c = 0; c < w; ++c) {
        if (!is_finite(mean_a[c]) || !is_finite(mean_b[c]) || !is_finite(sq_a[c]) || !is_finite(sq_b[c]) ||
            !is_finite(cross[c])) {
          scaled_column_stats(a + c0 + c, sa, b + c0 + c, sb, B, D, stats + c0 + c);
          continue;
        }
        const acc_t rstd_a = 1 / std::sqrt(sq_a[c] / B + static_cast<acc_t>(kBarlowVarianceEps));
        const acc_t rstd_b = 1 / std::sqrt(sq_b[c] / B + static_cast<acc_t>(kBarlowVarianceEps));
        stats[c0 + c] = mean_a[c];
        stats[D + c0 + c] = rstd_a;
        stats[2 * D + c0 + c] = mean_b[c];
        stats[3 * D + c0 + c] = rstd_b;
        stats[4 * D + c0 + c] = cross[c] * rstd_a * rstd_b / B;
      }
    }
  });
}

// (x - mean) * rstd in the compute dtype, contiguous (B, D) (safe_math.h's standardise: finite up to
// the format's largest values).
template <typename scalar_t>
at::Tensor standardised(const at::Tensor& x, const at::opmath_type<scalar_t>* mean,
                        const at::opmath_type<scalar_t>* rstd) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = x.size(0), D = x.size(1), sx = x.stride(0);
  at::Tensor out = pooled_empty({B, D}, compute_scalar_type<scalar_t>());
  const scalar_t* in = x.const_data_ptr<scalar_t>();
  acc_t* o = out.data_ptr<acc_t>();
  at::parallel_for(0, B, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* __restrict row = in + r * sx;
      acc_t* __restrict dst = o + r * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) dst[c] = standardise(static_cast<acc_t>(row[c]), mean[c], rstd[c]);
    }
  });
  return out;
}

template <typename acc_t>
double frobenius_inner(const at::Tensor& x, const at::Tensor& y) {
  const acc_t *px = x.const_data_ptr<acc_t>(), *py = y.const_data_ptr<acc_t>();
  const int64_t n = x.numel();
  return at::parallel_reduce(0, n, grain(1), 0.0, [&](int64_t begin, int64_t end, double partial) {
    const auto s = row_sums<double, 1>(end - begin, [&](int64_t k) {
      return std::array<double, 1>{static_cast<double>(px[begin + k]) * static_cast<double>(py[begin + k])};
    });
    return partial + s[0];
  }, std::plus<double>());
}

// One Barlow term's forward: the loss s (sum_i (d_i - 1)^2 + l sum_{i != j} C_ij^2) of a against b
// and what its gradient needs: stats (5, D), the standardised a^ and b^ (compute dtype, contiguous)
// and the product it was computed from, `saved`: C = a^T b^ / B (D, D) for B > D (the smaller
// matrix), else G_b = b^ b^T (B, B), with sum_ij C_ij^2 = <G_a, G_b> / B^2.
struct BarlowTerm {
  double loss;
  at::Tensor stats, a_std, b_std, saved;
};

template <typename scalar_t>
BarlowTerm barlow_term(const at::Tensor& a_in, const at::Tensor& b_in, double l, double s) {
  using acc_t = at::opmath_type<scalar_t>;
  const at::Tensor a = unit_column_stride(a_in), b = unit_column_stride(b_in);
  const int64_t B = a.size(0), D = a.size(1);
  BarlowTerm term;
  term.stats = at::empty({5, D}, a.options().dtype(compute_scalar_type<scalar_t>()));
  acc_t* st = term.stats.data_ptr<acc_t>();
  barlow_stats_kernel<scalar_t>(a.const_data_ptr<scalar_t>(), a.stride(0), b.const_data_ptr<scalar_t>(),
                                b.stride(0), B, D, st);
  term.a_std = standardised<scalar_t>(a, st, st + D);
  term.b_std = standardised<scalar_t>(b, st + 2 * D, st + 3 * D);
  double all_squares;
  if (B > D) {
    term.saved = at::mm(term.a_std.t(), term.b_std).div_(static_cast<double>(B));
    all_squares = frobenius_inner<acc_t>(term.saved, term.saved);
  } else {
    term.saved = at::mm(term.b_std, term.b_std.t());
    all_squares = frobenius_inner<acc_t>(at::mm(term.a_std, term.a_std.t()), term.saved) / (static_cast<double>(B) * B);
  }
  double on_diagonal = 0, diagonal_squares = 0;
  for (int64_t c = 0; c < D; ++c) {
    const double d = st[4 * D + c];
    on_diagonal += (d - 1) * (d - 1);
    diagonal_squares += d * d;
  }
  term.loss = s * (on_diagonal + l * (all_squares - diagonal_squares));
  return term;
}

// weight * d loss / d a of one Barlow term (docs: pnr_kernels/ops/regularizers.py) into `out` (B, D),
// compute dtype, contiguous:
//   g^  = alpha * b^ + b^ (beta C)^T       alpha = weight s (2 (d - 1) - 2 l d) / B,  beta = weight s 2 l / B
//       = alpha * b^ + beta' G_b a^        (Gram form: beta' = weight s 2 l / B^2)
//   d a = rstd_a (g^ - mean_rows(g^) - a^ mean_rows(g^ a^))
// The correlation form folds alpha into the product's matrix (M = beta C + diag(alpha), one
// product b^ M^T). The row means are summed in chunks of rows fixed by the sizes (not the thread
// count) and merged in order, so they do not depend on the number of threads (at::mm's products may).
template <typename acc_t>
void barlow_gradient(const at::Tensor& a_std, const at::Tensor& b_std, const at::Tensor& stats,
                     const at::Tensor& saved, double weight, double l, double s, at::Tensor& out) {
  const int64_t B = a_std.size(0), D = a_std.size(1);
  const acc_t* st = stats.const_data_ptr<acc_t>();
  const acc_t *rstd_a = st + D, *diag = st + 4 * D;
  std::vector<acc_t> alpha(D);
  for (int64_t c = 0; c < D; ++c) {
    alpha[c] = static_cast<acc_t>(weight * s * (2 * (diag[c] - 1.0) - 2 * l * diag[c]) / B);
  }
  const bool correlation_form = B > D;
  acc_t beta = 0;
  if (correlation_form) {
    at::Tensor m = saved.mul(weight * s * 2 * l / B);
    acc_t* pm = m.data_ptr<acc_t>();
    for (int64_t c = 0; c < D; ++c) pm[c * D + c] += alpha[c];
    at::mm_out(out, b_std, m.t());
  } else {
    beta = static_cast<acc_t>(weight * s * 2 * l / (static_cast<double>(B) * B));
    at::mm_out(out, saved, a_std);
  }
  acc_t* g = out.data_ptr<acc_t>();
  const acc_t *as = a_std.const_data_ptr<acc_t>(), *bs = b_std.const_data_ptr<acc_t>();
  const acc_t* pa = alpha.data();
  const int64_t chunk_rows = std::max<int64_t>(1, kParallelElements / std::max<int64_t>(1, 2 * D));
  const int64_t chunks = (B + chunk_rows - 1) / chunk_rows;
  std::vector<acc_t> partial(chunks * 2 * D, 0);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      acc_t* __restrict sum_g = partial.data() + k * 2 * D;
      acc_t* __restrict sum_ga = sum_g + D;
      for (int64_t r = k * chunk_rows; r < std::min(B, (k + 1) * chunk_rows); ++r) {
        acc_t* __restrict gr = g + r * D;
        const acc_t* __restrict ar = as + r * D;
        if (!correlation_form) {
          const acc_t* __restrict br = bs + r * D;
#pragma omp simd
          for (int64_t c = 0; c < D; ++c) gr[c] = pa[c] * br[c] + beta * gr[c];
        }
#pragma omp simd
        for (int64_t c = 0; c < D; ++c) sum_g[c] += gr[c], sum_ga[c] += gr[c] * ar[c];
      }
    }
  });
  std::vector<acc_t> mean_g(D, 0), mean_ga(D, 0);
  for (int64_t k = 0; k < chunks; ++k) {
    for (int64_t c = 0; c < D; ++c) mean_g[c] += partial[k * 2 * D + c], mean_ga[c] += partial[k * 2 * D + D + c];
  }
  for (int64_t c = 0; c < D; ++c) mean_g[c] /= B, mean_ga[c] /= B;
  const acc_t *m1 = mean_g.data(), *m2 = mean_ga.data();
  at::parallel_for(0, B, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      acc_t* __restrict gr = g + r * D;
      const acc_t* __restrict ar = as + r * D;
#pragma omp simd
      for (int64_t c = 0; c < D; ++c) gr[c] = rstd_a[c] * (gr[c] - m1[c] - ar[c] * m2[c]);
    }
  });
}

template <typename acc_t>
at::Tensor correlation_loss_forward_kernel(const at::Tensor& c, double l, double s) {
  const int64_t D = c.size(0);
  const acc_t* pc = c.const_data_ptr<acc_t>();
  const double total = at::parallel_reduce(0, D, grain(D), 0.0, [&](int64_t begin, int64_t end, double partial) {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t* row = pc + i * D;
      const double squares = row_sums<double, 1>(D, [&](int64_t j) {
        return std::array<double, 1>{static_cast<double>(row[j]) * static_cast<double>(row[j])};
      })[0];
      const double diagonal = row[i];
      partial += (diagonal - 1) * (diagonal - 1) + l * (squares - diagonal * diagonal);
    }
    return partial;
  }, std::plus<double>());
  at::Tensor loss = at::empty({}, c.options());
  loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(s * total);
  return loss;
}

template <typename acc_t>
at::Tensor correlation_loss_backward_kernel(double grad_loss, const at::Tensor& c, double l, double s) {
  const int64_t D = c.size(0);
  at::Tensor out = at::empty({D, D}, c.options());
  const acc_t* pc = c.const_data_ptr<acc_t>();
  acc_t* po = out.data_ptr<acc_t>();
  const acc_t on = static_cast<acc_t>(2 * grad_loss * s), off = static_cast<acc_t>(2 * grad_loss * s * l);
  at::parallel_for(0, D, grain(D), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t j = 0; j < D; ++j) po[i * D + j] = off * pc[i * D + j];
      po[i * D + i] = on * (pc[i * D + i] - 1);
    }
  });
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> paired_terms_forward_cpu(const at::Tensor& p1, const at::Tensor& p2,
                                                            const at::Tensor& f1, const at::Tensor& f2,
                                                            bool cosine) {
  const int64_t B = p1.size(0), D = p1.size(1);
  at::Tensor terms, norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p1.scalar_type(), "paired_terms_forward_cpu", [&] {
    const auto options = p1.options().dtype(compute_scalar_type<scalar_t>());
    terms = at::empty({B, 4}, options);
    norms = at::empty({B, cosine ? 4 : 0}, options);
    paired_forward_kernel<scalar_t>(Rows<scalar_t>(p1, p2, f1, f2), B, D, cosine, terms, norms);
  });
  return {terms, norms};
}

std::vector<at::Tensor> paired_terms_backward_cpu(const at::Tensor& grad_terms, const at::Tensor& terms,
                                                  const at::Tensor& norms, const at::Tensor& p1,
                                                  const at::Tensor& p2, const at::Tensor& f1,
                                                  const at::Tensor& f2, bool cosine, bool p1_needs_grad,
                                                  bool p2_needs_grad) {
  const int64_t B = p1.size(0), D = p1.size(1);
  std::vector<at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p1.scalar_type(), "paired_terms_backward_cpu", [&] {
    at::Tensor g1, g2;
    if (p1_needs_grad) g1 = pooled_empty({B, D}, p1.scalar_type());
    if (p2_needs_grad) g2 = pooled_empty({B, D}, p2.scalar_type());
    paired_backward_kernel<scalar_t>(grad_terms.contiguous(), terms.contiguous(), norms.contiguous(),
                                     Rows<scalar_t>(p1, p2, f1, f2), B, D, cosine,
                                     p1_needs_grad ? g1.data_ptr<scalar_t>() : nullptr,
                                     p2_needs_grad ? g2.data_ptr<scalar_t>() : nullptr);
    if (p1_needs_grad) grads.push_back(g1);
    if (p2_needs_grad) grads.push_back(g2);
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> paired_loss_forward_cpu(const at::Tensor& p1, const at::Tensor& p2,
                                                                       const at::Tensor& f1, const at::Tensor& f2,
                                                                       bool cosine, const std::array<double, 4>& weights,
                                                                       double constant, bool p1_needs_grad,
                                                                       bool p2_needs_grad) {
  const int64_t B = p1.size(0), D = p1.size(1);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p1.scalar_type(), "paired_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor g1 = pooled_empty({p1_needs_grad ? B : 0, D}, p1.scalar_type());
    at::Tensor g2 = pooled_empty({p2_needs_grad ? B : 0, D}, p2.scalar_type());
    const double total = paired_loss_kernel<scalar_t>(Rows<scalar_t>(p1, p2, f1, f2), B, D, cosine, weights.data(),
                                                      p1_needs_grad ? g1.data_ptr<scalar_t>() : nullptr,
                                                      p2_needs_grad ? g2.data_ptr<scalar_t>() : nullptr);
    at::Tensor loss = at::empty({}, p1.options().dtype(compute_scalar_type<scalar_t>()));
    loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(constant + total);
    out = {loss, g1, g2};
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_gram_forward_cpu(const at::Tensor& a, const at::Tensor& b,
                                                                       double off_diagonal_weight, double scale) {
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "barlow_gram_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const BarlowTerm term = barlow_term<scalar_t>(a, b, off_diagonal_weight, scale);
    at::Tensor loss = at::empty({}, term.stats.options());
    loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(term.loss);
    out = {loss, term.stats, term.saved};
  });
  return out;
}

at::Tensor barlow_gram_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& stats, const at::Tensor& gram_b,
                                    double off_diagonal_weight, double scale) {
  at::Tensor out;
  const double g = grad_loss.item().toDouble();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "barlow_gram_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const at::Tensor st = stats.contiguous();
    const acc_t* pst = st.const_data_ptr<acc_t>();
    const int64_t D = a.size(1);
    at::Tensor grad = pooled_empty(a.sizes(), st.scalar_type());
    barlow_gradient<acc_t>(standardised<scalar_t>(unit_column_stride(a), pst, pst + D),
                           standardised<scalar_t>(unit_column_stride(b), pst + 2 * D, pst + 3 * D), st,
                           gram_b.contiguous(), g, off_diagonal_weight, scale, grad);
    out = grad.to(a.scalar_type());  // a copy for half types only
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> barlow_pnr_loss_forward_cpu(
    const at::Tensor& p1, const at::Tensor& p2, const at::Tensor& f1, const at::Tensor& f2, double distill_weight,
    double negative_weight, double off_diagonal_weight, double scale, bool p1_needs_grad, bool p2_needs_grad) {
  const int64_t B = p1.size(0), D = p1.size(1);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p1.scalar_type(), "barlow_pnr_loss_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto options = p1.options().dtype(compute_scalar_type<scalar_t>());
    at::Tensor grads[2] = {pooled_empty({p1_needs_grad ? B : 0, D}, compute_scalar_type<scalar_t>()),
                           pooled_empty({p2_needs_grad ? B : 0, D}, compute_scalar_type<scalar_t>())};
    const at::Tensor* views[2][2] = {{&p1, &f1}, {&p2, &f2}};
    const bool needs[2] = {p1_needs_grad, p2_needs_grad};
    double total = 0;
    for (int k = 0; k < 2; ++k) {  // w_d (barlow(p1, f1) + barlow(p2, f2)) / 2
      const BarlowTerm term = barlow_term<scalar_t>(*views[k][0], *views[k][1], off_diagonal_weight, scale);
      total += distill_weight / 2 * term.loss;
      if (needs[k]) {
        barlow_gradient<acc_t>(term.a_std, term.b_std, term.stats, term.saved, distill_weight / 2,
                               off_diagonal_weight, scale, grads[k]);
      }
    }
    // - w_n (neg(p1, f2) + neg(p2, f1)) / 2 with neg = - mean cos: the cross pairs' cosines, weight
    // w_n / (2 B) each, their gradients added to the Barlow terms'
    const double weights[4] = {0, 0, negative_weight / (2.0 * B), negative_weight / (2.0 * B)};
    total += paired_loss_kernel<scalar_t, acc_t>(Rows<scalar_t>(p1, p2, f1, f2), B, D, true, weights,
                                                 p1_needs_grad ? grads[0].data_ptr<acc_t>() : nullptr,
                                                 p2_needs_grad ? grads[1].data_ptr<acc_t>() : nullptr, true);
    at::Tensor loss = at::empty({}, options);
    loss.data_ptr<acc_t>()[0] = static_cast<acc_t>(total);
    out = {loss, grads[0].to(p1.scalar_type()), grads[1].to(p2.scalar_type())};  // copies for half types only
  });
  return out;
}

at::Tensor barlow_correlation_loss_forward_cpu(const at::Tensor& c, double off_diagonal_weight, double scale) {
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "barlow_correlation_loss_forward_cpu", [&] {
    out = correlation_loss_forward_kernel<scalar_t>(c.contiguous(), off_diagonal_weight, scale);
  });
  return out;
}

at::Tensor barlow_correlation_loss_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& c,
                                                double off_diagonal_weight, double scale) {
  at::Tensor out;
  const double g = grad_loss.item().toDouble();
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "barlow_correlation_loss_backward_cpu", [&] {
    out = correlation_loss_backward_kernel<scalar_t>(g, c.contiguous(), off_diagonal_weight, scale);
  });
  return out;
}

}  // namespace pnr_kernels
