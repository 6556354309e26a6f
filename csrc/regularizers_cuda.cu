// CUDA kernels of the non-contrastive PNR regularisers (contract: pnr_kernels/ops/regularizers.py;
// launchers declared in regularizers_cuda.h). Accumulation is float32 for every input dtype.
//
// Paired terms: one block per row, threads stride over the columns, block reduction of the sums.
// Barlow: column kernels (a block of kColumns columns x kRowLanes row lanes, reduced over the lanes)
// for the statistics and the gradient's column sums, elementwise kernels for the standardisation.
// Barlow over a given C: grid-stride loss partial sums per block, elementwise d C.
// Huge magnitudes and non-finite values: as the CPU kernels (regularizers_cpu.cpp), a row (cosine)
// or a block of columns (Barlow statistics) whose sums overflow is summed again divided by a power
// of two near its largest magnitude (safe_math.h); every max propagates NaN.
#include "cuda_common.cuh"
#include "regularizers_cuda.h"
#include "safe_math.h"

namespace pnr_kernels {
namespace {

constexpr float kCosineEps = 1e-8f;
constexpr float kBarlowVarianceEps = 1e-5f;
constexpr int kRowThreads = 256;        // threads of the per-row kernels
constexpr int kColumns = 32;            // columns per block of the column kernels
constexpr int kRowLanes = 8;            // row lanes per block of the column kernels
constexpr int kElementwiseThreads = 256;
static_assert(kElementwiseThreads == kRowThreads, "the loss over C reduces elementwise blocks with block_reduce");

template <typename T>
struct Matrix {
  const T* data;
  int64_t row_stride, col_stride;
  __device__ __forceinline__ float at(int64_t r, int64_t c) const {
    return to_float(data[r * row_stride + c * col_stride]);
  }
};

template <typename T>
Matrix<T> matrix(const StridedMatrix& m) {
  return {static_cast<const T*>(m.data), m.row_stride, m.col_stride};
}

struct Sum {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  static constexpr float kIdentity = 0.f;
};
struct NanMax {  // of magnitudes (>= 0): 0 is its identity
  __device__ __forceinline__ float operator()(float a, float b) const { return nan_max(a, b); }
  static constexpr float kIdentity = 0.f;
};

// Reduces `values[Q]` over the block (blockDim.x <= kRowThreads threads, a multiple of 32) with
// Op; the result is valid in every thread. Ends synchronised, so that it can be called again.
template <typename Op = Sum, int Q>
__device__ void block_reduce(float (&values)[Q], Op op = Op{}) {
  __shared__ float partial[Q][kRowThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int q = 0; q < Q; ++q) {
    for (int offset = 16; offset > 0; offset /= 2) values[q] = op(values[q], __shfl_xor_sync(0xffffffffu, values[q], offset));
    if (lane == 0) partial[q][warp] = values[q];
  }
  __syncthreads();
  for (int q = 0; q < Q; ++q) {
    float total = Op::kIdentity;
    for (int w = 0; w < warps; ++w) total = op(total, partial[q][w]);
    values[q] = total;
  }
  __syncthreads();
}

template <int Q>
__device__ bool all_finite(const float (&values)[Q]) {
  bool finite = true;
  for (int q = 0; q < Q; ++q) finite = finite && is_finite(values[q]);
  return finite;
}

template <typename T>
__global__ void paired_forward_kernel(Matrix<T> p1, Matrix<T> p2, Matrix<T> f1, Matrix<T> f2, int64_t cols,
                                      bool cosine, float* terms, float* norms) {
  const int64_t row = blockIdx.x;
  float s[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float u1 = p1.at(row, c), u2 = p2.at(row, c), v1 = f1.at(row, c), v2 = f2.at(row, c);
    if (cosine) {
      s[0] += u1 * v1, s[1] += u2 * v2, s[2] += u1 * v2, s[3] += u2 * v1;
      s[4] += u1 * u1, s[5] += u2 * u2, s[6] += v1 * v1, s[7] += v2 * v2;
    } else {
      s[0] += (u1 - v1) * (u1 - v1), s[1] += (u2 - v2) * (u2 - v2);
      s[2] += (u1 - v2) * (u1 - v2), s[3] += (u2 - v1) * (u2 - v1);
    }
  }
  block_reduce(s);
  // The sums are the same in every thread: the branch is uniform over the block.
  if (cosine && !all_finite(s)) {  // overflow (or non-finite input): sum again at unit scale
    float largest[4] = {0.f, 0.f, 0.f, 0.f};
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      largest[0] = nan_max(largest[0], fabsf(p1.at(row, c))), largest[1] = nan_max(largest[1], fabsf(p2.at(row, c)));
      largest[2] = nan_max(largest[2], fabsf(f1.at(row, c))), largest[3] = nan_max(largest[3], fabsf(f2.at(row, c)));
    }
    block_reduce<NanMax>(largest);
    int e[4];
    float inv[4];
    for (int k = 0; k < 4; ++k) e[k] = scale_exponent(largest[k]), inv[k] = inverse_scale<float>(e[k]);
    for (float& v : s) v = 0.f;
    for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      const float u1 = p1.at(row, c) * inv[0], u2 = p2.at(row, c) * inv[1];
      const float v1 = f1.at(row, c) * inv[2], v2 = f2.at(row, c) * inv[3];
      s[0] += u1 * v1, s[1] += u2 * v2, s[2] += u1 * v2, s[3] += u2 * v1;
      s[4] += u1 * u1, s[5] += u2 * u2, s[6] += v1 * v1, s[7] += v2 * v2;
    }
    block_reduce(s);
    if (threadIdx.x != 0) return;
    float r[4];
    for (int k = 0; k < 4; ++k) {
      const float scaled_norm = sqrtf(s[4 + k]);
      norms[row * 4 + k] = ldexpf(scaled_norm, e[k]);
      r[k] = scaled_inverse_clamped_norm(scaled_norm, e[k], kCosineEps);
    }
    terms[row * 4 + 0] = s[0] * r[0] * r[2], terms[row * 4 + 1] = s[1] * r[1] * r[3];
    terms[row * 4 + 2] = s[2] * r[0] * r[3], terms[row * 4 + 3] = s[3] * r[1] * r[2];
    return;
  }
  if (threadIdx.x != 0) return;
  if (cosine) {
    float clamped[4];
    for (int k = 0; k < 4; ++k) {
      const float norm = sqrtf(s[4 + k]);
      norms[row * 4 + k] = norm;
      clamped[k] = nan_max(norm, kCosineEps);
    }
    s[0] /= clamped[0] * clamped[2], s[1] /= clamped[1] * clamped[3];
    s[2] /= clamped[0] * clamped[3], s[3] /= clamped[1] * clamped[2];
  }
  for (int k = 0; k < 4; ++k) terms[row * 4 + k] = s[k];
}

template <typename T>
__global__ void paired_backward_kernel(const float* grad_terms, const float* terms, const float* norms,
                                       Matrix<T> p1, Matrix<T> p2, Matrix<T> f1, Matrix<T> f2, int64_t cols,
                                       bool cosine, T* g1, T* g2) {
  const int64_t row = blockIdx.x;
  const float* g = grad_terms + row * 4;
  // d p1 = k1 (a11 f1 + a12 f2 + b1 p1);  d p2 = k2 (a21 f1 + a22 f2 + b2 p2). For cosines k = 1 /
  // max(|p|, eps) stays outside: every product inside is O(|g|) whatever the rows' scale, so nothing
  // underflows for huge rows (as regularizers_cpu.cpp's write_row_gradient).
  float k1 = 1.f, k2 = 1.f, a11, a12, b1, a21, a22, b2;
  if (cosine) {
    const float* n = norms + row * 4;
    const float* t = terms + row * 4;
    k1 = 1.f / nan_max(n[0], kCosineEps), k2 = 1.f / nan_max(n[1], kCosineEps);
    const float inv_f1 = 1.f / nan_max(n[2], kCosineEps), inv_f2 = 1.f / nan_max(n[3], kCosineEps);
    const float unit_p1 = n[0] > 0.f ? 1.f / n[0] : (n[0] == 0.f ? 0.f : n[0]);  // NaN stays NaN
    const float unit_p2 = n[1] > 0.f ? 1.f / n[1] : (n[1] == 0.f ? 0.f : n[1]);
    a11 = g[0] * inv_f1, a12 = g[2] * inv_f2;
    a21 = g[3] * inv_f1, a22 = g[1] * inv_f2;
    b1 = -unit_p1 * (g[0] * t[0] + g[2] * t[2]);
    b2 = -unit_p2 * (g[1] * t[1] + g[3] * t[3]);
  } else {
    a11 = -2.f * g[0], a12 = -2.f * g[2], b1 = 2.f * (g[0] + g[2]);
    a21 = -2.f * g[3], a22 = -2.f * g[1], b2 = 2.f * (g[1] + g[3]);
  }
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v1 = f1.at(row, c), v2 = f2.at(row, c);
    if (g1 != nullptr) g1[row * cols + c] = from_float<T>(k1 * (a11 * v1 + a12 * v2 + b1 * p1.at(row, c)));
    if (g2 != nullptr) g2[row * cols + c] = from_float<T>(k2 * (a21 * v1 + a22 * v2 + b2 * p2.at(row, c)));
  }
}

// Reduces `values[Q]` over the kRowLanes row lanes (threadIdx.y) of each column (threadIdx.x) with
// Op; every lane gets the result. Ends synchronised.
template <typename Op = Sum, int Q>
__device__ void lane_reduce(float (&values)[Q], Op op = Op{}) {
  __shared__ float partial[Q][kRowLanes][kColumns];
  for (int q = 0; q < Q; ++q) partial[q][threadIdx.y][threadIdx.x] = values[q];
  __syncthreads();
  for (int q = 0; q < Q; ++q) {
    float total = Op::kIdentity;
    for (int y = 0; y < kRowLanes; ++y) total = op(total, partial[q][y][threadIdx.x]);
    values[q] = total;
  }
  __syncthreads();
}

template <typename T>
__global__ void barlow_stats_kernel(Matrix<T> a, Matrix<T> b, int64_t rows, int64_t cols, float* stats) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const bool valid = c < cols;
  float sums[2] = {0.f, 0.f};
  for (int64_t r = threadIdx.y; valid && r < rows; r += kRowLanes) sums[0] += a.at(r, c), sums[1] += b.at(r, c);
  lane_reduce(sums);
  const float mean_a = sums[0] / rows, mean_b = sums[1] / rows;
  float centred[3] = {0.f, 0.f, 0.f};  // sum (a - mean)^2, sum (b - mean)^2, sum (a - mean)(b - mean)
  for (int64_t r = threadIdx.y; valid && r < rows; r += kRowLanes) {
    const float xa = a.at(r, c) - mean_a, xb = b.at(r, c) - mean_b;
    centred[0] += xa * xa, centred[1] += xb * xb, centred[2] += xa * xb;
  }
  lane_reduce(centred);
  const bool overflow = valid && !(is_finite(mean_a) && is_finite(mean_b) && all_finite(centred));
  // Overflow (or non-finite input) in any column of the block: the whole block sums again at unit
  // scale (lane_reduce synchronises the block), and the columns that overflowed use the result.
  if (__syncthreads_or(overflow)) {
    float largest[2] = {0.f, 0.f};
    for (int64_t r = threadIdx.y; valid && r < rows; r += kRowLanes) {
      largest[0] = nan_max(largest[0], fabsf(a.at(r, c))), largest[1] = nan_max(largest[1], fabsf(b.at(r, c)));
    }
    lane_reduce<NanMax>(largest);
    const int ea = scale_exponent(largest[0]), eb = scale_exponent(largest[1]);
    const float inv_a = inverse_scale<float>(ea), inv_b = inverse_scale<float>(eb);
    float scaled[2] = {0.f, 0.f};
    for (int64_t r = threadIdx.y; valid && r < rows; r += kRowLanes) {
      scaled[0] += a.at(r, c) * inv_a, scaled[1] += b.at(r, c) * inv_b;
    }
    lane_reduce(scaled);
    const float scaled_mean_a = scaled[0] / rows, scaled_mean_b = scaled[1] / rows;
    float spread[3] = {0.f, 0.f, 0.f};
    for (int64_t r = threadIdx.y; valid && r < rows; r += kRowLanes) {
      const float xa = a.at(r, c) * inv_a - scaled_mean_a, xb = b.at(r, c) * inv_b - scaled_mean_b;
      spread[0] += xa * xa, spread[1] += xb * xb, spread[2] += xa * xb;
    }
    lane_reduce(spread);
    if (overflow && threadIdx.y == 0) {
      const float rstd_a = scaled_rstd(spread[0] / rows, ea, kBarlowVarianceEps);
      const float rstd_b = scaled_rstd(spread[1] / rows, eb, kBarlowVarianceEps);
      stats[c] = ldexpf(scaled_mean_a, ea);
      stats[cols + c] = rstd_a;
      stats[2 * cols + c] = ldexpf(scaled_mean_b, eb);
      stats[3 * cols + c] = rstd_b;
      // diag = (2^(ea+eb) spread / rows) rstd_a rstd_b, the powers of two folded into the rstds
      stats[4 * cols + c] = spread[2] == 0.f ? 0.f : spread[2] / rows * ldexpf(rstd_a, ea) * ldexpf(rstd_b, eb);
    }
    if (overflow) return;
  }
  if (!valid || threadIdx.y != 0) return;
  const float rstd_a = 1.f / sqrtf(centred[0] / rows + kBarlowVarianceEps);
  const float rstd_b = 1.f / sqrtf(centred[1] / rows + kBarlowVarianceEps);
  stats[c] = mean_a;
  stats[cols + c] = rstd_a;
  stats[2 * cols + c] = mean_b;
  stats[3 * cols + c] = rstd_b;
  stats[4 * cols + c] = centred[2] * rstd_a * rstd_b / rows;
}

template <typename T>
__global__ void standardise_kernel(Matrix<T> x, int64_t rows, int64_t cols, const float* mean, const float* rstd,
                                   float* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / cols, c = i % cols;
    out[i] = standardise(x.at(r, c), mean[c], rstd[c]);  // safe_math.h: no overflow
  }
}

template <typename T>
__global__ void barlow_grad_kernel(const float* grad_loss, Matrix<T> b, int64_t rows, int64_t cols,
                                   const float* stats, const float* a_std, float* grad_std, float* col_sums,
                                   float off_diagonal_weight, float scale) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColumns + threadIdx.x;
  const bool valid = c < cols;
  const float g = *grad_loss * scale;
  const float beta = g * 2.f * off_diagonal_weight / (static_cast<float>(rows) * rows);
  float sums[2] = {0.f, 0.f};
  if (valid) {
    const float diag = stats[4 * cols + c], mean_b = stats[2 * cols + c], rstd_b = stats[3 * cols + c];
    const float alpha = g * (2.f * (diag - 1.f) - 2.f * off_diagonal_weight * diag) / rows;
    for (int64_t r = threadIdx.y; r < rows; r += kRowLanes) {
      const int64_t i = r * cols + c;
      const float value = alpha * standardise(b.at(r, c), mean_b, rstd_b) + beta * grad_std[i];
      grad_std[i] = value;
      sums[0] += value, sums[1] += value * a_std[i];
    }
  }
  lane_reduce(sums);
  if (!valid || threadIdx.y != 0) return;
  col_sums[c] = sums[0];
  col_sums[cols + c] = sums[1];
}

template <typename T>
__global__ void barlow_finish_kernel(const float* a_std, const float* stats, const float* grad_std,
                                     const float* col_sums, int64_t rows, int64_t cols, T* out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < rows * cols;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % cols;
    const float mean_g = col_sums[c] / rows, mean_ga = col_sums[cols + c] / rows;
    out[i] = from_float<T>(stats[cols + c] * (grad_std[i] - mean_g - a_std[i] * mean_ga));
  }
}

__global__ void correlation_loss_kernel(const float* c, int64_t dim, float off_diagonal_weight, float* partial) {
  float value[1] = {0.f};
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < dim * dim;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = c[i];
    value[0] += i / dim == i % dim ? (x - 1.f) * (x - 1.f) : off_diagonal_weight * x * x;
  }
  block_reduce(value);
  if (threadIdx.x == 0) partial[blockIdx.x] = value[0];
}

__global__ void correlation_grad_kernel(const float* grad_loss, const float* c, int64_t dim,
                                        float off_diagonal_weight, float scale, float* out) {
  const float g = 2.f * *grad_loss * scale;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < dim * dim;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = i / dim == i % dim ? g * (c[i] - 1.f) : g * off_diagonal_weight * c[i];
  }
}

unsigned elementwise_blocks(int64_t n) {
  const int64_t blocks = ceil_div(n, kElementwiseThreads);
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

unsigned column_blocks(int64_t cols) { return static_cast<unsigned>(ceil_div(cols, kColumns)); }

}  // namespace

const char* launch_paired_forward(StridedMatrix p1, StridedMatrix p2, StridedMatrix f1, StridedMatrix f2,
                                  DType dtype, bool cosine, float* terms, float* norms, void* stream) {
  if (p1.rows == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    paired_forward_kernel<T><<<static_cast<unsigned>(p1.rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        matrix<T>(p1), matrix<T>(p2), matrix<T>(f1), matrix<T>(f2), p1.cols, cosine, terms, norms);
    return launch_error();
  });
}

const char* launch_paired_backward(const float* grad_terms, const float* terms, const float* norms,
                                   StridedMatrix p1, StridedMatrix p2, StridedMatrix f1, StridedMatrix f2,
                                   DType dtype, bool cosine, void* g1, void* g2, void* stream) {
  if (p1.rows == 0) return nullptr;
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    paired_backward_kernel<T><<<static_cast<unsigned>(p1.rows), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
        grad_terms, terms, norms, matrix<T>(p1), matrix<T>(p2), matrix<T>(f1), matrix<T>(f2), p1.cols, cosine,
        static_cast<T*>(g1), static_cast<T*>(g2));
    return launch_error();
  });
}

const char* launch_barlow_stats(StridedMatrix a, StridedMatrix b, DType dtype, float* stats, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    barlow_stats_kernel<T><<<column_blocks(a.cols), dim3(kColumns, kRowLanes), 0, static_cast<cudaStream_t>(stream)>>>(
        matrix<T>(a), matrix<T>(b), a.rows, a.cols, stats);
    return launch_error();
  });
}

const char* launch_standardise(StridedMatrix x, DType dtype, const float* mean, const float* rstd, float* out,
                               void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    standardise_kernel<T><<<elementwise_blocks(x.rows * x.cols), kElementwiseThreads, 0,
                            static_cast<cudaStream_t>(stream)>>>(matrix<T>(x), x.rows, x.cols, mean, rstd, out);
    return launch_error();
  });
}

const char* launch_barlow_grad(const float* grad_loss, StridedMatrix b, DType dtype, const float* stats,
                               const float* a_std, float* grad_std, float* col_sums, double off_diagonal_weight,
                               double scale, void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    barlow_grad_kernel<T><<<column_blocks(b.cols), dim3(kColumns, kRowLanes), 0, static_cast<cudaStream_t>(stream)>>>(
        grad_loss, matrix<T>(b), b.rows, b.cols, stats, a_std, grad_std, col_sums,
        static_cast<float>(off_diagonal_weight), static_cast<float>(scale));
    return launch_error();
  });
}

const char* launch_barlow_finish(const float* a_std, const float* stats, const float* grad_std,
                                 const float* col_sums, int64_t rows, int64_t cols, DType dtype, void* out,
                                 void* stream) {
  return dispatch_dtype(dtype, [&](auto tag) -> const char* {
    using T = decltype(tag);
    barlow_finish_kernel<T><<<elementwise_blocks(rows * cols), kElementwiseThreads, 0,
                              static_cast<cudaStream_t>(stream)>>>(a_std, stats, grad_std, col_sums, rows, cols,
                                                                   static_cast<T*>(out));
    return launch_error();
  });
}

int64_t correlation_loss_blocks(int64_t dim) { return elementwise_blocks(dim * dim); }

const char* launch_correlation_loss(const float* c, int64_t dim, double off_diagonal_weight, float* partial,
                                    void* stream) {
  correlation_loss_kernel<<<elementwise_blocks(dim * dim), kRowThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      c, dim, static_cast<float>(off_diagonal_weight), partial);
  return launch_error();
}

const char* launch_correlation_grad(const float* grad_loss, const float* c, int64_t dim, double off_diagonal_weight,
                                    double scale, float* out, void* stream) {
  correlation_grad_kernel<<<elementwise_blocks(dim * dim), kElementwiseThreads, 0,
                            static_cast<cudaStream_t>(stream)>>>(grad_loss, c, dim,
                                                                 static_cast<float>(off_diagonal_weight),
                                                                 static_cast<float>(scale), out);
  return launch_error();
}

}  // namespace pnr_kernels
