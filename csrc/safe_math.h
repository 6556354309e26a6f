// Scalar helpers shared by the CPU kernels (g++) and the CUDA kernels (nvcc, host and device):
// a NaN-propagating max and the pieces of overflow-safe norms and variances. Plain C++ (<cmath>)
// only, so that both compilers take this header.
//
// Overflow-safe scheme: values of magnitude up to m are divided by s = 2^e with 2^(e-1) <= m < 2^e
// (a power of two: the division is exact), summed at unit scale, and the result is assembled from
// the scaled sum and e without forming s^2 (which overflows float32 from m ~ 1.8e19 on).
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define PNR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PNR_HOST_DEVICE inline
#endif

namespace pnr_kernels {

// max(a, b), NaN if either is NaN (fmaxf, std::fmax and std::max drop a NaN argument).
template <typename T>
PNR_HOST_DEVICE T nan_max(T a, T b) {
  return (a != a || a > b) ? a : b;
}

template <typename T>
PNR_HOST_DEVICE bool is_finite(T x) {
  return std::isfinite(x);
}

// e with 2^(e-1) <= max_abs < 2^e for a finite max_abs > 0; 0 (no scaling) for 0, Inf or NaN, so
// that non-finite values propagate unchanged.
template <typename T>
PNR_HOST_DEVICE int scale_exponent(T max_abs) {
  if (!(max_abs > T(0)) || !is_finite(max_abs)) return 0;
  int e = 0;
  (void)std::frexp(max_abs, &e);
  return e;
}

// 2^-e, the exact factor that brings values below 2^e under 1 (a subnormal for e up to the
// format's, still exact).
template <typename T>
PNR_HOST_DEVICE T inverse_scale(int e) {
  return std::ldexp(T(1), -e);
}

// x / max(|x|, eps) = (x / 2^e) * r for a row x of norm 2^e * scaled_norm: r = 2^e / max(2^e
// scaled_norm, eps), without forming 2^e * scaled_norm when it overflows (then r = 1/scaled_norm).
template <typename T>
PNR_HOST_DEVICE T scaled_inverse_clamped_norm(T scaled_norm, int e, T eps) {
  return std::ldexp(scaled_norm, e) >= eps ? T(1) / scaled_norm : std::ldexp(T(1), e) / eps;
}

// 1 / sqrt(var + eps) for var = 2^(2e) * scaled_var, without forming var: 2^-e / sqrt(scaled_var +
// eps 2^-2e). A zero variance (a constant column) gives 1 / sqrt(eps), whatever e.
template <typename T>
PNR_HOST_DEVICE T scaled_rstd(T scaled_var, int e, T eps) {
  if (scaled_var == T(0)) return T(1) / std::sqrt(eps);
  return std::ldexp(T(1) / std::sqrt(scaled_var + std::ldexp(eps, -2 * e)), -e);
}

// (x - mean) * rstd without forming x - mean, which overflows when x and mean, of opposite signs,
// are near the format's largest value: (x/2 - mean/2) * (2 rstd). Halving and doubling are exact,
// so this rounds exactly as the plain formula wherever x/2 and mean/2 are normal numbers.
template <typename T>
PNR_HOST_DEVICE T standardise(T x, T mean, T rstd) {
  return (x * T(0.5) - mean * T(0.5)) * (rstd * T(2));
}

}  // namespace pnr_kernels
